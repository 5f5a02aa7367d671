// Decode attention (one query row per head, fp32) over a ragged KV pool and over the KIVI-quantized pool,
// and the appends that feed them, for the cpu backend. Plain C ABI, no PyTorch headers: kvkernels/cpu/native.py
// compiles it with the system C++ compiler on first use (a few seconds) and calls it through ctypes with
// raw pointers.
//
// Why C++ here: a decode step of a small model on a CPU is a few dozen tiny products per layer; in eager
// PyTorch each costs its fixed dispatch cost (5-15 us) more than its arithmetic. One call per layer does
// the whole layer: every segment, every head of its GQA group, and (quantized pool) the dequantization of
// each row as it is read, so no fp copy of the quantized cache is made, not even per step. The quantized
// pool's append also quantizes the groups that leave the full-precision window (one call in group_size
// per segment), bit for bit as kivi_quantize: in PyTorch that call cost about 30 times an ordinary one.
//
// Work is split flash-decoding style into (segment, chunk of CHUNK rows) items, spread over OpenMP
// threads; each item keeps a running max, sum and output per head, and the items of a segment are merged
// by log-sum-exp at the end. Every index is checked against the buffer sizes passed in before anything
// is read or written: a bad table returns a nonzero code (the caller raises), never an out-of-bounds access.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t CHUNK = 256;
using kvk::NEG_INF;

struct Item {
  int64_t seg, first, count;  // segment, first row, row count
};

// Row pointers of one chunk: keys and values of rows first .. first + count of a segment.
struct RowSource {
  virtual ~RowSource() = default;
  virtual bool needs_scratch() const = 0;  // rows() writes dequantized rows into scratch
  // Fill k[i], v[i] (i < count) with pointers to D floats; scratch holds 2 * count * D floats if needed.
  virtual void rows(int64_t seg, int64_t first, int64_t count, const float** k, const float** v,
                    float* scratch) const = 0;
};

struct PoolRows : RowSource {
  const float *k_pool, *v_pool;
  int64_t k_stride, v_stride;
  const int64_t* start;
  PoolRows(const float* k_pool, const float* v_pool, int64_t k_stride, int64_t v_stride, const int64_t* start)
      : k_pool(k_pool), v_pool(v_pool), k_stride(k_stride), v_stride(v_stride), start(start) {}
  bool needs_scratch() const override { return false; }
  void rows(int64_t seg, int64_t first, int64_t count, const float** k, const float** v, float*) const override {
    const int64_t row0 = start[seg] + first;
    for (int64_t i = 0; i < count; ++i) {
      k[i] = k_pool + (row0 + i) * k_stride;
      v[i] = v_pool + (row0 + i) * v_stride;
    }
  }
};

// The quantized pool: segment rows 0 .. q_len are quantized (global row q_start + i), the rest are the
// ring's live rows (slot (t_head + i - q_len) % TC). Dequantized as kivi_dequantize does: code*scale+zero.
struct QuantRows : RowSource {
  const int32_t *k_codes, *v_codes;
  const float *k_scale, *k_zero, *v_scale, *v_zero, *k_tail, *v_tail;
  const int64_t* q_start;
  const int32_t *q_len, *t_head;
  int64_t D, TC, bits, gs;
  QuantRows(const int32_t* k_codes, const float* k_scale, const float* k_zero, const int32_t* v_codes,
            const float* v_scale, const float* v_zero, const float* k_tail, const float* v_tail,
            const int64_t* q_start, const int32_t* q_len, const int32_t* t_head, int64_t D, int64_t TC, int64_t bits,
            int64_t gs)
      : k_codes(k_codes), v_codes(v_codes), k_scale(k_scale), k_zero(k_zero), v_scale(v_scale), v_zero(v_zero),
        k_tail(k_tail), v_tail(v_tail), q_start(q_start), q_len(q_len), t_head(t_head), D(D), TC(TC), bits(bits),
        gs(gs) {}
  bool needs_scratch() const override { return true; }
  void rows(int64_t seg, int64_t first, int64_t count, const float** k, const float** v,
            float* scratch) const override {
    const int64_t F = 32 / bits, nq = q_len[seg], words_per_row = D / F, groups_per_row = D / gs;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = first + i;
      if (r >= nq) {
        const int64_t slot = (t_head[seg] + r - nq) % TC;
        k[i] = k_tail + (seg * TC + slot) * D;
        v[i] = v_tail + (seg * TC + slot) * D;
        continue;
      }
      const int64_t row = q_start[seg] + r;
      float* kd = scratch + (2 * i) * D;
      float* vd = kd + D;
      // Keys: packed along rows (F rows per word of each channel), one (scale, zero) per channel and group.
      const int32_t* kw = k_codes + (row / F) * D;
      const uint32_t kshift = static_cast<uint32_t>((row % F) * bits);
      const float* ks = k_scale + (row / gs) * D;
      const float* kz = k_zero + (row / gs) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        kd[d] = static_cast<float>((static_cast<uint32_t>(kw[d]) >> kshift) & mask) * ks[d] + kz[d];
      // Values: packed along channels (F channels per word), one (scale, zero) per row and channel group.
      const int32_t* vw = v_codes + row * words_per_row;
      const float* vs = v_scale + row * groups_per_row;
      const float* vz = v_zero + row * groups_per_row;
      for (int64_t w = 0; w < words_per_row; ++w) {  // gs is a multiple of F: one group per word
        const uint32_t word = static_cast<uint32_t>(vw[w]);
        const float scale = vs[w * F / gs], zero = vz[w * F / gs];
        float* out = vd + w * F;
        for (int64_t j = 0; j < F; ++j)
          out[j] = static_cast<float>((word >> static_cast<uint32_t>(j * bits)) & mask) * scale + zero;
      }
      k[i] = kd;
      v[i] = vd;
    }
  }
};

