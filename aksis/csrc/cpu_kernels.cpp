// aksis's own CPU kernels for x86 CPUs with AVX-512 VNNI, built at first use by aksis/native.py
// (torch.utils.cpp_extension) and registered as PyTorch ops:
//
// - aksis_cpu::int8_linear and aksis_cpu::int4_linear: matrix products for a few rows (a decode step's);
// - aksis_cpu::dense_linear: the same for float32 and bf16 weights, streamed once for all of a few input rows;
// - aksis_cpu::cached_attention: attention of new tokens over the KV cache, reading only the slots each one sees.
//
// The int8 and int4 ones read the weights exactly as aksis.quantize stores them (no packed copy) and quantize the
// input per call to 8 bits, then multiply in integers with VNNI's vpdpbusd (64 products of an unsigned and a signed
// byte, summed in fours into 32-bit lanes), as llama.cpp multiplies its q8_0 and q4_0 weights by 8-bit activations:
//
// - int8: W = scale[n] * w, w in -127..127 (int8, (N, K)). The input row is quantized symmetrically to 8 bits, one
//   scale per row. vpdpbusd wants one unsigned operand: the weight byte is read as w + 128 (one xor), and the
//   surplus 128 * sum(xq) is taken off the row's integer sum.
// - int4: W = (q - 8) * scale[n, g] + zero[n, g], q in 0..15 in groups of 32 inputs, two codes a byte (the even
//   input in the low nibble), scale and zero in bf16. The input is quantized per group of 32 (as llama.cpp's
//   q8_0 does for q4_0), and the input's codes of each 128-input chunk are laid out even inputs first, odd ones
//   second, so that 64 bytes of weight codes (a chunk) meet the even inputs with their low nibbles and the odd ones
//   with their high nibbles. A 32-bit lane then sums 8 inputs of one group, lanes 4g..4g+3 make group g of a
//   chunk, and a group's sum is scale * dx * (sum(q * xq) - 8 * sum(xq)) + zero * sum(x).
//
// Each op takes x in float32 or bfloat16 and returns the same dtype; the work is split among PyTorch's threads
// (at::parallel_for, whose OpenMP pragmas need -fopenmp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#define AKSIS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

namespace {

constexpr int64_t kGroup = 32;        // int4 inputs sharing one scale and zero
constexpr int64_t kChunk = 128;       // int4 inputs in one 64-byte load of codes
constexpr int64_t kBlockGroups = 16;  // int4 groups reduced together (4 chunks, one float per group)
// Software prefetch: the bytes of each weight row this far ahead are fetched while the row is read. Streaming the
// weights from memory, the int8, int4 and bf16 loops wait otherwise (the base preset's bf16 layers, one row: 0.72 ms
// with 16 KB ahead, 0.85 with 8 KB, 1.2 with none; int4, which reads a row in half the steps of int8, did best
// nearer). float32's loads, a whole cache line a step, keep the hardware's prefetcher ahead: prefetching there was
// slower (1.93 ms against 2.04 at 4 KB ahead; and 1.21-1.28 against 1.13-1.18 read a row at a time, dense_row).
constexpr int64_t kAheadBytes = 16384, kInt4AheadBytes = 2048;

inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~0ULL : (1ULL << n) - 1; }

// The sums of four vectors' 32-bit lanes in fours: lane 4k + c of the result is the sum of lanes 4k..4k+3 of
// a[c] (the 128-bit block k of a[c]).
AKSIS_AVX512 inline __m512i sum_fours(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
}

// 16 float32 or bf16 values as floats (the lanes outside m zero: nothing is read there).
AKSIS_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
AKSIS_AVX512 inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// The first n (up to 16) bf16 values at p as floats, the rest zero.
AKSIS_AVX512 inline __m512 load_bf16(const at::BFloat16* p, int64_t n) {
  return load16(p, n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1));
}

// ---- int8 ----------------------------------------------------------------------------------------------------

struct Int8Rows {  // the input rows, quantized: row m is dx[m] * xq[m], xq padded with zeros to `stride` bytes
  int64_t stride;
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> sum128;  // 128 * sum(xq) of each row: what reading w as w + 128 adds
};

