// In-pass attention with its statistics, one coarse task per (batch row, KV head, query chunk).
//
// The same computation as kvpolicy.integrations.hf.in_pass.attend (its reference, tested equal):
// scores of a chunk's queries (a GQA group stacked) over the keys they may see, softmax, the
// output from the probabilities, and, from the same probabilities, the group-mean rows of the
// newest `rows` queries and the attention each token received. Each task runs its matmuls and
// softmax single-threaded, so the threads split the work the way a fused attention kernel does
// instead of splitting every small operation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace {

// Keys per segment of `attend_split`, at least.
constexpr int64_t kMinSegment = 256;

// Runs fn(task) for task in [0, count), in parallel, each worker with the caller's thread-local
// state (inference / grad mode: cached keys are often inference tensors).
template <typename Fn>
void parallel_tasks(int64_t count, const Fn& fn) {
  const at::ThreadLocalState caller;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t task = begin; task < end; ++task) fn(task);
  });
}

// Runs fn(b, head, segment, k0, k1) for every non-empty segment [k0, k1) of `length` keys of every
// (row, KV head), in parallel.
template <typename Fn>
void for_each_segment(int64_t B, int64_t KV, int64_t segments, int64_t length, int64_t T, const Fn& fn) {
  parallel_tasks(B * KV * segments, [&](int64_t task) {
    const int64_t segment = task % segments, head = (task / segments) % KV, b = task / (segments * KV);
    const int64_t k0 = segment * length, k1 = std::min(T, k0 + length);
    if (k0 < k1) fn(b, head, segment, k0, k1);
  });
}