// exp(x) for x <= 0 (softmax weights): vec.h's, on one float, vectorizable across the loop that calls it.
#pragma omp declare simd
inline float exp_nonpositive(float x) { return kvk::exp_nonpositive(x); }

// Eight floats: GCC/Clang vector extensions (AVX on x86-64, two NEON registers on AArch64), so that the
// products below run on whole vectors without intrinsics. Loads and stores go through memcpy (unaligned).
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline v8 load8(const float* p) {
  v8 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline float hsum(v8 x) {
  v4 a = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
  a += __builtin_shufflevector(a, a, 2, 3, 0, 1);
  a += __builtin_shufflevector(a, a, 1, 0, 3, 2);
  return a[0];
}

// The logit of one query row (DV vectors, in registers) with key row k.
template <int DV>
inline float dot(const v8* q, const float* k) {
  v8 s0 = q[0] * load8(k), s1 = {};
  for (int j = 1; j < DV; j += 2) {  // two chains: each FMA waits for the previous one of its chain only
    s1 += q[j] * load8(k + 8 * j);
    if (j + 1 < DV) s0 += q[j + 1] * load8(k + 8 * (j + 1));
  }
  return hsum(s0 + s1);
}

// One item: running max m[G], sum l[G] and unnormalised output acc[G * D] of q [G, D] (pre-scaled) over
// its rows, D = 8 * DV (a compile-time size, so a query row and an output row stay in registers).
template <int DV>
void attend_item(const RowSource& src, const Item& it, const float* q, int64_t G, float* m, float* l, float* acc) {
  constexpr int64_t D = 8 * DV;
  // Uninitialised buffers (a zero-filled 128 KB scratch per chunk cost as much as the arithmetic).
  const float* k[CHUNK];
  const float* v[CHUNK];
  std::unique_ptr<float[]> scratch(src.needs_scratch() ? new float[2 * it.count * D] : nullptr);
  float lg[CHUNK];
  src.rows(it.seg, it.first, it.count, k, v, scratch.get());
  const int64_t n = it.count;
  for (int64_t g = 0; g < G; ++g) {
    v8 qg[DV];
    for (int j = 0; j < DV; ++j) qg[j] = load8(q + g * D + 8 * j);
    float mx = NEG_INF;
    for (int64_t i = 0; i < n; ++i) {
      lg[i] = dot<DV>(qg, k[i]);
      mx = std::max(mx, lg[i]);
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      lg[i] = exp_nonpositive(lg[i] - mx);
      sum += lg[i];
    }
    m[g] = mx;
    l[g] = sum;
    v8 o[DV] = {};
    for (int64_t i = 0; i < n; ++i) {
      const v8 p = v8{} + lg[i];
      for (int j = 0; j < DV; ++j) o[j] += p * load8(v[i] + 8 * j);
    }
    std::memcpy(acc + g * D, o, sizeof o);
  }
}

using ItemFn = void (*)(const RowSource&, const Item&, const float*, int64_t, float*, float*, float*);

// The item kernel for head dim D (kvkernels' head dims: 64, 80, 96, 128, 256), or null.
ItemFn item_kernel(int64_t D) {
  return kvk::for_head_dim(D, [](auto d) -> ItemFn { return attend_item<decltype(d)::value / 8>; });
}

// Attend every segment: q [S, G, D], seg_rows[s] rows each; out [S, G, D], lse [S, G] (nullable).
void attend_all(ItemFn kernel, const RowSource& src, const float* q, const std::vector<int64_t>& seg_rows,
                int64_t G, int64_t D, float scale, float* out, float* lse, int threads) {
  const int64_t S = static_cast<int64_t>(seg_rows.size());
  std::vector<Item> items;
  std::vector<int64_t> first_item(S + 1);
  for (int64_t s = 0; s < S; ++s) {
    first_item[s] = static_cast<int64_t>(items.size());
    for (int64_t r = 0; r < seg_rows[s]; r += CHUNK) items.push_back({s, r, std::min(CHUNK, seg_rows[s] - r)});
  }
  first_item[S] = static_cast<int64_t>(items.size());
  std::vector<float> q_scaled(S * G * D);
  for (int64_t i = 0; i < S * G * D; ++i) q_scaled[i] = q[i] * scale;
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<float> m(n_items * G), l(n_items * G), acc(n_items * G * D);
  int64_t total_rows = 0;
  for (int64_t n : seg_rows) total_rows += n;
  // Threads only pay off past a few chunks: a fork/join costs about as much as a small chunk.
  const bool parallel = threads > 1 && n_items > 1 && total_rows >= 2 * CHUNK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel)
  for (int64_t j = 0; j < n_items; ++j)
    kernel(src, items[j], q_scaled.data() + items[j].seg * G * D, G, m.data() + j * G, l.data() + j * G,
           acc.data() + j * G * D);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t g = 0; g < G; ++g) {
      float* o = out + (s * G + g) * D;
      float mx = NEG_INF;
      for (int64_t j = first_item[s]; j < first_item[s + 1]; ++j) mx = std::max(mx, m[j * G + g]);
      if (first_item[s] == first_item[s + 1]) {  // an empty segment: o = 0, lse = -inf
        std::fill(o, o + D, 0.f);
        if (lse) lse[s * G + g] = NEG_INF;
        continue;
      }
      float total = 0.f;
      std::fill(o, o + D, 0.f);
      for (int64_t j = first_item[s]; j < first_item[s + 1]; ++j) {
        const float w = std::exp(m[j * G + g] - mx);
        total += w * l[j * G + g];
        const float* a = acc.data() + (j * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      if (lse) lse[s * G + g] = mx + std::log(total);
    }
  }
}