// One row of k floats to 8 bits, symmetrically: out[i] = round(x[i] * 127 / max|x|) (to nearest, ties to even, as
// the CPU rounds by default), zeros after k up to a multiple of 16. Returns the sum of out.
AKSIS_AVX512 int32_t quantize_row(const float* x, int64_t k, float inv, int8_t* out) {
  __m512i sum = _mm512_setzero_si512();
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 mask = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), scale));
    sum = _mm512_add_epi32(sum, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtsepi32_epi8(v));
  }
  return _mm512_reduce_add_epi32(sum);
}

AKSIS_AVX512 float abs_max(const float* x, int64_t k) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 mask = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1);
    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, x + i)));
  }
  return _mm512_reduce_max_ps(m);
}

Int8Rows quantize_int8_rows(const float* x, int64_t rows, int64_t k) {
  Int8Rows q;
  q.stride = (k + 63) / 64 * 64;
  q.xq.assign(rows * q.stride, 0);
  q.dx.resize(rows);
  q.sum128.resize(rows);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float amax = abs_max(x + m * k, k);
      q.sum128[m] = 128 * quantize_row(x + m * k, k, amax > 0.0f ? 127.0f / amax : 0.0f, q.xq.data() + m * q.stride);
      q.dx[m] = amax / 127.0f;
    }
  });
  return q;
}

// One step of int8_dot4: 64 inputs (the bytes in `mask`) at i of the four weight rows and the MT input rows.
template <int MT>
AKSIS_AVX512 inline void int8_step(const int8_t* w, int64_t k, const int8_t* xq, int64_t stride, int64_t i,
                                   __mmask64 mask, __m512i (&acc)[MT][4]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w xor 0x80 == w + 128, as an unsigned byte
  __m512i wv[4];
  for (int r = 0; r < 4; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(w + r * k + i) + kAheadBytes, _MM_HINT_T0);
    wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + r * k + i), flip);
  }
  for (int t = 0; t < MT; ++t) {
    __m512i xv = _mm512_loadu_si512(xq + t * stride + i);  // zero-padded: whatever the masked bytes are, 0
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_dpbusd_epi32(acc[t][r], wv[r], xv);
  }
}

// Four rows of the weight (from w, k bytes each) times MT input rows (1 to 4, from xq, `stride` bytes apart): for
// each input row, the four integer sums (with the 128 * sum(xq) surplus). Each weight vector is read once for all MT.
// The loop over whole vectors has a constant mask (as dense_dot4's).
template <int MT>
AKSIS_AVX512 inline void int8_dot4(const int8_t* w, int64_t k, const int8_t* xq, int64_t stride, __m128i* out) {
  __m512i acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) int8_step<MT>(w, k, xq, stride, i, ~0ULL, acc);
  if (i < k) int8_step<MT>(w, k, xq, stride, i, byte_mask(k - i), acc);
  for (int t = 0; t < MT; ++t) {
    __m512i s = sum_fours(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);  // block j: partial sums of the four rows
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    out[t] = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  }
}

AKSIS_AVX512 inline int32_t int8_dot1(const int8_t* w, int64_t k, const int8_t* xq) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; i += 64) {
    __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(byte_mask(k - i), w + i), flip);
    acc = _mm512_dpbusd_epi32(acc, wv, _mm512_loadu_si512(xq + i));
  }
  return _mm512_reduce_add_epi32(acc);
}

AKSIS_AVX512 void int8_rows(const Int8Rows& q, int64_t rows, const int8_t* w, const float* scale,
                            const float* bias, int64_t n_out, int64_t k, float* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
      int64_t mt = std::min<int64_t>(4, rows - m0);
      const int8_t* xq = q.xq.data() + m0 * q.stride;
      __m128i dots4[4];
      switch (mt) {
        case 1: int8_dot4<1>(w + n * k, k, xq, q.stride, dots4); break;
        case 2: int8_dot4<2>(w + n * k, k, xq, q.stride, dots4); break;
        case 3: int8_dot4<3>(w + n * k, k, xq, q.stride, dots4); break;
        default: int8_dot4<4>(w + n * k, k, xq, q.stride, dots4); break;
      }
      for (int64_t t = 0; t < mt; ++t) {
        alignas(16) int32_t dots[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(dots), dots4[t]);
        int64_t m = m0 + t;
        for (int r = 0; r < 4; ++r) {
          float v = q.dx[m] * scale[n + r] * static_cast<float>(dots[r] - q.sum128[m]);
          y[m * n_out + n + r] = bias ? v + bias[n + r] : v;
        }
      }
    }
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < rows; ++m) {
      int32_t dot = int8_dot1(w + n * k, k, q.xq.data() + m * q.stride);
      float v = q.dx[m] * scale[n] * static_cast<float>(dot - q.sum128[m]);
      y[m * n_out + n] = bias ? v + bias[n] : v;
    }
  }
}

