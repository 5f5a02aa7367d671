// The second pass of KVzip's reconstruction score on CPU (kvkernels/cpu/kvzip_score.py): for every chunk key
// j, the max over the R query rows of its logit minus the row's log-sum-exp, never storing a logit.
//
// Why C++ here: in PyTorch this pass is a [keys x rows] matrix product with a head-dim inner dimension (64),
// followed by a subtraction and a max that each reread the product from cache; measured on SmolLM2 at 2K
// tokens it took half as long as the reconstruction forward's whole attention. Here every logit lives in
// a register from its last multiply-add to the max that consumes it.
//
// Layout:
//   q   [S, R, D]  query rows (the G heads of one KV head stacked), rows contiguous;
//   lse [S, R]     each row's log-sum-exp;
//   kt  [S, D, M]  the chunk's keys transposed (keys contiguous), M a multiple of KEYS (the caller pads);
//   out [S, M]     max_r (scale * q_r . k_j - lse_r).
// The logits come from vec.h's logit tile (ROWS rows x KEYS keys in registers). The last tile of rows repeats
// row R - 1 instead of reading past the end: a repeated row cannot change a max.

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace {

using namespace kvk;

// out[0 .. KEYS): for keys j0 .. j0 + KEYS of one KV head, the max over all R rows. (Blocking the rows so that
// a block of queries serves several key tiles from cache measured no faster: the queries of a head stay in
// L2/L3 here.)
template <int D>
void score_keys(const float* q, const float* lse, int64_t R, const float* kt, int64_t M, int64_t j0, float scale,
                float* out) {
  vec best[KEY_VECS];
  for (int u = 0; u < KEY_VECS; ++u) best[u] = splat(NEG_INF);
  for (int64_t r = 0; r < R; r += ROWS) {
    int64_t row[ROWS];
    for (int i = 0; i < ROWS; ++i) row[i] = std::min(r + i, R - 1);
    vec acc[ROWS][KEY_VECS];
    logit_tile<D>(q, row, kt, M, j0, acc);
    for (int i = 0; i < ROWS; ++i)  // the scale is applied once per logit here, as one multiply-add
      for (int u = 0; u < KEY_VECS; ++u) best[u] = vmax(best[u], acc[i][u] * scale - lse[row[i]]);
  }
  for (int u = 0; u < KEY_VECS; ++u) store(out + u * LANES, best[u]);
}

using KeysFn = void (*)(const float*, const float*, int64_t, const float*, int64_t, int64_t, float, float*);

KeysFn keys_kernel(int64_t D) {
  return kvk::for_head_dim(D, [](auto d) -> KeysFn { return score_keys<decltype(d)::value>; });
}

}  // namespace

extern "C" {

// The key tile of both scoring kernels (this one and attention.cpp's): kt's key count M must be a multiple
// of it.
int64_t kvk_keys_per_tile() { return KEYS; }

// Returns 0; -1 for a head dim without a kernel; -2 if M is not a multiple of the tile or R < 1.
int kvk_score_max_f32(const float* q, const float* lse, const float* kt, int64_t S, int64_t R, int64_t M,
                      int64_t D, float scale, float* out, int threads) {
  const KeysFn kernel = keys_kernel(D);
  if (!kernel) return -1;
  if (M % KEYS != 0 || R < 1) return -2;
  const int64_t tiles = M / KEYS, items = S * tiles;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t s = it / tiles, j0 = (it % tiles) * KEYS;
    kernel(q + s * R * D, lse + s * R, R, kt + s * D * M, M, j0, scale, out + s * M + j0);
  }
  return 0;
}

}  // extern "C"