// The quantized buffers a flush writes (layouts of kvkernels.reference.quant_pool, fp32 scales): Q quantized
// rows in all; k_codes int32 [Q / F, D], k_scale/k_zero [Q / gs, D], v_codes int32 [Q, D / F],
// v_scale/v_zero [Q, D / gs]. Null when the caller cannot take a flush here (not fp32, or flush_after).
struct QuantBuffers {
  int32_t *k_codes, *v_codes;
  float *k_scale, *k_zero, *v_scale, *v_zero;
  int64_t bits;
};

// KIVI quantization of n values x[i], kivi_quantize's formula bit for bit: zero = min,
// scale = (max - min) / levels, code = round_half_even((x - zero) / scale) clamped to [0, levels], 0 when
// scale is 0 (all in fp32, no fused multiply-add in reach). Codes go to code[i].
void quantize_group(const float* x, int64_t n, int64_t levels, float* scale, float* zero, uint32_t* code) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float s = (hi - lo) / static_cast<float>(levels);
  *scale = s;
  *zero = lo;
  for (int64_t i = 0; i < n; ++i) {
    const float c = s > 0.f ? std::nearbyint((x[i] - lo) / s) : 0.f;
    code[i] = static_cast<uint32_t>(std::min(std::max(c, 0.f), static_cast<float>(levels)));
  }
}

// F = 32 / bits codes in one int32 word, the first in the least significant bits.
int32_t pack_word(const uint32_t* code, int64_t F, int64_t bits) {
  uint32_t word = 0;
  for (int64_t i = 0; i < F; ++i) word |= code[i] << (bits * i);
  return static_cast<int32_t>(word);
}