// ---- int4 ----------------------------------------------------------------------------------------------------

struct Int4Rows {  // the input rows quantized per group of 32; per row: `chunks` x 128 bytes, then per-group values
  int64_t chunks, groups_padded;
  std::vector<int8_t> xq;      // each 128-input chunk: its 64 even inputs, then its 64 odd ones (zero-padded)
  std::vector<float> dx;       // each group's scale
  std::vector<float> sx;       // each group's sum of x (float)
  std::vector<int32_t> sum8;   // 8 * each group's sum of xq: what the codes' offset of 8 adds
};

// One group of 32 inputs: its codes in `even` (inputs 0, 2, .., 30) and `odd` (1, 3, .., 31), 16 bytes each.
AKSIS_AVX512 void quantize_group(const float* x, int8_t* even, int8_t* odd, float* dx, float* sx, int32_t* sum8) {
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  __m512 scale = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, scale)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, scale));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(qa, evens, qb)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(qa, odds, qb)));
  *dx = amax / 127.0f;
  *sx = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  *sum8 = 8 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}

Int4Rows quantize_int4_rows(const float* x, int64_t rows, int64_t k) {
  Int4Rows q;
  int64_t groups = k / kGroup;
  q.chunks = (k + kChunk - 1) / kChunk;
  q.groups_padded = (groups + kBlockGroups - 1) / kBlockGroups * kBlockGroups;
  q.xq.assign(rows * q.chunks * kChunk, 0);
  q.dx.assign(rows * q.groups_padded, 0.0f);
  q.sx.assign(rows * q.groups_padded, 0.0f);
  q.sum8.assign(rows * q.groups_padded, 0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        // Group g is the (g % 4)-th of its chunk: its even inputs go to the chunk's first 64 bytes, its odd ones to
        // the last 64, 16 bytes each, in the order the codes' low and high nibbles hold them.
        int8_t* chunk = q.xq.data() + (m * q.chunks + g / 4) * kChunk + 16 * (g % 4);
        int64_t j = m * q.groups_padded + g;
        quantize_group(x + m * k + g * kGroup, chunk, chunk + 64, &q.dx[j], &q.sx[j], &q.sum8[j]);
      }
    }
  });
  return q;
}

// One block of 16 groups (512 inputs; fewer at the row's end unless FULL) of R output rows (1 or 2, `row_bytes`
// apart from wn, their scales and zeros `groups` apart), for input rows m0..m0+MT-1 (MT of them, 1 to 4), added to
// total[r][t]: each row's codes are unpacked once for all MT, and each input vector is loaded once for all R.
template <int MT, int R, bool FULL>
AKSIS_AVX512 inline void int4_block(const Int4Rows& q, int64_t m0, const uint8_t* wn, const at::BFloat16* sn,
                                    const at::BFloat16* zn, int64_t groups, int64_t g0, __m512 (*total)[MT]) {
  const int64_t row_bytes = groups * kGroup / 2;
  const __m512i low = _mm512_set1_epi8(0x0F);
  // sum_fours leaves chunk c's group j in lane 4j + c; this puts group 4c + j in lane 4c + j.
  const __m512i natural = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i lo[R][4], hi[R][4];
  __m512 s[R], z[R];
  const int64_t left = FULL ? kBlockGroups : groups - g0;
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = wn + r * row_bytes;
    for (int c = 0; c < 4; ++c) {
      int64_t byte0 = (g0 + 4 * c) * (kGroup / 2);
      _mm_prefetch(reinterpret_cast<const char*>(wr + byte0) + kInt4AheadBytes, _MM_HINT_T0);
      __m512i codes = FULL ? _mm512_loadu_si512(wr + byte0)
                           : _mm512_maskz_loadu_epi8(byte_mask(std::max<int64_t>(row_bytes - byte0, 0)), wr + byte0);
      lo[r][c] = _mm512_and_si512(codes, low);
      hi[r][c] = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
    }
    s[r] = load_bf16(sn + r * groups + g0, left);
    z[r] = load_bf16(zn + r * groups + g0, left);
  }
  for (int t = 0; t < MT; ++t) {
    const int8_t* xm = q.xq.data() + ((m0 + t) * q.chunks + g0 / 4) * kChunk;
    __m512i acc[R][4];
    for (int c = 0; c < 4; ++c) {  // chunks past the row's end: lo and hi are zero, and so is x
      const __m512i xe = _mm512_loadu_si512(xm + c * kChunk), xo = _mm512_loadu_si512(xm + c * kChunk + 64);
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r][c], xe), hi[r][c], xo);
    }
    int64_t j = (m0 + t) * q.groups_padded + g0;
    const __m512i sum8 = _mm512_loadu_si512(q.sum8.data() + j);
    const __m512 dx = _mm512_loadu_ps(q.dx.data() + j), sx = _mm512_loadu_ps(q.sx.data() + j);
    for (int r = 0; r < R; ++r) {
      __m512i dots = _mm512_permutexvar_epi32(natural, sum_fours(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      dots = _mm512_sub_epi32(dots, sum8);
      total[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(s[r], dx), total[r][t]);
      total[r][t] = _mm512_fmadd_ps(z[r], sx, total[r][t]);
    }
  }
}

