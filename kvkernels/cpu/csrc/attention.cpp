// The attention of KVzip's reconstruction forward on CPU (kvkernels/cpu/ragged_attention.py,
// context_then_causal_self): R query rows per KV head over N context keys (all visible) and the block's own
// Lq keys (row r = g * Lq + i sees own keys 0 .. i), in one online softmax, fp32. Besides the output it
// returns each row's log-sum-exp over the keys KVzip scores (sink, chunk and own keys), which is the
// normaliser of kvzip_score.
//
// Why C++ here: this attention is half of the reconstruction's time, and PyTorch's fused CPU kernel needs
// separate calls for the unmasked context and the causal own keys, merged by log-sum-exp afterwards
// (their outputs make two more passes over memory). Here both are one sweep over the keys, with every
// logit kept in a small per-item buffer from its product to its weight.
//
// Layout: q [S, R, D] rows contiguous; kt [S, D, M] the N + Lq keys transposed (keys contiguous), M >= N + Lq
// a multiple of the key tile (kvk_keys_per_tile; the padding is never read into a result); v rows of D floats
// at v + s * v_head + j * v_row. Outputs o [S, R, D] and lse_scored [S, R] (nullable).
//
// Work items are (KV head, block of RB rows). Per block of KEYS keys: logits of the RB rows (vec.h's logit
// tile, as in kvzip_score.cpp), masked and turned into weights with a running max per row, then the weighted
// values added (tiles of pv_rows rows x D). Key blocks past the last own key any
// row of the item sees are skipped: for causal rows that is about half of the own keys.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec.h"