// Few queries (a decoding step, or TOVA's one row per chunk): fewer (row, KV head) tasks than
// threads, so the keys are split instead. The scores of every key segment are computed in
// parallel into one buffer, softmax runs over whole rows, and each segment's share of the
// output is computed in parallel and summed. q [B, KV, G, Q, D] (scaled unless soft-capped);
// fills out [B, Q, H, D], row_out [B, KV, rows, T] and, if columns, col_out [B*KV, T].
void attend_split(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& bias,
                  at::Tensor& out, at::Tensor& row_out, at::Tensor& col_out, double scaling, double softcap,
                  bool columns, int64_t segments) {
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2), Q = q.size(3), D = q.size(4);
  const int64_t T = keys.size(2), before = T - Q, rows = row_out.size(2);
  const int64_t length = (T + segments - 1) / segments;
  at::Tensor scores = at::empty({B, KV, G * Q, T}, keys.options());
  at::Tensor partial = at::zeros({B, KV, segments, G * Q, D}, keys.options());
  float* data = scores.data_ptr<float>();
  for_each_segment(B, KV, segments, length, T, [&](int64_t b, int64_t head, int64_t, int64_t k0, int64_t k1) {
    at::Tensor part = scores[b][head].narrow(1, k0, k1 - k0);
    part.copy_(at::mm(q[b][head].reshape({G * Q, D}), keys[b][head].narrow(0, k0, k1 - k0).t()));
    if (softcap > 0) part.mul_(scaling / softcap).tanh_().mul_(softcap);
    if (bias.defined() && k0 < before) {
      part.narrow(1, 0, std::min(k1, before) - k0).add_(bias[b][head].narrow(0, k0, std::min(k1, before) - k0));
    }
    const float hidden = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < G * Q; ++r) {  // query r % Q sees keys up to before + r % Q
      float* row = data + ((b * KV + head) * G * Q + r) * T;
      const int64_t from = std::max(k0, before + r % Q + 1);
      if (from < k1) std::fill(row + from, row + k1, hidden);
    }
  });
  at::Tensor probs = at::softmax(scores, -1);
  for_each_segment(B, KV, segments, length, T, [&](int64_t b, int64_t head, int64_t segment, int64_t k0, int64_t k1) {
    partial[b][head][segment].copy_(
        at::mm(probs[b][head].narrow(1, k0, k1 - k0), values[b][head].narrow(0, k0, k1 - k0)));
  });
  out.view({B, Q, KV, G, D}).permute({0, 2, 3, 1, 4}).copy_(partial.sum(2).view({B, KV, G, Q, D}));
  at::Tensor grouped = probs.view({B, KV, G, Q, T});
  if (rows) at::mean_out(row_out, grouped.narrow(3, Q - rows, rows), {2});
  if (columns) col_out.view({B, KV, T}).copy_(grouped.sum({2, 3}).div_(G));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attend(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const c10::optional<at::Tensor>& valid, double scaling, double softcap, int64_t rows, bool columns,
    int64_t step) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "attend: 4-d query, key and value expected");
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat && value.scalar_type() == at::kFloat,
              "attend: float32 query, key and value expected");
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2), D = query.size(3);
  const int64_t KV = key.size(1), T = key.size(2);
  TORCH_CHECK(KV > 0 && H % KV == 0, "attend: ", H, " query heads are not a multiple of ", KV, " KV heads");
  TORCH_CHECK(T >= Q && step > 0, "attend: ", Q, " queries over ", T, " tokens, step ", step);
  const int64_t G = H / KV, before = T - Q;
  rows = std::min(rows, Q);
  const bool capped = softcap > 0;
  const at::Tensor q = (capped ? query.contiguous() : query * scaling).view({B, KV, G, Q, D});
  // Each (row, KV head) is read as its own [tokens, D] matrix, so a cache's keys may be the
  // front of a larger store (kvpolicy.integrations.hf.layer): copied only if a matrix is not dense.
  const auto dense_rows = [](const at::Tensor& t) { return t.stride(3) == 1 && t.stride(2) == t.size(3) ? t : t.contiguous(); };
  const at::Tensor keys = dense_rows(key), values = dense_rows(value);
  at::Tensor out = at::empty({B, Q, H, D}, query.options());
  at::Tensor out_grouped = out.view({B, Q, KV, G, D}).permute({0, 2, 3, 1, 4});
  at::Tensor row_out = at::empty({B, KV, rows, T}, key.options());
  const int64_t chunks = (Q + step - 1) / step, tasks = B * KV * chunks;
  at::Tensor col_parts = columns ? at::zeros({tasks, T}, key.options()) : at::Tensor();
  at::Tensor bias;  // 0 where a cached slot is valid, -inf where it holds padding
  if (valid.has_value() && before > 0) {
    bias = at::zeros({B, KV, before}, key.options())
               .masked_fill_(valid->narrow(2, 0, before).logical_not(), -std::numeric_limits<double>::infinity());
  }
  const int64_t threads = at::get_num_threads();
  if (chunks == 1 && B * KV < 2 * threads && T >= 2 * kMinSegment) {
    const int64_t segments = std::min((2 * threads + B * KV - 1) / (B * KV), T / kMinSegment);
    attend_split(q, keys, values, bias, out, row_out, col_parts, scaling, softcap, columns, segments);
    at::Tensor col_out = columns ? col_parts.view({B, KV, T}) : at::empty({0}, key.options());
    return {out, row_out, col_out};
  }
  const int64_t first_row = Q - rows;
  parallel_tasks(tasks, [&](int64_t task) {
    const int64_t chunk = task % chunks, head = (task / chunks) % KV, b = task / (chunks * KV);
    const int64_t start = chunk * step, stop = std::min(start + step, Q), size = stop - start;
    const int64_t visible = before + stop;  // keys after the chunk's last query are never seen
    at::Tensor part = q[b][head].narrow(1, start, size).reshape({G * size, D});
    at::Tensor scores = at::mm(part, keys[b][head].narrow(0, 0, visible).t());
    if (capped) scores = at::tanh(scores.mul_(scaling / softcap)).mul_(softcap);
    if (bias.defined()) scores.narrow(1, 0, before).add_(bias[b][head]);
    float* data = scores.data_ptr<float>();
    const float hidden = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < G * size; ++r) {  // causality inside the chunk's own block
      float* row = data + r * visible;
      std::fill(row + before + start + r % size + 1, row + visible, hidden);
    }
    at::Tensor probs = at::softmax(scores, -1);
    out_grouped[b][head].narrow(1, start, size).copy_(
        at::mm(probs, values[b][head].narrow(0, 0, visible)).view({G, size, D}));
    at::Tensor grouped = probs.view({G, size, visible});
    if (columns) col_parts[task].narrow(0, 0, visible).copy_(grouped.sum({0, 1}).div_(G));
    if (rows && stop > first_row) {
      const int64_t skip = std::max<int64_t>(0, first_row - start);
      at::Tensor written = row_out[b][head].narrow(0, start + skip - first_row, size - skip);
      at::Tensor target = written.narrow(1, 0, visible);
      at::mean_out(target, grouped.narrow(1, skip, size - skip), {0});
      written.narrow(1, visible, T - visible).zero_();
    }
  });
  at::Tensor col_out = columns ? col_parts.view({B, KV, chunks, T}).sum(2) : at::empty({0}, key.options());
  return {out, row_out, col_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvpolicy_native, m) {
  m.def(
      "attend(Tensor query, Tensor key, Tensor value, Tensor? valid, float scaling, float softcap, int rows, "
      "bool columns, int step) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvpolicy_native, CompositeImplicitAutograd, m) { m.impl("attend", &attend); }