// Output rows n..n+R-1 (wn, sn, zn at row n) for input rows m0..m0+MT-1: 16 partial sums for each pair, in
// total[r][t].
template <int MT, int R>
AKSIS_AVX512 inline void int4_rows_of(const Int4Rows& q, int64_t m0, const uint8_t* wn, const at::BFloat16* sn,
                                      const at::BFloat16* zn, int64_t groups, __m512 (*total)[MT]) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) total[r][t] = _mm512_setzero_ps();
  int64_t g0 = 0;
  for (; g0 + kBlockGroups <= groups; g0 += kBlockGroups) int4_block<MT, R, true>(q, m0, wn, sn, zn, groups, g0, total);
  if (g0 < groups) int4_block<MT, R, false>(q, m0, wn, sn, zn, groups, g0, total);
}

// The sums of four float vectors, as four floats.
AKSIS_AVX512 inline __m128 sum4_ps(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  __m512d l = _mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
  __m512d h = _mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
  __m512 s = _mm512_add_ps(_mm512_castpd_ps(l), _mm512_castpd_ps(h));  // block j: partial sums of a0..a3
  __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
  __m256 half = _mm256_add_ps(_mm512_castps512_ps256(s), upper);
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

template <int MT>
AKSIS_AVX512 inline void int4_tile(const Int4Rows& q, int64_t m0, const uint8_t* w, const at::BFloat16* scale,
                                   const at::BFloat16* zero, const float* bias, int64_t n_out, int64_t k, float* y,
                                   int64_t n0, int64_t n1) {
  const int64_t groups = k / kGroup, row_bytes = k / 2;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {  // four output rows at a time (two pairs), their sums reduced together
    __m512 total[4][MT];
    for (int r = 0; r < 4; r += 2)
      int4_rows_of<MT, 2>(q, m0, w + (n + r) * row_bytes, scale + (n + r) * groups, zero + (n + r) * groups, groups,
                          total + r);
    __m128 b = bias ? _mm_loadu_ps(bias + n) : _mm_setzero_ps();
    for (int t = 0; t < MT; ++t) {
      __m128 sums = sum4_ps(total[0][t], total[1][t], total[2][t], total[3][t]);
      _mm_storeu_ps(y + (m0 + t) * n_out + n, _mm_add_ps(sums, b));
    }
  }
  for (; n < n1; ++n) {
    __m512 total[1][MT];
    int4_rows_of<MT, 1>(q, m0, w + n * row_bytes, scale + n * groups, zero + n * groups, groups, total);
    for (int t = 0; t < MT; ++t) {
      float v = _mm512_reduce_add_ps(total[0][t]);
      y[(m0 + t) * n_out + n] = bias ? v + bias[n] : v;
    }
  }
}

AKSIS_AVX512 void int4_rows(const Int4Rows& q, int64_t rows, const uint8_t* w, const at::BFloat16* scale,
                            const at::BFloat16* zero, const float* bias, int64_t n_out, int64_t k, float* y,
                            int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    switch (std::min<int64_t>(4, rows - m0)) {
      case 1: int4_tile<1>(q, m0, w, scale, zero, bias, n_out, k, y, n0, n1); break;
      case 2: int4_tile<2>(q, m0, w, scale, zero, bias, n_out, k, y, n0, n1); break;
      case 3: int4_tile<3>(q, m0, w, scale, zero, bias, n_out, k, y, n0, n1); break;
      default: int4_tile<4>(q, m0, w, scale, zero, bias, n_out, k, y, n0, n1); break;
    }
  }
}