namespace {

using namespace kvk;

constexpr int64_t RB = 48;  // rows per item: a multiple of vec.h's ROWS and of every pv_rows

struct Problem {
  const float *q, *kt, *v;
  int64_t M, v_head, v_row, R, N, Lq, sink, chunk_start, chunk_end;
  float scale;
  float *o, *lse_scored;
};

// Rows of the value tile: pv_rows x D / LANES accumulators in about half the registers.
template <int D>
constexpr int pv_rows() {
  constexpr int per_row = D / LANES;
  return std::max(1, std::min(4, (REGISTERS / 2) / per_row));
}

template <int D>
void attend_rows(const Problem& p, int64_t s, int64_t r0) {
  constexpr int DV = D / LANES;
  constexpr int PV = pv_rows<D>();
  static_assert(D % LANES == 0 && RB % ROWS == 0 && RB % PV == 0, "tile sizes");
  const float* q = p.q + s * p.R * D;
  const float* kt = p.kt + s * D * p.M;
  const float* v = p.v + s * p.v_head;
  const int64_t n_keys = p.N + p.Lq;

  // Rows past R (the last item) repeat row R - 1: computed, never stored.
  int64_t row[RB], own[RB];  // query row, and the last own key it sees
  int64_t last_own = 0;
  for (int64_t t = 0; t < RB; ++t) {
    row[t] = std::min(r0 + t, p.R - 1);
    own[t] = row[t] % p.Lq;
    last_own = std::max(last_own, own[t]);
  }
  const int64_t key_end = p.N + last_own + 1;

  alignas(64) float acc[RB * D];
  alignas(64) float w[RB * KEYS];  // logits, then weights, of one key block
  float m[RB], corr[RB];
  vec l[RB], l_scored[RB];  // running sums, lane by lane: reduced once at the end
  std::fill(acc, acc + RB * D, 0.f);
  std::fill(m, m + RB, NEG_INF);
  std::fill(l, l + RB, vec{});
  std::fill(l_scored, l_scored + RB, vec{});

  const vec lane = iota();
  const float N = static_cast<float>(p.N), sink = static_cast<float>(p.sink);
  const float cs = static_cast<float>(p.chunk_start), ce = static_cast<float>(p.chunk_end);
  for (int64_t j0 = 0; j0 < key_end; j0 += KEYS) {
    // Logits (scaled) of the RB rows with keys j0 .. j0 + KEYS.
    for (int64_t t0 = 0; t0 < RB; t0 += ROWS) {
      vec a[ROWS][KEY_VECS];
      logit_tile<D>(q, row + t0, kt, p.M, j0, a);
      for (int i = 0; i < ROWS; ++i)
        for (int u = 0; u < KEY_VECS; ++u) store(w + (t0 + i) * KEYS + u * LANES, a[i][u] * p.scale);
    }
    // Weights with a running max per row; which keys a row sees and which are scored, lane by lane. Only
    // blocks that reach the own keys need the causal mask.
    const bool all_seen = j0 + KEYS <= p.N;
    const int64_t j1 = j0 + KEYS;  // whether the block's keys are all scored or none is: no lane masks then
    const bool all_scored = j1 <= p.sink || (j0 >= p.chunk_start && j1 <= p.chunk_end) || j0 >= p.N;
    const bool none_scored = j0 >= p.sink && (j1 <= p.chunk_start || j0 >= p.chunk_end) && j1 <= p.N;
    for (int64_t t = 0; t < RB; ++t) {
      vec x[KEY_VECS];
      const float sees_up_to = N + static_cast<float>(own[t]);  // key index, exact in fp32 (< 2^24)
      vec block_max = splat(NEG_INF);
      for (int u = 0; u < KEY_VECS; ++u) {
        x[u] = load(w + t * KEYS + u * LANES);
        if (!all_seen) x[u] = lane + static_cast<float>(j0 + u * LANES) <= sees_up_to ? x[u] : splat(NEG_INF);
        block_max = vmax(block_max, x[u]);
      }
      const float m_new = std::max(m[t], hmax(block_max));
      // A row sees key 0, so m_new is finite from the first block on; corr = 0 drops the empty start.
      corr[t] = m_new == m[t] ? 1.f : (m[t] == NEG_INF ? 0.f : std::exp(m[t] - m_new));
      m[t] = m_new;
      vec sum{}, sum_scored{};
      for (int u = 0; u < KEY_VECS; ++u) {
        const vec j = lane + static_cast<float>(j0 + u * LANES);
        vec e = exp_nonpositive(x[u] - m_new);
        if (!all_seen) e = x[u] == NEG_INF ? vec{} : e;
        sum += e;
        if (!all_scored && !none_scored) sum_scored += (j < sink) | ((j >= cs) & (j < ce)) | (j >= N) ? e : vec{};
        store(w + t * KEYS + u * LANES, e);
      }
      if (all_scored) sum_scored = sum;
      l[t] = l[t] * corr[t] + sum;
      l_scored[t] = l_scored[t] * corr[t] + sum_scored;
    }
    // acc = acc * corr + weights . values, over the block's keys that exist.
    const int64_t kb = std::min<int64_t>(KEYS, n_keys - j0);
    for (int64_t t0 = 0; t0 < RB; t0 += PV) {
      vec a[PV][DV];
      for (int i = 0; i < PV; ++i)
        for (int e = 0; e < DV; ++e) a[i][e] = load(acc + (t0 + i) * D + e * LANES) * corr[t0 + i];
      for (int64_t j = 0; j < kb; ++j) {
        const float* vj = v + (j0 + j) * p.v_row;
        vec vv[DV];
        for (int e = 0; e < DV; ++e) vv[e] = load(vj + e * LANES);
        for (int i = 0; i < PV; ++i) {
          const float wt = w[(t0 + i) * KEYS + j];
          for (int e = 0; e < DV; ++e) a[i][e] += vv[e] * wt;
        }
      }
      for (int i = 0; i < PV; ++i)
        for (int e = 0; e < DV; ++e) store(acc + (t0 + i) * D + e * LANES, a[i][e]);
    }
  }
  for (int64_t t = 0; t < RB && r0 + t < p.R; ++t) {
    const int64_t r = r0 + t;
    const float total = hsum(l[t]), scored = hsum(l_scored[t]);  // total > 0: a row sees at least key 0
    float* out = p.o + (s * p.R + r) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = acc[t * D + d] / total;
    if (p.lse_scored) p.lse_scored[s * p.R + r] = scored > 0.f ? m[t] + std::log(scored) : NEG_INF;
  }
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

RowsFn rows_kernel(int64_t D) {
  return kvk::for_head_dim(D, [](auto d) -> RowsFn { return attend_rows<decltype(d)::value>; });
}

}  // namespace

extern "C" {

// Returns 0; -1 for a head dim without a kernel; -2 for sizes the layout above does not allow (caller bug).
int kvk_reconstruction_attention_f32(const float* q, const float* kt, int64_t M, const float* v, int64_t v_head,
                                     int64_t v_row, int64_t S, int64_t R, int64_t D, int64_t N, int64_t Lq,
                                     int64_t sink, int64_t chunk_start, int64_t chunk_end, float scale, float* o,
                                     float* lse_scored, int threads) {
  const RowsFn kernel = rows_kernel(D);
  if (!kernel) return -1;
  if (M % KEYS != 0 || M < N + Lq || Lq < 1 || N < 0 || R < 1 || R % Lq != 0) return -2;
  const Problem p{q, kt, v, M, v_head, v_row, R, N, Lq, sink, chunk_start, chunk_end, scale, o, lse_scored};
  const int64_t blocks = (R + RB - 1) / RB, items = S * blocks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && items > 1)
  for (int64_t it = 0; it < items; ++it) kernel(p, it / blocks, (it % blocks) * RB);
  return 0;
}

}  // extern "C"