// Quantize the f oldest ring rows of one segment (k_rows[i], v_rows[i] -> D floats; f whole groups) into
// quantized rows row0 .. row0 + f: keys per channel over each group of gs rows, values per row over groups
// of gs channels; codes packed with pack_word (keys along rows, values along channels).
void flush_rows(const QuantBuffers& qb, const float* const* k_rows, const float* const* v_rows, int64_t f,
                int64_t row0, int64_t D, int64_t gs) {
  const int64_t F = 32 / qb.bits, levels = (1 << qb.bits) - 1;
  std::vector<uint32_t> code(std::max(gs, D));
  std::vector<float> column(gs);
  for (int64_t g = 0; g < f; g += gs) {  // keys: one group of gs rows, channel by channel
    const int64_t group = (row0 + g) / gs;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t i = 0; i < gs; ++i) column[i] = k_rows[g + i][d];
      quantize_group(column.data(), gs, levels, qb.k_scale + group * D + d, qb.k_zero + group * D + d,
                     code.data());
      for (int64_t w = 0; w < gs / F; ++w)
        qb.k_codes[((row0 + g) / F + w) * D + d] = pack_word(&code[w * F], F, qb.bits);
    }
  }
  for (int64_t i = 0; i < f; ++i) {  // values: row by row, groups of gs channels
    const int64_t row = row0 + i;
    for (int64_t c = 0; c < D / gs; ++c)
      quantize_group(v_rows[i] + c * gs, gs, levels, qb.v_scale + row * (D / gs) + c,
                     qb.v_zero + row * (D / gs) + c, code.data() + c * gs);
    for (int64_t w = 0; w < D / F; ++w) qb.v_codes[row * (D / F) + w] = pack_word(&code[w * F], F, qb.bits);
  }
}

}  // namespace

extern "C" {

// Ragged pool. k_pool/v_pool: n_rows rows of D floats, row strides k_stride/v_stride (channel stride 1).
// seg_start int64 [S], seg_len int32 [S]. Returns 0; 1 + s for the first segment s outside the pool; -1 for a
// head dim without a kernel.
int kvk_ragged_decode_f32(const float* q, const float* k_pool, const float* v_pool, int64_t n_rows,
                          int64_t k_stride, int64_t v_stride, const int64_t* seg_start, const int32_t* seg_len,
                          int64_t S, int64_t G, int64_t D, float scale, float* out, float* lse, int threads) {
  const ItemFn kernel = item_kernel(D);
  if (!kernel) return -1;
  std::vector<int64_t> rows(S);
  for (int64_t s = 0; s < S; ++s) {
    if (seg_start[s] < 0 || seg_len[s] < 0 || seg_start[s] + seg_len[s] > n_rows) return static_cast<int>(1 + s);
    rows[s] = seg_len[s];
  }
  attend_all(kernel, PoolRows(k_pool, v_pool, k_stride, v_stride, seg_start), q, rows, G, D, scale, out, lse,
             threads);
  return 0;
}

// Quantized pool (layouts of kvkernels.reference.quant_pool): Q quantized rows in all; k_codes int32
// [Q / F, D], k_scale/k_zero [Q / gs, D], v_codes int32 [Q, D / F], v_scale/v_zero [Q, D / gs];
// k_tail/v_tail [S, TC, D]; q_start int64, q_len/t_head/seg_len int32, each [S]. Returns 0, or 1 + s for
// the first segment whose tables point outside the buffers; -1 for a head dim without a kernel.
int kvk_quant_decode_f32(const float* q, const int32_t* k_codes, const float* k_scale, const float* k_zero,
                         const int32_t* v_codes, const float* v_scale, const float* v_zero, const float* k_tail,
                         const float* v_tail, int64_t Q, const int64_t* q_start, const int32_t* q_len,
                         const int32_t* t_head, const int32_t* seg_len, int64_t S, int64_t G, int64_t D, int64_t TC,
                         int64_t bits, int64_t gs, float scale, float* out, float* lse, int threads) {
  const ItemFn kernel = item_kernel(D);
  if (!kernel) return -1;
  std::vector<int64_t> rows(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t nq = q_len[s], n = seg_len[s];
    if (q_start[s] < 0 || nq < 0 || n < nq || n - nq > TC || q_start[s] + nq > Q || t_head[s] < 0 ||
        t_head[s] >= TC)
      return static_cast<int>(1 + s);
    rows[s] = n;
  }
  const QuantRows src(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head, D,
                      TC, bits, gs);
  attend_all(kernel, src, q, rows, G, D, scale, out, lse, threads);
  return 0;
}

// Ragged append: the t new rows of each of the S segments (k_new/v_new contiguous [S, t, row_bytes]) go
// after its live rows; seg_len grows by t. Any dtype (rows are copied as bytes). Nothing is written
// unless every segment has room (seg_len + t <= seg_cap) and lies in the pool (start + cap <= n_rows).
// Returns 0, or 1 + s for the first segment s without room or outside the pool.
int kvk_ragged_append(char* k_pool, char* v_pool, int64_t n_rows, int64_t k_stride_bytes, int64_t v_stride_bytes,
                      int64_t row_bytes, const int64_t* seg_start, int32_t* seg_len, const int32_t* seg_cap,
                      int64_t S, const char* k_new, const char* v_new, int64_t t) {
  for (int64_t s = 0; s < S; ++s)
    if (seg_start[s] < 0 || seg_len[s] < 0 || seg_len[s] + t > seg_cap[s] || seg_start[s] + seg_cap[s] > n_rows)
      return static_cast<int>(1 + s);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row = seg_start[s] + seg_len[s];
    for (int64_t i = 0; i < t; ++i) {
      std::memcpy(k_pool + (row + i) * k_stride_bytes, k_new + (s * t + i) * row_bytes, row_bytes);
      std::memcpy(v_pool + (row + i) * v_stride_bytes, v_new + (s * t + i) * row_bytes, row_bytes);
    }
    seg_len[s] += static_cast<int32_t>(t);
  }
  return 0;
}