// ---- float32 and bfloat16 weights ------------------------------------------------------------------------------

// One step of dense_dot4: 16 inputs (the lanes in `mask`) at i of the four weight rows and the MT input rows.
template <int MT, typename T>
AKSIS_AVX512 inline void dense_step(const T* w, int64_t k, const float* x, int64_t i, __mmask16 mask,
                                    __m512 (&acc)[MT][4]) {
  __m512 wv[4];
  for (int r = 0; r < 4; ++r) {
    if (sizeof(T) == 2 && i % 32 == 0)  // bf16: once a cache line
      _mm_prefetch(reinterpret_cast<const char*>(w + r * k + i) + kAheadBytes, _MM_HINT_T0);
    wv[r] = load16(w + r * k + i, mask);
  }
  for (int t = 0; t < MT; ++t) {
    __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * k + i);
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_fmadd_ps(wv[r], xv, acc[t][r]);
  }
}

// Four rows of a float32 or bf16 weight (k values each, from w) times MT input rows (1 to 4, float32, k apart):
// each weight vector read once for all MT, as int8_dot4 does. The loop over whole vectors has a constant mask:
// computing one each step made a float32 layer 28% slower.
template <int MT, typename T>
AKSIS_AVX512 inline void dense_dot4(const T* w, int64_t k, const float* x, __m128* out) {
  __m512 acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) dense_step<MT>(w, k, x, i, static_cast<__mmask16>(0xFFFF), acc);
  if (i < k) dense_step<MT>(w, k, x, i, static_cast<__mmask16>((1u << (k - i)) - 1), acc);
  for (int t = 0; t < MT; ++t) out[t] = sum4_ps(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
}

// One weight row (k values from w) times MT input rows (float32, k apart), read front to back, 64 values a step in
// four accumulators each: a thread reads its share of the weight as one stream. For one row (two in float32), the
// base preset's 25 float32 layers took 1.13 ms this way against 1.52-1.70 four rows at a time, SmolLM2's 151 layers
// 8.1-9.0 ms against 11.3-13.0, bf16 0.49 ms against 0.52 (with prefetch); from two bf16 rows up, where the
// multiplies count more than the bytes, four weight rows at a time (dense_dot4) reuse each input vector better.
template <int MT, typename T>
AKSIS_AVX512 inline void dense_row(const T* w, int64_t k, const float* x, float* out) {
  __m512 acc[MT][4];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < 4; ++u) acc[t][u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    if (sizeof(T) == 2) {  // bf16: 64 values are two cache lines (float32's stream needs no help)
      _mm_prefetch(reinterpret_cast<const char*>(w + i) + kAheadBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + i + 32) + kAheadBytes, _MM_HINT_T0);
    }
    for (int u = 0; u < 4; ++u) {
      const __m512 wv = load16(w + i + 16 * u, static_cast<__mmask16>(0xFFFF));
      for (int t = 0; t < MT; ++t) acc[t][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * k + i + 16 * u), acc[t][u]);
    }
  }
  for (; i < k; i += 16) {
    const __mmask16 mask = k - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k - i)) - 1);
    const __m512 wv = load16(w + i, mask);
    for (int t = 0; t < MT; ++t) acc[t][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + t * k + i), acc[t][0]);
  }
  for (int t = 0; t < MT; ++t) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3]));
    out[t] = _mm512_reduce_add_ps(sum);
  }
}

