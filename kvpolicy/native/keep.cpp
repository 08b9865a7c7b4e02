// Keep the selected tokens of many layers' key and value stores in place, in one call.
//
// The same result as kvpolicy.integrations.hf.layer.EvictingLayer._take_in_place on each store
// (its reference, tested equal): for every (layer, batch row, KV head), slot j of the store ends
// up holding what slot indices[layer, row, head, j] held, for j < kept. A per-step policy (TOVA)
// drops one token of thousands in every layer at every decoding step; done layer by layer in
// torch, each move is a dozen small operations whose fixed cost is most of the step's eviction
// work. Here each (layer, row, head) is one task copying whole token rows (head_dim elements of
// any dtype) forwards, starting at the first slot that moves.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

// stores: 2 per layer (keys, values), each contiguous [batch, kv_heads, slots, head_dim] on the
// CPU; indices: [layers, batch, kv_heads, kept] int64, each row strictly ascending within
// [0, slots). Checked before anything is written, so a refused call leaves every store as it was.
void keep_in_place(at::TensorList stores, const at::Tensor& indices) {
  TORCH_CHECK(indices.dim() == 4 && indices.scalar_type() == at::kLong && indices.device().is_cpu(),
              "keep_in_place: indices must be int64 [layers, batch, kv_heads, kept] on the CPU");
  const int64_t L = indices.size(0), B = indices.size(1), H = indices.size(2), K = indices.size(3);
  TORCH_CHECK(static_cast<int64_t>(stores.size()) == 2 * L, "keep_in_place: 2 stores per layer of indices");
  for (const at::Tensor& store : stores) {
    TORCH_CHECK(store.device().is_cpu() && store.is_contiguous() && store.dim() == 4 && store.size(0) == B &&
                    store.size(1) == H && store.size(2) >= K,
                "keep_in_place: every store must be a contiguous CPU tensor [batch, kv_heads, slots >= kept, width]");
  }
  const at::Tensor index = indices.contiguous();
  const int64_t* idx = index.data_ptr<int64_t>();
  bool ascending = true;
  for (int64_t layer = 0; layer < L && ascending; ++layer) {
    const int64_t slots = std::min(stores[2 * layer].size(2), stores[2 * layer + 1].size(2));
    for (int64_t row = 0; row < B * H && ascending; ++row) {
      const int64_t* r = idx + (layer * B * H + row) * K;
      for (int64_t j = 0; j < K; ++j) {
        if (r[j] < j || r[j] >= slots || (j && r[j] <= r[j - 1])) {
          ascending = false;
          break;
        }
      }
    }
  }
  TORCH_CHECK(ascending, "keep_in_place: every row of indices must be strictly ascending within the store's slots");
  at::parallel_for(0, 2 * L * B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t which = task / (B * H), row = task % (B * H);
      const at::Tensor& store = stores[which];
      const int64_t slots = store.size(2), width = store.size(3) * store.element_size();
      char* base = static_cast<char*>(store.data_ptr()) + row * slots * width;
      const int64_t* r = idx + ((which / 2) * B * H + row) * K;
      // ascending with r[j] >= j: a source slot is never written before it is read. A run of
      // slots that all come from the same distance (the tokens after one dropped token) moves
      // as one block: one memmove instead of a call per token row.
      for (int64_t j = 0; j < K;) {
        const int64_t shift = r[j] - j;
        int64_t end = j + 1;
        while (end < K && r[end] - end == shift) ++end;
        if (shift) std::memmove(base + j * width, base + r[j] * width, (end - j) * width);
        j = end;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvpolicy_native, m) { m.def("keep_in_place(Tensor(a!)[] stores, Tensor indices) -> ()"); }

TORCH_LIBRARY_IMPL(kvpolicy_native, CompositeImplicitAutograd, m) { m.impl("keep_in_place", &keep_in_place); }
