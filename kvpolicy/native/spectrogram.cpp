// NAMM's folded Hann spectrogram in one pass per tile of tokens (kvpolicy_plugins.stft).
//
// For every token t: Σ_f weights[f, t] · |Hann-windowed DFT of frame f of t's series|, n_fft =
// 2·hop. As in the reference (folded_hann_spectrogram), the window is applied in the frequency
// domain: a frame's plain spectrum is X = A + (−1)^k B from the DFTs A, B of its two half-frame
// blocks, and its windowed spectrum is ¼ |X[k−1] + X[k+1] − 2X[k]|. Each block's DFT uses the
// symmetry of cos / sin about the block's middle (values n and hop − n enter as their sum and
// difference), half the multiplications of a plain DFT, and is vectorised across tokens, which
// lie contiguously in the query-major series. Blocks are transformed once and frames are folded
// as they complete, so nothing larger than a tile's two block spectra is ever held.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

at::Tensor folded_hann(const at::Tensor& series_in, const at::Tensor& weights_in, const at::Tensor& head_in,
                       int64_t hop, int64_t tile) {
  TORCH_CHECK(series_in.scalar_type() == at::kFloat && weights_in.scalar_type() == at::kFloat &&
                  head_in.scalar_type() == at::kFloat,
              "folded_hann: float32 tensors expected");
  TORCH_CHECK(hop >= 2 && hop % 2 == 0 && tile > 0, "folded_hann: hop must be even and >= 2, got ", hop);
  const at::Tensor series = series_in.contiguous(), weights = weights_in.contiguous(), head = head_in.contiguous();
  const int64_t B = series.size(0), H = series.size(1), L = series.size(2), T = series.size(3);
  const int64_t F = weights.size(2), C = head.size(3), bins = hop + 1, mid = hop / 2;
  TORCH_CHECK(L % hop == 0 && C % hop == 0, "folded_hann: series (", L, ") and head (", C, ") must hold whole blocks");
  at::Tensor out = at::zeros({B, H, T, bins}, series.options());
  if (F == 0 || T == 0) return out;
  const int64_t needed = F + 1, body_blocks = std::min(needed, L / hop), head_blocks = needed - body_blocks;
  TORCH_CHECK(head_blocks * hop <= C, "folded_hann: ", F, " frames need ", needed * hop, " values, got ", L + C);
  std::vector<float> cosine(bins * hop), sine(bins * hop);  // of 2πkn / n_fft
  for (int64_t k = 0; k < bins; ++k)
    for (int64_t n = 0; n < hop; ++n) {
      const double angle = M_PI * static_cast<double>(k * n) / static_cast<double>(hop);
      cosine[k * hop + n] = static_cast<float>(std::cos(angle));
      sine[k * hop + n] = static_cast<float>(std::sin(angle));
    }
  const int64_t tiles = (T + tile - 1) / tile;
  const float* series_data = series.data_ptr<float>();
  const float* head_data = head.data_ptr<float>();
  const float* weight_data = weights.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const at::ThreadLocalState caller;  // inference / grad mode travel to the worker threads
  at::parallel_for(0, B * H * tiles, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    std::vector<float> gathered(hop * tile), sums(mid * tile), diffs(mid * tile);
    std::vector<float> spectra[2] = {std::vector<float>(2 * bins * tile), std::vector<float>(2 * bins * tile)};
    std::vector<float> frame_re(bins * tile), frame_im(bins * tile), acc(bins * tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t0 = (task % tiles) * tile, bh = task / tiles, size = std::min(tile, T - t0);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < needed; ++j) {
        const float* x;  // block j: value n of token t at x[n * stride + t]
        int64_t stride;
        if (j < head_blocks) {  // from the token-major head
          const float* src = head_data + (bh * T + t0) * C + (C - head_blocks * hop) + j * hop;
          for (int64_t n = 0; n < hop; ++n)
            for (int64_t t = 0; t < size; ++t) gathered[n * size + t] = src[t * C + n];
          x = gathered.data();
          stride = size;
        } else {
          x = series_data + (bh * L + (L - body_blocks * hop) + (j - head_blocks) * hop) * T + t0;
          stride = T;
        }
        for (int64_t n = 1; n < mid; ++n) {
          const float* low = x + n * stride;
          const float* high = x + (hop - n) * stride;
          float* s = sums.data() + n * size;
          float* d = diffs.data() + n * size;
          for (int64_t t = 0; t < size; ++t) {
            s[t] = low[t] + high[t];
            d[t] = low[t] - high[t];
          }
        }
        float* current = spectra[j & 1].data();  // real parts [bins][size], then imaginary parts
        const float* first = x;
        const float* middle = x + mid * stride;
        for (int64_t k = 0; k < bins; ++k) {
          // cos is even about the middle for even k and odd for odd k; sin the other way round
          const float* for_cos = k % 2 == 0 ? sums.data() : diffs.data();
          const float* for_sin = k % 2 == 0 ? diffs.data() : sums.data();
          float* re = current + k * size;
          float* im = current + (bins + k) * size;
          const float c_mid = cosine[k * hop + mid], s_mid = sine[k * hop + mid];
          for (int64_t t = 0; t < size; ++t) {
            re[t] = first[t] + c_mid * middle[t];
            im[t] = -s_mid * middle[t];
          }
          for (int64_t n = 1; n < mid; ++n) {
            const float c = cosine[k * hop + n], s = -sine[k * hop + n];
            const float* a = for_cos + n * size;
            const float* b = for_sin + n * size;
            for (int64_t t = 0; t < size; ++t) {
              re[t] += c * a[t];
              im[t] += s * b[t];
            }
          }
        }
        if (j == 0) continue;
        const int64_t f = j - 1;  // frame f: blocks j - 1 (A) and j (B)
        const float* previous = spectra[(j - 1) & 1].data();
        for (int64_t k = 0; k < bins; ++k) {
          const float sign = k % 2 == 0 ? 1.f : -1.f;
          const float* ar = previous + k * size;
          const float* ai = previous + (bins + k) * size;
          const float* br = current + k * size;
          const float* bi = current + (bins + k) * size;
          float* r = frame_re.data() + k * size;
          float* i = frame_im.data() + k * size;
          for (int64_t t = 0; t < size; ++t) {
            r[t] = ar[t] + sign * br[t];
            i[t] = ai[t] + sign * bi[t];
          }
        }
        const float* w = weight_data + (bh * F + f) * T + t0;
        for (int64_t k = 0; k < bins; ++k) {
          // the neighbours of the edge bins mirror: X[-1] = conj X[1], X[hop + 1] = conj X[hop - 1]
          const int64_t left = k == 0 ? 1 : k - 1, right = k == hop ? hop - 1 : k + 1;
          const float left_sign = k == 0 ? -1.f : 1.f, right_sign = k == hop ? -1.f : 1.f;
          const float* r0 = frame_re.data() + left * size;
          const float* r1 = frame_re.data() + k * size;
          const float* r2 = frame_re.data() + right * size;
          const float* i0 = frame_im.data() + left * size;
          const float* i1 = frame_im.data() + k * size;
          const float* i2 = frame_im.data() + right * size;
          float* a = acc.data() + k * size;
          for (int64_t t = 0; t < size; ++t) {
            const float re = r0[t] + r2[t] - 2.f * r1[t];
            const float im = left_sign * i0[t] + right_sign * i2[t] - 2.f * i1[t];
            a[t] += 0.25f * w[t] * std::sqrt(re * re + im * im);
          }
        }
      }
      float* o = out_data + (bh * T + t0) * bins;
      for (int64_t t = 0; t < size; ++t)
        for (int64_t k = 0; k < bins; ++k) o[t * bins + k] = acc[k * size + t];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvpolicy_native, m) {
  m.def("folded_hann(Tensor series, Tensor weights, Tensor head, int hop, int tile) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvpolicy_native, CompositeImplicitAutograd, m) { m.impl("folded_hann", &folded_hann); }