template <typename T>
AKSIS_AVX512 void dense_rows(const float* x, int64_t rows, const T* w, const float* bias, int64_t n_out, int64_t k,
                             float* y, int64_t n0, int64_t n1) {
  if (rows == 1 || (rows == 2 && sizeof(T) == 4)) {  // as few rows as a decode step at batch 1: one stream
    for (int64_t n = n0; n < n1; ++n) {
      float v[2];
      if (rows == 1)
        dense_row<1>(w + n * k, k, x, v);
      else
        dense_row<2>(w + n * k, k, x, v);
      for (int64_t t = 0; t < rows; ++t) y[t * n_out + n] = bias ? v[t] + bias[n] : v[t];
    }
    return;
  }
  for (int64_t n = n0; n < n1; n += 4) {
    // The last rows of an output count not divisible by 4 are read from a zero-padded copy.
    const T* wn = w + n * k;
    std::vector<T> padded;
    const int64_t live = std::min<int64_t>(4, n1 - n);
    if (live < 4) {
      padded.assign(4 * k, T(0));
      std::copy(wn, wn + live * k, padded.begin());
      wn = padded.data();
    }
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
      __m128 sums[4];
      const float* xm = x + m0 * k;
      switch (std::min<int64_t>(4, rows - m0)) {
        case 1: dense_dot4<1>(wn, k, xm, sums); break;
        case 2: dense_dot4<2>(wn, k, xm, sums); break;
        case 3: dense_dot4<3>(wn, k, xm, sums); break;
        default: dense_dot4<4>(wn, k, xm, sums); break;
      }
      for (int64_t t = 0; t < std::min<int64_t>(4, rows - m0); ++t) {
        alignas(16) float v[4];
        _mm_store_ps(v, sums[t]);
        for (int64_t r = 0; r < live; ++r) y[(m0 + t) * n_out + n + r] = bias ? v[r] + bias[n + r] : v[r];
      }
    }
  }
}

// ---- attention over the KV cache ----------------------------------------------------------------------------

// e^x for x <= 0 (softmax's shifted scores), to about 2e-7: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor
// polynomial to r^6, times 2^n (scalef).
AKSIS_AVX512 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // e^-87 is near float's smallest normal: 0 from here on is as good
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: r exact enough
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}


constexpr int64_t kMaxHeadDim = 256;

// One query (hd values at q) over the first n slots of one head's keys and values (rows of hd, contiguous):
// softmax(q k^T * scale) v, into out (hd floats). `scores` has room for n floats.
template <typename T>
AKSIS_AVX512 void attend_one(const T* q, const T* k, const T* v, int64_t n, int64_t hd, float scale, float* scores,
                             float* out) {
  const int64_t nv = (hd + 15) / 16;
  const __mmask16 tail = hd % 16 ? static_cast<__mmask16>((1u << (hd % 16)) - 1) : 0xFFFF;
  auto lanes = [&](int64_t j) -> __mmask16 { return j == nv - 1 ? tail : 0xFFFF; };  // vector j of a head
  __m512 qv[kMaxHeadDim / 16];
  for (int64_t j = 0; j < nv; ++j) qv[j] = _mm512_mul_ps(load16(q + 16 * j, lanes(j)), _mm512_set1_ps(scale));
  float top = -INFINITY;
  for (int64_t s = 0; s < n; ++s) {
    const T* ks = k + s * hd;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < nv; ++j) acc = _mm512_fmadd_ps(qv[j], load16(ks + 16 * j, lanes(j)), acc);
    scores[s] = _mm512_reduce_add_ps(acc);
    top = std::max(top, scores[s]);
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; s += 16) {
    __mmask16 m = n - s >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - s)) - 1);
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + s), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(scores + s, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  __m512 acc[kMaxHeadDim / 16];
  for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    const T* vs = v + s * hd;
    __m512 p = _mm512_set1_ps(scores[s]);
    for (int64_t j = 0; j < nv; ++j) acc[j] = _mm512_fmadd_ps(p, load16(vs + 16 * j, lanes(j)), acc[j]);
  }
  __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t j = 0; j < nv; ++j) _mm512_mask_storeu_ps(out + 16 * j, lanes(j), _mm512_mul_ps(acc[j], inv));
}

// ---- the ops -------------------------------------------------------------------------------------------------

// n contiguous bf16 values as floats.
AKSIS_AVX512 void bf16_to_float(const at::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, load16(src + i, m));
  }
}

// n floats as bf16, rounded to nearest even as PyTorch rounds them (a NaN is bf16's NaN).
AKSIS_AVX512 void float_to_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
  }
}

// A tensor's values as contiguous float32: its own data when it is contiguous float32, else a copy in buf, made
// without an ATen call when it is contiguous bf16 (a decode step makes 25 calls of each op, and each ATen call costs
// about as much as a small layer's arithmetic: in bf16, three conversions a call took 0.1 ms a step).
const float* float_values(const at::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  buf.resize(t.numel());
  if (t.scalar_type() == at::kBFloat16 && t.is_contiguous()) {
    bf16_to_float(t.data_ptr<at::BFloat16>(), buf.data(), t.numel());
  } else {
    at::Tensor c = t.to(at::kFloat).contiguous();
    std::copy(c.data_ptr<float>(), c.data_ptr<float>() + c.numel(), buf.begin());
  }
  return buf.data();
}