// Quantized pool append of one layer: the t new rows of each segment (k_new/v_new contiguous
// [S, t, row_bytes]) go into the ring slots after its live tail (rings k_ring/v_ring [S, TC, row_bytes]);
// seg_len grows by t. A segment whose ring holds a completed group beyond the residual window first
// quantizes its oldest whole groups (KIVI's order, kvkernels.reference.quant_pool's flush rule with
// flush_after false) into the quantized buffers, if they are given (fp32 rings, row_bytes = 4 D); q_len and
// t_head move past them. Returns 1 and writes nothing if any segment would flush without buffers (or with
// flush_after), lacks room, or has tables outside its buffers: the caller then runs the general path,
// which raises the reference's errors; else 0.
int kvk_quant_append(char* k_ring, char* v_ring, int64_t TC, int64_t row_bytes, const int64_t* q_start,
                     int32_t* q_len, const int32_t* q_cap, int32_t* t_head, int32_t* seg_len, const int32_t* seg_cap,
                     int64_t S, const char* k_new, const char* v_new, int64_t t, int64_t residual, int64_t gs,
                     int flush_after, int32_t* k_codes, float* k_scale, float* k_zero, int32_t* v_codes,
                     float* v_scale, float* v_zero, int64_t Q, int64_t bits) {
  const QuantBuffers qb{k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, bits};
  const int64_t D = row_bytes / 4, F = bits > 0 ? 32 / bits : 0;
  const bool can_flush = k_codes && !flush_after && bits > 0 && 32 % bits == 0 && gs % F == 0 && D % gs == 0;
  std::vector<int64_t> flush(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t tail = static_cast<int64_t>(seg_len[s]) - q_len[s];
    const int64_t pending = flush_after ? tail + t : tail;
    flush[s] = std::max<int64_t>(pending - residual, 0) / gs * gs;
    if (q_len[s] < 0 || tail < 0 || t_head[s] < 0 || t_head[s] >= TC || seg_len[s] + t > seg_cap[s] ||
        tail - flush[s] + t > TC)
      return 1;
    if (flush[s] && (!can_flush || q_start[s] < 0 || q_len[s] + flush[s] > q_cap[s] || q_start[s] + q_cap[s] > Q ||
                     (q_start[s] + q_len[s]) % gs != 0))
      return 1;
  }
  std::vector<const float*> k_rows, v_rows;
  for (int64_t s = 0; s < S; ++s) {
    if (flush[s]) {
      k_rows.resize(flush[s]);
      v_rows.resize(flush[s]);
      for (int64_t i = 0; i < flush[s]; ++i) {
        const int64_t at = (s * TC + (t_head[s] + i) % TC) * row_bytes;
        k_rows[i] = reinterpret_cast<const float*>(k_ring + at);
        v_rows[i] = reinterpret_cast<const float*>(v_ring + at);
      }
      flush_rows(qb, k_rows.data(), v_rows.data(), flush[s], q_start[s] + q_len[s], D, gs);
      q_len[s] += static_cast<int32_t>(flush[s]);
      t_head[s] = static_cast<int32_t>((t_head[s] + flush[s]) % TC);
    }
    const int64_t tail = static_cast<int64_t>(seg_len[s]) - q_len[s];
    for (int64_t i = 0; i < t; ++i) {
      const int64_t slot = (t_head[s] + tail + i) % TC;
      std::memcpy(k_ring + (s * TC + slot) * row_bytes, k_new + (s * t + i) * row_bytes, row_bytes);
      std::memcpy(v_ring + (s * TC + slot) * row_bytes, v_new + (s * t + i) * row_bytes, row_bytes);
    }
    seg_len[s] += static_cast<int32_t>(t);
  }
  return 0;
}

}  // extern "C"