// Where an op writes float32 results for an output `out` of float32 or bf16: out's own data, or a buffer that
// `finish` then rounds into out.
struct FloatOut {
  at::Tensor out;
  bool rounds;  // out is bf16
  std::vector<float> buf;
  explicit FloatOut(at::Tensor t) : out(std::move(t)), rounds(out.scalar_type() != at::kFloat) {
    if (rounds) buf.resize(out.numel());
  }
  float* data() { return rounds ? buf.data() : out.data_ptr<float>(); }
  at::Tensor finish() {
    if (rounds && out.numel() > 0) float_to_bf16(buf.data(), out.data_ptr<at::BFloat16>(), out.numel());
    return out;
  }
};

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, not ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x needs at least one dimension");
}

// Grain of output rows per thread: enough work that a call on one small layer does not pay for waking threads.
int64_t grain(int64_t rows, int64_t k) { return std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(k * rows, 1)); }

// What the three linear ops share: x as float32 rows of k, the bias as float32 (or null), the output (..., n) in
// x's dtype, run(x, rows, bias, y) called (y float32) unless there are no rows.
template <typename Run>
at::Tensor linear_op(const at::Tensor& x, int64_t n, int64_t k, const std::optional<at::Tensor>& bias, const Run& run) {
  TORCH_CHECK(!bias.has_value() || bias->numel() == n, "aksis_cpu: the bias has ", bias->numel(), " values for ", n,
              " outputs");
  const int64_t rows = x.numel() / k;
  FloatOut y(at::empty(output_shape(x, n), x.options()));
  if (rows == 0) return y.out;
  std::vector<float> xbuf, bbuf;
  const float* xp = float_values(x, xbuf);
  run(xp, rows, bias.has_value() ? float_values(*bias, bbuf) : nullptr, y.data());
  return y.finish();
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  check_input(x, "aksis_cpu::int8_linear");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "aksis_cpu::int8_linear: the weight must be a contiguous int8 matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.size(-1) == k && k > 0, "aksis_cpu::int8_linear: x has ", x.size(-1), " features, the weight ", k);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n && scale.is_contiguous(),
              "aksis_cpu::int8_linear: the scale must be ", n, " contiguous float32 values");
  return linear_op(x, n, k, bias, [&](const float* xp, int64_t rows, const float* bp, float* yp) {
    Int8Rows q = quantize_int8_rows(xp, rows, k);
    const int8_t* w = weight.data_ptr<int8_t>();
    const float* s = scale.data_ptr<float>();
    at::parallel_for(0, (n + 3) / 4, grain(rows, k) / 4 + 1, [&](int64_t begin, int64_t end) {
      int8_rows(q, rows, w, s, bp, n, k, yp, begin * 4, std::min(end * 4, n));
    });
  });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero,
                       const std::optional<at::Tensor>& bias) {
  check_input(x, "aksis_cpu::int4_linear");
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.is_contiguous(),
              "aksis_cpu::int4_linear: the weight must be a contiguous uint8 matrix of two codes a byte");
  const int64_t n = weight.size(0), k = 2 * weight.size(1);
  TORCH_CHECK(x.size(-1) == k, "aksis_cpu::int4_linear: x has ", x.size(-1), " features, the weight ", k);
  TORCH_CHECK(k > 0 && k % kGroup == 0, "aksis_cpu::int4_linear: the inputs must come in groups of ", kGroup);
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->numel() == n * (k / kGroup) && t->is_contiguous(),
                "aksis_cpu::int4_linear: scale and zero must be contiguous bf16, one a group of ", kGroup);
  }
  return linear_op(x, n, k, bias, [&](const float* xp, int64_t rows, const float* bp, float* yp) {
    Int4Rows q = quantize_int4_rows(xp, rows, k);
    const uint8_t* w = weight.data_ptr<uint8_t>();
    const at::BFloat16* s = scale.data_ptr<at::BFloat16>();
    const at::BFloat16* z = zero.data_ptr<at::BFloat16>();
    at::parallel_for(0, n, grain(rows, k), [&](int64_t begin, int64_t end) {
      int4_rows(q, rows, w, s, z, bp, n, k, yp, begin, end);
    });
  });
}

// x (..., K) times a float32 or bf16 weight (N, K) of the same dtype as x, plus the bias: a few rows, as a decode
// step has them (the weight streamed once, 4 of its rows at a time; bf16 with software prefetch).
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_input(x, "aksis_cpu::dense_linear");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 2 && weight.is_contiguous(),
              "aksis_cpu::dense_linear: the weight must be a contiguous matrix in x's dtype");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.size(-1) == k && k > 0, "aksis_cpu::dense_linear: x has ", x.size(-1), " features, the weight ", k);
  return linear_op(x, n, k, bias, [&](const float* xp, int64_t rows, const float* bp, float* yp) {
    at::parallel_for(0, (n + 3) / 4, grain(rows, k) / 4 + 1, [&](int64_t begin, int64_t end) {
      if (weight.scalar_type() == at::kFloat)
        dense_rows(xp, rows, weight.data_ptr<float>(), bp, n, k, yp, begin * 4, std::min(end * 4, n));
      else
        dense_rows(xp, rows, weight.data_ptr<at::BFloat16>(), bp, n, k, yp, begin * 4, std::min(end * 4, n));
    });
  });
}

at::Tensor dense_linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return at::empty(output_shape(x, weight.size(0)), x.options());
}

// Attention of the queries q (B, n_head, T, hd) over a KV cache k, v (B, n_kv_head, S, hd): the query at slot
// input_pos[t] sees the slots 0..input_pos[t] (causal, no padding), and only those are read. Returns
// (B, n_head, T, hd) in q's dtype, laid out as (B, T, n_head, hd), which is how the model reads it next.
at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& input_pos) {
  check_input(q, "aksis_cpu::cached_attention");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "aksis_cpu::cached_attention: q, k and v must be 4-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() && k.is_contiguous() &&
                  v.is_contiguous() && k.sizes() == v.sizes(),
              "aksis_cpu::cached_attention: the cache's k and v must be contiguous, of one shape, in q's dtype");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hd = q.size(3), nkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == hd && nkv > 0 && nh % nkv == 0 && hd <= kMaxHeadDim,
              "aksis_cpu::cached_attention: q ", q.sizes(), " does not fit the cache ", k.sizes());
  TORCH_CHECK(input_pos.scalar_type() == at::kLong && input_pos.dim() == 1 && input_pos.size(0) == T,
              "aksis_cpu::cached_attention: input_pos must hold one int64 slot per query");
  at::Tensor pos = input_pos.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < S, "aksis_cpu::cached_attention: slot ", pp[t], " is outside the cache");
  at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  FloatOut out(at::empty({B, T, nh, hd}, q.options()));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* op = out.data();
  auto run = [&](auto* qp, auto* kp, auto* vp) {
    at::parallel_for(0, B * nh * T, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(S);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (nh * T), h = i / T % nh, t = i % T, kvh = h / (nh / nkv);
        const int64_t head = (b * nkv + kvh) * S * hd;
        attend_one(qp + b * qc.stride(0) + h * qc.stride(1) + t * qc.stride(2), kp + head, vp + head, pp[t] + 1, hd,
                   scale, scores.data(), op + ((b * T + t) * nh + h) * hd);
      }
    });
  };
  if (q.scalar_type() == at::kFloat)
    run(qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(qc.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  return out.finish().transpose(1, 2);
}

at::Tensor cached_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& input_pos) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

at::Tensor int8_linear_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias) {
  return at::empty(output_shape(x, weight.size(0)), x.options());
}

at::Tensor int4_linear_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const at::Tensor& zero, const std::optional<at::Tensor>& bias) {
  return at::empty(output_shape(x, weight.size(0)), x.options());
}

}  // namespace

TORCH_LIBRARY(aksis_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor weight, Tensor scale, Tensor zero, Tensor? bias) -> Tensor");
  m.def("cached_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(aksis_cpu, CPU, m) {
  m.impl("int8_linear", int8_linear);
  m.impl("int4_linear", int4_linear);
  m.impl("cached_attention", cached_attention);
  m.impl("dense_linear", dense_linear);
}

TORCH_LIBRARY_IMPL(aksis_cpu, Meta, m) {
  m.impl("int8_linear", int8_linear_meta);
  m.impl("int4_linear", int4_linear_meta);
  m.impl("cached_attention", cached_attention_meta);
  m.impl("dense_linear", dense_linear_meta);
}
