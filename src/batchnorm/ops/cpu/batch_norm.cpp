// Batch normalization kernels for the CPU: training and eval forward, backward.
//
// Layouts (no copies for these): an input (N, C, *) is seen either as
//   planar:        x[n, c, s] at (n * C + c) * S + s   (NCHW, NCDHW: contiguous, S = prod(*))
//   channel-inner: x[r, c]    at r * C + c             ((N, C), NHWC, NDHWC: R = N * S rows)
// Any other strides are copied to the contiguous layout first.
//
// Statistics are float32 arithmetic on vectors, merged in float64 in a fixed order:
// - the data are cut in fixed-size groups (planar: whole rows of a channel, about 4096 values;
//   channel-inner: fixed blocks of rows); each group gets its mean and M2 = sum (x - mean)^2 and
//   the groups are merged with Chan's formula in float64, in group order;
// - every group is centred before it is summed, so that x - centre is exact in float32 for a
//   large mean with a small spread (1e4 + randn keeps float32 accuracy) and the float32 sums stay
//   small where a channel's values drift along the batch. Both layouts take one pass of sums
//   of d = x - centre and d^2 per group, whose cancellation is bounded by a guard
//   (one_pass_moments: mean^2 <= 8 var); a group that fails it is redone in two passes (the
//   second from L1/L2). Planar: the first group centred on the mean of its first row, every
//   later one on the mean of the group before (group_centres); the tails of rows that are
//   not a multiple of the vector width are summed as partial vectors (zeroed lanes) in the
//   same lanes as the rest. Channel-inner: every block on the channel's
//   common shift, the first block's mean (inner_block_moments); a redone block is centred on
//   its own first row. No unguarded E[x^2] - E[x]^2 anywhere.
// - the work split never depends on the thread count (planar: fixed blocks of channels;
//   channel-inner: fixed blocks of rows), so results are bitwise independent of torch's thread
//   count.
//
// Saved for backward (float32, (C,)): shift, mean_s (the mean of x - shift) and invstd; the mean
// is shift + mean_s. Eval mode stores shift = running_mean, mean_s = 0.
//
// Fused tails (batch norm + ReLU, batch norm + residual + ReLU): the output pass adds the residual
// z and applies the ReLU before it stores y (and, for save="mask", one byte per element saying
// y > 0); the residual is added to the batch-norm value rounded to the input's dtype, as the
// unfused composition relu(bn(x) + z) computes it, so both give the same numbers. The backward
// first gates dy by the ReLU (from y, the mask, or the pre-activation recomputed from x and z with
// the forward's own per-channel scale and offset) into dz, then runs the batch-norm backward on it.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#ifndef _WIN32
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace {

// The per-row helpers and the lambdas that walk rows must be inlined into their loops, so that
// the accumulators stay in registers across a channel's rows.
#define BN_ALWAYS_INLINE __attribute__((always_inline))
#define BN_NOINLINE __attribute__((noinline))

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
using BF16 = c10::BFloat16;
constexpr int64_t kW = Vec::size();
constexpr int64_t kGroupElems = 4096;  // planar: values per statistics group (in L1/L2)

template <typename T>
inline Vec vload(const T* p);
template <>
inline Vec vload<float>(const float* p) {
  return Vec::loadu(p);
}
template <>
inline Vec vload<BF16>(const BF16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}

template <typename T>
inline void vstore(T* p, const Vec& v);
template <>
inline void vstore<float>(float* p, const Vec& v) {
  v.store(p);
}
#if defined(CPU_CAPABILITY_AVX512)
// The 16 floats of v rounded to bfloat16 as vstore rounds them, as 16-bit lanes.
inline __m256i bf16_bits(const Vec& v) {
  return _mm512_castsi512_si256(__m512i(at::vec::convert_float_bfloat16(v, v)));
}
#endif
template <>
inline void vstore<BF16>(BF16* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  // The lower half of the 32 lanes in a plain store (the store of 16 lanes masks the 32).
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
#elif defined(CPU_CAPABILITY_AVX2)
  const at::vec::Vectorized<BF16> b = at::vec::convert_float_bfloat16(v, v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(__m256i(b)));
#else
  const at::vec::Vectorized<BF16> b = at::vec::convert_float_bfloat16(v, v);
  b.store(p, kW);
#endif
}

// The first n < kW values at p as a vector (zeros in the other lanes), and a store of a vector's
// first n lanes: the tails of rows shorter than a multiple of the vector width.
template <typename T>
inline Vec vload_n(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    // One masked load (the other lanes zero), widened to float: bfloat16 is float's upper half.
    // (Through a buffer, the copy's call and the failed store forwarding took 40 % of a 7x7
    // bfloat16 forward.)
    const __m256i raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
    // AVX2 has no 16-bit masked load: whole pairs as masked 32-bit lanes (never a byte past
    // the n values), an odd last value inserted on its own, then widened to float.
    const int pairs = static_cast<int>(n / 2);
    const __m128i lanes = _mm_cmpgt_epi32(_mm_set1_epi32(pairs), _mm_setr_epi32(0, 1, 2, 3));
    __m128i raw = _mm_maskload_epi32(reinterpret_cast<const int*>(p), lanes);
    if (n & 1) {
      const int last = static_cast<int>(c10::bit_cast<uint16_t>(p[n - 1]));
      switch (n) {  // the lane index of _mm_insert_epi16 is an immediate
        case 1: raw = _mm_insert_epi16(raw, last, 0); break;
        case 3: raw = _mm_insert_epi16(raw, last, 2); break;
        case 5: raw = _mm_insert_epi16(raw, last, 4); break;
        default: raw = _mm_insert_epi16(raw, last, 6); break;
      }
    }
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
#else
    float buf[kW] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return Vec::loadu(buf);
#endif
  }
}
// The n <= kW values at p as a vector (a whole vector where n == kW).
template <typename T>
BN_ALWAYS_INLINE inline Vec vload_upto(const T* p, int64_t n) {
  return n == kW ? vload(p) : vload_n(p, n);
}

template <typename T>
inline void vstore_n(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    at::vec::convert_float_bfloat16(v, v).store(p, n);
  }
}

// Streaming (non-temporal) stores, for outputs too large to stay in cache until their reader
// comes: a plain store first reads the line it writes (for ownership), so an output pass moves
// its bytes twice; a streaming store writes whole lines to memory without reading them. On the
// AMD EPYC a training forward's output pass (x from L2, y written) took 1.6x the time of a copy
// with plain stores and about 1.0x with streaming ones. Each value is computed as before; only
// the store differs, so the results do not depend on whether a pass streams.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;
#endif

// A streaming store of one vector at p, which must be aligned to the stored bytes
// (stream_head).
template <typename T>
inline void vstream(T* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
  } else {  // the 16 bfloat16 values are the low half of the packed pair
    const __m512i packed = at::vec::convert_float_bfloat16(v, v);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else {
    const __m256i packed = at::vec::convert_float_bfloat16(v, v);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
#else
  vstore(p, v);
#endif
}

// A vector stored at p, streamed where `stream` (p then aligned as vstream needs).
template <typename T>
BN_ALWAYS_INLINE inline void vstore_or_stream(T* p, const Vec& v, bool stream) {
  if (stream) {
    vstream(p, v);
  } else {
    vstore(p, v);
  }
}

// How many of the len values from p come before the first address where a vector of T can be
// streamed (at most len).
template <typename T>
inline int64_t stream_head(const T* p, int64_t len) {
  constexpr uintptr_t bytes = kW * sizeof(T);
  const uintptr_t skip = (bytes - reinterpret_cast<uintptr_t>(p) % bytes) % bytes;
  return std::min<int64_t>(len, static_cast<int64_t>(skip / sizeof(T)));
}

// The first n < kW lanes of v stored at p through a buffer (the same bits as vstore_n): beside
// streaming stores a masked store cost more (a 64x1024x14x14 output pass with masked row ends
// took 1.69x the copy, with the ends written through a buffer 1.37x).
template <typename T>
inline void vstore_n_copied(T* p, const Vec& v, int64_t n) {
  T tmp[kW];
  vstore(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}

struct NothingAfter {
  void operator()(int64_t, int64_t) const {}
};

// A run of len values written as whole vectors on vector boundaries: value_n(i, n) gives the
// n < kW values from i (the run's ends, off a vector boundary), value(i) the vector at i, and
// after(i, n) comes after the n values from i are stored. kStream: streaming stores for the
// whole vectors, the ends written through a buffer (a template argument: as a run-time flag
// in the loop, the eval forward took 1.38x the time at 32x512x7x7, 1.03-1.07x on 14x14 and
// other 7x7 planes).
template <bool kStream, typename T, typename N, typename V, typename A>
BN_ALWAYS_INLINE inline void vector_run(T* out, int64_t len, N&& value_n, V&& value, A&& after) {
  auto part = [&](int64_t i, int64_t n) BN_ALWAYS_INLINE {
    if constexpr (kStream) {
      vstore_n_copied(out + i, value_n(i, n), n);
    } else {
      vstore_n(out + i, value_n(i, n), n);
    }
    after(i, n);
  };
  int64_t i = stream_head(out, len);
  if (i > 0) part(0, i);
  for (; i + kW <= len; i += kW) {
    if constexpr (kStream) {
      vstream(out + i, value(i));
    } else {
      vstore(out + i, value(i));
    }
    after(i, kW);
  }
  if (i < len) part(i, len - i);
}

// vector_run over a flat run whose values come from at(i, n) (n <= kW), streaming or not.
template <typename T, typename N, typename A>
BN_ALWAYS_INLINE inline void flat_run(T* out, int64_t len, bool stream, N&& at, A&& after) {
  auto whole = [&](int64_t i) BN_ALWAYS_INLINE { return at(i, kW); };
  if (stream) {
    vector_run<true>(out, len, at, whole, after);
  } else {
    vector_run<false>(out, len, at, whole, after);
  }
}

// A row of len values written with streaming stores (vector_run).
template <typename T, typename N, typename V>
BN_ALWAYS_INLINE inline void stream_row(T* out, int64_t len, N&& value_n, V&& value) {
  vector_run<true>(out, len, value_n, value, NothingAfter());
}

// Makes the streaming stores of this thread visible before it reports its part done.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// When a pass streams its output, measured on the EPYC (1 thread, training forward, eval forward,
// forward + backward, and a step that also reads y and dx once, as the next layers do; paired
// medians, BENCHMARKS.md): when the pass moves at least kStreamMinBytes (its inputs read plus its
// output written). Steps with a 6-49 MB tensor took 0.76-0.91x the time; forward passes moving
// 12-16 MB (a 6 or 8 MB x) were mixed (0.94-1.26x); a 3 MB backward was even. A fixed size, not
// one derived from the cache sizes the CPU reports: in a virtual machine those can be the
// host's (cpuid reported 320 MB of L3 where the VM had 32 MB).
constexpr int64_t kStreamMinBytes = int64_t{18} << 20;
// Planar rows written one by one stream from this many bytes on. A row that does not start on
// a cache line has a line at each end shared with its neighbours, written with plain stores
// (through a buffer: vstore_n_copied); 14x14 planes (784 bytes) gained (64x1024x14x14: forward
// 0.71x, backward 0.84x), 7x7 planes (196 bytes, 2 of their 4 lines shared) took 1.04-1.16x the
// time. The output passes walk such short rows, and rows off the vector width, as one flat run
// instead (flat_rows, rows_after_statistics), which streams whole vectors like a long row.
constexpr int64_t kStreamMinRowBytes = 512;

std::atomic<int64_t>& stream_min_bytes() {
  static std::atomic<int64_t> bytes{kStreamMinBytes};
  return bytes;
}

// Whether a pass that moves `traffic` bytes (inputs read plus output written) streams its output.
inline bool stream_pass(int64_t traffic) {
  return kCanStream && traffic >= stream_min_bytes().load(std::memory_order_relaxed);
}

// Whether every row of `row` values of a channels-last output at p starts where a vector can be
// streamed: the walks over rows of C then split each row into vectors exactly as without
// streaming (their scalar tails need not round like the vector code).
template <typename T>
inline bool rows_can_stream(const T* p, int64_t row) {
  constexpr int64_t bytes = kW * sizeof(T);
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && (row * sizeof(T)) % bytes == 0;
}

// Asks for a short row (a channel's run of S values in NCHW) ahead of its use: the hardware
// prefetchers do not follow runs of a few hundred bytes spread C * S values apart.
inline void prefetch_row(const void* p, int64_t bytes) {
  if (bytes > 16384) return;  // long rows: the hardware prefetchers keep up on their own
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// Asks for a chunk of K vectors into L2, for a walk down the rows of a channels-last block:
// such a walk touches a few lines per row, every row in another 4 KiB page, which the hardware
// prefetchers do not follow when the tensor comes from memory. The walks ask for the same
// channels of the next block (same row, one block on) as they go, one line asked per line read.
template <int K, typename T>
BN_ALWAYS_INLINE inline void prefetch_chunk(const T* p) {
  constexpr int64_t bytes = K * kW * static_cast<int64_t>(sizeof(T));
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

inline float hsum(const Vec& v) {
  float tmp[kW];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += tmp[i];
  return s;
}

// Running (count, mean, M2) in float64, merged with Chan et al.'s pairwise formula.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    if (n == 0) {  // the first group: the weights below are 1 and 0 exactly, without divisions
      add(mean, m2, mean_b, m2_b, 1.0, 0.0);
      n = nb;
      return;
    }
    const double total = n + nb;
    add(mean, m2, mean_b, m2_b, nb / total, n * nb / total);
    n = total;
  }
  // Chan's update of (mean, m2) by a group's (mean_b, m2_b) with the weights nb / total and
  // n * nb / total, which depend on the counts alone (shared by channels with the same counts).
  static void add(double& mean, double& m2, double mean_b, double m2_b, double w_mean,
                  double w_m2) {
    const double delta = mean_b - mean;
    mean += delta * w_mean;
    m2 += m2_b + delta * delta * w_m2;
  }
};

// The lanes of v past the first n set to zero (the tail of a row shorter than a multiple of the
// vector width: its values are summed in vector lanes like the rest).
inline Vec first_lanes(const Vec& v, int64_t n) { return Vec::set(Vec(0.f), v, n); }

// first_lanes(vload_n(p, n) - c, n), with two masked instructions where AVX512 has them (a row
// of 49 values pays this once per row: Vec::set's blend costs a jump per call).
template <typename T>
inline Vec tail_minus(const T* p, int64_t n, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    return Vec(_mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, p), c));
  }
#endif
  return first_lanes(vload_n(p, n) - c, n);
}

// Sum of (p[i] - shift) over a row of len values (four independent vector chains).
template <typename T>
BN_ALWAYS_INLINE inline void row_sum(const T* p, int64_t len, float shift, Vec* acc) {
  const Vec vs(shift);
  int64_t i = 0;
  for (; i + 4 * kW <= len; i += 4 * kW) {
    acc[0] += vload(p + i) - vs;
    acc[1] += vload(p + i + kW) - vs;
    acc[2] += vload(p + i + 2 * kW) - vs;
    acc[3] += vload(p + i + 3 * kW) - vs;
  }
  for (; i + kW <= len; i += kW) acc[0] += vload(p + i) - vs;
  if (i < len) acc[1] += first_lanes(vload_n(p + i, len - i) - vs, len - i);
}

// Sum of ((p[i] - shift) - centre)^2 over a row (x - shift is exact; centre is small).
template <typename T>
BN_ALWAYS_INLINE inline void row_m2(const T* p, int64_t len, float shift, float centre, Vec* acc) {
  const Vec vs(shift), vc(centre);
  int64_t i = 0;
  for (; i + 4 * kW <= len; i += 4 * kW) {
    for (int j = 0; j < 4; ++j) {
      const Vec d = (vload(p + i + j * kW) - vs) - vc;
      acc[j] = at::vec::fmadd(d, d, acc[j]);
    }
  }
  for (; i + kW <= len; i += kW) {
    const Vec d = (vload(p + i) - vs) - vc;
    acc[0] = at::vec::fmadd(d, d, acc[0]);
  }
  if (i < len) {
    const Vec d = first_lanes((vload_n(p + i, len - i) - vs) - vc, len - i);
    acc[1] = at::vec::fmadd(d, d, acc[1]);
  }
}

inline float hsum4(const Vec* acc) { return hsum((acc[0] + acc[1]) + (acc[2] + acc[3])); }

// out[b] = hsum(vec(b)) for b in [0, B): the same sums, lane 0 first, with the chains of
// additions of up to kW vectors interleaved. Where a channel has few rows, one channel's chain
// of 16 dependent additions after another was the larger part of its cost.
template <typename F>
BN_ALWAYS_INLINE inline void hsums(int64_t B, F&& vec, float* out) {
  alignas(64) float lanes[kW * kW];
  for (int64_t b0 = 0; b0 < B; b0 += kW) {
    const int64_t n = std::min<int64_t>(kW, B - b0);
    for (int64_t j = 0; j < n; ++j) vec(b0 + j).store(lanes + j * kW);
    float sums[kW] = {};
    for (int64_t i = 0; i < kW; ++i) {
      for (int64_t j = 0; j < n; ++j) sums[j] += lanes[j * kW + i];
    }
    std::copy(sums, sums + n, out + b0);
  }
}

// out[b] = hsum(acc[4 * b + first] + acc[4 * b + first + 1]) over a block's accumulators (four
// vectors per channel), as one_pass_moments and the gradient sums take them.
inline void pair_hsums(const Vec* acc, int64_t B, int first, float* out) {
  hsums(B, [&](int64_t b) BN_ALWAYS_INLINE { return acc[4 * b + first] + acc[4 * b + first + 1]; },
        out);
}

// One pass over a row: sums of d = p[i] - centre (acc[0], acc[1]) and of d^2 (acc[2], acc[3]).
template <typename T>
BN_ALWAYS_INLINE inline void row_sum_sq(const T* p, int64_t len, float centre, Vec* acc) {
  const Vec vc(centre);
  int64_t i = 0;
  for (; i + 2 * kW <= len; i += 2 * kW) {
    const Vec d0 = vload(p + i) - vc, d1 = vload(p + i + kW) - vc;
    acc[0] += d0;
    acc[1] += d1;
    acc[2] = at::vec::fmadd(d0, d0, acc[2]);
    acc[3] = at::vec::fmadd(d1, d1, acc[3]);
  }
  for (; i + kW <= len; i += kW) {
    const Vec d = vload(p + i) - vc;
    acc[0] += d;
    acc[2] = at::vec::fmadd(d, d, acc[2]);
  }
  if (i < len) {
    const Vec d = tail_minus(p + i, len - i, vc);
    acc[1] += d;
    acc[3] = at::vec::fmadd(d, d, acc[3]);
  }
}

// The one-pass moments of a group from its sums of d and d^2 (d = x - centre): the mean of d,
// and M2 = sum d^2 - n mean^2, whose rounding error is that of a two-pass M2 times
// (1 + mean^2 / var). False where mean^2 > kMaxMeanToVar * var (a centre far from the group's
// mean), M2 < 0, or anything is not finite: the group then takes the two-pass way.
constexpr float kMaxMeanToVar = 8.f;

inline bool one_pass_moments(double s1, double s2, double count, float& mean, float& m2) {
  mean = static_cast<float>(s1 / count);
  const double centred = s1 * mean;  // n mean^2
  m2 = static_cast<float>(s2 - centred);
  // !(a <= b) also catches NaN and inf, which the two passes then propagate as such.
  return centred * (1.0 / kMaxMeanToVar) <= m2 && m2 >= 0.f;
}

inline bool one_pass_moments(const Vec* acc, double count, float& mean, float& m2) {
  return one_pass_moments(hsum(acc[0] + acc[1]), hsum(acc[2] + acc[3]), count, mean, m2);
}

// What the output pass does after the affine map: add a residual, apply a ReLU, write a mask
// (1 where the gradient passes the ReLU: !(y <= 0), as torch's threshold_backward, so a NaN
// passes its gradient).
// The pointers address element 0 of tensors laid out like x (null: not used).
template <typename T>
struct Fuse {
  bool relu = false;
  const T* z = nullptr;
  uint8_t* mask = nullptr;
  bool any() const { return relu || z != nullptr; }
};

// v rounded to T and back (the value an unfused op would have stored), in registers: the same
// conversions as vstore and vload. (Through a buffer, the buffer's masked store did not forward
// to the load after it: 80 % of a bfloat16 fused forward went to that round trip.)
template <typename T>
BN_ALWAYS_INLINE inline Vec round_like(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v)));
  }
}

inline float relu1(float v) { return (v > 0.f || std::isnan(v)) ? v : 0.f; }  // NaN propagates

template <typename T>
inline Vec fuse_tail(Vec v, const Fuse<T>& f, int64_t off) {
  if (f.z != nullptr) v = round_like<T>(v) + vload(f.z + off);
  if (f.relu) v = at::vec::clamp_min(v, Vec(0.f));  // max(0, v): NaN propagates
  return v;
}

template <typename T>
inline float fuse_tail1(float v, const Fuse<T>& f, int64_t off) {
  if (f.z != nullptr) v = static_cast<float>(static_cast<T>(v)) + static_cast<float>(f.z[off]);
  if (f.relu) v = relu1(v);
  return v;
}

// mask[i] = !(y[i] <= 0) over a row just written (still in L1); a loop the compiler vectorizes
// for float32. bfloat16 on AVX512 and AVX2 goes a vector at a time: widened, compared (not
// less or equal, unordered: NaN passes), a byte per lane stored (where the compiler kept
// c10::BFloat16's conversion scalar, the mask took two thirds of a bfloat16 fused forward of
// 7x7 planes).
template <typename T>
inline void write_mask(const T* y, uint8_t* mask, int64_t len) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (!std::is_same_v<T, float>) {
    for (; i + kW <= len; i += kW) {
      const __mmask16 pass = _mm512_cmp_ps_mask(vload(y + i), _mm512_setzero_ps(), _CMP_NLE_UQ);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(mask + i), _mm_maskz_set1_epi8(pass, 1));
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (!std::is_same_v<T, float>) {
    for (; i + kW <= len; i += kW) {  // the 8 lanes' all-ones or zero, narrowed to bytes
      const __m256 pass = _mm256_cmp_ps(vload(y + i), _mm256_setzero_ps(), _CMP_NLE_UQ);
      const __m256i lanes = _mm256_castps_si256(pass);
      const __m128i words =
          _mm_packs_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
      const __m128i bytes = _mm_and_si128(_mm_packs_epi16(words, words), _mm_set1_epi8(1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(mask + i), bytes);
    }
  }
#endif
  for (; i < len; ++i) mask[i] = !(static_cast<float>(y[i]) <= 0.f);
}

// out = (p - shift) * scale + offset over a row (then the fused tail; p is x + off); `stream`:
// with streaming stores (not with a fused tail).
template <typename T>
inline void row_affine(const T* p, T* out, int64_t len, float shift, float scale, float offset,
                       const Fuse<T>& f = Fuse<T>(), int64_t off = 0, bool stream = false) {
  const Vec vs(shift), va(scale), vb(offset);
  int64_t i = 0;
  if (!f.any()) {
    if (stream) {
      stream_row(
          out, len,
          [&](int64_t j, int64_t n) BN_ALWAYS_INLINE {
            return at::vec::fmadd(vload_n(p + j, n) - vs, va, vb);
          },
          [&](int64_t j) BN_ALWAYS_INLINE { return at::vec::fmadd(vload(p + j) - vs, va, vb); });
      return;
    }
    for (; i + kW <= len; i += kW) vstore(out + i, at::vec::fmadd(vload(p + i) - vs, va, vb));
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // A fused multiply-add, as std::fma in the fused path's tail below and in the backward's
    // recomputed ReLU gate (Gate::cut1): the same value for every element either way.
    if (i < len) vstore_n(out + i, at::vec::fmadd(vload_n(p + i, len - i) - vs, va, vb), len - i);
#else
    // Without vector FMA, at::vec::fmadd rounds twice: the scalar tail keeps std::fma.
    for (; i < len; ++i)
      out[i] = static_cast<T>(std::fma(static_cast<float>(p[i]) - shift, scale, offset));
#endif
    return;
  }
  for (; i + kW <= len; i += kW)
    vstore(out + i, fuse_tail(at::vec::fmadd(vload(p + i) - vs, va, vb), f, off + i));
  for (; i < len; ++i)
    out[i] = static_cast<T>(
        fuse_tail1(std::fma(static_cast<float>(p[i]) - shift, scale, offset), f, off + i));
  if (f.mask != nullptr) write_mask(out, f.mask + off, len);
}

// Lanes [0, k) of a and lanes [k, kW) of b (0 < k < kW): the per-channel constants of a vector
// that crosses from one planar row into the next.
inline Vec first_lanes_from(const Vec& a, const Vec& b, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_mask_blend_ps(static_cast<__mmask16>((1u << k) - 1u), b, a));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), lanes);
  return Vec(_mm256_blendv_ps(b, a, _mm256_castsi256_ps(first)));
#else
  return Vec::set(b, a, k);
#endif
}

// Sums of dy and of dy * (x - shift) over a row (two chains each).
template <typename T>
BN_ALWAYS_INLINE inline void row_grad_sums(const T* x, const T* dy, int64_t len, float shift, Vec* s_dy,
                          Vec* s_dyx) {
  const Vec vs(shift);
  int64_t i = 0;
  for (; i + 2 * kW <= len; i += 2 * kW) {
    for (int j = 0; j < 2; ++j) {
      const Vec g = vload(dy + i + j * kW);
      s_dy[j] += g;
      s_dyx[j] = at::vec::fmadd(g, vload(x + i + j * kW) - vs, s_dyx[j]);
    }
  }
  for (; i + kW <= len; i += kW) {
    const Vec g = vload(dy + i);
    s_dy[0] += g;
    s_dyx[0] = at::vec::fmadd(g, vload(x + i) - vs, s_dyx[0]);
  }
  if (i < len) {  // zeros in the unused lanes of g: they add nothing to either sum
    const Vec g = vload_n(dy + i, len - i);
    s_dy[1] += g;
    s_dyx[1] = at::vec::fmadd(g, vload_n(x + i, len - i) - vs, s_dyx[1]);
  }
}

// dx = dy * a + (x - shift) * k + c0 over a row; without x (kWithX false, eval mode: k = c0 = 0),
// dx = dy * a, which reads neither x nor its NaN.
// `stream`: with streaming stores.
template <typename T, bool kWithX = true>
inline void row_dx(const T* x, const T* dy, T* dx, int64_t len, float shift, float a, float k,
                   float c0, bool stream = false) {
  const Vec vs(shift), va(a), vk(k), vc(c0);
  auto at_n = [&](int64_t i, int64_t n) BN_ALWAYS_INLINE {  // the n < kW values from i
    if constexpr (kWithX) {
      return at::vec::fmadd(vload_n(dy + i, n), va, at::vec::fmadd(vload_n(x + i, n) - vs, vk, vc));
    } else {
      return vload_n(dy + i, n) * va;
    }
  };
  auto at_i = [&](int64_t i) BN_ALWAYS_INLINE {
    if constexpr (kWithX) {
      return at::vec::fmadd(vload(dy + i), va, at::vec::fmadd(vload(x + i) - vs, vk, vc));
    } else {
      return vload(dy + i) * va;
    }
  };
  if (stream) {
    stream_row(dx, len, at_n, at_i);
    return;
  }
  int64_t i = 0;
  for (; i + kW <= len; i += kW) vstore(dx + i, at_i(i));
  if (i < len) vstore_n(dx + i, at_n(i, len - i), len - i);
}

// ------------------------------------------------------------------------------------------
// Output memory
// ------------------------------------------------------------------------------------------

// The large outputs (y, dx, the ReLU's mask and gated gradient) come from a cache of freed
// blocks. A training loop allocates the same sizes at every step; glibc serves an allocation
// above its mmap threshold with fresh pages and trims the top of its heap on free, so without a
// cache each call faults its output in page by page (a fault and a zeroing per 4 KiB:
// 250-800 faults per step of a 3 MB channels-last layer measured, 20-30 % of the step). A block
// freed by its last tensor goes back to the cache; blocks are reused for the same size
// (rounded up to 4 KiB) only, and the cache holds at most its limit (set_cache_limit from
// Python: BATCHNORM_CPU_CACHE_MB, default 256 MB), evicting the blocks freed longest ago first,
// so that a change of shapes (another batch size, eval) does not leave the cache full of
// sizes that no longer come. An allocation that fails empties the cache and tries once more.
// Small outputs (< 256 KiB) and the (C,) statistics use torch's CPU allocator as before.
class BlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{256} << 10;

  static BlockCache& get() {
    // Never destroyed: tensors that outlive the module's teardown still return their blocks.
    static BlockCache* cache = [] {
      auto* c = new BlockCache();
      // A fork holds the lock across the fork, so that a child never starts with the lock
      // taken by a thread it does not have (DataLoader workers, multiprocessing).
#ifndef _WIN32
      pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                     [] { get().mutex_.unlock(); });
#endif
      return c;
    }();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + 4095) & ~size_t{4095};
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        block = it->second.back();
        it->second.pop_back();
        order_.erase(block->pos);
        cached_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) {
      void* data = nullptr;
      try {
        data = c10::alloc_cpu(bytes);
      } catch (const c10::Error&) {
        empty();  // the cached blocks of other sizes go back to the system first
        data = c10::alloc_cpu(bytes);
      }
      block = new Block{data, bytes, {}};
    }
    return {block->data, block, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // (cached bytes, limit, hits, misses)
  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(limit_),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_)};
  }

  // Sets the limit and frees the cached blocks above it, oldest first (all of them for 0).
  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "the cache limit must be >= 0 bytes, got ", bytes);
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = static_cast<size_t>(bytes);
      evict_until(limit_, drop);
    }
    for (Block* b : drop) destroy(b);
  }

  // Frees every cached block (the limit stays).
  void empty() {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_until(0, drop);
    }
    for (Block* b : drop) destroy(b);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
    std::list<Block*>::iterator pos;  // in order_, while cached
  };

  static void destroy(Block* b) {
    c10::free_cpu(b->data);
    delete b;
  }

  // Under the lock: takes the blocks freed longest ago out of the cache into `drop` until it
  // holds at most `bytes`.
  void evict_until(size_t bytes, std::vector<Block*>& drop) {
    while (cached_ > bytes && !order_.empty()) {
      Block* old = order_.front();
      order_.pop_front();
      auto& same = free_[old->bytes];
      same.erase(std::find(same.begin(), same.end(), old));
      cached_ -= old->bytes;
      drop.push_back(old);
    }
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    BlockCache& cache = get();
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (b->bytes <= cache.limit_) {
        cache.evict_until(cache.limit_ - b->bytes, drop);
        b->pos = cache.order_.insert(cache.order_.end(), b);
        cache.free_[b->bytes].push_back(b);
        cache.cached_ += b->bytes;
        b = nullptr;
      }
    }
    if (b != nullptr) destroy(b);
    for (Block* old : drop) destroy(old);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> free_;  // by size; the last freed at the back
  std::list<Block*> order_;                                // every cached block, oldest first
  size_t cached_ = 0, limit_ = size_t{256} << 20;
  uint64_t hits_ = 0, misses_ = 0;
};

// Memory that every use writes before it reads is left uninitialized (the outputs, the
// per-channel scratch). Builds with BN_POISON_SCRATCH (BATCHNORM_CPU_POISON=1, for the tests)
// fill it with NaN instead, so that a read before a write, or a value never written, shows as
// NaN in the results.
#ifdef BN_POISON_SCRATCH
constexpr bool kPoisonScratch = true;
#else
constexpr bool kPoisonScratch = false;
#endif
template <typename V>
inline void poison(V* p, int64_t n) {
  if constexpr (kPoisonScratch) std::fill(p, p + n, std::numeric_limits<V>::quiet_NaN());
}

// An uninitialized tensor of these sizes and strides from the block cache (poisoned as above;
// not a bool mask).
Tensor empty_cached(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  Tensor t = at::detail::empty_strided_generic(sizes, strides, &BlockCache::get(),
                                               c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
  if constexpr (kPoisonScratch) {
    if (dtype != at::kBool) t.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return t;
}

// An uninitialized output laid out as x (contiguous, channels-last or a transposed (N, L, C)
// sequence: dense, as every kernel layout is), with that layout's standard strides, as torch's
// kernel gives (x may have any stride on a dimension of one value, as an N = 1 slice of a
// batch has); from the block cache (poisoned as above; not a bool mask).
Tensor empty_output(const Tensor& x, at::ScalarType dtype) {
  c10::DimVector strides;
  if (x.is_contiguous()) {
    strides = c10::contiguous_strides(x.sizes());
  } else if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    const auto cl = c10::get_channels_last_strides_2d(x.sizes());
    strides.assign(cl.begin(), cl.end());
  } else if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    const auto cl = c10::get_channels_last_strides_3d(x.sizes());
    strides.assign(cl.begin(), cl.end());
  } else if (x.dim() == 3) {  // (N, L, C) storage
    strides = {x.size(1) * x.size(2), 1, std::max<int64_t>(x.size(1), 1)};
  } else {
    strides.assign(x.strides().begin(), x.strides().end());
  }
  return empty_cached(x.sizes(), strides, dtype);
}

// ------------------------------------------------------------------------------------------
// Layout
// ------------------------------------------------------------------------------------------

struct Geometry {
  bool inner;     // channel-inner (x[r, c] at r * C + c) or planar
  int64_t N, C, S;
  int64_t rows() const { return N * S; }
  int64_t per_channel() const { return N * S; }
};

// Whether a pass over a tensor of geometry g that reads `reads` tensors like it and writes one
// at `out` streams its stores: it moves enough bytes (stream_pass), and planar rows are long
// enough or channels-last rows start on vector boundaries (rows_can_stream).
// The bytes a pass over a tensor of geometry g moves when it reads `reads` tensors like it and
// writes one.
template <typename T>
inline int64_t pass_traffic(const Geometry& g, int reads) {
  return (reads + 1) * g.N * g.C * g.S * static_cast<int64_t>(sizeof(T));
}

template <typename T>
inline bool streams(const Geometry& g, int reads, const T* out) {
  if (!stream_pass(pass_traffic<T>(g, reads))) return false;
  return g.inner ? rows_can_stream(out, g.C)
                 : g.S * static_cast<int64_t>(sizeof(T)) >= kStreamMinRowBytes;
}

// The input as one of the two layouts, copying only when it is neither.
std::pair<Tensor, Geometry> as_kernel_layout(const Tensor& input) {
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : input.numel() / (N * C);
  if (input.is_contiguous()) return {input, Geometry{S == 1, N, C, S}};
  if ((input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) ||
      (input.dim() == 3 && input.transpose(1, 2).is_contiguous())) {  // (N, L, C) storage
    return {input, Geometry{true, N, C, S}};
  }
  return {input.contiguous(), Geometry{S == 1, N, C, S}};
}

// Whether a and b (of x's sizes, from like_layout) address their elements alike: the same
// strides on every dimension longer than one (a dimension of one value may have any stride, as
// an N = 1 slice of a batch has).
bool same_layout(const Tensor& a, const Tensor& x) {
  if (a.sizes() != x.sizes()) return false;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1 && a.stride(d) != x.stride(d)) return false;
  }
  return true;
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 rows of 16 floats transposed in registers: pairs of rows interleaved (unpack), then pairs
// of pairs (unpack of 64-bit halves: each 128-bit lane k holds column 4k + j of 4 rows), then
// the lanes gathered across the four groups of rows (two rounds of 128-bit shuffles). ATen's
// block transpose goes through the stack: eval of a (N, L, C)-stored 32x256x128 took 0.84x the
// time with this one (the transpose 3.4x a copy's time with ATen's, 2.6x with this; one run).
// The 16 rows in r[] (overwritten) turned into their 16 columns: put(j, column j).
template <typename Put>
BN_ALWAYS_INLINE inline void transpose_16x16_regs(__m512* r, Put&& put) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 16; i += 4) {  // r[i + j]: column 4k + j of rows i..i+3 in lane k
    r[i] = lo(t[i], t[i + 2]);
    r[i + 1] = hi(t[i], t[i + 2]);
    r[i + 2] = lo(t[i + 1], t[i + 3]);
    r[i + 3] = hi(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // lanes 0, 2 and 1, 3 of rows 0-7, then of rows 8-15
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {  // column c of all 16 rows, for c = j, 8 + j, 4 + j, 12 + j
    put(j, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    put(8 + j, _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd));
    put(4 + j, _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88));
    put(12 + j, _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd));
  }
}

// 16 rows of floats (r, overwritten) stored as the 16 columns of dst, plain or streamed.
template <bool kStream>
BN_ALWAYS_INLINE inline void transpose_16x16_into(__m512* r, float* dst, int64_t ld_dst) {
  transpose_16x16_regs(r, [&](int j, __m512 v) BN_ALWAYS_INLINE {
    if constexpr (kStream) {
      _mm512_stream_ps(dst + j * ld_dst, v);
    } else {
      _mm512_storeu_ps(dst + j * ld_dst, v);
    }
  });
}

// bfloat16 turns as 32-bit lanes: each value's 16 bits widened into the low half of a lane
// (zero-extended), moved with the float lanes, and narrowed back, so that every value keeps its
// bits (NaN payloads included).
BN_ALWAYS_INLINE inline __m512 widen_bf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_cvtepu16_epi32(v));
}

// 16 widened rows of bfloat16 (r, overwritten; widen_bf16) stored as the 16 columns of dst.
BN_ALWAYS_INLINE inline void transpose_16x16_into(__m512* r, BF16* dst, int64_t ld_dst) {
  transpose_16x16_regs(r, [&](int j, __m512 v) BN_ALWAYS_INLINE {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j * ld_dst),
                        _mm512_cvtepi32_epi16(_mm512_castps_si512(v)));
  });
}

template <bool kStream>
inline void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  transpose_16x16_into<kStream>(r, dst, ld_dst);
}

inline void transpose_16x16(const BF16* src, int64_t ld_src, BF16* dst, int64_t ld_dst) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * ld_src)));
  }
  transpose_16x16_into(r, dst, ld_dst);
}
#endif

// The 16 x 16 block of src (m <= 16 rows of n <= 16 values, rows ld_src apart) transposed into
// dst (n rows of m values, ld_dst apart): in registers (transpose_16x16 on AVX-512, float32 and
// bfloat16; ATen's transpose_mxn for other full float blocks), element by element at the edges
// and for bfloat16 off AVX-512.
template <typename T>
inline void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int m, int n,
                            bool stream = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (m == 16 && n == 16) {
#if defined(CPU_CAPABILITY_AVX512)
      if (stream) {
        transpose_16x16<true>(src, ld_src, dst, ld_dst);
      } else {
        transpose_16x16<false>(src, ld_src, dst, ld_dst);
      }
#else
      at::vec::transpose_mxn<float, 16, 16>(src, ld_src, dst, ld_dst);
#endif
      return;
    }
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, BF16>) {
    if (m == 16 && n == 16) {  // (ATen's goes value by value: 9-10x a copy's time)
      transpose_16x16(src, ld_src, dst, ld_dst);
      return;
    }
  }
#endif
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, m, n);
}

// dst[k] = src[k] transposed for the `count` row-major matrices of rows x cols values in src
// (dst: count matrices of cols x rows), a strip of 16 rows per task. ATen's copy of a
// transposed tensor goes element by element on one side: 9-15x a plain copy's time here.
template <typename T>
void transpose_matrices(const T* src, T* dst, int64_t count, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 16;
  constexpr int64_t kAhead = 4 * 64 / static_cast<int64_t>(sizeof(T));  // values: 4 lines
  const int64_t strips = (rows + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(kBlock * cols, 1));
  // Streaming stores where the passes stream (stream_pass: the bytes read and written), on
  // float32 blocks whose rows start on cache lines: 16 MB sequences took 0.66-0.79x the time of
  // the eval forward and 0.71-0.87x of the backward with them; a 4 MB one 2.4x (its output no
  // longer in cache), hence not below the passes' own threshold.
  const bool stream = std::is_same_v<T, float> &&
                      stream_pass(2 * count * rows * cols * static_cast<int64_t>(sizeof(T))) &&
                      reinterpret_cast<uintptr_t>(dst) % 64 == 0 && rows % 16 == 0;
  at::parallel_for(0, count * strips, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / strips, i = t % strips * kBlock;
      const int m = static_cast<int>(std::min(kBlock, rows - i));
      const T* s = src + k * rows * cols + i * cols;
      T* d = dst + k * rows * cols + i;
      for (int64_t j = 0; j < cols; j += kBlock) {
        // The strip's 16 rows are read 64 bytes of each at a time: more streams than the
        // hardware prefetchers follow, so each row is asked for a few blocks ahead.
        if (j + kAhead < cols) {
          for (int r = 0; r < m; ++r) __builtin_prefetch(s + r * cols + j + kAhead);
        }
        transpose_block(s + j, cols, d + j * rows, rows, m,
                        static_cast<int>(std::min(kBlock, cols - j)), stream);
      }
    }
    if (stream) stream_fence();
  });
}

// A 3-D (N, C, L) tensor in the other of a sequence batch's two storages: contiguous from
// (N, L, C) storage (to_nlc false), or (N, L, C) storage from contiguous (to_nlc true); the same
// values. Other strides and dtypes go through ATen's copy.
Tensor restored_sequence(const Tensor& t, bool to_nlc) {
  const bool dense = to_nlc ? t.is_contiguous() : t.transpose(1, 2).is_contiguous();
  const at::ScalarType dtype = t.scalar_type();
  if (t.dim() != 3 || !dense || t.numel() == 0 ||
      (dtype != at::kFloat && dtype != at::kBFloat16)) {
    return to_nlc ? t.transpose(1, 2).contiguous().transpose(1, 2) : t.contiguous();
  }
  const int64_t N = t.size(0), C = t.size(1), L = t.size(2);
  const std::array<int64_t, 3> strides =
      to_nlc ? std::array<int64_t, 3>{L * C, 1, C} : std::array<int64_t, 3>{C * L, L, 1};
  Tensor out = empty_cached(t.sizes(), strides, dtype);
  // Per sample, src is a C x L matrix (contiguous) or an L x C one ((N, L, C) storage).
  const int64_t rows = to_nlc ? C : L, cols = to_nlc ? L : C;
  if (dtype == at::kFloat) {
    transpose_matrices(t.data_ptr<float>(), out.data_ptr<float>(), N, rows, cols);
  } else {
    transpose_matrices(t.data_ptr<BF16>(), out.data_ptr<BF16>(), N, rows, cols);
  }
  return out;
}

// An output in the layout torch's kernel gives it. A sequence batch stored (N, L, C) (a
// transposed (N, C, L)) runs channel-inner, but torch returns its outputs and gradients
// contiguous (only 4-D and 5-D channels-last keep their layout there), and code after a
// BatchNorm1d may view() them; every other kernel layout is torch's own. (y and dx are written
// contiguous by their passes, sequence_pass; the fused backward's dz comes through here.)
Tensor in_torch_layout(const Tensor& out, const Tensor& x, const Geometry& g) {
  return x.dim() == 3 && g.inner && !x.is_contiguous() ? restored_sequence(out, false) : out;
}

// A tensor laid out like the kernel's view of x (dy for backward).
Tensor like_layout(const Tensor& t, const Tensor& x, const Geometry& g) {
  if (g.inner && !x.is_contiguous()) {
    if (x.dim() == 3) return t.transpose(1, 2).is_contiguous() ? t : restored_sequence(t, true);
    return t.contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                     : at::MemoryFormat::ChannelsLast3d);
  }
  return t.contiguous();
}

// t (of x's sizes: dy, the residual, the ReLU's saved tensor) in the kernel's view of x
// (like_layout), checked to address its elements as x does; `what` names t in the error.
Tensor matched_layout(const Tensor& t, const Tensor& x, const Geometry& g, const char* what) {
  Tensor out = like_layout(t, x, g);
  TORCH_CHECK(out.sizes() == x.sizes() && (x.numel() == 0 || same_layout(out, x)), what,
              " does not match the input's layout");
  return out;
}

// Rows per block for the channel-inner layout: fixed by C alone (never by the thread count).
int64_t inner_block_rows(int64_t C) {
  return std::clamp<int64_t>(16384 / std::max<int64_t>(C, 1), 64, 1024);
}

// Tensors from this size on are asked for ahead in the channels-last block walks: a smaller one
// stays in a core's L2 (1-2 MB) or the last-level cache after the layer that wrote it, where the
// prefetches only cost (5-15 % at 32x64x8x8 and 512x512 measured).
constexpr int64_t kPrefetchMinBytes = int64_t{2} << 20;

// The `ahead` of a channels-last block walk over a tensor of `bytes`: values to the next block
// of rows when this thread reads it next (b + 1 < b1, the end of its range), else 0. The next
// block may be shorter (the last one): rows past the tensor's end are not asked for.
inline int64_t next_block_ahead(int64_t b, int64_t b1, int64_t block, int64_t R, int64_t C,
                                int64_t bytes) {
  if (bytes < kPrefetchMinBytes) return 0;
  return (b + 1 < b1 && (b + 2) * block <= R) ? block * C : 0;
}

// The C values of a (C,) tensor as float32 into out, or `fill` where there is no tensor.
void floats_into(const c10::optional<Tensor>& t, int64_t C, float fill, float* out) {
  if (!t.has_value() || !t->defined()) {
    std::fill(out, out + C, fill);
    return;
  }
  if (t->scalar_type() == at::kFloat && t->is_contiguous()) {  // the common case: no ATen call
    const float* p = t->data_ptr<float>();
    std::copy(p, p + C, out);
    return;
  }
  const Tensor f = t->detach().to(at::kFloat).contiguous();
  std::copy(f.data_ptr<float>(), f.data_ptr<float>() + C, out);
}

// An array of n values left uninitialized (poison), for per-channel scratch that every use
// writes before it reads (a std::vector's zero fill was a memset per array and call: with the
// copies below, 30 % of a 2x9216 training forward).
template <typename V>
class Uninit {
 public:
  explicit Uninit(int64_t n) : p_(new V[static_cast<size_t>(std::max<int64_t>(n, 1))]) {
    poison(p_.get(), std::max<int64_t>(n, 1));
  }
  V* data() const { return p_.get(); }
  V& operator[](int64_t i) const { return p_[i]; }

 private:
  std::unique_ptr<V[]> p_;
};

// The C float32 values of a (C,) tensor, read where they lie when it is float32 and
// contiguous (the common case: no copy), else converted (floats_into).
class ChannelFloats {
 public:
  ChannelFloats(const c10::optional<Tensor>& t, int64_t C, float fill) {
    if (t.has_value() && t->defined() && t->scalar_type() == at::kFloat && t->is_contiguous()) {
      ptr_ = t->data_ptr<float>();
      return;
    }
    own_ = std::make_unique<float[]>(static_cast<size_t>(std::max<int64_t>(C, 1)));
    floats_into(t, C, fill, own_.get());
    ptr_ = own_.get();
  }
  const float* data() const { return ptr_; }

 private:
  const float* ptr_ = nullptr;
  std::unique_ptr<float[]> own_;
};

// running = (1 - momentum) * running + momentum * value(c), in the buffer's own dtype (value:
// a float64 per channel, computed in the loop).
template <typename F>
void blend_into(Tensor& running, F&& value, double momentum) {
  if (!running.is_contiguous()) {  // a strided view of a buffer: update a copy, write it back
    Tensor dense = running.contiguous();
    blend_into(dense, value, momentum);
    running.copy_(dense);
    return;
  }
  const int64_t C = running.numel();
  if (running.scalar_type() == at::kFloat) {
    float* p = running.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) p[c] = (1 - momentum) * p[c] + momentum * value(c);
  } else if (running.scalar_type() == at::kBFloat16) {
    BF16* p = running.data_ptr<BF16>();
    for (int64_t c = 0; c < C; ++c)
      p[c] = static_cast<BF16>((1 - momentum) * static_cast<float>(p[c]) + momentum * value(c));
  } else if (running.scalar_type() == at::kDouble) {
    double* p = running.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) p[c] = (1 - momentum) * p[c] + momentum * value(c);
  } else {
    TORCH_CHECK(false, "running statistics must be float32, bfloat16 or float64");
  }
}

// ------------------------------------------------------------------------------------------
// Training statistics
// ------------------------------------------------------------------------------------------

// Planar: channels go in blocks of consecutive channels (planar_block_channels); per channel,
// groups of whole rows (about kGroupElems values), two passes per group. A block of one channel
// walks down the batch jumping C * S values per row; the rows of a channel then share a few
// cache sets (all of them when C * S * sizeof(T) is a multiple of 4 KB: 2048 * 49 floats,
// 512 * 49, ...), and once the rows in flight outnumber the ways of L2 (16 here) they evict each
// other between the passes. A block of B channels reads one contiguous run of B * S values per
// step instead, at the price of keeping B channels' accumulators in L1 rather than in
// registers. Measured (1 thread, float32, training forward / backward against one channel per
// step, paired medians of 20 interleaved rounds): 64x2048x7x7 0.62x / 0.61x, 128x512x7x7
// 0.78x / 0.78x, 64x960x7x7 0.83x / 0.79x, 32x512x7x7 (backward) 0.91x; but with 784-byte rows
// 32x256x14x14 1.19x (backward) and with fewer rows 16x256x14x14 1.14x / 1.15x. So blocks are
// used for rows under 512 bytes when the rows in flight, N per tensor read, reach 64. Each
// channel's arithmetic (and so its result) is the same whatever the block size, and the block
// size depends on the shape alone.
constexpr int64_t kPlanarBlockBytes = 256 * 1024;  // one block's slice of x, in L2

// Planes of at most a vector (4x4, 3x3, 2x2: short_planes) are summed by columns instead
// (planar_block_column_moments): a block's run of B * S values per sample, about
// kColumnRunValues long whatever N, so that its column sums stay in L1.
constexpr int64_t kColumnRunValues = 1024;

inline bool short_planes(const Geometry& g) { return !g.inner && g.S <= kW; }

template <typename T>
int64_t planar_block_channels(const Geometry& g, int64_t tensors) {
  if (short_planes(g)) {
    return std::clamp<int64_t>(kColumnRunValues / g.S, 1, std::max<int64_t>(g.C, 1));
  }
  const int64_t row_bytes = g.S * static_cast<int64_t>(sizeof(T));
  if (row_bytes >= 512 || g.N * tensors < 64) return 1;
  const int64_t per_channel = std::max<int64_t>(1, g.N * row_bytes);
  return std::clamp<int64_t>(kPlanarBlockBytes / per_channel, 1, std::max<int64_t>(g.C, 1));
}

// Per-task scratch of a planar channel block (allocated once per task, not per block): per
// channel, 4 vector accumulators.
struct PlanarScratch {
  std::vector<Vec> acc;
  std::vector<float> mean, centre;
  std::vector<float> sum1, sum2;  // per channel, the horizontal sums of its accumulators
  // Short planes (walk_block_columns): per value of a block's run, its channel's centre (or
  // shift) and two sums, each padded with zeros to whole vectors and aligned to a vector.
  std::vector<float> columns;
  float *col_centre = nullptr, *col1 = nullptr, *col2 = nullptr;
  int64_t col_len = 0;  // values per array, a multiple of kW
  // `accumulators`: whether the walk keeps its sums in per-channel vectors (acc: 4 * B zeroed
  // vectors, 64 KB for a block of 256 channels). Every walk does but the short planes' sums by
  // columns (blocks of more than one channel), which keep them per column and take their
  // centres straight from the rows (group_centres): zeroing those 64 KB per task was about a
  // tenth of a 4x512x2x2 training forward.
  PlanarScratch(int64_t B, bool accumulators)
      : acc(accumulators ? 4 * B : 0), mean(B), centre(B), sum1(B), sum2(B) {}
  PlanarScratch(int64_t B, const Geometry& g, bool accumulators)
      : PlanarScratch(B, accumulators) {
    if (!short_planes(g)) return;
    col_len = (B * g.S + kW - 1) / kW * kW;
    columns.assign(3 * col_len + kW, 0.f);
    const uintptr_t bytes = kW * sizeof(float);
    const uintptr_t at = reinterpret_cast<uintptr_t>(columns.data());
    col_centre = columns.data() + ((bytes - at % bytes) % bytes) / sizeof(float);
    col1 = col_centre + col_len;
    col2 = col1 + col_len;
  }
  // Channel b's centre (or shift) in its S columns of the run.
  void set_column_centres(const float* per_channel, int64_t B, int64_t S) {
    for (int64_t b = 0; b < B; ++b)
      std::fill(col_centre + b * S, col_centre + (b + 1) * S, per_channel[b]);
  }
  void clear_columns() {
    std::fill(col1, col1 + col_len, 0.f);
    std::fill(col2, col2 + col_len, 0.f);
  }
  void clear(int64_t B) {
    std::fill(acc.begin(), acc.begin() + 4 * B, Vec(0.f));
  }
};

// Calls add(b, n, acc) for the rows [n0, n1) of a block's B channels, kBlockRows samples per
// step: channel b's 4 vector accumulators are taken from `scratch` into locals, its rows of the
// step's samples added, and put back. ask(m) comes before a step reads its samples, ask_row(m, b)
// before channel b's rows, m being the samples of the next step (the prefetches: one burst per
// sample, or spread over the channels; m may be past the batch). Every channel adds its rows in
// the same order as one row per step would, so the sums are the same bits; with one row per step
// the round trip of the accumulators through L1 came at every row of 49 values: 4 rows per step
// took 0.80-0.88x the time of the 7x7 training forward at 32x512, 64x960 and 64x2048 (and the
// backward 0.81-0.92x), 1 thread. (A block of one channel runs planar_channels_moments or
// planar_channels_grad_sums instead, whose accumulators stay in registers across the rows.)
constexpr int64_t kBlockRows = 4;

// step(n, count) for the samples [n0, n1): kBlockRows at a time, then one at a time (count an
// std::integral_constant, so that each step's loop over its samples unrolls).
template <typename F>
BN_ALWAYS_INLINE inline void for_sample_steps(int64_t n0, int64_t n1, F&& step) {
  int64_t n = n0;
  for (; n + kBlockRows <= n1; n += kBlockRows)
    step(n, std::integral_constant<int64_t, kBlockRows>{});
  for (; n < n1; ++n) step(n, std::integral_constant<int64_t, 1>{});
}

template <typename R, typename P, typename F>
BN_ALWAYS_INLINE inline void walk_block_rows(int64_t B, int64_t n0, int64_t n1,
                                             PlanarScratch& scratch, R&& ask, P&& ask_row,
                                             F&& add) {
  auto step = [&](int64_t n, auto count) BN_ALWAYS_INLINE {
    constexpr int64_t kRows = decltype(count)::value;
    for (int64_t k = 0; k < kRows; ++k) ask(n + kRows + k);
    for (int64_t b = 0; b < B; ++b) {
      Vec a[4] = {scratch.acc[4 * b], scratch.acc[4 * b + 1], scratch.acc[4 * b + 2],
                  scratch.acc[4 * b + 3]};
      for (int64_t k = 0; k < kRows; ++k) {
        ask_row(n + kRows + k, b);
        add(b, n + k, a);
      }
      for (int k = 0; k < 4; ++k) scratch.acc[4 * b + k] = a[k];
    }
  };
  for_sample_steps(n0, n1, step);
}

// Planar statistics groups are centred near their own mean, so that the one-pass sums of d and
// d^2 lose little (one_pass_moments): the first group on the mean of its first row (a short
// pass; that row is then in L1), every later group on the mean of the group before, which it
// meets unless the channel's values drift along the batch (the guard then sends that group to
// two passes). A centre is the float32 nearest a mean of the data, so x - centre is exact
// wherever the values are within a factor of 2 of it (1e4 + randn, say).
inline float next_centre(float centre, float group_mean, float fallback) {
  const float next = static_cast<float>(static_cast<double>(centre) + group_mean);
  return std::isfinite(next) ? next : fallback;
}

// The centres of a block's B channels for its group of samples from n0 (row(b, n): channel b's
// row of sample n; `mean`: the group before's means): for the first group the mean of each
// channel's first row, their horizontal sums interleaved (hsums), else next_centre's.
template <typename T, typename Row>
void group_centres(Row&& row, int64_t B, int64_t S, int64_t n0, const float* mean, float* centre,
                   Vec* acc, float* sums) {
  if (n0 > 0) {
    for (int64_t b = 0; b < B; ++b) {
      centre[b] = next_centre(centre[b], mean[b], static_cast<float>(*row(b, n0)));
    }
    return;
  }
  if (S <= kW) {
    // A row of at most a vector: row_sum leaves its values' x - first in the first S lanes
    // and zeros past them, which hsums adds lane after lane; the same additions in the same
    // order straight from the row (the zeros change no sum, which starts at +0 and so is never
    // -0): the same bits without a vector's round trip through the stack per channel.
    for (int64_t b = 0; b < B; ++b) {
      const T* p = row(b, 0);
      const float first = static_cast<float>(p[0]);
      float sum = 0.f;
      for (int64_t i = 0; i < S; ++i) sum += static_cast<float>(p[i]) - first;
      sums[b] = sum;
    }
  } else {
    for (int64_t b = 0; b < B; ++b) {  // one vector per channel: its row's sums, combined
      Vec a[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
      row_sum(row(b, 0), S, static_cast<float>(*row(b, 0)), a);
      acc[b] = (a[0] + a[1]) + (a[2] + a[3]);
    }
    hsums(B, [&](int64_t b) BN_ALWAYS_INLINE { return acc[b]; }, sums);
  }
  for (int64_t b = 0; b < B; ++b) {
    const float first = static_cast<float>(*row(b, 0));
    const double mean_d = sums[b] / static_cast<double>(S);  // the first row's mean of x - first
    const float c = static_cast<float>(static_cast<double>(first) + mean_d);
    centre[b] = std::isfinite(c) ? c : first;
  }
}

// A group whose one-pass sums failed the guard (one_pass_moments): two passes over the
// channel's rows [n0, n1) (row(n) its row of sample n; the second pass from L1/L2), the mean of
// x - centre, then M2 around that float32 mean (whose rounding error enters M2 only squared).
template <typename Row>
void two_pass_group(Row&& row, int64_t n0, int64_t n1, int64_t S, float centre, float& mean,
                    float& m2) {
  const double count = static_cast<double>((n1 - n0) * S);
  Vec acc1[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  for (int64_t n = n0; n < n1; ++n) row_sum(row(n), S, centre, acc1);
  mean = static_cast<float>(hsum4(acc1) / count);
  Vec acc2[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  for (int64_t n = n0; n < n1; ++n) row_m2(row(n), S, centre, mean, acc2);
  m2 = hsum4(acc2);
}

// A group's moments of B channels (rows [n0, n1); row(b, n) channel b's row of sample n) from
// their vector accumulators in `scratch` (channel b's acc[4b..4b+1] of d = x - centre,
// acc[4b+2..4b+3] of d^2, centred on scratch.centre[b]), merged into out[b]: one pass where the
// guard passes (one_pass_moments), else two (two_pass_group); `shift` is channel 0's.
template <typename Row>
BN_ALWAYS_INLINE inline void merge_group_moments(PlanarScratch& scratch, Row&& row, int64_t B,
                                                 int64_t S, int64_t n0, int64_t n1,
                                                 const float* shift, Moments* out) {
  float *mean = scratch.mean.data(), *centre = scratch.centre.data();
  float *s1 = scratch.sum1.data(), *s2 = scratch.sum2.data();
  pair_hsums(scratch.acc.data(), B, 0, s1);
  pair_hsums(scratch.acc.data(), B, 2, s2);
  const double count = static_cast<double>((n1 - n0) * S);
  for (int64_t b = 0; b < B; ++b) {
    float m2;
    if (!one_pass_moments(s1[b], s2[b], count, mean[b], m2)) {
      two_pass_group([&](int64_t n) { return row(b, n); }, n0, n1, S, centre[b], mean[b], m2);
    }
    out[b].merge(count, static_cast<double>(centre[b]) - shift[b] + mean[b], m2);
  }
}

// Channels [c0, c1) of the planar layout, each a block of one: the same arithmetic as
// planar_block_moments, one channel's rows after another with its accumulators in registers,
// and the groups' horizontal sums of all the channels at once (pair_hsums). The channels go
// through each group of samples together, so ranges of more than one channel are for short
// rows (a group or two); a range of one walks its channel's rows in order.
template <typename T>
void planar_channels_moments(const T* x, const Geometry& g, int64_t c0, int64_t c1,
                             const float* shift, Moments* out, PlanarScratch& scratch) {
  const int64_t S = g.S, stride = g.C * S, B = c1 - c0;
  const int64_t rows_per_group = std::max<int64_t>(1, kGroupElems / std::max<int64_t>(S, 1));
  auto row = [&](int64_t b, int64_t n) BN_ALWAYS_INLINE { return x + n * stride + (c0 + b) * S; };
  float *mean = scratch.mean.data(), *centre = scratch.centre.data();
  for (int64_t n0 = 0; n0 < g.N; n0 += rows_per_group) {
    const int64_t n1 = std::min(g.N, n0 + rows_per_group);
    group_centres<T>(row, B, S, n0, mean, centre, scratch.acc.data(), scratch.sum1.data());
    for (int64_t b = 0; b < B; ++b) {
      const T* p = row(b, 0);
      const float cb = centre[b];
      Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
      for (int64_t n = n0; n < n1; ++n) {
        if (n + 1 < g.N) prefetch_row(p + (n + 1) * stride, S * sizeof(T));
        row_sum_sq(p + n * stride, S, cb, acc);
      }
      for (int k = 0; k < 4; ++k) scratch.acc[4 * b + k] = acc[k];
    }
    merge_group_moments(scratch, row, B, S, n0, n1, shift + c0, out);
  }
}

template <typename T>
void planar_block_moments(const T* x, const Geometry& g, int64_t c0, int64_t c1,
                          const float* shift, Moments* out, PlanarScratch& scratch) {
  const int64_t S = g.S, B = c1 - c0, run = g.C * S, bytes = B * S * sizeof(T);
  const int64_t rows_per_group = std::max<int64_t>(1, kGroupElems / std::max<int64_t>(S, 1));
  // One burst for the next sample's run (spreading it per channel, as the gradient sums do,
  // measured 1.03-1.06x the time here).
  auto prefetch = [&](int64_t m) BN_ALWAYS_INLINE {
    if (m < g.N) prefetch_row(x + m * run + c0 * S, bytes);
  };
  auto row = [&](int64_t b, int64_t n) BN_ALWAYS_INLINE { return x + n * run + (c0 + b) * S; };
  float *mean = scratch.mean.data(), *centre = scratch.centre.data();
  for (int64_t n0 = 0; n0 < g.N; n0 += rows_per_group) {
    const int64_t n1 = std::min(g.N, n0 + rows_per_group);
    group_centres<T>(row, B, S, n0, mean, centre, scratch.acc.data(), scratch.sum1.data());
    scratch.clear(B);
    walk_block_rows(B, n0, n1, scratch, prefetch, [](int64_t, int64_t) {},
                    [&](int64_t b, int64_t n, Vec* a) BN_ALWAYS_INLINE {
      row_sum_sq(row(b, n), S, centre[b], a);
    });
    merge_group_moments(scratch, row, B, S, n0, n1, shift + c0, out);
  }
}

// Short planes (short_planes: 4x4, 3x3, 2x2): row by row, every row of S <= kW values is one
// partial vector whose four accumulators make a round trip through L1 (a 16x1024x3x3 training
// forward took 12x the copy, 64x512x2x2 18x; with the sums by columns and the output as a flat
// run, 0.41x and 0.22x that time, 32x256x4x4 0.52x; the backward 0.51x, 0.35x and 0.71x;
// 1 thread, paired medians). Instead the sums go by columns: a block's run of
// L = B * S values per sample is read in whole vectors, and lane l of the sums' vector v holds
// column v * kW + l of the run (channel (v * kW + l) / S), summed down the samples; a channel's
// S columns are added in float64 at the end of the group (column_total). kBlockRows samples
// share one load and store of the sums. add(n, j, m, a1, a2) adds the m <= kW values from
// position j of sample n's run (the lanes past m read as zero, and the centres there are zero).
// No software prefetches: asking for the next step's runs (a prefetch per line, one per vector
// read) took 1.02-1.28x the time of the training forward and 1.11-1.17x of the backward on
// 64x512x4x4, 64x512x2x2, 64x2048x3x3, 16x1024x3x3, 128x256x3x3 and 32x256x4x4, and
// 1.02-1.18x with the caches evicted (1 thread, paired medians): the runs of 1-4 KB per
// sample are long enough for the hardware prefetchers, and the prefetches took load slots.
template <typename F>
BN_ALWAYS_INLINE inline void walk_block_columns(int64_t L, int64_t n0, int64_t n1,
                                                PlanarScratch& scratch, F&& add) {
  float *s1 = scratch.col1, *s2 = scratch.col2;
  auto rows = [&](int64_t n, auto count) BN_ALWAYS_INLINE {
    constexpr int64_t kRows = decltype(count)::value;
    auto column = [&](int64_t j, int64_t m) BN_ALWAYS_INLINE {
      Vec a1 = Vec::loadu(s1 + j), a2 = Vec::loadu(s2 + j);
      for (int64_t k = 0; k < kRows; ++k) add(n + k, j, m, a1, a2);
      a1.store(s1 + j);
      a2.store(s2 + j);
    };
    int64_t j = 0;
    for (; j + kW <= L; j += kW) column(j, kW);
    if (j < L) column(j, L - j);
  };
  for_sample_steps(n0, n1, rows);
}

// The sum of channel b's S columns of a block's column sums, in float64.
inline double column_total(const float* sums, int64_t b, int64_t S) {
  double t = 0;
  for (int64_t s = 0; s < S; ++s) t += sums[b * S + s];
  return t;
}

// planar_block_moments for short planes: the same groups, centres and guard, the sums of d and
// d^2 taken by columns (walk_block_columns).
template <typename T>
void planar_block_column_moments(const T* x, const Geometry& g, int64_t c0, int64_t c1,
                                 const float* shift, Moments* out, PlanarScratch& scratch) {
  const int64_t S = g.S, B = c1 - c0, L = B * S, run = g.C * S;
  const int64_t rows_per_group = std::max<int64_t>(1, kGroupElems / S);
  const T* base = x + c0 * S;  // sample 0's run
  auto row = [&](int64_t b, int64_t n) BN_ALWAYS_INLINE { return base + n * run + b * S; };
  float *mean = scratch.mean.data(), *centre = scratch.centre.data();
  const float* vc = scratch.col_centre;
  for (int64_t n0 = 0; n0 < g.N; n0 += rows_per_group) {
    const int64_t n1 = std::min(g.N, n0 + rows_per_group);
    group_centres<T>(row, B, S, n0, mean, centre, scratch.acc.data(), scratch.sum1.data());
    scratch.set_column_centres(centre, B, S);
    scratch.clear_columns();
    walk_block_columns(L, n0, n1, scratch,
                       [&](int64_t n, int64_t j, int64_t m, Vec& a1, Vec& a2) BN_ALWAYS_INLINE {
                         const Vec d = vload_upto(base + n * run + j, m) - Vec::loadu(vc + j);
                         a1 += d;
                         a2 = at::vec::fmadd(d, d, a2);
                       });
    const double count = static_cast<double>((n1 - n0) * S);
    for (int64_t b = 0; b < B; ++b) {
      float m2;
      if (!one_pass_moments(column_total(scratch.col1, b, S), column_total(scratch.col2, b, S),
                            count, mean[b], m2)) {
        two_pass_group([&](int64_t n) { return row(b, n); }, n0, n1, S, centre[b], mean[b], m2);
      }
      out[b].merge(count, static_cast<double>(centre[b]) - shift[c0 + b] + mean[b], m2);
    }
  }
}

// How the channel-inner backward walks a block of rows (inner_block_grad_sums, inner_block_dx):
// a chunk of channels down the rows (accumulators and constants in registers) or row after row
// (accumulators in L1). Which is faster depends on the CPU; both give the same values bit for
// bit (every channel sums its rows in the same order with the same operations, and dx is
// elementwise). Measured, 1 thread, caches evicted before each backward
// (benchmarks/cpu_kernel_ab.py --cold --backward):
// - on an Intel Xeon, the dx pass row after row took 2x the time of the chunk walk: x, dy and
//   dx share their offsets modulo 4 KiB, and the loads of the next row wait on the stores of
//   this one (4K aliasing);
// - on an AMD EPYC, the dx pass row after row took 0.71-0.87x the chunk walk's time
//   (8x32x112x112, 16x512x28x28, 32x256x14x14, 64x960x7x7 NHWC, 8192x256), and the gradient
//   sums row after row another 0.57-0.71x (8x256x56x56, 16x512x28x28, 32x256x14x14,
//   64x960x7x7 NHWC, 8192x256; 1.03x at C = 64, 32x64x56x56).
// So AMD CPUs walk rows, others chunks; set_channels_last_walk (batchnorm.ops.cpu) overrides it.
enum class BlockWalk { kChunks, kRows };

inline bool cpu_is_amd() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  return ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;  // "AuthenticAMD"
#else
  return false;
#endif
}

// Atomic: set from Python while other threads may be running the kernels (either walk gives
// the same values, so a change between two blocks of one call is harmless).
std::atomic<BlockWalk>& block_walk() {
  static std::atomic<BlockWalk> walk{cpu_is_amd() ? BlockWalk::kRows : BlockWalk::kChunks};
  return walk;
}

inline BlockWalk channels_last_walk() { return block_walk().load(std::memory_order_relaxed); }

// The channels [lo, hi) of a channel-inner pass (all of them, or a task's share of the rows
// of short planes: planes_as_rows).
struct Cols {
  int64_t lo, hi;
};

// Channel-inner layout: within a block of rows, channels go in chunks of K vectors whose
// accumulators and constants stay in registers while the chunk walks down the rows (the block
// is in L1/L2 after the first chunk). `for_chunks` calls f(c, K) for K = 4 and K = 1 chunks,
// then `tail(c)` for the channels left over (of [0, C) or of cols).
template <typename F, typename G>
inline void for_chunks(Cols cols, F&& f, G&& tail) {
  int64_t c = cols.lo;
  for (; c + 4 * kW <= cols.hi; c += 4 * kW) f(c, std::integral_constant<int, 4>{});
  for (; c + kW <= cols.hi; c += kW) f(c, std::integral_constant<int, 1>{});
  for (; c < cols.hi; ++c) tail(c);
}
template <typename F, typename G>
inline void for_chunks(int64_t C, F&& f, G&& tail) {
  for_chunks(Cols{0, C}, std::forward<F>(f), std::forward<G>(tail));
}

// Values per task, at least, where a pass splits its work finer than its natural unit (the
// blocks of rows of a channel-inner pass, the samples of short planes).
constexpr int64_t kRowTaskValues = 16384;

// Calls f(b, cols, last) in parallel for the blocks [b0, b1) of `block` rows of a channel-inner
// pass over R rows of C channels, and ranges `cols` of their channels; `last`: the end of the
// blocks that this task walks (for a prefetch of the next block: next_block_ahead). Whole
// blocks (cols all of [0, C)) where they are at least as many as the threads; else each block's
// channels go in ranges of whole chunks of for_chunks (4 vectors, so that every chunk holds the
// same channels as without the split) of at least kRowTaskValues values, so that a tensor of
// few rows (64x1280, 16x9216: one block) still occupies the threads. Every value is computed as
// with whole blocks: each channel's arithmetic is its own, whatever the split.
template <typename F>
void for_block_tiles(int64_t b0, int64_t b1, int64_t block, int64_t R, int64_t C, F&& f) {
  const int64_t n = b1 - b0;
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = (C + 4 * kW - 1) / (4 * kW);
  int64_t split = 1;
  if (n < threads) {
    const int64_t rows = std::min(block, R - b0 * block);
    const int64_t most = std::max<int64_t>(1, chunks * 4 * kW * rows / kRowTaskValues);
    split = std::clamp<int64_t>((threads + n - 1) / n, 1, std::min(chunks, most));
  }
  if (split == 1) {
    at::parallel_for(b0, b1, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t b = t0; b < t1; ++b) f(b, Cols{0, C}, t1);
    });
    return;
  }
  at::parallel_for(0, n * split, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = b0 + t / split, part = t % split;
      const int64_t lo = chunks * part / split * 4 * kW;
      const int64_t hi = std::min(C, chunks * (part + 1) / split * 4 * kW);
      f(b, Cols{lo, hi}, b + 1);
    }
  });
}

// Per channel of the block rows [r0, r1): mean of (x - shift) and M2 around it (float32).
//
// One pass with sums of d = x - shift and of d^2, M2 = sum d^2 - n mean^2: exact enough when
// the shift is near the block's mean (training_moments centres every channel on its first
// block's mean). The rounding error of sum d^2 - n mean^2 is that of the two-pass M2 times
// (1 + mean^2 / var); a chunk of channels where mean^2 > kMaxMeanToVar * var (data whose mean
// drifts along the rows by more than that, a zero spread, NaN or inf) is redone with two passes
// over the block (the second from L1/L2): mean first, then M2 around it. So the one-pass M2 is
// at most 9x the two-pass rounding error (about 3 bits of float32), and no E[x^2] - E[x]^2 is
// ever taken unguarded.
template <typename T, int K>
inline void inner_chunk_two_pass(const T* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                 const float* centre, float inv, float* mean_out, float* m2_out) {
  Vec vs[K], acc[K], acc2[K], mean[K];
  for (int k = 0; k < K; ++k) {
    vs[k] = Vec::loadu(centre + k * kW);
    acc[k] = Vec(0.f);
    acc2[k] = Vec(0.f);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = x + r * C + c;
    for (int k = 0; k < K; ++k) acc[k] += vload(p + k * kW) - vs[k];
  }
  for (int k = 0; k < K; ++k) {
    mean[k] = acc[k] * Vec(inv);
    mean[k].store(mean_out + c + k * kW);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = x + r * C + c;
    for (int k = 0; k < K; ++k) {
      const Vec d = (vload(p + k * kW) - vs[k]) - mean[k];
      acc2[k] = at::vec::fmadd(d, d, acc2[k]);
    }
  }
  for (int k = 0; k < K; ++k) acc2[k].store(m2_out + c + k * kW);
}

// Mean and M2 of K vectors of channels from their one-pass sums of d and d^2 (acc, acc2) into
// mean_out[0, K * kW) and m2_out; true where a lane needs the two passes instead
// (n mean^2 / kMaxMeanToVar > M2, M2 < 0, NaN or inf).
template <int K>
BN_ALWAYS_INLINE inline bool one_pass_chunk(const Vec* acc, const Vec* acc2, float inv,
                                            float* mean_out, float* m2_out) {
  bool redo = false;
  for (int k = 0; k < K; ++k) {
    const Vec mean = acc[k] * Vec(inv);
    const Vec centred = acc[k] * mean;  // n mean^2
    const Vec m2 = acc2[k] - centred;
    // !(a <= b) also catches NaN and inf, which the two passes then propagate as such.
    float c2[kW], m[kW];
    (centred * Vec(1.f / kMaxMeanToVar)).store(c2);
    m2.store(m);
    for (int64_t i = 0; i < kW; ++i) redo |= !(c2[i] <= m[i] && m[i] >= 0.f);
    mean.store(mean_out + k * kW);
    m2.store(m2_out + k * kW);
  }
  return redo;
}

// The one pass of inner_block_moments over a chunk of K vectors of channels from c: mean of
// d = x - shift and M2 = sum d^2 - n mean^2 into mean_out and m2_out (one_pass_chunk). A
// function of its own, with and without the prefetches: inlined into inner_block_moments beside
// the two passes and the redo, or with the prefetch as a branch in its loop, GCC kept three of
// the four sums of d^2 on the stack, so that every row's FMAs waited on a store and a reload.
template <typename T, int K, bool kAhead, bool kSquaresOut>
BN_NOINLINE bool inner_chunk_one_pass(const T* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                                      const float* shift, float inv, int64_t ahead,
                                      float* mean_out, float* m2_out) {
  Vec vs[K], acc[K], acc2[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    vs[k] = Vec::loadu(shift + c + k * kW);
    acc[k] = Vec(0.f);
    acc2[k] = Vec(0.f);
    if constexpr (kSquaresOut) acc2[k].store(m2_out + c + k * kW);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* p = x + r * C + c;
    if constexpr (kAhead) prefetch_chunk<K>(p + ahead);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const Vec d = vload(p + k * kW) - vs[k];
      acc[k] += d;
      if constexpr (kSquaresOut) {
        float* q = m2_out + c + k * kW;
        at::vec::fmadd(d, d, Vec::loadu(q)).store(q);
      } else {
        acc2[k] = at::vec::fmadd(d, d, acc2[k]);
      }
    }
  }
  // Copies, so that the loop's sums never have their address taken (with it, GCC left the
  // bfloat16 loop's sums on the stack).
  Vec sums[K], squares[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    sums[k] = acc[k];
    squares[k] = kSquaresOut ? Vec::loadu(m2_out + c + k * kW) : acc2[k];
  }
  return one_pass_chunk<K>(sums, squares, inv, mean_out + c, m2_out + c);
}

// `ahead`: values from a row to the same channels in the next block of rows (prefetched as the
// block is read), or 0 where this is the last block of the thread. `from_memory`: the tensor is
// as large as those whose output passes stream, so its blocks come from memory; there the one
// pass keeps its sums of d^2 in m2_out (L1) instead of registers, each row's FMAs then waiting
// on a store and a reload of the row before (inner_chunk_one_pass, kSquaresOut), as the loop
// did before it had registers. Measured on the EPYC (training forward, 1 thread, paired medians
// of 30 rounds, against that loop): sums in registers 0.84x the time at 8192x256, 0.89-0.91x
// at 32x512x7x7 and 32x256x14x14 channels-last, 0.93x at 64x1280 (bfloat16 0.93-0.95x at
// 8192x256, 32x256x14x14 and 8x256x56x56 channels-last); but 1.1-1.3x on tensors from memory
// (8x256x56x56, 64x192x28x28, 32x64x56x56 channels-last), where the sums in m2_out take
// 0.95-1.07x. Why the faster loop loses there is not known: whole rows walked in order, with
// the sums in L1 (what the prefetchers follow best), took 1.0-1.5x (64x2048x7x7 the most).
template <typename T>
void inner_block_moments(const T* x, int64_t C, int64_t r0, int64_t r1, const float* shift,
                         float* mean_out, float* m2_out, bool one_pass, int64_t ahead,
                         Cols cols, bool from_memory = false) {
  const float n = static_cast<float>(r1 - r0), inv = 1.f / n;
  for_chunks(
      cols,
      [&](int64_t c, auto k_const) {
        constexpr int K = decltype(k_const)::value;
        if (!one_pass) {
          inner_chunk_two_pass<T, K>(x, C, c, r0, r1, shift + c, inv, mean_out, m2_out);
          return;
        }
        const auto chunk_pass = ahead == 0   ? inner_chunk_one_pass<T, K, false, false>
                                : from_memory ? inner_chunk_one_pass<T, K, true, true>
                                              : inner_chunk_one_pass<T, K, true, false>;
        const bool redo = chunk_pass(x, C, c, r0, r1, shift, inv, ahead, mean_out, m2_out);
        if (redo) {
          // Far from the shift: the block is centred on its own first row (as the first block
          // is), so that its sums stay small, and its mean is moved to the common shift.
          float local[K * kW];
          for (int64_t i = 0; i < K * kW; ++i) local[i] = static_cast<float>(x[r0 * C + c + i]);
          inner_chunk_two_pass<T, K>(x, C, c, r0, r1, local, inv, mean_out, m2_out);
          for (int64_t i = 0; i < K * kW; ++i) {
            mean_out[c + i] = static_cast<float>(static_cast<double>(local[i]) - shift[c + i] +
                                                 mean_out[c + i]);
          }
        }
      },
      [&](int64_t c) {
        // Two passes, centred on the block's first row, the mean moved to the common shift.
        const float local = static_cast<float>(x[r0 * C + c]);
        float sum = 0.f, m2 = 0.f;
        for (int64_t r = r0; r < r1; ++r) sum += static_cast<float>(x[r * C + c]) - local;
        const float mean = sum * inv;
        for (int64_t r = r0; r < r1; ++r) {
          const float d = (static_cast<float>(x[r * C + c]) - local) - mean;
          m2 += d * d;
        }
        mean_out[c] = static_cast<float>(static_cast<double>(local) - shift[c] + mean);
        m2_out[c] = m2;
      });
}

// Rows of many channels, walked row after row in a pass that does not stream (the output pass,
// fused or not, dx, the gradient sums, the fused backward's recomputed gate), go a chunk of
// kRowChunk channels at a time down the block's rows (for_row_chunks), from 2 * kRowChunk
// channels on: beyond that the (C,) constants and sums (three or four floats per channel)
// outgrow L1 beside the rows of x, y and dy, and every vector's loads of them come from L2
// (chunk_rows: not on tensors as large as those whose passes stream). Measured on the
// EPYC (1 thread, paired medians): eval 16x9216 0.77x the time, 64x9216 0.62x, 32x4096 0.76x,
// 64x2048 0.77x, 64x2048x3x3 NHWC 0.72x; training forward 0.82-0.90x; backward 0.67-0.81x;
// 64x1280 1.03x, so not below 2048 channels. Streamed passes keep whole rows: chunked, their
// streaming stores took 1.2-1.9x the time (64x2048x7x7, 64x1024x14x14 NHWC), and so did the
// sums over such large tensors (1.3x), whose rows the hardware prefetchers follow (64x2048x7x7
// NHWC backward 1.03x). Every value is computed as without chunks.
constexpr int64_t kRowChunk = 1024;

// Whether a row walk over C channels goes in chunks; `large`: the tensor is as large as the
// passes over it that stream (stream_pass), whether or not this one does.
inline bool chunk_rows(int64_t C, bool large) { return !large && C >= 2 * kRowChunk; }

template <typename T>
inline bool large_pass(const Geometry& g, int reads) {
  return stream_pass(pass_traffic<T>(g, reads));
}

// f(lo, hi) for the channel ranges of a row walk over cols: all of them, or chunks of
// kRowChunk.
template <typename F>
BN_ALWAYS_INLINE inline void for_row_chunks(Cols cols, bool chunked, F&& f) {
  if (!chunked) {
    f(cols.lo, cols.hi);
    return;
  }
  for (int64_t lo = cols.lo; lo < cols.hi; lo += kRowChunk) {
    f(lo, std::min(cols.hi, lo + kRowChunk));
  }
}

// How a pass walks the rows of a block of a channels-last (or (N, C)) tensor: `chunked`, by
// chunks of kRowChunk channels (for_row_chunks); `grouped`, kBlockRows rows at a time
// (for_row_steps), the loads of the (C,) constants or sums shared by the rows (a row after row
// pass loads three or four of them per vector of x, and a vector load or two per cycle is what
// bounds a pass over data in L1 or L2). Grouped: rows of 8 KB or more; in tensors of up to
// kGroupedTensorBytes (one core's L2, where the layer before left them), rows of at most 256
// bytes (4 of them a run of 1 KB or less, read almost in order) and, in the passes that read
// x and dy, rows between 4 and 8 KB (each in pages of its own). Other rows read 4 at a time
// share pages, the loads alternating between them, and the hardware prefetchers fall behind
// wherever the rows come from beyond L2. Measured on the EPYC (paired medians, 1 thread), 4
// rows per step against 1: rows of 8 KB 0.64-0.77x the time of the training forward and the
// backward of 64x2048x3x3 NHWC with the caches evicted before each call, 0.79-0.98x repeated
// on the same tensors, 0.70-0.85x on the large 64x2048x7x7 (eval, training forward,
// backward), and 0.79-0.98x the backward of (N, C) 16x9216 (36 KB rows; its training forward
// 0.91-1.04x); rows of 2 KB 0.78-1.05x repeated (32x512x7x7, 64x512x4x4, 512x512) but
// 1.09-1.31x with the caches evicted (also 512x512 and 64x512x2x2 NHWC, 1 MB and 512 KB), and
// 1.1-1.4x on the large 16x512x28x28 and 32x512x28x28; rows of 1 KB 0.81-0.89x repeated but
// 1.33-1.77x evicted (1024x256, 16x256x4x4 NHWC); rows of exactly 4 KB 1.26-1.50x repeated
// (256x1024: each row's loads alias the stores of the row before modulo 4 KB) and 1.0-1.3x on
// the large 64x1024x14x14; rows of 512-1152 bytes 1.17-1.37x on 6-8 MB tensors
// (16x128x56x56-16x160x56x56). Rows of at most 256 bytes in tensors up to 1 MB (128x64,
// 1024x64, 32x64x8x8, 64x32x8x8, 16x64x16x16 NHWC; two runs): eval 0.74-0.93x, training
// forward 0.82-0.96x, backward 0.60-0.79x repeated, 0.88-1.12x evicted; in larger tensors (4-26 MB)
// mixed, 0.71-1.21x. Backward rows of 5-6 KB (64x1280, 32x1536): 0.78-0.82x repeated,
// 0.90-0.98x evicted; their eval and training forward 0.96-1.06x, so only the backward.
struct RowWalk {
  bool chunked, grouped;
};

constexpr int64_t kGroupedTensorBytes = int64_t{1} << 20;

template <typename T>
inline RowWalk row_walk(const Geometry& g, int reads) {
  const int64_t row = g.C * static_cast<int64_t>(sizeof(T));
  const bool small = row * g.rows() <= kGroupedTensorBytes;
  const bool grouped =
      row >= 8192 || (small && (row <= 256 || (reads > 1 && row > 4096)));
  return {chunk_rows(g.C, large_pass<T>(g, reads)), grouped};
}

// rows(ra, rb, count) over the rows [r0, r1), which it walks count rows at a time (count an
// std::integral_constant; rb - ra a multiple of it): kBlockRows rows at a time, the loads and
// stores of the (C,) sums and constants shared by them, where `grouped`, else row after row.
// `rows` best calls a BN_NOINLINE function template of the count with its values as
// arguments: each count then gets a function of its own, and the row-after-row one keeps its
// registers (inlined beside the 4-row one, its loop over rows of 2 vectors spilled, perf
// showed; a noinline lambda reloads its captures at every vector, 1.3-1.6x the time at
// 8x32x112x112 NHWC eval).
template <typename F>
BN_ALWAYS_INLINE inline void for_row_steps(bool grouped, int64_t r0, int64_t r1, F&& rows) {
  int64_t r = r0;
  if (grouped) {
    r = r0 + (r1 - r0) / kBlockRows * kBlockRows;
    if (r > r0) rows(r0, r, std::integral_constant<int64_t, kBlockRows>{});
  }
  if (r < r1) rows(r, r1, std::integral_constant<int64_t, 1>{});
}

// inner_block_affine without a fused tail over the channels [lo, hi) of the rows [ra, rb),
// kRows rows at a time (for_row_steps). kShift false: every shift is 0 (output_constants), and
// x - 0 = x is taken as it is, without loading the shifts (the same bits).
template <int64_t kRows, typename T, bool kShift = true>
BN_NOINLINE void affine_row_steps(const T* x, T* y, int64_t C, int64_t lo, int64_t hi,
                                  int64_t ra, int64_t rb, const float* shift, const float* scale,
                                  const float* offset, bool stream) {
  for (int64_t r = ra; r < rb; r += kRows) {
    auto rows_at = [&](int64_t c, auto put) BN_ALWAYS_INLINE {
      const Vec va = Vec::loadu(scale + c), vb = Vec::loadu(offset + c);
      if constexpr (kShift) {
        const Vec vs = Vec::loadu(shift + c);
        for (int64_t i = 0; i < kRows; ++i) {
          const int64_t o = (r + i) * C + c;
          put(y + o, at::vec::fmadd(vload(x + o) - vs, va, vb));
        }
      } else {
        for (int64_t i = 0; i < kRows; ++i) {
          const int64_t o = (r + i) * C + c;
          put(y + o, at::vec::fmadd(vload(x + o), va, vb));
        }
      }
    };
    int64_t c = lo;
    if (stream) {
      for (; c + kW <= hi; c += kW) rows_at(c, [](T* q, const Vec& v) { vstream(q, v); });
    }
    for (; c + kW <= hi; c += kW) rows_at(c, [](T* q, const Vec& v) { vstore(q, v); });
    for (; c < hi; ++c) {
      const float sc = kShift ? shift[c] : 0.f;
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t o = (r + i) * C + c;
        y[o] = static_cast<T>(std::fma(static_cast<float>(x[o]) - sc, scale[c], offset[c]));
      }
    }
  }
}

// Sums of dy and of dy * (x - shift) over the channels [lo, hi) of the rows [ra, rb), added to
// sum_dy and sum_dyx, kRows rows at a time (for_row_steps); each channel's sums add the rows
// in order, whatever kRows.
template <int64_t kRows, typename T>
BN_NOINLINE void grad_sum_row_steps(const T* x, const T* dy, int64_t C, int64_t lo, int64_t hi,
                                    int64_t ra, int64_t rb, const float* shift, float* sum_dy,
                                    float* sum_dyx) {
  for (int64_t o = ra * C; o < rb * C; o += kRows * C) {
    int64_t c = lo;
    for (; c + kW <= hi; c += kW) {
      const Vec vs = Vec::loadu(shift + c);
      Vec s = Vec::loadu(sum_dy + c), sx = Vec::loadu(sum_dyx + c);
      for (int64_t k = 0; k < kRows; ++k) {
        const Vec g = vload(dy + o + k * C + c);
        s += g;
        sx = at::vec::fmadd(g, vload(x + o + k * C + c) - vs, sx);
      }
      s.store(sum_dy + c);
      sx.store(sum_dyx + c);
    }
    for (; c < hi; ++c) {
      for (int64_t k = 0; k < kRows; ++k) {
        const float g = static_cast<float>(dy[o + k * C + c]);
        sum_dy[c] += g;
        sum_dyx[c] += g * (static_cast<float>(x[o + k * C + c]) - shift[c]);
      }
    }
  }
}

// dx = dy * a + (x - shift) * k + c0 (kWithX false: dy * a) over the channels [lo, hi) of the
// rows [ra, rb), kRows rows at a time (for_row_steps); `stream`: streaming stores.
template <int64_t kRows, typename T, bool kWithX>
BN_NOINLINE void dx_row_steps(const T* x, const T* dy, T* dx, int64_t C, int64_t lo, int64_t hi,
                              int64_t ra, int64_t rb, const float* shift, const float* a,
                              const float* kk, const float* c0, bool stream) {
  auto put = [stream](T* p, const Vec& v) BN_ALWAYS_INLINE { vstore_or_stream(p, v, stream); };
  for (int64_t r = ra; r < rb; r += kRows) {
    int64_t c = lo;
    for (; c + kW <= hi; c += kW) {
      const Vec va = Vec::loadu(a + c);
      if constexpr (kWithX) {
        const Vec vs = Vec::loadu(shift + c), vk = Vec::loadu(kk + c), vc = Vec::loadu(c0 + c);
        for (int64_t i = 0; i < kRows; ++i) {
          const int64_t o = (r + i) * C + c;
          put(dx + o, at::vec::fmadd(vload(dy + o), va, at::vec::fmadd(vload(x + o) - vs, vk, vc)));
        }
      } else {
        for (int64_t i = 0; i < kRows; ++i) {
          const int64_t o = (r + i) * C + c;
          put(dx + o, vload(dy + o) * va);
        }
      }
    }
    for (; c < hi; ++c) {
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t o = (r + i) * C + c;
        if constexpr (kWithX) {
          dx[o] = static_cast<T>(static_cast<float>(dy[o]) * a[c] +
                                 (static_cast<float>(x[o]) - shift[c]) * kk[c] + c0[c]);
        } else {
          dx[o] = static_cast<T>(static_cast<float>(dy[o]) * a[c]);
        }
      }
    }
  }
}

// inner_block_affine without a fused tail, a chunk of channels at a time down the rows
// [r0, r1) (for_chunks), the chunk's constants in registers: one load and one store per vector
// of x, against four loads walked row after row. For blocks in L1 (pieces_forward's
// pieces); the same values as affine_row_steps.
template <bool kStream, typename T>
void affine_chunks(const T* x, T* y, int64_t C, int64_t r0, int64_t r1, const float* shift,
                   const float* scale, const float* offset, Cols cols) {
  auto put = [](T* p, const Vec& v) BN_ALWAYS_INLINE {
    if constexpr (kStream) {
      vstream(p, v);
    } else {
      vstore(p, v);
    }
  };
  for_chunks(
      cols,
      [&](int64_t c, auto k_const) {
        constexpr int K = decltype(k_const)::value;
        Vec vs[K], va[K], vb[K];
        for (int k = 0; k < K; ++k) {
          vs[k] = Vec::loadu(shift + c + k * kW);
          va[k] = Vec::loadu(scale + c + k * kW);
          vb[k] = Vec::loadu(offset + c + k * kW);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r * C + c;
          for (int k = 0; k < K; ++k) {
            put(y + o + k * kW, at::vec::fmadd(vload(x + o + k * kW) - vs[k], va[k], vb[k]));
          }
        }
      },
      [&](int64_t c) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r * C + c;
          y[o] = static_cast<T>(std::fma(static_cast<float>(x[o]) - shift[c], scale[c], offset[c]));
        }
      });
}

// y = (x - shift) * scale + offset over the block rows [r0, r1), row after row: the writes
// stream in memory order (walking a chunk of channels down the rows, as the reductions do,
// scatters the stores over pages and costs twice the time for large C); the per-channel
// constants come from L1 (for_row_chunks). `stream`: with streaming stores (not with a fused
// tail; every row must start on a vector boundary, rows_can_stream). `zero_shift`: every
// shift is 0 (all_zero), which the walk then does not load.
template <typename T>
void inner_block_affine(const T* x, T* y, int64_t C, int64_t r0, int64_t r1, const float* shift,
                        const float* scale, const float* offset, const Fuse<T>& f, bool stream,
                        RowWalk walk, Cols cols, bool zero_shift = false) {
  if (!f.any()) {
    for_row_chunks(cols, walk.chunked, [&](int64_t lo, int64_t hi) BN_ALWAYS_INLINE {
      for_row_steps(walk.grouped, r0, r1, [&](int64_t ra, int64_t rb, auto count) BN_ALWAYS_INLINE {
        constexpr int64_t kRows = decltype(count)::value;
        if (zero_shift) {
          affine_row_steps<kRows, T, false>(x, y, C, lo, hi, ra, rb, shift, scale, offset,
                                            stream);
        } else {
          affine_row_steps<kRows, T>(x, y, C, lo, hi, ra, rb, shift, scale, offset, stream);
        }
      });
    });
    return;
  }
  for_row_chunks(cols, walk.chunked, [&](int64_t lo, int64_t hi) BN_ALWAYS_INLINE {
    for (int64_t r = r0; r < r1; ++r) {
      const T* p = x + r * C;
      T* q = y + r * C;
      int64_t c = lo;
      for (; c + kW <= hi; c += kW) {
        const Vec v = at::vec::fmadd(vload(p + c) - Vec::loadu(shift + c),
                                     Vec::loadu(scale + c), Vec::loadu(offset + c));
        vstore(q + c, fuse_tail(v, f, r * C + c));
      }
      for (; c < hi; ++c) {
        const float v = std::fma(static_cast<float>(p[c]) - shift[c], scale[c], offset[c]);
        q[c] = static_cast<T>(fuse_tail1(v, f, r * C + c));
      }
      if (f.mask != nullptr) write_mask(q + lo, f.mask + r * C + lo, hi - lo);
    }
  });
}

// inner_block_grad_sums a chunk of channels at a time down the rows (for_chunks), the sums in
// registers.
template <typename T>
void grad_sums_chunks(const T* x, const T* dy, int64_t C, int64_t r0, int64_t r1,
                      const float* shift, float* sum_dy, float* sum_dyx, Cols cols) {
  for_chunks(
      cols,
      [&](int64_t c, auto k_const) {
        constexpr int K = decltype(k_const)::value;
        Vec vs[K], a[K], b[K];
        for (int k = 0; k < K; ++k) {
          vs[k] = Vec::loadu(shift + c + k * kW);
          a[k] = Vec(0.f);
          b[k] = Vec(0.f);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * C + c;
          for (int k = 0; k < K; ++k) {
            const Vec g = vload(dy + off + k * kW);
            a[k] += g;
            b[k] = at::vec::fmadd(g, vload(x + off + k * kW) - vs[k], b[k]);
          }
        }
        for (int k = 0; k < K; ++k) {
          a[k].store(sum_dy + c + k * kW);
          b[k].store(sum_dyx + c + k * kW);
        }
      },
      [&](int64_t c) {
        float a = 0.f, b = 0.f;
        for (int64_t r = r0; r < r1; ++r) {
          const float g = static_cast<float>(dy[r * C + c]);
          a += g;
          b += g * (static_cast<float>(x[r * C + c]) - shift[c]);
        }
        sum_dy[c] = a;
        sum_dyx[c] = b;
      });
}

// Per channel of the block rows [r0, r1): sums of dy and of dy * (x - shift) (float32).
template <typename T>
void inner_block_grad_sums(const T* x, const T* dy, int64_t C, int64_t r0, int64_t r1,
                           const float* shift, float* sum_dy, float* sum_dyx, RowWalk walk,
                           Cols cols) {
  if (channels_last_walk() == BlockWalk::kRows) {
    std::fill(sum_dy + cols.lo, sum_dy + cols.hi, 0.f);
    std::fill(sum_dyx + cols.lo, sum_dyx + cols.hi, 0.f);
    for_row_chunks(cols, walk.chunked, [&](int64_t lo, int64_t hi) BN_ALWAYS_INLINE {
      for_row_steps(walk.grouped, r0, r1, [&](int64_t ra, int64_t rb, auto count) BN_ALWAYS_INLINE {
        grad_sum_row_steps<decltype(count)::value>(x, dy, C, lo, hi, ra, rb, shift, sum_dy,
                                                   sum_dyx);
      });
    });
    return;
  }
  grad_sums_chunks(x, dy, C, r0, r1, shift, sum_dy, sum_dyx, cols);
}

// inner_block_dx a chunk of channels at a time down the rows (for_chunks), the chunk's
// constants in registers; `ahead` as in inner_block_dx.
template <typename T, bool kWithX>
void dx_chunks(const T* x, const T* dy, T* dx, int64_t C, int64_t r0, int64_t r1,
               const float* shift, const float* a, const float* kk, const float* c0,
               int64_t ahead, bool stream, Cols cols) {
  auto put = [stream](T* p, const Vec& v) BN_ALWAYS_INLINE { vstore_or_stream(p, v, stream); };
  for_chunks(
      cols,
      [&](int64_t c, auto k_const) {
        constexpr int K = decltype(k_const)::value;
        Vec vs[K], va[K], vk[K], vc[K];
        for (int k = 0; k < K; ++k) {
          vs[k] = Vec::loadu(shift + c + k * kW);
          va[k] = Vec::loadu(a + c + k * kW);
          vk[k] = Vec::loadu(kk + c + k * kW);
          vc[k] = Vec::loadu(c0 + c + k * kW);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * C + c;
          if (ahead != 0 && !stream) prefetch_chunk<K>(dx + off + ahead);
          for (int k = 0; k < K; ++k) {
            if constexpr (kWithX) {
              const Vec xs = vload(x + off + k * kW) - vs[k];
              put(dx + off + k * kW, at::vec::fmadd(vload(dy + off + k * kW), va[k],
                                                    at::vec::fmadd(xs, vk[k], vc[k])));
            } else {
              put(dx + off + k * kW, vload(dy + off + k * kW) * va[k]);
            }
          }
        }
      },
      [&](int64_t c) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * C + c;
          if constexpr (kWithX) {
            dx[off] = static_cast<T>(static_cast<float>(dy[off]) * a[c] +
                                     (static_cast<float>(x[off]) - shift[c]) * kk[c] + c0[c]);
          } else {
            dx[off] = static_cast<T>(static_cast<float>(dy[off]) * a[c]);
          }
        }
      });
}

// dx = dy * a + (x - shift) * k + c0 over the block rows [r0, r1), row after row or a chunk of
// channels at a time (channels_last_walk). The stores of a chunk land in as many pages as the
// block has rows, where no hardware prefetcher fetches the lines they need ahead: the chunk
// walk asks for the dx lines of the next block (`ahead`, as in inner_block_moments), which
// took 5-6 % off the channels-last backward in geometric mean over the benchmark's shapes on
// the Xeon, up to 16 % (asking for x and dy as well: -5 to +5 %, not kept).
template <typename T, bool kWithX = true>
void inner_block_dx(const T* x, const T* dy, T* dx, int64_t C, int64_t r0, int64_t r1,
                    const float* shift, const float* a, const float* kk, const float* c0,
                    int64_t ahead, bool stream, RowWalk walk, Cols cols) {
  // `stream`: streaming stores for dx (every row starting on a vector boundary).
  if (channels_last_walk() == BlockWalk::kRows) {
    for_row_chunks(cols, walk.chunked, [&](int64_t lo, int64_t hi) BN_ALWAYS_INLINE {
      for_row_steps(walk.grouped, r0, r1, [&](int64_t ra, int64_t rb, auto count) BN_ALWAYS_INLINE {
        dx_row_steps<decltype(count)::value, T, kWithX>(x, dy, dx, C, lo, hi, ra, rb, shift, a,
                                                        kk, c0, stream);
      });
    });
    return;
  }
  dx_chunks<T, kWithX>(x, dy, dx, C, r0, r1, shift, a, kk, c0, ahead, stream, cols);
}

// Whether p[0..n) are all +0.0 (output_constants' shifts), on the bits: a loop on vectors.
inline bool all_zero(const float* __restrict p, int64_t n) {
  uint32_t bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof(u));
    bits |= u;
  }
  return bits == 0;
}

// The shift and offset of the output pass, channels [c0, c1), from the (C,)
// constants that are saved (shift, mean_s, invstd, scale, offset): a channel whose mean
// (shift + mean_s) lies within kSmallMean standard deviations (1 / invstd) of zero is written as
// x * scale + (offset - shift * scale), its shift 0; the others as (x - shift) * scale + offset.
// With every shift 0, the output pass loads two (C,) vectors per vector of x instead of three:
// on channels-last and (N, C) tensors whose passes meet other traffic in between (the
// benchmark's rounds, a network's step) the eval took 0.81-1.01x the time and the training
// forward 0.82-1.05x (BENCHMARKS.md). The folded form loses at most log2(1 + kSmallMean) bits of y against the
// shifted one (torch's kernel folds every channel); means farther out (1e4 + randn) keep the
// shift and their float32 accuracy. The backward of the fused ReLU recomputes y with the same
// function of the same saved constants, so that its gate is the forward's bit for bit; the
// backward's own passes keep the saved shift. Planar passes, which take the shift as a scalar
// per row at no cost, use the same constants, so that every layout gives the same output; the
// planar passes that read per-value tables or broadcasts of the constants (short_planes_affine,
// and flat_affine on 4x4 planes: flat_without_shift) skip the shifts too where all are 0: eval
// 0.74-0.96x the time on 3x3, 4x4 and 2x2 planes (1 and 2 threads), training forward
// 0.89-0.95x on 3x3 and 4x4 (BENCHMARKS.md).
constexpr float kSmallMean = 8.f;

inline void output_constants(int64_t c0, int64_t c1, const float* __restrict shift,
                             const float* __restrict mean_s, const float* __restrict invstd,
                             const float* __restrict scale, const float* __restrict offset,
                             float* __restrict yshift, float* __restrict yoffset) {
  for (int64_t c = c0; c < c1; ++c) {  // float arithmetic and selects: a loop on vectors
    const float z = (shift[c] + mean_s[c]) * invstd[c];
    const bool small = z * z <= kSmallMean * kSmallMean;  // false for NaN
    const float folded = std::fma(-shift[c], scale[c], offset[c]);  // rounded once
    yshift[c] = small ? 0.f : shift[c];
    yoffset[c] = small ? folded : offset[c];
  }
}

// Channel-inner statistics: the first block's centre moves to its mean (rounded to float32),
// for the channels [c0, c1) (training_moments says why). Only a finite centre is an
// improvement; NaN and inf reach the statistics either way. The first block's moments stay: its
// mean is moved to the new centre (M2 does not move). The choice is made on the bits, without
// a branch, so that the loop runs on vectors (with std::isfinite's branch it was a scalar
// chain: 1.7 us of a 64x1280 forward).
inline void move_first_centres(int64_t c0, int64_t c1, float* __restrict shift,
                               float* __restrict means) {
  auto bits = [](float v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof(b));
    return b;
  };
  auto value = [](uint32_t b) {
    float v;
    std::memcpy(&v, &b, sizeof(v));
    return v;
  };
  for (int64_t c = c0; c < c1; ++c) {
    const float s = shift[c], m = means[c];
    const float centre = s + m;
    const float moved = static_cast<float>(static_cast<double>(s) - centre + m);
    const uint32_t keep = (bits(centre) & 0x7f800000u) == 0x7f800000u ? ~0u : 0u;  // inf, NaN
    means[c] = value((bits(moved) & ~keep) | (bits(m) & keep));
    shift[c] = value((bits(centre) & ~keep) | (bits(s) & keep));
  }
}

// Chan's merge (Moments::add) of the channel-inner blocks' moments, in block order. A block's
// weights depend on its row count alone, the same for every channel: they are computed once
// (two divisions per channel and block were 5-10 % of a forward with many blocks), and the
// channels merge side by side.
struct BlockWeights {
  std::vector<double> mean, m2;
  double n = 0;  // rows in all
  BlockWeights(int64_t R, int64_t block) {
    const int64_t blocks = (R + block - 1) / block;
    mean.resize(blocks);
    m2.resize(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      const double nb = static_cast<double>(std::min(R, (b + 1) * block) - b * block);
      const double total = n + nb;
      mean[b] = nb / total;
      m2[b] = n * nb / total;
      n = total;
    }
  }
  // mean_s and var (biased) of the channels [c0, c1) from the blocks' float32 means and M2s
  // (block b's at means + b * C).
  void merge(int64_t c0, int64_t c1, int64_t C, const float* means, const float* m2s,
             double* mean_s, double* var) const {
    for (int64_t c = c0; c < c1; ++c) mean_s[c] = var[c] = 0.0;  // var holds M2 until the end
    for (size_t b = 0; b < mean.size(); ++b) {
      const float* block_mean = means + b * C;
      const float* block_m2 = m2s + b * C;
      for (int64_t c = c0; c < c1; ++c) {
        Moments::add(mean_s[c], var[c], block_mean[c], block_m2[c], mean[b], m2[b]);
      }
    }
    // One division for all channels (a float64 division per channel was 5-10 % of a
    // 2x1280 training forward); the product differs from M2 / n by at most an ulp of float64.
    const double inv_n = 1.0 / n;
    for (int64_t c = c0; c < c1; ++c) var[c] *= inv_n;
  }
};

// Channels per parallel task of a per-channel loop over `blocks` values per channel (the
// merges of the channel-inner blocks): at least 64, and enough that a task does about
// kRowTaskValues of work, so that a merge of one or a few blocks runs on the calling thread
// (a parallel region costs more than it).
inline int64_t merge_grain(int64_t blocks) {
  return std::max<int64_t>(64, kRowTaskValues / std::max<int64_t>(blocks, 1));
}

// Fills mean (of x - shift, float64) and biased variance per channel. Channel-inner: the
// shift moves from the first row to the first block's mean (rounded to float32), which the
// one-pass blocks need (inner_block_moments); the first block is measured by two passes, once.
template <typename T>
void training_moments(const T* x, const Geometry& g, float* shift, double* mean_s, double* var) {
  const int64_t C = g.C;
  const int64_t R = g.rows(), block = inner_block_rows(C);
  const int64_t blocks = (R + block - 1) / block;
  const int64_t bytes = R * C * static_cast<int64_t>(sizeof(T));
  const Uninit<float> means(blocks * C), m2s(blocks * C);  // every block writes all channels
  const bool from_memory = large_pass<T>(g, 1);  // as large as the output passes that stream
  for_block_tiles(0, 1, block, R, C, [&](int64_t, Cols cols, int64_t) {
    inner_block_moments(x, C, 0, std::min(R, block), shift, means.data(), m2s.data(),
                        /*one_pass=*/false, /*ahead=*/0, cols);
  });
  move_first_centres(0, C, shift, means.data());
  for_block_tiles(1, blocks, block, R, C, [&](int64_t b, Cols cols, int64_t last) {
    inner_block_moments(x, C, b * block, std::min(R, (b + 1) * block), shift,
                        means.data() + b * C, m2s.data() + b * C, /*one_pass=*/true,
                        next_block_ahead(b, last, block, R, C, bytes), cols, from_memory);
  });
  const BlockWeights weights(R, block);
  at::parallel_for(0, C, merge_grain(blocks), [&](int64_t c0, int64_t c1) {
    weights.merge(c0, c1, C, means.data(), m2s.data(), mean_s, var);
  });
}

// ------------------------------------------------------------------------------------------
// Elementwise passes
// ------------------------------------------------------------------------------------------

// Whether the planar output pass walks the rows as one flat run of vectors (flat_affine): rows
// of a vector or more whose length is not a multiple of the vector width (7x7, 14x14), and rows
// of exactly one vector (4x4, where the row by row pass paid a division and three broadcasts
// per vector: eval 32x256x4x4 0.51x the time as a flat run, 1 thread). Shorter planes (3x3,
// 2x2) go as rows of C * S values instead (planes_as_rows). Written row by
// row, such rows end in a partial vector and every vector after a row's start is off the
// vector boundaries (a 196-byte row's stores cross 4-5 cache lines); the flat run stores whole
// vectors on vector boundaries and streams them like a long row. Measured on the EPYC (eval
// forward, 1 thread, paired medians against row by row): 32x512x7x7 0.53x the time,
// 128x512x7x7 0.72x, 64x960x7x7 0.71x, 64x2048x7x7 0.80x, 32x256x14x14 0.88x,
// 64x1024x14x14 0.79x. Only with vector FMA, where the vector tail of row_affine rounds as its
// body (every value is then the same bits either way).
template <typename T>
inline bool flat_rows(const Geometry& g) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return !g.inner && g.S >= kW && (g.S % kW != 0 || g.S == kW);
#else
  (void)g;
  return false;
#endif
}

// Lane permutes: lanes[i] = v[idx[i]] (idx from an int32 array of kW lanes).
#if defined(CPU_CAPABILITY_AVX512)
inline Vec permute_lanes(const Vec& v, const int32_t* idx) {
  return Vec(_mm512_permutexvar_ps(_mm512_loadu_si512(idx), v));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec permute_lanes(const Vec& v, const int32_t* idx) {
  const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  return Vec(_mm256_permutevar8x32_ps(v, lanes));
}
#else
inline Vec permute_lanes(const Vec& v, const int32_t* idx) {
  float in[kW], out[kW];
  v.store(in);
  for (int64_t i = 0; i < kW; ++i) out[i] = in[idx[i]];
  return Vec::loadu(out);
}
#endif

// A pass over the planar rows [r0, r1) (row r = n * C + c) that walks them as one run of
// values: value(i, n, v) gives the n <= kW output values from offset i of the run (from
// element r0 * S of the tensors), v[j] being channel constant j (tables[j][c]) for each lane. A
// vector that crosses a row's end takes the constants of both rows lane by lane
// (first_lanes_from; a row has at least kW values, so a vector meets at most one end). Every
// value is computed as the row-by-row pass computes it. `stream`: streaming stores for the
// vectors on vector boundaries (vector_run). after(i, n) comes after the n values from i are
// stored.
template <int K, typename T, typename F, typename A = NothingAfter>
void flat_rows_pass(T* out, const Geometry& g, int64_t r0, int64_t r1,
                    const std::array<const float*, K>& tables, bool stream, F&& value,
                    A&& after = A()) {
  const int64_t S = g.S, C = g.C, len = (r1 - r0) * S;
  TORCH_INTERNAL_ASSERT(S >= kW, "a flat run of planes shorter than a vector");
  T* yp = out + r0 * S;
  int64_t c = r0 % C, row_end = S;  // the current row's channel and where it ends in the run
  int64_t next = c + 1 == C ? 0 : c + 1;
  std::array<Vec, K> cur;
  for (int j = 0; j < K; ++j) cur[j] = Vec(tables[j][c]);
  // Calls come in increasing i, each at or past the end of the one before: at most one row end
  // is crossed per call.
  auto at = [&](int64_t i, int64_t n) BN_ALWAYS_INLINE {
    if (i >= row_end) {
      c = next;
      next = c + 1 == C ? 0 : c + 1;
      row_end += S;
      for (int j = 0; j < K; ++j) cur[j] = Vec(tables[j][c]);
    }
    const int64_t k = row_end - i;
    if (k >= n) return value(i, n, cur.data());
    std::array<Vec, K> both;
    for (int j = 0; j < K; ++j) both[j] = first_lanes_from(cur[j], Vec(tables[j][next]), k);
    return value(i, n, both.data());
  };
  flat_run(yp, len, stream, at, after);
}

// y = (x - shift) * scale + offset over the planar rows [r0, r1), then the fused tail (the
// residual, the ReLU, the mask from the values just stored), as row_affine computes it (its
// scalar tail's std::fma is the vector FMA's rounding). `stream` only without a fused tail.
template <typename T>
void flat_affine(const T* x, T* y, const Geometry& g, int64_t r0, int64_t r1, const float* shift,
                 const float* scale, const float* offset, const Fuse<T>& f, bool stream,
                 bool zero_shift) {
  const int64_t first = r0 * g.S;
  const T* xp = x + first;
  if (zero_shift && !f.any()) {
    // Every shift 0 (output_constants): x taken as it is (the same bits).
    flat_rows_pass<2>(y, g, r0, r1, {scale, offset}, stream,
                      [&](int64_t i, int64_t n, const Vec* v) BN_ALWAYS_INLINE {
                        return at::vec::fmadd(vload_upto(xp + i, n), v[0], v[1]);
                      });
    return;
  }
  if (!f.any()) {
    flat_rows_pass<3>(y, g, r0, r1, {shift, scale, offset}, stream,
                      [&](int64_t i, int64_t n, const Vec* v) BN_ALWAYS_INLINE {
                        return at::vec::fmadd(vload_upto(xp + i, n) - v[0], v[1], v[2]);
                      });
    return;
  }
  const T* zp = f.z != nullptr ? f.z + first : nullptr;
  uint8_t* mp = f.mask != nullptr ? f.mask + first : nullptr;
  const T* yp = y + first;
  flat_rows_pass<3>(
      y, g, r0, r1, {shift, scale, offset}, false,
      [&](int64_t i, int64_t n, const Vec* v) BN_ALWAYS_INLINE {
        Vec out = at::vec::fmadd(vload_upto(xp + i, n) - v[0], v[1], v[2]);
        if (zp != nullptr) out = round_like<T>(out) + vload_upto(zp + i, n);
        if (f.relu) out = at::vec::clamp_min(out, Vec(0.f));  // as fuse_tail
        return out;
      },
      [&](int64_t i, int64_t n) BN_ALWAYS_INLINE {
        if (mp != nullptr) write_mask(yp + i, mp + i, n);
      });
}

// dx = dy * a + (x - shift) * k + c0 over the planar rows [r0, r1) (kWithX false: dx = dy * a),
// as row_dx computes it.
template <typename T, bool kWithX>
void flat_dx(const T* x, const T* dy, T* dx, const Geometry& g, int64_t r0, int64_t r1,
             const float* shift, const float* a, const float* k, const float* c0, bool stream) {
  const T* xp = x + r0 * g.S;
  const T* gp = dy + r0 * g.S;
  if constexpr (kWithX) {
    flat_rows_pass<4>(dx, g, r0, r1, {shift, a, k, c0}, stream,
                      [&](int64_t i, int64_t n, const Vec* v) BN_ALWAYS_INLINE {
                        const Vec xk = at::vec::fmadd(vload_upto(xp + i, n) - v[0], v[2], v[3]);
                        return at::vec::fmadd(vload_upto(gp + i, n), v[1], xk);
                      });
  } else {
    flat_rows_pass<1>(dx, g, r0, r1, {a}, stream,
                      [&](int64_t i, int64_t n, const Vec* v) BN_ALWAYS_INLINE {
                        return vload_upto(gp + i, n) * v[0];
                      });
  }
}

// Whether a planar pass that follows the statistics (the training forward's output, the
// backward's dx) writes a block's rows right after the block's statistics, with its inputs
// (`reads` tensors: x, or x and dy) still in cache, rather than in one pass over the whole tensor
// after all of them (rows in memory order, a flat run where flat_rows, each thread over the
// channels it has just read: planar_rows_by_channels). Block by block, each sample's rows of a
// block land C * S values apart, and for short rows (under kStreamMinRowBytes) and rows off the
// vector width those scattered stores cost more than reading the inputs again. Measured on the
// EPYC (paired medians, one pass against block by block; 1 thread / 2 threads):
// - forward: 32x512x7x7 0.62x / 0.62x the time, 64x960x7x7 0.64x / 0.83x, 64x2048x7x7
//   0.87x / 0.91x, 32x256x14x14 0.70x / 0.72x; with the fused ReLU and residual 0.59-0.76x
//   (1 thread). 14x14 planes of 10-50 MB tensors, whose rows stream (streams), took
//   0.76-1.03x the time on 1 thread but 1.01-1.09x on 2: they stay block by block.
// - backward: 32x512x7x7 0.78x / 0.83x, 64x960x7x7 0.86x / 0.89x, 64x2048x7x7 0.94x / 0.93x;
//   14x14 planes 0.92-0.93x on 1 thread but 1.12-1.16x on 2 (32x256x14x14, 16x512x14x14):
//   with two inputs to read again, only short rows go in one pass.
template <typename T>
inline bool rows_after_statistics(const Geometry& g, int reads, const T* out) {
  if (g.S * static_cast<int64_t>(sizeof(T)) < kStreamMinRowBytes) return false;
  return reads > 1 || !flat_rows<T>(g) || streams(g, reads, out);
}

// How a planar output pass writes: as a flat run (flat_rows) or row by row, and whether it
// streams (row by row: streams; as a flat run: stream_pass alone, its vectors being on vector
// boundaries; never with a fused tail, whose mask is computed from the values just stored).
struct PlanarWrite {
  bool flat, stream;
  bool zero_shift = false;  // a flat run without the shifts (flat_without_shift)
};
template <typename T>
inline PlanarWrite planar_write(const Geometry& g, int reads, const T* out, bool fused) {
  const bool flat = flat_rows<T>(g);
  if (fused) return {flat, false};
  return {flat, flat ? stream_pass(pass_traffic<T>(g, reads)) : streams(g, reads, out)};
}

// Whether a flat output pass (w.flat) goes without its shifts: all 0 (output_constants), on
// planes of exactly one vector (4x4), where each vector broadcasts its row's constants. Eval
// took 0.84-0.86x the time at 64x512x4x4 without them, 0.97x on 7x7 planes, but 1.03-1.21x on
// 14x14 (32x256x14x14; paired medians, 1 thread): kept to one-vector planes.
inline bool flat_without_shift(const Geometry& g, const PlanarWrite& w, const float* shift) {
  return w.flat && g.S == kW && all_zero(shift, g.C);
}

// Planar rows [r0, r1): y = (x - shift) * scale + offset, then the fused tail.
template <typename T>
void affine_rows(const T* x, T* y, const Geometry& g, int64_t r0, int64_t r1, const float* shift,
                 const float* scale, const float* offset, const Fuse<T>& f, PlanarWrite w) {
  if (w.flat) {
    flat_affine(x, y, g, r0, r1, shift, scale, offset, f, w.stream, w.zero_shift);
    return;
  }
  const int64_t C = g.C, S = g.S;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t c = i % C;
    row_affine(x + i * S, y + i * S, S, shift[c], scale[c], offset[c], f, i * S, w.stream);
  }
}

// Calls rows(r0, r1) for the planar rows of every sample in this task's channels, the tasks
// taking the channel blocks of B channels as the statistics passes do (the same
// at::parallel_for range and grain, so each thread meets the channels whose data it just read):
// per sample one contiguous run of rows, or the whole tensor where one task has every channel.
// One fence per task for its streamed stores.
template <typename F>
void planar_rows_by_channels(const Geometry& g, int64_t B, bool stream, F&& rows) {
  const int64_t C = g.C;
  at::parallel_for(0, (C + B - 1) / B, 1, [&](int64_t k0, int64_t k1) {
    const int64_t c0 = k0 * B, c1 = std::min(C, k1 * B);
    if (c0 == 0 && c1 == C) {
      rows(int64_t{0}, g.N * C);
    } else {
      for (int64_t n = 0; n < g.N; ++n) rows(n * C + c0, n * C + c1);
    }
    if (stream) stream_fence();
  });
}

// Planes shorter than a vector (3x3, 2x2, ...) go through the elementwise passes (the output,
// dx, the fused backward's recomputed gate) as the rows of an (N, C * S) channel-inner tensor
// (the same memory: sample n's planes are its row), each channel's constants repeated S times
// (PerValue): the channel-inner walks load them as plain vectors, shared by kBlockRows samples
// where the rows are grouped (row_walk), and every value is computed as before (the same fmadd
// of the same operands). Before, they went as one flat run whose every vector gathered and
// permuted its constants from up to kW / S + 1 channels. Measured on the EPYC (paired medians
// against the flat run; 64x512x2x2, 64x2048x3x3, 16x1024x3x3, 8x512x3x3, 128x256x3x3):
// - 1 thread: eval 0.48-0.81x the time (64x2048x3x3 0.76-0.96x), training forward 0.59-0.98x,
//   backward 0.68-0.91x (64x2048x3x3 1.03-1.11x), fused forward 0.68-0.91x, fused backward
//   (save="recompute") 0.66-0.85x (64x2048x3x3 1.07-1.08x);
// - 2 threads: eval 0.71-0.93x (64x512x2x2 1.05x), training forward 0.49-0.88x, backward
//   0.50-0.96x, fused 0.44-0.83x, fused backward 0.58-0.87x (64x2048x3x3 1.03x);
// - caches evicted before each call (1 thread): eval 0.99-1.18x, training forward 0.94-1.02x,
//   backward 0.93-1.04x, fused backward 1.05-1.16x (the flat run reads in memory order; walked
//   without chunks, 0.88-0.96x there but 1.05-1.16x repeated).
// The threads take ranges of the columns, whole vectors of at least kRowTaskValues values in
// all (down every sample), and each repeats the constants of its own columns: partitioned by
// samples instead, the repetition of the whole tables before the pass (one thread) took the
// time that the second thread saved (16x1024x3x3 and 8x512x3x3 eval on 2 threads: 1.37x the
// time of the flat run).
inline bool planes_as_rows(const Geometry& g) { return !g.inner && g.S > 1 && g.S < kW; }

inline Geometry rows_of_planes(const Geometry& g) { return Geometry{true, g.N, g.C * g.S, 1}; }

// out[i - lo] = t[i / S] for the columns i in [lo, hi) (lo a multiple of kW, S < kW), a vector
// at a time: the lanes of vector v take channels v * kW / S on, in a pattern (lanes[k],
// k = v % S) that repeats every S vectors, kW channels on (a permute of the kW channels from
// its first). One store per channel (whole vectors, each overlapping the one before) took as
// long as the pass it serves at 16x1024x3x3: the stores split across cache lines.
inline void repeat_each(const float* t, int64_t C, int64_t S, int64_t lo, int64_t hi,
                        float* out) {
  int32_t lanes[kW][kW];
  int64_t base[kW];
  for (int64_t k = 0; k < S; ++k) {
    base[k] = k * kW / S;
    for (int64_t l = 0; l < kW; ++l) {
      lanes[k][l] = static_cast<int32_t>((k * kW + l) / S - base[k]);
    }
  }
  const int64_t v0 = lo / kW, v1 = hi / kW;
  int64_t k = v0 % S, from = v0 / S * kW;  // vector v's pattern, and its repetition's channel
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t first = from + base[k];
    float* o = out + (v * kW - lo);
    if (first + kW <= C) {
      permute_lanes(Vec::loadu(t + first), lanes[k]).store(o);
    } else {
      for (int64_t l = 0; l < kW; ++l) o[l] = t[(v * kW + l) / S];
    }
    if (++k == S) {
      k = 0;
      from += kW;
    }
  }
  for (int64_t i = v1 * kW; i < hi; ++i) out[i - lo] = t[i / S];
}

// The constants of the columns [lo, hi) of planes_as_rows, each channel's entry of each of K
// (C,) tables repeated S times (repeat_each): table j's column c at operator[](j)[c]. They live
// in a buffer of the thread that is kept from call to call: allocated at every call (100-150 KB
// at 16x1024x3x3 on one thread), their pages were faulted in anew each time, and that took
// longer than the pass. One PerValue at a time per thread (each task makes one and is done
// with it when it returns).
template <size_t K>
class PerValue {
 public:
  PerValue(const std::array<const float*, K>& tables, const Geometry& g, Cols cols)
      : lo_(cols.lo), stride_((cols.hi - cols.lo + kW - 1) / kW * kW) {
    std::vector<float>& kept = buffer();
    if (kept.size() < K * stride_) kept.resize(K * stride_);
    data_ = kept.data();
    for (size_t j = 0; j < K; ++j) {
      repeat_each(tables[j], g.C, g.S, cols.lo, cols.hi, data_ + j * stride_);
    }
  }
  PerValue(const PerValue&) = delete;
  PerValue& operator=(const PerValue&) = delete;
  const float* operator[](size_t j) const { return data_ + j * stride_ - lo_; }

 private:
  static std::vector<float>& buffer() {
    thread_local std::vector<float> kept;
    return kept;
  }
  int64_t lo_, stride_;
  float* data_;
};

// f(rg, cols, t) for ranges of columns of the planes as rows (rg: (N, C * S)), in parallel, t
// the PerValue<K> of `tables` for them; the streamed stores fenced per task.
template <size_t K, typename F>
void for_plane_columns(const Geometry& g, const std::array<const float*, K>& tables,
                       bool stream, F&& f) {
  const Geometry rg = rows_of_planes(g);
  const int64_t vectors = (rg.C + kW - 1) / kW;
  const int64_t grain = std::max<int64_t>(1, kRowTaskValues / (std::max<int64_t>(rg.N, 1) * kW));
  at::parallel_for(0, vectors, grain, [&](int64_t v0, int64_t v1) {
    const Cols cols{v0 * kW, std::min(rg.C, v1 * kW)};
    const PerValue<K> t(tables, g, cols);
    f(rg, cols, t);
    if (stream) stream_fence();
  });
}

// affine for planes_as_rows.
template <typename T>
void short_planes_affine(const T* x, T* y, const Geometry& g, const float* shift,
                         const float* scale, const float* offset, const Fuse<T>& f) {
  const int reads = f.z != nullptr ? 2 : 1;
  const bool stream = !f.any() && streams(rows_of_planes(g), reads, y);
  const RowWalk walk = row_walk<T>(rows_of_planes(g), reads);
  if (!f.any() && all_zero(shift, g.C)) {
    // Every shift 0 (output_constants): two tables, and x taken as it is (the same bits).
    for_plane_columns<2>(g, {scale, offset}, stream,
                         [&](const Geometry& rg, Cols cols, const PerValue<2>& t) {
                           inner_block_affine(x, y, rg.C, 0, rg.N, nullptr, t[0], t[1], f,
                                              stream, walk, cols, /*zero_shift=*/true);
                         });
    return;
  }
  for_plane_columns<3>(g, {shift, scale, offset}, stream,
                       [&](const Geometry& rg, Cols cols, const PerValue<3>& t) {
                         inner_block_affine(x, y, rg.C, 0, rg.N, t[0], t[1], t[2], f, stream,
                                            walk, cols);
                       });
}

// y = (x - shift) * scale + offset, per channel.
template <typename T>
void affine(const T* x, T* y, const Geometry& g, const float* shift, const float* scale,
            const float* offset, const Fuse<T>& f) {
  const int64_t C = g.C, S = g.S;
  if (planes_as_rows(g)) {
    short_planes_affine(x, y, g, shift, scale, offset, f);
    return;
  }
  if (!g.inner) {
    PlanarWrite w = planar_write(g, f.z != nullptr ? 2 : 1, y, f.any());
    w.zero_shift = flat_without_shift(g, w, shift);
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)),
                     [&](int64_t i0, int64_t i1) {
                       affine_rows(x, y, g, i0, i1, shift, scale, offset, f,
                                   w);
                       if (w.stream) stream_fence();
                     });
    return;
  }
  const int reads = f.z != nullptr ? 2 : 1;
  const bool stream = streams(g, reads, y);
  const RowWalk walk = row_walk<T>(g, reads);
  const int64_t R = g.rows(), block = inner_block_rows(C);
  const bool zero_shift = all_zero(shift, C);
  for_block_tiles(0, (R + block - 1) / block, block, R, C, [&](int64_t b, Cols cols, int64_t last) {
    inner_block_affine(x, y, C, b * block, std::min(R, (b + 1) * block), shift,
                       scale, offset, f, stream, walk, cols, zero_shift);
    if (stream && b + 1 == last) stream_fence();
  });
}

// A pass whose output `out` is contiguous (N, C, L) and whose inputs `inputs` are a sequence
// batch stored (N, L, C) (a transposed (N, C, L): g.inner, g.S = L), the layout torch returns
// y and dx in. Blocks of 16 positions x 16 channels are computed as the channel-inner passes
// compute them, vec(cv, off) for a vector of channels at offset off of the (N, L, C) storage
// (cv: its kConsts (C,) constants from `consts`, loaded once per block) and one(off, c) for
// channel c of the last partial vector (the same bits), and transposed into out, a strip of 16
// positions of one sample per task as in transpose_matrices: whole blocks in registers on
// AVX-512 (bfloat16 as 32-bit lanes, rounded as vstore rounds), the others through a block in
// L1 (transpose_block). One pass, where the channel-inner pass and then restored_sequence took
// two. Measured on the EPYC (paired medians of 20 rounds against the two passes, 1 thread):
// float32 eval 0.44-0.72x the time, training forward 0.50-0.83x (8x64x100 to 64x1024x64; 2
// threads 0.44-0.77x); with every block through L1, eval 0.65-0.99x and training forward
// 0.68-0.98x. bfloat16 (its whole blocks turned in registers too, before value by value): eval
// 0.44-0.58x, training forward 0.48-0.62x.
template <typename T, size_t kConsts, size_t kInputs, typename VecFn, typename OneFn>
void sequence_pass(const Geometry& g, T* out, int reads,
                   const std::array<const float*, kConsts>& consts,
                   const std::array<const T*, kInputs>& inputs, const VecFn& vec,
                   const OneFn& one) {
  constexpr int64_t kBlock = 16;
  constexpr int64_t kAhead = 4 * 64 / static_cast<int64_t>(sizeof(T));  // values: 4 lines
  static_assert(kBlock % kW == 0, "a block holds whole vectors of channels");
  constexpr int kVecs = static_cast<int>(kBlock / kW);
  const int64_t C = g.C, L = g.S, strips = (L + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(kBlock * C, 1));
  const bool stream = std::is_same_v<T, float> && stream_pass(pass_traffic<T>(g, reads)) &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && L % kBlock == 0;
  at::parallel_for(0, g.N * strips, grain, [&](int64_t t0, int64_t t1) {
    // Local copies: the vector stores (which may alias anything) cannot be taken to change them,
    // so they stay in registers instead of being reloaded at every row.
    const std::array<const float*, kConsts> cs = consts;
    const std::array<const T*, kInputs> ins = inputs;
    const VecFn vec_at = vec;
    const OneFn one_at = one;
    T* const os = out;
    alignas(64) T block[kBlock * kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / strips, l0 = t % strips * kBlock;
      const int m = static_cast<int>(std::min(kBlock, L - l0));
      const int64_t row0 = (n * L + l0) * C;  // the strip's first position in (N, L, C)
      T* const dst = os + n * C * L + l0;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int w = static_cast<int>(std::min(kBlock, C - c0));
        const int vecs = w / static_cast<int>(kW);  // whole vectors of channels
        if (c0 + kAhead < C) {
          for (const T* in : ins) {
            for (int i = 0; i < m; ++i) __builtin_prefetch(in + row0 + i * C + c0 + kAhead);
          }
        }
        Vec cv[kVecs][kConsts];
        for (int v = 0; v < vecs; ++v) {
          for (size_t j = 0; j < kConsts; ++j) cv[v][j] = Vec::loadu(cs[j] + c0 + v * kW);
        }
#if defined(CPU_CAPABILITY_AVX512)
        if (m == kBlock && w == kBlock) {  // a whole block: computed and turned in registers
          __m512 r[kBlock];
          for (int i = 0; i < kBlock; ++i) {
            const Vec v = vec_at(cv[0], row0 + i * C + c0);
            if constexpr (std::is_same_v<T, float>) {
              r[i] = v;
            } else {
              r[i] = widen_bf16(bf16_bits(v));  // rounded as vstore rounds
            }
          }
          if constexpr (std::is_same_v<T, float>) {
            if (stream) {
              transpose_16x16_into<true>(r, dst + c0 * L, L);
            } else {
              transpose_16x16_into<false>(r, dst + c0 * L, L);
            }
          } else {
            transpose_16x16_into(r, dst + c0 * L, L);
          }
          continue;
        }
#endif
        for (int i = 0; i < m; ++i) {
          const int64_t off = row0 + i * C + c0;
          T* q = block + i * kBlock;
          for (int v = 0; v < vecs; ++v) vstore(q + v * kW, vec_at(cv[v], off + v * kW));
          for (int64_t c = vecs * kW; c < w; ++c) q[c] = static_cast<T>(one_at(off + c, c0 + c));
        }
        transpose_block(block, kBlock, dst + c0 * L, L, m, w, stream);
      }
    }
    if (stream) stream_fence();
  });
}

// mask[0, kW) = !(y <= 0) for the kW values of y (NaN passes), as write_mask writes it.
inline void vstore_mask(const Vec& y, uint8_t* mask) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 pass = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NLE_UQ);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(mask), _mm_maskz_set1_epi8(pass, 1));
#else
  float v[kW];
  y.store(v);
  for (int64_t i = 0; i < kW; ++i) mask[i] = !(v[i] <= 0.f);
#endif
}

// y = (x - shift) * scale + offset into y contiguous (N, C, L) from x stored (N, L, C), as the
// channel-inner output pass computes it (affine_row_steps, and inner_block_affine with a fused
// tail: the residual z and the mask laid out as x; sequence_pass).
template <typename T>
void sequence_affine(const T* x, T* y, const Geometry& g, const float* shift, const float* scale,
                     const float* offset, const Fuse<T>& f) {
  if (!f.any()) {
    sequence_pass<T, 3, 1>(
        g, y, 1, {shift, scale, offset}, {x},
        [x](const Vec* k, int64_t off) BN_ALWAYS_INLINE {
          return at::vec::fmadd(vload(x + off) - k[0], k[1], k[2]);
        },
        [x, shift, scale, offset](int64_t off, int64_t c) {
          return std::fma(static_cast<float>(x[off]) - shift[c], scale[c], offset[c]);
        });
    return;
  }
  const auto vec = [x, f](const Vec* k, int64_t off) BN_ALWAYS_INLINE {
    const Vec v = fuse_tail(at::vec::fmadd(vload(x + off) - k[0], k[1], k[2]), f, off);
    if (f.mask != nullptr) vstore_mask(round_like<T>(v), f.mask + off);
    return v;
  };
  const auto one = [x, shift, scale, offset, f](int64_t off, int64_t c) {
    const float v =
        fuse_tail1(std::fma(static_cast<float>(x[off]) - shift[c], scale[c], offset[c]), f, off);
    if (f.mask != nullptr) f.mask[off] = !(static_cast<float>(static_cast<T>(v)) <= 0.f);
    return v;
  };
  if (f.z != nullptr) {
    sequence_pass<T, 3, 2>(g, y, 2, {shift, scale, offset}, {x, f.z}, vec, one);
  } else {
    sequence_pass<T, 3, 1>(g, y, 1, {shift, scale, offset}, {x}, vec, one);
  }
}

// dx = dy * a + (x - shift) * k + c0 (kWithX false: dy * a) into dx contiguous (N, C, L) from x
// and dy stored (N, L, C), as the channel-inner dx pass computes it (dx_row_steps; sequence_pass).
template <typename T, bool kWithX>
void sequence_dx(const T* x, const T* dy, T* dx, const Geometry& g, const float* shift,
                 const float* a, const float* kk, const float* c0) {
  if constexpr (kWithX) {
    sequence_pass<T, 4, 2>(
        g, dx, 2, {shift, a, kk, c0}, {x, dy},
        [x, dy](const Vec* k, int64_t off) BN_ALWAYS_INLINE {
          return at::vec::fmadd(vload(dy + off), k[1],
                                at::vec::fmadd(vload(x + off) - k[0], k[2], k[3]));
        },
        [x, dy, shift, a, kk, c0](int64_t off, int64_t c) {
          return static_cast<float>(dy[off]) * a[c] +
                 (static_cast<float>(x[off]) - shift[c]) * kk[c] + c0[c];
        });
  } else {
    sequence_pass<T, 1, 1>(
        g, dx, 1, {a}, {dy},
        [dy](const Vec* k, int64_t off) BN_ALWAYS_INLINE { return vload(dy + off) * k[0]; },
        [dy, a](int64_t off, int64_t c) { return static_cast<float>(dy[off]) * a[c]; });
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
// 1 / sqrt(a) of 8 float64 lanes: the 14-bit estimate and two Newton steps (relative error
// below 2^-52 before rounding, so within an ulp or two of float64 of 1.0 / std::sqrt(a), and
// the float32 constants made from it the same but in about one channel in 10^8); about a tenth
// of the time of the square root and the division, which were 15 % of a 2x1280 training
// forward. Lanes outside [1e-300, 1e300] (0, inf, NaN, negative, and where y * y of the steps
// would leave float64's normal range) take 1.0 / std::sqrt(a) itself.
inline __m512d inv_sqrt8(__m512d a) {
  const __m512d half_a = _mm512_mul_pd(a, _mm512_set1_pd(0.5));
  const __m512d three_halves = _mm512_set1_pd(1.5);
  __m512d y = _mm512_rsqrt14_pd(a);
  for (int step = 0; step < 2; ++step) {
    const __m512d yy = _mm512_mul_pd(y, y);
    y = _mm512_mul_pd(y, _mm512_fnmadd_pd(half_a, yy, three_halves));
  }
  const __mmask8 normal =
      _mm512_cmp_pd_mask(a, _mm512_set1_pd(1e-300), _CMP_GE_OQ) &
      _mm512_cmp_pd_mask(a, _mm512_set1_pd(1e300), _CMP_LE_OQ);
  if (normal != 0xff) {
    y = _mm512_mask_div_pd(y, static_cast<__mmask8>(~normal), _mm512_set1_pd(1.0),
                           _mm512_sqrt_pd(a));
  }
  return y;
}
#endif

// The per-channel constants, in float64 each rounded to float32 once, as plain loops over
// arrays that the compiler vectorizes (square roots and divisions of a vector of channels at a
// time: a scalar chain per channel cost 3-4 ns, 4 us of a 64x1280 call); on AVX-512 invstd
// comes from inv_sqrt8 instead of the square root and the division.
// Training, channels [c0, c1): invstd = 1 / sqrt(var + eps), scale = gamma * invstd, offset =
// beta - mean_s * gamma * invstd, and the saved mean_s and invstd.
inline void training_constants(int64_t c0, int64_t c1, const double* __restrict mean_s,
                               const double* __restrict var, const float* __restrict gamma,
                               const float* __restrict beta, double eps, float* __restrict scale,
                               float* __restrict offset, float* __restrict mean_out,
                               float* __restrict invstd_out) {
  int64_t c = c0;
#if defined(CPU_CAPABILITY_AVX512)
  // The loop below on 8 lanes, written out (as written, GCC split it into scalar conversions).
  for (; c + 8 <= c1; c += 8) {
    const __m512d is = inv_sqrt8(_mm512_add_pd(_mm512_loadu_pd(var + c), _mm512_set1_pd(eps)));
    const __m512d g = _mm512_cvtps_pd(_mm256_loadu_ps(gamma + c));
    const __m512d b = _mm512_cvtps_pd(_mm256_loadu_ps(beta + c));
    const __m512d m = _mm512_loadu_pd(mean_s + c);
    _mm256_storeu_ps(scale + c, _mm512_cvtpd_ps(_mm512_mul_pd(g, is)));
    _mm256_storeu_ps(offset + c,
                     _mm512_cvtpd_ps(_mm512_sub_pd(b, _mm512_mul_pd(_mm512_mul_pd(m, g), is))));
    _mm256_storeu_ps(mean_out + c, _mm512_cvtpd_ps(m));
    _mm256_storeu_ps(invstd_out + c, _mm512_cvtpd_ps(is));
  }
#endif
  for (; c < c1; ++c) {
    const double invstd = 1.0 / std::sqrt(var[c] + eps);
    scale[c] = static_cast<float>(gamma[c] * invstd);
    offset[c] = static_cast<float>(beta[c] - mean_s[c] * gamma[c] * invstd);
    mean_out[c] = static_cast<float>(mean_s[c]);
    invstd_out[c] = static_cast<float>(invstd);
  }
}

// Whether a[c] and b[c] are finite for every c in [c0, c1), decided on the bits (an exponent
// of all ones is inf or NaN), so that the loop runs on vectors.
inline bool all_finite(int64_t c0, int64_t c1, const double* __restrict a,
                       const double* __restrict b) {
  constexpr uint64_t kExponent = 0x7ff0000000000000ull;
  uint64_t nonfinite = 0;
  for (int64_t c = c0; c < c1; ++c) {
    uint64_t u, v;
    std::memcpy(&u, a + c, sizeof(u));
    std::memcpy(&v, b + c, sizeof(v));
    nonfinite |= static_cast<uint64_t>((u & kExponent) == kExponent) |
                 static_cast<uint64_t>((v & kExponent) == kExponent);
  }
  return nonfinite == 0;
}

// Eval: invstd = 1 / sqrt(running_var + eps) and scale = gamma * invstd, in float32 as torch's
// kernel computes them (the same bits): 16 lanes a vector, where the float64 square roots and
// divisions took 8 and several times as long (1.2 us of a 10 us 64x1280 eval).
inline void eval_constants(int64_t C, const float* __restrict rv, const float* __restrict gamma,
                           double eps, float* __restrict scale, float* __restrict invstd_out) {
  const float e = static_cast<float>(eps);
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = 1.f / std::sqrt(rv[c] + e);
    scale[c] = invstd * gamma[c];
    invstd_out[c] = invstd;
  }
}

// Where the forward writes its (C,) float32 constants: the saved statistics (shift, mean_s,
// invstd) and the output's scale and offset.
struct ChannelOut {
  float *shift, *mean, *invstd, *scale, *offset;
};

// Whether the training forward's planar statistics walk each thread's channels as one block
// (planar_block_moments: four samples' runs of all of them at a time, long runs that the
// hardware prefetchers follow), and the output then goes in a pass of its own: planes longer
// than a vector, on tensors as large as those whose passes stream (from memory, not from the
// caches). The blocks of 256 KB (or single channels, for rows of 512 bytes and more) read 4-64
// runs of a few KB spread C * S values apart per step, and ran at a quarter to a third of a
// plain read's speed there (the statistics of 64x1024x14x14 NCHW took about 4x the time of
// x.sum()); the statistics are the same bits with any block size. Measured on the EPYC (1
// thread, paired medians): the training forward took 0.55x the time at 64x1024x14x14, 0.65x
// at 64x192x28x28, 0.77-0.82x at 16x512x28x28, 32x64x56x56 and 16x144x56x56, 0.90x at
// 8x256x56x56 and 64x2048x7x7, 0.96x at 64x960x7x7. The backward's gradient sums the same way,
// with dx in a pass of its own (x and dy read twice from memory instead of once, strided):
// 1.05-1.29x the time (0.85x at 32x64x56x56); not done.
template <typename T>
inline bool planar_in_memory_order(const Geometry& g) {
  return !g.inner && !short_planes(g) && large_pass<T>(g, 1);
}

// Whether the training passes over a channel-inner tensor go a piece of channels at a time
// (for_inner_pieces; `forward`: the forward, else the backward): tensors of one block of rows
// (inner_block_rows: (N, C) inputs of small batches, 64x1280 or a BatchNorm1d(100) at batch
// 60), and tensors of up to kPiecesTensorBytes (the forward half of it) with at least as many
// chunks of channels as threads. Measured on the EPYC (paired medians against the passes over
// whole blocks, BENCHMARKS.md), 1 thread: training forward 0.91-1.02x the time (32x64, 60x100,
// 64x512, 64x1280, 16x9216, 128x512, 300x200, 1024x64, 16x256x4x4 NHWC), backward 0.75-1.00x;
// 2 threads (one parallel region instead of three or four) 0.68-0.99x and 0.62-0.93x. From
// memory (the caches evicted before each call) the backward takes 1.17-1.47x on rows of 800
// bytes and more: a piece's walk down the rows reads each row in another page, which the
// hardware prefetchers do not follow (asking for the next piece ahead did not help); with the
// tensors in L3 0.81-1.02x. Kept: a tensor of at most 512 KB that left L3 between its forward
// and backward belongs to a step that moved more than 32 MB in between. Not on 1 MB: the
// pieces' walk down rows of 2 or 4 KB meets itself in the same cache sets (512x512 forward
// 1.25x, backward 1.10x; 256x1024 forward 1.15x); at 512 KB with rows of 2 KB (256x512,
// 64x512x2x2 NHWC) the forward varied from run to run, 0.92-1.14x (its output's pieces land in
// the same sets as x's, or not), the backward 0.75-0.92x. Nor the forward over rows of a
// multiple of 4 KB, whose output stores alias the loads of x modulo 4 KB: 64x1024 and 128x1024
// took 1.03-1.49x the time (8 KB rows, 64x2048 and 32x2048, 0.96-1.02x); their backward took
// 0.83-1.06x over five runs.
constexpr int64_t kPiecesTensorBytes = int64_t{512} << 10;  // x and its output in one L2

template <typename T>
inline bool inner_pieces(const Geometry& g, bool forward) {
  if (!g.inner) return false;
  if (forward && (g.C * static_cast<int64_t>(sizeof(T))) % 4096 == 0) return false;
  if (g.rows() <= inner_block_rows(g.C)) return true;
  const int64_t chunks = (g.C + 4 * kW - 1) / (4 * kW);
  const int64_t most = forward ? kPiecesTensorBytes / 2 : kPiecesTensorBytes;
  return g.rows() * g.C * static_cast<int64_t>(sizeof(T)) <= most &&
         chunks >= at::get_num_threads();
}

// Bytes of a piece of channels down the rows of for_inner_pieces: in L1 (rows permitting)
// while its second pass reads it.
constexpr int64_t kPieceBytes = int64_t{16} << 10;

// f(cols) for the channels of a channel-inner tensor in pieces of whole chunks (for_chunks)
// of about kPieceBytes of each of `reads` tensors, at least one chunk, in one parallel region
// over ranges of chunks of at least kRowTaskValues values; the streamed stores fenced per
// task. The pieces start on chunk boundaries, so that every channel goes through the same code
// (vector or scalar tail, and the one-pass statistics' redo of a chunk) as in a pass over
// all of them.
template <typename T, typename F>
void for_inner_pieces(const Geometry& g, int reads, bool stream, F&& f) {
  const int64_t C = g.C, R = std::max<int64_t>(g.rows(), 1);
  const int64_t chunk = 4 * kW, chunks = (C + chunk - 1) / chunk;
  const int64_t piece = std::max<int64_t>(1, kPieceBytes / (reads * R * sizeof(T)) / chunk);
  const int64_t grain = std::max<int64_t>(1, kRowTaskValues / (chunk * R));
  at::parallel_for(0, chunks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; k += piece) {
      f(Cols{k * chunk, std::min(C, std::min(k1, k + piece) * chunk)});
    }
    if (stream) stream_fence();
  });
}

// The training forward of inner_pieces(g) without a fused tail: statistics, constants and
// output a piece of channels at a time, the output pass reading the piece from L1 or L2 where
// the statistics left it, its constants in registers (affine_chunks), in one parallel region
// (three or four before: the first block's statistics, the other blocks', the merge, the
// output). The values are those of training_moments, finalize and affine: each channel's
// arithmetic is its own. (With a fused tail the pieces' output went row after row, 1.03-1.13x
// the time of the passes over whole blocks: not done.)
// `finalize` writes the output's shift and offset (yshift, yoffset) of its channels too.
template <typename T, typename Finalize>
void pieces_forward(const T* x, T* y, const Geometry& g, float* shift, const float* scale,
                    const float* yshift, const float* yoffset, double* mean_s, double* var,
                    Finalize&& finalize) {
  const int64_t C = g.C, R = g.rows(), block = inner_block_rows(C);
  const int64_t blocks = (R + block - 1) / block;
  const Uninit<float> means(blocks * C), m2s(blocks * C);  // every block writes all channels
  const BlockWeights weights(R, block);
  const bool stream = streams(g, 1, y);
  for_inner_pieces<T>(g, 1, stream, [&](Cols p) {
    inner_block_moments(x, C, 0, std::min(R, block), shift, means.data(), m2s.data(),
                        /*one_pass=*/false, /*ahead=*/0, p);
    move_first_centres(p.lo, p.hi, shift, means.data());
    for (int64_t b = 1; b < blocks; ++b) {
      inner_block_moments(x, C, b * block, std::min(R, (b + 1) * block), shift,
                          means.data() + b * C, m2s.data() + b * C, /*one_pass=*/true,
                          /*ahead=*/0, p);
    }
    weights.merge(p.lo, p.hi, C, means.data(), m2s.data(), mean_s, var);
    finalize(p.lo, p.hi);
    if (stream) {
      affine_chunks<true>(x, y, C, 0, R, yshift, scale, yoffset, p);
    } else {
      affine_chunks<false>(x, y, C, 0, R, yshift, scale, yoffset, p);
    }
  });
}

// Statistics that came out inf or NaN. The float32 sums overflow for finite values near the
// float32 limit (|x| ~ 1e37 gave a mean of -inf and NaN outputs where torch's kernel gives a
// finite mean), and the shifted sums give NaN where a channel's infinities share a sign (an
// infinite shift, or Chan's merge of two infinite means) while IEEE arithmetic on the values
// gives that infinity. Such channels (all_finite says whether there are any) are measured
// again in float64 by two plain passes over the channel: a mean of +inf or -inf with a NaN
// variance where the channel holds infinities of one sign (as torch's kernel gives), NaN where
// it holds NaN or both infinities, finite statistics for finite values. A non-finite shift
// becomes 0, so that shift + mean_s is the mean. (Checking every call costs about 1.5 us of a
// 33 us 2x9216 training forward, 1-2 % on 64x1280 and 16x9216.)
// Calls f(i) with the offset i of every value of channel c in a tensor of geometry g (x, y, dy
// and dx share it): the plain walk of the float64 measurements below.
template <typename F>
void for_channel_offsets(const Geometry& g, int64_t c, F&& f) {
  if (g.inner) {
    for (int64_t r = 0; r < g.rows(); ++r) f(r * g.C + c);
    return;
  }
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t o = (n * g.C + c) * g.S;
    for (int64_t i = 0; i < g.S; ++i) f(o + i);
  }
}

template <typename T>
inline double as_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}

// Variances below kTinyVar are measured again in float64 too where eps is as small (eps = 0,
// as the theory's experiments use): the float32 squares of deviations under about 1e-19 fall
// into the subnormals and then to 0, so that data of a spread under 1e-20 gave a variance off by
// percent and under 1e-23 a variance of 0 (NaN or inf in y) where float64 gives the right one.
// With eps >= kTinyVar such variances do not change y beyond float32 rounding.
constexpr double kTinyVar = 1e-30;

// Whether var[c] < limit for some c in [c0, c1) (a loop that vectorizes).
inline bool any_below(int64_t c0, int64_t c1, const double* __restrict var, double limit) {
  uint32_t below = 0;
  for (int64_t c = c0; c < c1; ++c) below |= static_cast<uint32_t>(var[c] < limit);
  return below != 0;
}

template <typename T>
void redo_nonfinite_channels(const T* x, const Geometry& g, int64_t c0, int64_t c1,
                             float* shift, double* mean_s, double* var, double eps) {
  for (int64_t c = c0; c < c1; ++c) {
    if (std::isfinite(mean_s[c]) && std::isfinite(var[c]) && !(var[c] + eps < kTinyVar)) {
      continue;
    }
    const double count = static_cast<double>(g.per_channel());
    double sum = 0.0, m2 = 0.0;
    for_channel_offsets(g, c, [&](int64_t i) { sum += as_double(x[i]); });
    const double mean = sum / count;
    for_channel_offsets(g, c, [&](int64_t i) {
      const double d = as_double(x[i]) - mean;
      m2 += d * d;
    });
    if (!std::isfinite(shift[c])) shift[c] = 0.f;
    mean_s[c] = mean - shift[c];
    var[c] = m2 / count;
  }
}

template <typename T>
void forward_impl(const Tensor& x, Tensor& y, const Geometry& g,
                  const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                  c10::optional<Tensor>& running_mean, c10::optional<Tensor>& running_var,
                  bool training, double momentum, double eps, const ChannelOut& out,
                  const Fuse<T>& fuse, bool sequence_out = false) {
  // sequence_out: x is a sequence batch stored (N, L, C), y contiguous (sequence_affine).
  const int64_t C = g.C;
  const T* xp = x.data_ptr<T>();
  auto output_pass = [&](const float* yshift, const float* yoffset) {
    if (sequence_out) {
      sequence_affine(xp, y.data_ptr<T>(), g, yshift, out.scale, yoffset, fuse);
    } else {
      affine(xp, y.data_ptr<T>(), g, yshift, out.scale, yoffset, fuse);
    }
  };
  if (!training) {
    // The (C,) constants are written where they are kept (out) and the output pass reads them
    // there: no vectors of them and no copies.
    const ChannelFloats gamma(weight, C, 1.f), rv(running_var, C, 1.f);
    floats_into(running_mean, C, 0.f, out.shift);
    floats_into(bias, C, 0.f, out.offset);
    eval_constants(C, rv.data(), gamma.data(), eps, out.scale, out.invstd);
    std::fill(out.mean, out.mean + C, 0.f);
    const Uninit<float> folded(2 * C);  // the output's shift and offset
    float *yshift = folded.data(), *yoffset = yshift + C;
    output_constants(0, C, out.shift, out.mean, out.invstd, out.scale, out.offset, yshift,
                     yoffset);
    output_pass(yshift, yoffset);
    return;
  }
  // The constants are written where they are kept (out), the scratch left uninitialized: every
  // channel's is written before it is read.
  const ChannelFloats gamma(weight, C, 1.f), beta(bias, C, 0.f);
  float* const shift = out.shift;
  float* const scale = out.scale;
  float* const offset = out.offset;
  float* mean_out = out.mean;
  float* invstd_out = out.invstd;
  // Centre every channel on its first value.
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<float>(xp[g.inner ? c : c * g.S]);
  const Uninit<double> mean_s(C), var(C);
  // The output pass's shift and offset (output_constants).
  const Uninit<float> folded(2 * C);
  float *const yshift = folded.data(), *const yoffset = yshift + C;
  auto finalize = [&](int64_t c0, int64_t c1) {
    if (!all_finite(c0, c1, mean_s.data(), var.data()) ||
        (eps < kTinyVar && any_below(c0, c1, var.data(), kTinyVar - eps))) {
      redo_nonfinite_channels(xp, g, c0, c1, shift, mean_s.data(), var.data(), eps);
    }
    training_constants(c0, c1, mean_s.data(), var.data(), gamma.data(), beta.data(), eps, scale,
                       offset, mean_out, invstd_out);
    output_constants(c0, c1, shift, mean_out, invstd_out, scale, offset, yshift, yoffset);
  };
  if (!g.inner) {
    // A block of channels at a time: statistics, then (rows_after_statistics) its output
    // while the block's slice is still in cache. On tensors from memory
    // (planar_in_memory_order) each thread's channels are one block, and the output goes in
    // a pass of its own.
    T* yp = y.data_ptr<T>();
    const bool in_order = planar_in_memory_order<T>(g);
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t B = in_order ? (C + threads - 1) / threads : planar_block_channels<T>(g, 1);
    const bool stream = streams(g, 1, yp);
    const bool separate = in_order || !rows_after_statistics(g, 1, yp);
    // Blocks of one channel with short rows (few samples) whose output goes in a pass of its
    // own: kW channels per call of planar_channels_moments, their horizontal sums interleaved,
    // and each task's constants at the end (one channel at a time, with its constants, the
    // training forward took 1.2-1.3x the time at 4x512x7x7 and 8x512x7x7, 1.04x at
    // 32x512x7x7, 1.05x at 16x128x5x5; 1 thread, paired medians).
    const int64_t unit =
        B == 1 && separate && g.S * static_cast<int64_t>(sizeof(T)) < kStreamMinRowBytes ? kW : 1;
    at::parallel_for(0, (C + B - 1) / B, 1, [&](int64_t k0, int64_t k1) {
      std::vector<Moments> mo(B * unit);
      PlanarScratch scratch(B * unit, g, B == 1 || !short_planes(g));
      for (int64_t k = k0; k < k1; k += unit) {
        const int64_t c0 = k * B, c1 = std::min(C, std::min(k1, k + unit) * B);
        std::fill(mo.begin(), mo.end(), Moments());
        if (B == 1) {
          planar_channels_moments(xp, g, c0, c1, shift, mo.data(), scratch);
        } else if (short_planes(g)) {
          planar_block_column_moments(xp, g, c0, c1, shift, mo.data(), scratch);
        } else {
          planar_block_moments(xp, g, c0, c1, shift, mo.data(), scratch);
        }
        for (int64_t c = c0; c < c1; ++c) {
          mean_s[c] = mo[c - c0].mean;
          var[c] = mo[c - c0].m2 / mo[c - c0].n;
        }
        if (separate) continue;
        finalize(c0, c1);
        for (int64_t n = 0; n < g.N; ++n) {
          affine_rows(xp, yp, g, n * C + c0, n * C + c1, yshift, scale, yoffset,
                      fuse, PlanarWrite{false, stream});
        }
      }
      if (stream && !separate) stream_fence();  // once per task, not per block
      // The constants of the task's channels at once, a vector of channels at a time (per
      // channel, blocks of one channel paid a scalar chain of divisions and a square root).
      if (separate) finalize(k0 * B, std::min(C, k1 * B));
    });
    if (separate && planes_as_rows(g)) {
      affine(xp, yp, g, yshift, scale, yoffset, fuse);  // short_planes_affine
    } else if (separate) {
      PlanarWrite w = planar_write(g, fuse.z != nullptr ? 2 : 1, yp, fuse.any());
      w.zero_shift = flat_without_shift(g, w, yshift);
      planar_rows_by_channels(g, B, w.stream, [&](int64_t r0, int64_t r1) BN_ALWAYS_INLINE {
        affine_rows(xp, yp, g, r0, r1, yshift, scale, yoffset, fuse, w);
      });
    }
  } else if (!fuse.any() && !sequence_out && inner_pieces<T>(g, /*forward=*/true)) {
    pieces_forward(xp, y.data_ptr<T>(), g, shift, scale, yshift, yoffset, mean_s.data(),
                   var.data(), finalize);
  } else {
    training_moments(xp, g, shift, mean_s.data(), var.data());
    finalize(0, C);
    output_pass(yshift, yoffset);
  }
  const double m = static_cast<double>(g.per_channel());
  if (running_mean.has_value() && running_mean->defined()) {
    // The batch mean and the unbiased batch variance, per channel.
    blend_into(*running_mean, [&](int64_t c) { return shift[c] + mean_s[c]; }, momentum);
    const double unbias = m / (m - 1);  // one division, not one per channel
    blend_into(*running_var, [&](int64_t c) { return var[c] * unbias; }, momentum);
  }
}

// ReLU codes, as batchnorm.modes.FusedSave: what the backward of a fused ReLU keeps.
constexpr int64_t kReluNone = 0, kSaveOutput = 1, kSaveMask = 2, kSaveRecompute = 3;

// The (C,) tensors of a call, checked before anything is read or written through their
// pointers: C values each, running statistics both or neither and of a dtype the update writes.
void check_channel_tensors(int64_t C, const c10::optional<Tensor>& weight,
                           const c10::optional<Tensor>& bias,
                           const c10::optional<Tensor>& running_mean,
                           const c10::optional<Tensor>& running_var) {
  const std::pair<const char*, const c10::optional<Tensor>*> named[] = {
      {"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean},
      {"running_var", &running_var}};
  for (const auto& [name, t] : named) {
    if (!t->has_value() || !(*t)->defined()) continue;
    TORCH_CHECK((*t)->numel() == C, name, " should contain ", C, " elements (one per channel of ",
                "the input's dim 1), not ", (*t)->numel());
    TORCH_CHECK((*t)->device().is_cpu(), name, " must be a CPU tensor, got ", (*t)->device());
  }
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_mean == has_var,
              "running_mean and running_var must be given together (or both None)");
  if (has_mean) {
    for (const Tensor* t : {&*running_mean, &*running_var}) {
      const auto d = t->scalar_type();
      TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kDouble,
                  "running statistics must be float32, bfloat16 or float64, got ", d);
    }
  }
}

// What to do about a training batch of one value per channel (as the functional layer says).
constexpr const char* kOneValueRemedies =
    "Remedies: eval mode for inference (the running statistics are used), a batch larger than "
    "one, a norm that needs no batch (GroupNorm, LayerNorm), or ghost or sync batch norm for "
    "statistics over more samples.";

// Checks the call, lays x out for the kernels and runs the forward into `out` (the (C,)
// constants, from `channel_out(C)`). Returns (y, mask); mask is undefined unless relu ==
// kSaveMask. `residual` (laid out as the input is seen) is added before the ReLU.
template <typename Alloc>
std::pair<Tensor, Tensor> forward_run(const Tensor& input, const c10::optional<Tensor>& weight,
                                      const c10::optional<Tensor>& bias,
                                      c10::optional<Tensor> running_mean,
                                      c10::optional<Tensor> running_var, bool training,
                                      double momentum, double eps,
                                      const c10::optional<Tensor>& residual, int64_t relu,
                                      Alloc&& channel_out) {
  TORCH_CHECK(input.dim() >= 2, "batch norm expects an (N, C) or (N, C, *) input");
  TORCH_CHECK(input.device().is_cpu(), "the cpu kernels need a CPU tensor");
  TORCH_CHECK(relu >= kReluNone && relu <= kSaveRecompute, "unknown ReLU code ", relu);
  auto [x, g] = as_kernel_layout(input);
  // An empty batch has no statistics: an empty output and the running statistics untouched,
  // as torch's kernel does.
  TORCH_CHECK_VALUE(!training || g.per_channel() > 1 || x.numel() == 0,
                    "batch norm in training mode needs more than one value per channel, got "
                    "input shape ",
                    input.sizes(), ": the variance of one value is 0 and its output always 0. ",
                    kOneValueRemedies);
  check_channel_tensors(g.C, weight, bias, running_mean, running_var);
  TORCH_CHECK(training || (running_mean.has_value() && running_mean->defined()),
              "eval-mode batch norm needs running statistics");
  const bool has_z = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_z || relu != kReluNone, "a residual is only added before a ReLU");
  Tensor z;
  if (has_z) {
    TORCH_CHECK(residual->sizes() == input.sizes() && residual->scalar_type() == x.scalar_type(),
                "the residual must have the input's shape and dtype");
    z = matched_layout(*residual, x, g, "the residual");
  }
  // A sequence batch stored (N, L, C) is read channel-inner and its y written contiguous, the
  // layout torch returns, by the output pass itself (sequence_affine); the residual and the
  // mask keep x's layout.
  const bool sequence_out = x.dim() == 3 && g.inner && !x.is_contiguous();
  Tensor y = sequence_out
                 ? empty_cached(x.sizes(), c10::contiguous_strides(x.sizes()), x.scalar_type())
                 : empty_output(x, x.scalar_type());
  Tensor mask;
  if (relu == kSaveMask) mask = empty_output(x, at::kBool);
  const ChannelOut out = channel_out(g.C);
  if (x.numel() > 0) {
    uint8_t* mp = mask.defined() ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr;
    if (x.scalar_type() == at::kFloat) {
      Fuse<float> f{relu != kReluNone, has_z ? z.data_ptr<float>() : nullptr, mp};
      forward_impl<float>(x, y, g, weight, bias, running_mean, running_var, training, momentum,
                          eps, out, f, sequence_out);
    } else if (x.scalar_type() == at::kBFloat16) {
      Fuse<BF16> f{relu != kReluNone, has_z ? z.data_ptr<BF16>() : nullptr, mp};
      forward_impl<BF16>(x, y, g, weight, bias, running_mean, running_var, training, momentum,
                         eps, out, f, sequence_out);
    } else {
      TORCH_CHECK(false, "the cpu kernels handle float32 and bfloat16, got ", x.scalar_type());
    }
  }
  return {y, mask};
}

// Returns (y, shift, mean_s, invstd, scale, offset, mask); mask is undefined unless
// relu == kSaveMask.
std::vector<Tensor> forward_fused(const Tensor& input, const c10::optional<Tensor>& weight,
                                  const c10::optional<Tensor>& bias,
                                  c10::optional<Tensor> running_mean,
                                  c10::optional<Tensor> running_var, bool training,
                                  double momentum, double eps,
                                  const c10::optional<Tensor>& residual, int64_t relu) {
  std::vector<Tensor> channel;  // shift, mean_s, invstd, scale, offset
  auto [y, mask] = forward_run(input, weight, bias, running_mean, running_var, training, momentum,
                               eps, residual, relu, [&](int64_t C) {
                                 const auto opts = input.options().dtype(at::kFloat);
                                 for (int i = 0; i < 5; ++i) {
                                   channel.push_back(at::empty({C}, opts));
                                   poison(channel.back().data_ptr<float>(), C);
                                 }
                                 return ChannelOut{channel[0].data_ptr<float>(),
                                                   channel[1].data_ptr<float>(),
                                                   channel[2].data_ptr<float>(),
                                                   channel[3].data_ptr<float>(),
                                                   channel[4].data_ptr<float>()};
                               });
  return {y, channel[0], channel[1], channel[2], channel[3], channel[4], mask};
}

// Returns (y, shift, mean_s, invstd).
std::vector<Tensor> forward(const Tensor& input, const c10::optional<Tensor>& weight,
                            const c10::optional<Tensor>& bias, c10::optional<Tensor> running_mean,
                            c10::optional<Tensor> running_var, bool training, double momentum,
                            double eps) {
  auto out = forward_fused(input, weight, bias, running_mean, running_var, training, momentum,
                           eps, c10::nullopt, kReluNone);
  return {out[0], out[1], out[2], out[3]};
}

// The output alone, where nothing records a graph: the (C,) constants go to scratch memory
// instead of five tensors.
Tensor forward_output(const Tensor& input, const c10::optional<Tensor>& weight,
                      const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
                      const c10::optional<Tensor>& running_var, bool training, double momentum,
                      double eps, const c10::optional<Tensor>& residual, int64_t relu) {
  c10::optional<Uninit<float>> scratch;  // the forward writes every channel's constants
  return forward_run(input, weight, bias, running_mean, running_var, training, momentum, eps,
                     residual, relu, [&](int64_t C) {
                       float* p = scratch.emplace(5 * C).data();
                       return ChannelOut{p, p + C, p + 2 * C, p + 3 * C, p + 4 * C};
                     })
      .first;
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// A group's gradient sums of B channels, from their vector accumulators in `scratch` (channel b's
// acc[4b..4b+1] of dy, acc[4b+2..4b+3] of dy * (x - shift)), added to sum_dy and sum_dyx.
BN_ALWAYS_INLINE inline void add_group_grad_sums(PlanarScratch& scratch, int64_t B,
                                                 double* sum_dy, double* sum_dyx) {
  float *s1 = scratch.sum1.data(), *s2 = scratch.sum2.data();
  pair_hsums(scratch.acc.data(), B, 0, s1);
  pair_hsums(scratch.acc.data(), B, 2, s2);
  for (int64_t b = 0; b < B; ++b) {
    sum_dy[b] += s1[b];
    sum_dyx[b] += s2[b];
  }
}

// Channels [c0, c1) of the planar layout, each a block of one: sums of dy and of dy * (x - shift),
// float64, as planar_block_grad_sums computes them, one channel's rows after another with its
// accumulators in registers, the groups' horizontal sums of all of them at once (pair_hsums).
// As in planar_channels_moments, ranges of more than one channel are for short rows.
template <typename T>
void planar_channels_grad_sums(const T* x, const T* dy, const Geometry& g, int64_t c0,
                               int64_t c1, const float* shift, double* sum_dy, double* sum_dyx,
                               PlanarScratch& scratch) {
  const int64_t C = g.C, S = g.S, B = c1 - c0;
  const int64_t rows_per_group = std::max<int64_t>(1, kGroupElems / std::max<int64_t>(S, 1));
  std::fill(sum_dy, sum_dy + B, 0.0);
  std::fill(sum_dyx, sum_dyx + B, 0.0);
  for (int64_t n0 = 0; n0 < g.N; n0 += rows_per_group) {
    const int64_t n1 = std::min(g.N, n0 + rows_per_group);
    for (int64_t b = 0; b < B; ++b) {
      const T* xc = x + (c0 + b) * S;
      const T* gc = dy + (c0 + b) * S;
      const float sc = shift[c0 + b];
      Vec a[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};  // sums of dy, of dy * (x - shift)
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t off = n * C * S;
        if (n + 1 < g.N) {
          prefetch_row(xc + off + C * S, S * sizeof(T));
          prefetch_row(gc + off + C * S, S * sizeof(T));
        }
        row_grad_sums(xc + off, gc + off, S, sc, a, a + 2);
      }
      for (int k = 0; k < 4; ++k) scratch.acc[4 * b + k] = a[k];
    }
    add_group_grad_sums(scratch, B, sum_dy, sum_dyx);
  }
}

// Channels [c0, c1) of the planar layout: sums of dy and of dy * (x - shift), float64, in groups
// of whole rows; the block walks down the batch as planar_block_moments does.
template <typename T>
void planar_block_grad_sums(const T* x, const T* dy, const Geometry& g, int64_t c0, int64_t c1,
                            const float* shift, double* sum_dy, double* sum_dyx,
                            PlanarScratch& scratch) {
  const int64_t S = g.S, B = c1 - c0, run = g.C * S, bytes = B * S * sizeof(T);
  const int64_t rows_per_group = std::max<int64_t>(1, kGroupElems / std::max<int64_t>(S, 1));
  const int64_t row_bytes = S * static_cast<int64_t>(sizeof(T));
  // The next sample's rows of x and dy. One burst for both runs stalled on the line-fill
  // buffers (perf); spread over the channels, the requests overlap the work on the current
  // sample: 0.86x the time at 32x512x7x7, 0.96x at 64x960x7x7, 1.00x at 64x2048x7x7 (60 paired
  // rounds). Rows under a cache line keep the burst (per-channel calls: 1.25-1.35x at 3x3).
  auto burst = [&](int64_t m) BN_ALWAYS_INLINE {
    if (m < g.N) {
      prefetch_row(x + m * run + c0 * S, bytes);
      prefetch_row(dy + m * run + c0 * S, bytes);
    }
  };
  auto spread = [&](int64_t m, int64_t b) BN_ALWAYS_INLINE {
    if (m < g.N) {
      prefetch_row(x + m * run + (c0 + b) * S, row_bytes);
      prefetch_row(dy + m * run + (c0 + b) * S, row_bytes);
    }
  };
  std::fill(sum_dy, sum_dy + B, 0.0);
  std::fill(sum_dyx, sum_dyx + B, 0.0);
  for (int64_t n0 = 0; n0 < g.N; n0 += rows_per_group) {
    const int64_t n1 = std::min(g.N, n0 + rows_per_group);
    scratch.clear(B);
    // Per channel: a[0..1] sum dy, a[2..3] sum dy * (x - shift).
    auto add = [&](int64_t b, int64_t n, Vec* a) BN_ALWAYS_INLINE {
      const int64_t off = n * run + (c0 + b) * S;
      row_grad_sums(x + off, dy + off, S, shift[c0 + b], a, a + 2);
    };
    if (row_bytes >= 64) {
      walk_block_rows(B, n0, n1, scratch, [](int64_t) {}, spread, add);
    } else {
      walk_block_rows(B, n0, n1, scratch, burst, [](int64_t, int64_t) {}, add);
    }
    add_group_grad_sums(scratch, B, sum_dy, sum_dyx);
  }
}

// planar_block_grad_sums for short planes: the sums by columns (walk_block_columns), in the same
// groups of rows.
template <typename T>
void planar_block_column_grad_sums(const T* x, const T* dy, const Geometry& g, int64_t c0,
                                   int64_t c1, const float* shift, double* sum_dy,
                                   double* sum_dyx, PlanarScratch& scratch) {
  const int64_t S = g.S, B = c1 - c0, L = B * S, run = g.C * S;
  const int64_t rows_per_group = std::max<int64_t>(1, kGroupElems / S);
  const T* xb = x + c0 * S;
  const T* gb = dy + c0 * S;
  scratch.set_column_centres(shift + c0, B, S);
  const float* vs = scratch.col_centre;
  std::fill(sum_dy, sum_dy + B, 0.0);
  std::fill(sum_dyx, sum_dyx + B, 0.0);
  for (int64_t n0 = 0; n0 < g.N; n0 += rows_per_group) {
    const int64_t n1 = std::min(g.N, n0 + rows_per_group);
    scratch.clear_columns();
    // col1: sums of dy, col2: sums of dy * (x - shift) (dy's lanes past m read as zero).
    walk_block_columns(L, n0, n1, scratch,
                       [&](int64_t n, int64_t j, int64_t m, Vec& a1, Vec& a2) BN_ALWAYS_INLINE {
                         const int64_t off = n * run + j;
                         const Vec gv = vload_upto(gb + off, m);
                         a1 += gv;
                         a2 = at::vec::fmadd(gv, vload_upto(xb + off, m) - Vec::loadu(vs + j), a2);
                       });
    for (int64_t b = 0; b < B; ++b) {
      sum_dy[b] += column_total(scratch.col1, b, S);
      sum_dyx[b] += column_total(scratch.col2, b, S);
    }
  }
}

// Planar: the sums of every block of channels (planar_block_channels), then after(c0, c1) for
// the block [c0, c1) while its x and dy are still in cache.
template <typename T, typename F>
void planar_grad_sums_by_block(const T* x, const T* dy, const Geometry& g, const float* shift,
                               double* sum_dy, double* sum_dyx, F&& after,
                               bool streamed = false) {
  const int64_t C = g.C, B = planar_block_channels<T>(g, 2);
  // Blocks of one channel with short rows (few samples): kW channels per call of
  // planar_channels_grad_sums (rows_after_statistics is false there: `after` has no rows to
  // write while the block is in cache).
  const int64_t unit =
      B == 1 && g.S * static_cast<int64_t>(sizeof(T)) < kStreamMinRowBytes ? kW : 1;
  at::parallel_for(0, (C + B - 1) / B, 1, [&](int64_t k0, int64_t k1) {
    PlanarScratch scratch(B * unit, g, B == 1 || !short_planes(g));
    for (int64_t k = k0; k < k1; k += unit) {
      const int64_t c0 = k * B, c1 = std::min(C, std::min(k1, k + unit) * B);
      if (B == 1) {
        planar_channels_grad_sums(x, dy, g, c0, c1, shift, sum_dy + c0, sum_dyx + c0, scratch);
      } else if (short_planes(g)) {
        planar_block_column_grad_sums(x, dy, g, c0, c1, shift, sum_dy + c0, sum_dyx + c0, scratch);
      } else {
        planar_block_grad_sums(x, dy, g, c0, c1, shift, sum_dy + c0, sum_dyx + c0, scratch);
      }
      after(c0, c1);
    }
    // `after` streamed its stores: one fence per task (one per block waited for the write
    // buffers to drain 1024 times in a 64x1024x14x14 pass).
    if (streamed) stream_fence();
  });
}

// The channel-inner blocks' float32 gradient sums (block b's at part + b * C) added in block
// order in float64, for the channels [c0, c1).
// Block after block over the channels, which the compiler vectorizes (a channel after another,
// each down its blocks, was a scalar chain of dependent float64 adds: 4 % of a 32x512x7x7 NHWC
// training step); each channel adds its blocks in the same order either way.
inline void add_block_sums(int64_t c0, int64_t c1, int64_t blocks, int64_t C,
                           const float* __restrict part_dy, const float* __restrict part_dyx,
                           double* __restrict sum_dy, double* __restrict sum_dyx) {
  std::fill(sum_dy + c0, sum_dy + c1, 0.0);
  std::fill(sum_dyx + c0, sum_dyx + c1, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* pd = part_dy + b * C;
    const float* px = part_dyx + b * C;
    for (int64_t c = c0; c < c1; ++c) {
      sum_dy[c] += pd[c];
      sum_dyx[c] += px[c];
    }
  }
}

// Per channel: sum of dy and of dy * (x - shift), float64.
template <typename T>
void grad_sums(const T* x, const T* dy, const Geometry& g, const float* shift,
               std::vector<double>& sum_dy, std::vector<double>& sum_dyx) {
  const int64_t C = g.C, S = g.S;
  if (!g.inner) {
    planar_grad_sums_by_block(x, dy, g, shift, sum_dy.data(), sum_dyx.data(),
                              [](int64_t, int64_t) {});
    return;
  }
  const int64_t R = g.rows(), block = inner_block_rows(C);
  const int64_t blocks = (R + block - 1) / block;
  std::vector<float> part_dy(blocks * C, 0.f), part_dyx(blocks * C, 0.f);
  const RowWalk walk = row_walk<T>(g, 2);
  for_block_tiles(0, blocks, block, R, C, [&](int64_t b, Cols cols, int64_t) {
    inner_block_grad_sums(x, dy, C, b * block, std::min(R, (b + 1) * block), shift,
                          part_dy.data() + b * C, part_dyx.data() + b * C, walk, cols);
  });
  at::parallel_for(0, C, merge_grain(blocks), [&](int64_t c0, int64_t c1) {
    add_block_sums(c0, c1, blocks, C, part_dy.data(), part_dyx.data(), sum_dy.data(),
                   sum_dyx.data());
  });
}

// Planar rows [r0, r1): dx = dy * a + (x - shift) * k + c0 (kWithX false: dx = dy * a).
template <typename T, bool kWithX>
void dx_rows(const T* x, const T* dy, T* dx, const Geometry& g, int64_t r0, int64_t r1,
             const float* shift, const float* a, const float* k, const float* c0, PlanarWrite w) {
  if (w.flat) {
    flat_dx<T, kWithX>(x, dy, dx, g, r0, r1, shift, a, k, c0, w.stream);
    return;
  }
  const int64_t C = g.C, S = g.S;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t c = i % C;
    row_dx<T, kWithX>(x + i * S, dy + i * S, dx + i * S, S, shift[c], a[c], k[c], c0[c],
                      w.stream);
  }
}

// dx = dy * a + (x - shift) * k + c0, per channel (kWithX false: dx = dy * a).
template <typename T, bool kWithX>
void dx_pass(const T* x, const T* dy, T* dx, const Geometry& g, const float* shift,
             const float* a, const float* k, const float* c0v) {
  const int64_t C = g.C, S = g.S;
  if (planes_as_rows(g)) {
    const bool stream = streams(rows_of_planes(g), kWithX ? 2 : 1, dx);
    const RowWalk walk = row_walk<T>(rows_of_planes(g), kWithX ? 2 : 1);
    for_plane_columns<4>(g, {shift, a, k, c0v}, stream,
                         [&](const Geometry& rg, Cols cols, const PerValue<4>& t) {
                           inner_block_dx<T, kWithX>(x, dy, dx, rg.C, 0, rg.N, t[0], t[1], t[2],
                                                     t[3], /*ahead=*/0, stream, walk, cols);
                         });
    return;
  }
  if (!g.inner) {
    const PlanarWrite w = planar_write(g, kWithX ? 2 : 1, dx, false);
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)),
                     [&](int64_t i0, int64_t i1) {
                       dx_rows<T, kWithX>(x, dy, dx, g, i0, i1, shift, a, k, c0v, w);
                       if (w.stream) stream_fence();
                     });
    return;
  }
  const bool stream = streams(g, kWithX ? 2 : 1, dx);
  const RowWalk walk = row_walk<T>(g, kWithX ? 2 : 1);
  const int64_t R = g.rows(), block = inner_block_rows(C);
  const int64_t bytes = R * C * static_cast<int64_t>(sizeof(T));
  for_block_tiles(0, (R + block - 1) / block, block, R, C, [&](int64_t b, Cols cols, int64_t last) {
    inner_block_dx<T, kWithX>(x, dy, dx, C, b * block, std::min(R, (b + 1) * block), shift,
                              a, k, c0v,
                              next_block_ahead(b, last, block, R, C, bytes), stream, walk, cols);
    if (stream && b + 1 == last) stream_fence();
  });
}

// 1 where v is NaN, beyond +-max, or nonzero and below min in magnitude; comparisons joined
// without branches, so that loops reducing it vectorize.
inline uint32_t out_of_float(double v, double min, double max) {
  const double f = std::fabs(v);
  return static_cast<uint32_t>(!(f <= max)) |
         (static_cast<uint32_t>(f < min) & static_cast<uint32_t>(f != 0.0));
}

// The backward's per-channel coefficients of channels [c0, c1), as plain loops over arrays that
// the compiler vectorizes (as training_constants): dgamma and dbeta (dg null: not wanted), and
// dx = dy * a + (x - shift) * k + off, with mean = shift + mean_s and m values per channel:
// training, dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)); eval, dy * a.
// Returns whether a channel of the range needs redo_grad_channels.
inline bool grad_coefficients(int64_t c0, int64_t c1, bool training, double m,
                              const double* __restrict sum_dy, const double* __restrict sum_dyx,
                              const float* __restrict mean_s, const float* __restrict invstd,
                              const float* __restrict gamma, float* __restrict dg,
                              float* __restrict db, float* __restrict a, float* __restrict k,
                              float* __restrict off) {
  if (dg != nullptr) {
    for (int64_t c = c0; c < c1; ++c) {
      // sum dy * (x - mean)
      const double s_dyxc = sum_dyx[c] - static_cast<double>(mean_s[c]) * sum_dy[c];
      dg[c] = static_cast<float>(s_dyxc * static_cast<double>(invstd[c]));
      db[c] = static_cast<float>(sum_dy[c]);
    }
  }
  if (!training) {
    for (int64_t c = c0; c < c1; ++c) {
      a[c] = static_cast<float>(gamma[c] * static_cast<double>(invstd[c]));
      k[c] = 0.f;
      off[c] = 0.f;
    }
    return dg != nullptr && !all_finite(c0, c1, sum_dy, sum_dyx);
  }
  constexpr double kMinNormal = std::numeric_limits<float>::min();
  constexpr double kMax = std::numeric_limits<float>::max();
  // k below the normal floats (not 0), beyond them, or NaN: as it is where a sum is inf or
  // NaN. (a = gamma * invstd and off are out of range only where k is too, or dx itself.)
  uint32_t odd = 0;
  const double inv_m = 1.0 / m;  // one division, not two per channel
  for (int64_t c = c0; c < c1; ++c) {
    const double s_dyxc = sum_dyx[c] - static_cast<double>(mean_s[c]) * sum_dy[c];
    const double is = invstd[c];
    const double ga = gamma[c] * is;
    const double kk = -ga * is * is * s_dyxc * inv_m;
    const double o = -kk * mean_s[c] - ga * sum_dy[c] * inv_m;
    a[c] = static_cast<float>(ga);
    k[c] = static_cast<float>(kk);
    off[c] = static_cast<float>(o);
    odd |= out_of_float(kk, kMinNormal, kMax);
  }
  return odd != 0;
}

// The gradients of the channels for which grad_coefficients says so (sums that came out inf
// or NaN: inf in dy, or x - shift beyond float32; or a coefficient that float32 cannot hold:
// k, about gamma * mean(dy * xhat) / var, falls below the normal floats once the spread passes
// about 1e19, sooner where dy is small, and the float32 dx lost its digits, 1-15 % off at a
// spread of 1e25), measured again in float64 by plain passes over the channel with torch's
// formula: dgamma = sum(dy * (x - mean)) * invstd, dbeta = sum(dy), and in training dx = (dy -
// sum(dy) / m - (x - mean) * invstd^2 * sum(dy * (x - mean)) / m) * invstd * gamma. So inf and
// NaN land where torch's kernel puts them, and finite values keep float32 accuracy at any
// spread. (The eval dx, dy * gamma * invstd, needs no help.) a, k and off are scratch here.
template <typename T>
void redo_grad_channels(const T* x, const T* dy, T* dx, const Geometry& g, bool training,
                        const float* shift, const float* mean_s, const float* invstd,
                        const float* gamma, const double* sum_dy, const double* sum_dyx,
                        float* a, float* k, float* off, float* dg, float* db) {
  const double m = static_cast<double>(g.per_channel());
  for (int64_t c = 0; c < g.C; ++c) {
    if (!grad_coefficients(c, c + 1, training, m, sum_dy, sum_dyx, mean_s, invstd, gamma, dg,
                           db, a, k, off)) {
      continue;
    }
    const double mean = static_cast<double>(shift[c]) + static_cast<double>(mean_s[c]);
    const double is = invstd[c];
    double s_dy = 0.0, s_dyx = 0.0;
    for_channel_offsets(g, c, [&](int64_t i) {
      const double d = as_double(dy[i]);
      s_dy += d;
      s_dyx += d * (as_double(x[i]) - mean);
    });
    if (dg != nullptr) {
      dg[c] = static_cast<float>(s_dyx * is);
      db[c] = static_cast<float>(s_dy);
    }
    if (!training || dx == nullptr) continue;
    const double mean_dy = s_dy / m, proj = s_dyx * is * is / m;
    const double ga = is * static_cast<double>(gamma[c]);
    for_channel_offsets(g, c, [&](int64_t i) {
      const double v = (as_double(dy[i]) - mean_dy - (as_double(x[i]) - mean) * proj) * ga;
      dx[i] = static_cast<T>(static_cast<float>(v));
    });
  }
}

template <typename T>
void backward_impl(const Tensor& x, const Tensor& dy, const Geometry& g,
                   const float* gamma, const Tensor& shift_t, const Tensor& mean_t,
                   const Tensor& invstd_t, bool training, bool need_dx, bool need_params,
                   Tensor& dx, Tensor& dgamma, Tensor& dbeta, bool sequence = false) {
  // sequence: x and dy are a sequence batch stored (N, L, C) and dx is contiguous, written by
  // sequence_dx; where a channel needs redo_grad_channels (which writes dx as x is laid out),
  // dx goes through a channel-inner buffer and a transpose instead.
  const int64_t C = g.C;
  const T* xp = x.data_ptr<T>();
  const T* gp = dy.data_ptr<T>();
  const float* shift = shift_t.data_ptr<float>();
  const float* mean_s = mean_t.data_ptr<float>();
  const float* invstd = invstd_t.data_ptr<float>();
  const bool need_sums = need_params || (need_dx && training);
  std::vector<double> sum_dy(C, 0.0), sum_dyx(C, 0.0);  // the sums accumulate into them
  const double m = static_cast<double>(g.per_channel());
  const Uninit<float> a(C), k(C), c0(C);  // coefficients() writes a range before dx reads it
  float* dg = need_params ? dgamma.data_ptr<float>() : nullptr;
  float* db = need_params ? dbeta.data_ptr<float>() : nullptr;
  std::atomic<bool> redo{false};  // whether some channel needs redo_grad_channels
  auto coefficients = [&](int64_t cb, int64_t ce) {
    if (grad_coefficients(cb, ce, training, m, sum_dy.data(), sum_dyx.data(), mean_s, invstd,
                          gamma, dg, db, a.data(), k.data(), c0.data())) {
      redo.store(true, std::memory_order_relaxed);
    }
  };
  // dx over the planar rows [r0, r1), training or eval.
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  Tensor inner_dx;  // sequence, with a channel to redo: dx as x is laid out
  auto dx_rows_of = [&](int64_t r0, int64_t r1, PlanarWrite w) {
    if (training) {
      dx_rows<T, true>(xp, gp, dxp, g, r0, r1, shift, a.data(), k.data(), c0.data(), w);
    } else {
      dx_rows<T, false>(xp, gp, dxp, g, r0, r1, shift, a.data(), k.data(), c0.data(), w);
    }
  };
  auto passes = [&] {
    if (!g.inner && need_sums && need_dx && rows_after_statistics(g, 2, dxp)) {
      // A channel at a time (rows of 512 bytes and more: blocks of one): the sums, then its dx
      // rows while its x and dy are in cache.
      const bool stream = streams(g, training ? 2 : 1, dxp);
      planar_grad_sums_by_block(xp, gp, g, shift, sum_dy.data(), sum_dyx.data(),
                                [&](int64_t cb, int64_t ce) {
                                  coefficients(cb, ce);
                                  const PlanarWrite w{false, stream};
                                  for (int64_t n = 0; n < g.N; ++n) {
                                    dx_rows_of(n * C + cb, n * C + ce, w);
                                  }
                                },
                                stream);
      return;
    }
    if (need_sums && need_dx && training && !sequence && inner_pieces<T>(g, /*forward=*/false)) {
      // The sums, the coefficients and dx a piece of channels at a time, dx reading the piece's
      // x and dy from L1 or L2 (pieces_forward says why); the values of grad_sums and dx_pass.
      const int64_t R = g.rows(), block = inner_block_rows(C);
      const int64_t blocks = (R + block - 1) / block;
      std::vector<float> part_dy(blocks * C), part_dyx(blocks * C);
      const bool stream = streams(g, 2, dxp);
      for_inner_pieces<T>(g, 2, stream, [&](Cols p) {
        for (int64_t b = 0; b < blocks; ++b) {
          grad_sums_chunks(xp, gp, C, b * block, std::min(R, (b + 1) * block), shift,
                           part_dy.data() + b * C, part_dyx.data() + b * C, p);
        }
        add_block_sums(p.lo, p.hi, blocks, C, part_dy.data(), part_dyx.data(), sum_dy.data(),
                       sum_dyx.data());
        coefficients(p.lo, p.hi);
        dx_chunks<T, true>(xp, gp, dxp, C, 0, R, shift, a.data(), k.data(), c0.data(),
                           /*ahead=*/0, stream, p);
      });
      return;
    }
    if (need_sums) grad_sums(xp, gp, g, shift, sum_dy, sum_dyx);
    coefficients(0, C);
    if (sequence && need_dx) {
      if (!redo.load(std::memory_order_relaxed)) {
        if (training) {
          sequence_dx<T, true>(xp, gp, dxp, g, shift, a.data(), k.data(), c0.data());
        } else {
          sequence_dx<T, false>(xp, gp, dxp, g, shift, a.data(), k.data(), c0.data());
        }
        return;
      }
      inner_dx = empty_output(x, x.scalar_type());
      dxp = inner_dx.data_ptr<T>();
    }
    if (!g.inner && need_sums && need_dx && !planes_as_rows(g)) {
      // Short rows (rows_after_statistics): dx in one pass after all the sums, each thread over
      // the channels whose x and dy it has just read.
      const PlanarWrite w = planar_write(g, training ? 2 : 1, dxp, false);
      planar_rows_by_channels(g, planar_block_channels<T>(g, 2), w.stream,
                              [&](int64_t r0, int64_t r1) { dx_rows_of(r0, r1, w); });
      return;
    }
    if (need_dx && training) {
      dx_pass<T, true>(xp, gp, dxp, g, shift, a.data(), k.data(), c0.data());
    }
    // Eval: dx = gamma * invstd * dy, as torch computes it; x is not read (nor its NaN or inf).
    if (need_dx && !training) {
      dx_pass<T, false>(xp, gp, dxp, g, shift, a.data(), k.data(), c0.data());
    }
  };
  passes();
  if (redo.load(std::memory_order_relaxed)) {
    redo_grad_channels(xp, gp, dxp, g, training, shift, mean_s, invstd, gamma, sum_dy.data(),
                       sum_dyx.data(), a.data(), k.data(), c0.data(), dg, db);
  }
  if (inner_dx.defined()) {
    transpose_matrices(dxp, dx.data_ptr<T>(), g.N, g.S, C);
  }
}

// Returns (dx, dgamma, dbeta) (undefined tensors where not needed); dgamma/dbeta are float32.
std::vector<Tensor> backward(const Tensor& grad_output, const Tensor& input,
                             const c10::optional<Tensor>& weight, const Tensor& shift,
                             const Tensor& mean, const Tensor& invstd, bool training,
                             bool need_dx, bool need_params) {
  auto [x, g] = as_kernel_layout(input);
  const Tensor dy = matched_layout(grad_output, x, g, "grad_output");
  const ChannelFloats gamma(weight, g.C, 1.f);
  Tensor dx, dgamma, dbeta;
  // A sequence batch stored (N, L, C): dx written contiguous, the layout torch returns
  // (backward_impl's `sequence`).
  const bool sequence = x.dim() == 3 && g.inner && !x.is_contiguous();
  if (need_dx) {
    dx = sequence ? empty_cached(x.sizes(), c10::contiguous_strides(x.sizes()), x.scalar_type())
                  : empty_output(x, x.scalar_type());
  }
  if (need_params) {  // every channel is written below, unless x is empty
    const auto opts = input.options().dtype(at::kFloat);
    dgamma = x.numel() > 0 ? at::empty({g.C}, opts) : at::zeros({g.C}, opts);
    dbeta = x.numel() > 0 ? at::empty({g.C}, opts) : at::zeros({g.C}, opts);
    if (x.numel() > 0) {
      poison(dgamma.data_ptr<float>(), g.C);
      poison(dbeta.data_ptr<float>(), g.C);
    }
  }
  if (x.numel() > 0 && (need_dx || need_params)) {
    if (x.scalar_type() == at::kFloat) {
      backward_impl<float>(x, dy, g, gamma.data(), shift, mean, invstd, training, need_dx,
                           need_params, dx, dgamma, dbeta, sequence);
    } else if (x.scalar_type() == at::kBFloat16) {
      backward_impl<BF16>(x, dy, g, gamma.data(), shift, mean, invstd, training, need_dx,
                          need_params, dx, dgamma, dbeta, sequence);
    } else {
      TORCH_CHECK(false, "the cpu kernels handle float32 and bfloat16, got ", x.scalar_type());
    }
  }
  return {dx, dgamma, dbeta};
}

// ------------------------------------------------------------------------------------------
// Backward of the fused ReLU: dy gated by the ReLU
// ------------------------------------------------------------------------------------------

// Where the ReLU's gradient is zero: y <= 0 (from y, the mask, or the recomputed pre-activation,
// with the forward's own scale and offset, so the gate is the forward's bit for bit). Pointers
// address element 0 of tensors laid out like x.
template <typename T>
struct Gate {
  int64_t mode;
  const T* x;
  const T* y;          // kSaveOutput
  const uint8_t* mask; // kSaveMask
  const T* z;          // kSaveRecompute: the residual, or null

  // The lanes [o, o + kW) whose gradient is cut, as a vector mask; vs/va/vb: the channels'
  // shift, scale and offset.
  Vec cut(int64_t o, const Vec& vs, const Vec& va, const Vec& vb) const {  // recompute
    return cut_n(o, kW, vs, va, vb);
  }
  // The same for the n <= kW lanes from o (the others read as zero).
  BN_ALWAYS_INLINE Vec cut_n(int64_t o, int64_t n, const Vec& vs, const Vec& va,
                             const Vec& vb) const {
    Vec pre = at::vec::fmadd(vload_upto(x + o, n) - vs, va, vb);
    if (z != nullptr) pre = round_like<T>(pre) + vload_upto(z + o, n);
    return pre <= Vec(0.f);
  }

  bool cut1(int64_t o, float s, float a, float b) const {  // recompute, one value
    float pre = std::fma(static_cast<float>(x[o]) - s, a, b);
    if (z != nullptr) pre = static_cast<float>(static_cast<T>(pre)) + static_cast<float>(z[o]);
    return pre <= 0.f;
  }
};

// v where keep, else +0 (a select on the bits: no branch, and a NaN or inf in v is dropped where
// the gradient is cut, as with the ternary).
template <typename T>
inline T kept_if(T v, bool keep) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  static_assert(sizeof(T) == sizeof(U), "float32 or a 16-bit float");
  U bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= static_cast<U>(U{0} - static_cast<U>(keep));
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// gate_pass (kSaveRecompute) over the channel-inner rows [r0, r1) of C values.
template <typename T>
void gate_rows(const T* dy, T* out, int64_t C, int64_t r0, int64_t r1, const Gate<T>& g,
               const float* shift, const float* scale, const float* offset, bool chunked,
               Cols cols) {
  const Vec zero(0.f);
  const T t0 = static_cast<T>(0.f);
  for_row_chunks(cols, chunked, [&](int64_t lo, int64_t hi) BN_ALWAYS_INLINE {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t c = lo;
      for (; c + kW <= hi; c += kW) {
        const int64_t o = r * C + c;
        const Vec cut =
            g.cut(o, Vec::loadu(shift + c), Vec::loadu(scale + c), Vec::loadu(offset + c));
        vstore(out + o, Vec::blendv(vload(dy + o), zero, cut));
      }
      for (; c < hi; ++c) {
        const int64_t o = r * C + c;
        out[o] = g.cut1(o, shift[c], scale[c], offset[c]) ? t0 : dy[o];
      }
    }
  });
}

// out = dy where the ReLU passes its gradient, else 0.
template <typename T>
void gate_pass(const T* dy, T* out, const Geometry& geo, const Gate<T>& g, const float* shift,
               const float* scale, const float* offset) {
  const int64_t C = geo.C, S = geo.S;
  const Vec zero(0.f);
  const T t0 = static_cast<T>(0.f);
  if (g.mode != kSaveRecompute) {
    // The gate is elementwise: one flat pass over the tensor, as a select on the bits (dy's
    // bits and-ed with all ones or zeros), which the compiler vectorizes. Written as `mask ?
    // dy : 0` the loop compiled to a branch per element, mispredicted on about half of them for
    // a ReLU's random signs: the fused backward took 6x the plain one's time at 512x512.
    at::parallel_for(0, geo.N * C * S, 16384, [&](int64_t i0, int64_t i1) {
      const T* __restrict d = dy;
      T* __restrict o = out;
      if (g.mode == kSaveMask) {
        const uint8_t* __restrict m = g.mask;
        for (int64_t i = i0; i < i1; ++i) o[i] = kept_if(d[i], m[i] != 0);
      } else {
        const T* __restrict y = g.y;
        for (int64_t i = i0; i < i1; ++i) o[i] = kept_if(d[i], !(static_cast<float>(y[i]) <= 0.f));
      }
    });
    return;
  }
  if (planes_as_rows(geo)) {  // as the forward's output pass
    const bool chunked = chunk_rows(C * S, large_pass<T>(geo, g.z != nullptr ? 3 : 2));
    for_plane_columns<3>(geo, {shift, scale, offset}, false,
                         [&](const Geometry& rg, Cols cols, const PerValue<3>& t) {
                           gate_rows(dy, out, rg.C, 0, rg.N, g, t[0], t[1], t[2], chunked, cols);
                         });
    return;
  }
  if (flat_rows<T>(geo)) {  // one flat run, as the forward's output pass
    at::parallel_for(0, geo.N * C, std::max<int64_t>(1, 16384 / S), [&](int64_t i0, int64_t i1) {
      const int64_t first = i0 * S;
      flat_rows_pass<3>(out, geo, i0, i1, {shift, scale, offset}, false,
                        [&](int64_t i, int64_t n, const Vec* v) BN_ALWAYS_INLINE {
                          return Vec::blendv(vload_upto(dy + first + i, n), zero,
                                             g.cut_n(first + i, n, v[0], v[1], v[2]));
                        });
    });
    return;
  }
  if (!geo.inner) {
    at::parallel_for(0, geo.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)),
                     [&](int64_t i0, int64_t i1) {
                       for (int64_t i = i0; i < i1; ++i) {
                         const int64_t c = i % C, base = i * S;
                         const Vec vs(shift[c]), va(scale[c]), vb(offset[c]);
                         int64_t j = 0;
                         for (; j + kW <= S; j += kW) {
                           const int64_t o = base + j;
                           vstore(out + o, Vec::blendv(vload(dy + o), zero, g.cut(o, vs, va, vb)));
                         }
                         for (; j < S; ++j) {
                           const int64_t o = base + j;
                           out[o] = g.cut1(o, shift[c], scale[c], offset[c]) ? t0 : dy[o];
                         }
                       }
                     });
    return;
  }
  const int64_t R = geo.rows(), block = inner_block_rows(C);
  const bool chunked = chunk_rows(C, large_pass<T>(geo, g.z != nullptr ? 3 : 2));
  for_block_tiles(0, (R + block - 1) / block, block, R, C, [&](int64_t b, Cols cols, int64_t) {
    gate_rows(dy, out, C, b * block, std::min(R, (b + 1) * block), g, shift, scale, offset,
              chunked, cols);
  });
}

// Returns (dx, dgamma, dbeta, dz) of relu(bn(x) [+ z]); dz (dy gated by the ReLU) is defined
// when need_dz. `gate` is y (kSaveOutput), the mask (kSaveMask) or the residual or nothing
// (kSaveRecompute); scale and offset are the forward's.
std::vector<Tensor> backward_fused(const Tensor& grad_output, const Tensor& input,
                                   const c10::optional<Tensor>& weight, const Tensor& shift,
                                   const Tensor& mean, const Tensor& invstd, const Tensor& scale,
                                   const Tensor& offset, bool training, bool need_dx,
                                   bool need_params, bool need_dz, int64_t relu,
                                   const c10::optional<Tensor>& gate) {
  TORCH_CHECK(relu >= kSaveOutput && relu <= kSaveRecompute, "unknown ReLU code ", relu);
  auto [x, geo] = as_kernel_layout(input);
  const Tensor dy = matched_layout(grad_output, x, geo, "grad_output");
  const bool has_gate = gate.has_value() && gate->defined();
  TORCH_CHECK(has_gate || relu == kSaveRecompute, "the ReLU's saved tensor is missing");
  Tensor gt;
  if (has_gate) {
    gt = matched_layout(*gate, x, geo, "the ReLU's saved tensor");
  }
  Tensor dpre = empty_output(x, x.scalar_type());
  if (x.numel() > 0) {
    const float* sp = shift.data_ptr<float>();
    const float* ap = scale.data_ptr<float>();
    const float* bp = offset.data_ptr<float>();
    // The output pass's own shift and offset (output_constants), so that the recomputed gate
    // is the forward's (the other modes read y or the mask, not the constants).
    const bool recompute = relu == kSaveRecompute;
    const Uninit<float> folded(recompute ? 2 * geo.C : 0);
    if (recompute) {
      output_constants(0, geo.C, sp, mean.data_ptr<float>(), invstd.data_ptr<float>(), ap, bp,
                       folded.data(), folded.data() + geo.C);
      sp = folded.data();
      bp = folded.data() + geo.C;
    }
    const uint8_t* mp =
        relu == kSaveMask ? reinterpret_cast<const uint8_t*>(gt.data_ptr<bool>()) : nullptr;
    if (x.scalar_type() == at::kFloat) {
      const float* gp = has_gate && relu != kSaveMask ? gt.data_ptr<float>() : nullptr;
      Gate<float> g{relu, x.data_ptr<float>(), relu == kSaveOutput ? gp : nullptr, mp,
                    relu == kSaveRecompute ? gp : nullptr};
      gate_pass<float>(dy.data_ptr<float>(), dpre.data_ptr<float>(), geo, g, sp, ap, bp);
    } else if (x.scalar_type() == at::kBFloat16) {
      const BF16* gp = has_gate && relu != kSaveMask ? gt.data_ptr<BF16>() : nullptr;
      Gate<BF16> g{relu, x.data_ptr<BF16>(), relu == kSaveOutput ? gp : nullptr, mp,
                   relu == kSaveRecompute ? gp : nullptr};
      gate_pass<BF16>(dy.data_ptr<BF16>(), dpre.data_ptr<BF16>(), geo, g, sp, ap, bp);
    } else {
      TORCH_CHECK(false, "the cpu kernels handle float32 and bfloat16, got ", x.scalar_type());
    }
  }
  std::vector<Tensor> grads;
  if (need_dx || need_params) {
    grads = backward(dpre, x, weight, shift, mean, invstd, training, need_dx, need_params);
  } else {
    grads = {Tensor(), Tensor(), Tensor()};
  }
  grads.push_back(need_dz ? in_torch_layout(dpre, x, geo) : Tensor());
  return grads;
}

std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Autograd: the forward and backward above as C++ autograd nodes (no Python per call)
// ------------------------------------------------------------------------------------------

namespace batchnorm {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline bool is_set(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// A parameter's gradient in the parameter's dtype (the kernels return float32).
inline Tensor in_dtype(const Tensor& grad, int64_t dtype) {
  const auto type = static_cast<at::ScalarType>(dtype);
  return grad.scalar_type() == type ? grad : grad.to(type);
}
inline Tensor in_dtype(const Tensor& grad, const Tensor& param) {
  return in_dtype(grad, static_cast<int64_t>(param.scalar_type()));
}

// Passes gradients through (as copies tied to `sources`); differentiating them raises, so that
// a second derivative of a fused kernel fails loudly instead of coming out as zero or "unused".
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  static variable_list forward(AutogradContext*, at::TensorList grads, at::TensorList) {
    variable_list out;
    for (const Tensor& g : grads) out.push_back(g.clone());
    return out;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "the 'cpu' batch-norm backend has no second derivatives (double backward) of "
                "its fused ReLU kernels; use backend='torch' or 'explicit' for gradients of "
                "gradients (e.g. gradient penalties)");
  }
};

// Under create_graph=True: ties the defined gradients to a NoDoubleBackward node.
void guard_double_backward(std::vector<Tensor*> grads, const std::vector<Tensor>& sources) {
  if (!at::GradMode::is_enabled()) return;
  std::vector<Tensor> defined, from;
  for (Tensor* g : grads)
    if (g->defined()) defined.push_back(*g);
  for (const Tensor& t : sources)
    if (t.defined()) from.push_back(t);
  if (defined.empty()) return;
  variable_list tied = NoDoubleBackward::apply(at::TensorList(defined), at::TensorList(from));
  size_t i = 0;
  for (Tensor* g : grads)
    if (g->defined()) *g = tied[i++];
}

// dx, dgamma, dbeta that autograd can differentiate again (create_graph=True: Hessians,
// gradient penalties, MAML), from PyTorch's own ops. Training: through PyTorch's native batch
// norm on the saved x (itself twice differentiable; equal to this backend's own backward to
// rounding). Eval: y = gamma * (x - shift) * invstd + beta with the running statistics the
// forward used (shift = the running mean, invstd = 1 / sqrt(running_var + eps)), written out.
std::vector<Tensor> differentiable_backward(const Tensor& grad_output, const Tensor& input,
                                            const Tensor& weight, int64_t bias_dtype,
                                            const Tensor& shift, const Tensor& invstd,
                                            bool training, double eps, bool need_dx,
                                            bool need_w, bool need_b) {
  std::vector<int64_t> dims{0}, shape{1, -1};
  for (int64_t d = 2; d < input.dim(); ++d) {
    dims.push_back(d);
    shape.push_back(1);
  }
  Tensor dx, dgamma, dbeta;
  if (training) {
    std::vector<Tensor> sources;
    if (need_dx) sources.push_back(input);
    if (need_w) sources.push_back(weight);
    if (!sources.empty()) {
      at::AutoGradMode enable(true);
      const Tensor y = at::batch_norm(input, weight, Tensor(), Tensor(), Tensor(), true, 0.0, eps,
                                      false);
      variable_list found = torch::autograd::grad({y}, sources, {grad_output},
                                                  /*retain_graph=*/true, /*create_graph=*/true);
      size_t i = 0;
      if (need_dx) dx = found[i++];
      if (need_w) dgamma = found[i++];
    }
  } else {
    const Tensor scale = weight.defined() ? weight.to(at::kFloat) * invstd : invstd;
    if (need_dx) dx = (grad_output.to(at::kFloat) * scale.reshape(shape)).to(input.scalar_type());
    if (need_w) {
      const Tensor x_hat = (input.to(at::kFloat) - shift.reshape(shape)) * invstd.reshape(shape);
      dgamma = (grad_output.to(at::kFloat) * x_hat).sum(dims).to(weight.scalar_type());
    }
  }
  if (need_b) dbeta = in_dtype(grad_output.to(at::kFloat).sum(dims), bias_dtype);
  return {dx, dgamma, dbeta};
}

// batch_norm through the kernels above; saves x, gamma and the float32 (C,) statistics.
struct CpuBatchNormBackward : public torch::autograd::Function<CpuBatchNormBackward> {
  // Input edges, in order: input, weight (if given), bias (if given); the running statistics
  // come last (detached), so they never shift these indices.
  static Tensor forward(AutogradContext* ctx, const Tensor& input,
                        const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                        const c10::optional<Tensor>& running_mean,
                        const c10::optional<Tensor>& running_var, bool training, double momentum,
                        double eps) {
    auto out = ::forward(input, weight, bias, running_mean, running_var, training, momentum, eps);
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] = is_set(bias) ? static_cast<int64_t>(bias->scalar_type()) : -1;
    ctx->save_for_backward({input, is_set(weight) ? *weight : Tensor(), out[1], out[2], out[3]});
    return out[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &shift = saved[2], &mean = saved[3],
                 &invstd = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_w = weight.defined(), has_b = bias_dtype >= 0;
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_w = has_w && ctx->needs_input_grad(1);
    const bool need_b = has_b && ctx->needs_input_grad(has_w ? 2 : 1);
    const Tensor& grad_output = grad_outputs[0];
    std::vector<Tensor> grads;
    if (at::GradMode::is_enabled()) {
      grads = differentiable_backward(grad_output, input, weight, bias_dtype, shift, invstd,
                                      training, ctx->saved_data["eps"].toDouble(), need_dx,
                                      need_w, need_b);
    } else {
      grads = ::backward(grad_output, input, has_w ? c10::optional<Tensor>(weight) : c10::nullopt,
                         shift, mean, invstd, training, need_dx, need_w || need_b);
      grads[1] = need_w ? in_dtype(grads[1], weight) : Tensor();
      grads[2] = need_b ? in_dtype(grads[2], bias_dtype) : Tensor();
    }
    return {grads[0], grads[1], grads[2], Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// relu(batch_norm(x) [+ z]) through the fused kernels; saves x, gamma, the float32 statistics
// and the forward's scale and offset, plus y, the mask or the residual as `code` says.
struct CpuBatchNormReluBackward : public torch::autograd::Function<CpuBatchNormReluBackward> {
  // Input edges: input, residual (if given), weight (if given), bias (if given), then the
  // detached running statistics.
  static Tensor forward(AutogradContext* ctx, const Tensor& input,
                        const c10::optional<Tensor>& residual, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias,
                        const c10::optional<Tensor>& running_mean,
                        const c10::optional<Tensor>& running_var, bool training, double momentum,
                        double eps, int64_t code) {
    auto out = forward_fused(input, weight, bias, running_mean, running_var, training, momentum,
                             eps, residual, code);
    ctx->saved_data["training"] = training;
    ctx->saved_data["code"] = code;
    ctx->saved_data["has_residual"] = is_set(residual);
    ctx->saved_data["bias_dtype"] = is_set(bias) ? static_cast<int64_t>(bias->scalar_type()) : -1;
    Tensor gate;
    if (code == kSaveOutput) {
      gate = out[0];
    } else if (code == kSaveMask) {
      gate = out[6];
    } else if (is_set(residual)) {
      gate = *residual;
    }
    ctx->save_for_backward({input, is_set(weight) ? *weight : Tensor(), out[1], out[2], out[3],
                            out[4], out[5], gate});
    return out[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const Tensor& weight = saved[1];
    const bool has_z = ctx->saved_data["has_residual"].toBool();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_w = weight.defined(), has_b = bias_dtype >= 0;
    const size_t w_edge = has_z ? 2 : 1;
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dz = has_z && ctx->needs_input_grad(1);
    const bool need_w = has_w && ctx->needs_input_grad(w_edge);
    const bool need_b = has_b && ctx->needs_input_grad(has_w ? w_edge + 1 : w_edge);
    const Tensor& grad_output = grad_outputs[0];
    auto grads = backward_fused(
        grad_output, input, has_w ? c10::optional<Tensor>(weight) : c10::nullopt, saved[2],
        saved[3], saved[4], saved[5], saved[6], ctx->saved_data["training"].toBool(), need_dx,
        need_w || need_b, need_dz, ctx->saved_data["code"].toInt(),
        saved[7].defined() ? c10::optional<Tensor>(saved[7]) : c10::nullopt);
    Tensor dx = need_dx ? grads[0] : Tensor();
    Tensor dgamma = need_w ? in_dtype(grads[1], weight) : Tensor();
    Tensor dbeta = need_b ? in_dtype(grads[2], bias_dtype) : Tensor();
    Tensor dz = need_dz ? grads[3] : Tensor();
    guard_double_backward({&dx, &dz, &dgamma, &dbeta}, {input, weight, grad_output});
    return {dx,       dz,       dgamma,   dbeta,    Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor batch_norm_autograd(const Tensor& input, const c10::optional<Tensor>& weight,
                           const c10::optional<Tensor>& bias,
                           const c10::optional<Tensor>& running_mean,
                           const c10::optional<Tensor>& running_var, bool training,
                           double momentum, double eps) {
  return CpuBatchNormBackward::apply(input, weight, bias, running_mean, running_var, training,
                                     momentum, eps);
}

Tensor batch_norm_relu_autograd(const Tensor& input, const c10::optional<Tensor>& residual,
                                const c10::optional<Tensor>& weight,
                                const c10::optional<Tensor>& bias,
                                const c10::optional<Tensor>& running_mean,
                                const c10::optional<Tensor>& running_var, bool training,
                                double momentum, double eps, int64_t code) {
  return CpuBatchNormReluBackward::apply(input, residual, weight, bias, running_mean, running_var,
                                         training, momentum, eps, code);
}

// Whether autograd records a graph through these (grad mode on and one of them requires grad).
inline bool records_graph(const Tensor& input,
                          std::initializer_list<const c10::optional<Tensor>*> others) {
  if (!at::GradMode::is_enabled()) return false;
  if (input.requires_grad()) return true;
  for (const auto* t : others)
    if (is_set(*t) && (*t)->requires_grad()) return true;
  return false;
}

inline c10::optional<Tensor> detached(const c10::optional<Tensor>& t) {
  return is_set(t) ? c10::optional<Tensor>(t->detach()) : c10::nullopt;
}

// The kernels write the running statistics through raw pointers: count it as the in-place
// change it is (their version counters go up by one, as an in-place op of torch's would make
// them), so a graph that saved a buffer before fails at backward, as with torch's kernel,
// instead of reading the new values silently.
inline void count_update(bool training, const c10::optional<Tensor>& running_mean,
                         const c10::optional<Tensor>& running_var) {
  if (training && is_set(running_mean) && is_set(running_var)) {
    torch::autograd::impl::bump_version(*running_mean);
    torch::autograd::impl::bump_version(*running_var);
  }
}

// Running statistics that require grad where grad mode is on: torch's kernel refuses them (it is
// not differentiable with respect to them), and so do these kernels, which would otherwise
// leave an eval-mode gradient with respect to them out without a word (and update a leaf that
// requires grad in place).
inline void check_statistics_need_no_grad(const c10::optional<Tensor>& running_mean,
                                          const c10::optional<Tensor>& running_var) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [name, t] : {std::pair{"running_mean", &running_mean},
                                std::pair{"running_var", &running_var}}) {
    TORCH_CHECK(!is_set(*t) || !(*t)->requires_grad(), "the 'cpu' batch-norm kernels are not ",
                "differentiable with respect to ", name, ", which requires grad (torch's kernel ",
                "refuses it too): keep the running statistics as buffers that do not require ",
                "grad (", name, ".requires_grad_(False)), call under torch.no_grad(), or use ",
                "backend='explicit', which differentiates through them in eval mode");
  }
}

// batchnorm.ops.cpu.batch_norm in one call from Python, in F.batch_norm's argument order: an
// autograd node (the running statistics passed as detached aliases: the node's inputs are x,
// gamma and beta) where autograd records a graph, else the forward's output alone.
Tensor batch_norm_call(const Tensor& input, const c10::optional<Tensor>& running_mean,
                       const c10::optional<Tensor>& running_var,
                       const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                       bool training, double momentum, double eps) {
  check_statistics_need_no_grad(running_mean, running_var);
  Tensor y;
  if (records_graph(input, {&weight, &bias})) {
    y = batch_norm_autograd(input, weight, bias, detached(running_mean), detached(running_var),
                            training, momentum, eps);
  } else {
    y = forward_output(input, weight, bias, running_mean, running_var, training, momentum, eps,
                       c10::nullopt, kReluNone);
  }
  count_update(training, running_mean, running_var);
  return y;
}

// batchnorm.ops.cpu.batch_norm_relu in one call from Python (`code`: what the backward keeps).
Tensor batch_norm_relu_call(const Tensor& input, const c10::optional<Tensor>& residual,
                            const c10::optional<Tensor>& running_mean,
                            const c10::optional<Tensor>& running_var,
                            const c10::optional<Tensor>& weight,
                            const c10::optional<Tensor>& bias, bool training, double momentum,
                            double eps, int64_t code) {
  check_statistics_need_no_grad(running_mean, running_var);
  Tensor y;
  if (records_graph(input, {&residual, &weight, &bias})) {
    y = batch_norm_relu_autograd(input, residual, weight, bias, detached(running_mean),
                                 detached(running_var), training, momentum, eps, code);
  } else {
    TORCH_CHECK(code >= kReluNone && code <= kSaveRecompute, "unknown ReLU code ", code);
    // Nothing is kept for a backward: no mask to write.
    y = forward_output(input, weight, bias, running_mean, running_var, training, momentum, eps,
                       residual, kSaveRecompute);
  }
  count_update(training, running_mean, running_var);
  return y;
}

}  // namespace batchnorm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "batch norm forward: (y, shift, mean_s, invstd)");
  m.def("backward", &backward, "batch norm backward: (dx, dgamma, dbeta)");
  m.def("forward_fused", &forward_fused,
        "batch norm (+ residual) + ReLU forward: (y, shift, mean_s, invstd, scale, offset, mask)");
  m.def("backward_fused", &backward_fused,
        "batch norm (+ residual) + ReLU backward: (dx, dgamma, dbeta, dz)");
  m.def("batch_norm", &batchnorm::batch_norm_autograd,
        "batch norm with an autograd node (the running statistics are updated in place)");
  m.def("batch_norm_relu", &batchnorm::batch_norm_relu_autograd,
        "batch norm (+ residual) + ReLU with an autograd node");
  m.def("batch_norm_call", &batchnorm::batch_norm_call,
        "batchnorm.ops.cpu.batch_norm: F.batch_norm's arguments, an autograd node where a graph "
        "is recorded");
  m.def("batch_norm_relu_call", &batchnorm::batch_norm_relu_call,
        "batchnorm.ops.cpu.batch_norm_relu: (input, residual, running_mean, running_var, weight, "
        "bias, training, momentum, eps, save code)");
  m.def("cache_info", []() { return BlockCache::get().info(); },
        "the output block cache: (cached bytes, limit, hits, misses)");
  m.def("set_cache_limit", [](int64_t bytes) { BlockCache::get().set_limit(bytes); },
        "the most bytes of freed output blocks kept for reuse (0: none)");
  m.def("empty_cache", []() { BlockCache::get().empty(); }, "frees the cached output blocks");
  m.def(
      "threads_used",
      [](int64_t n) {
        // How many threads an at::parallel_for over n items of grain 1 ran on (the kernels'
        // own split is the same call): checks that the build uses torch's thread pool.
        std::vector<int> seen(std::max<int64_t>(at::get_num_threads(), 1), 0);
        at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
          const int id = at::get_thread_num();
          if (id >= 0 && id < static_cast<int>(seen.size())) seen[id] = 1;
        });
        return std::count(seen.begin(), seen.end(), 1);
      },
      "threads that one parallel_for used");
  m.def("capability", &capability, "the vector instruction set compiled in");
  m.def(
      "channels_last_walk",
      []() { return channels_last_walk() == BlockWalk::kRows ? "rows" : "chunks"; },
      "how the channels-last backward walks a block: 'rows' or 'chunks'");
  m.def(
      "set_channels_last_walk",
      [](const std::string& walk) {
        TORCH_CHECK_VALUE(walk == "rows" || walk == "chunks",
                          "the channels-last walk is 'rows' or 'chunks', got '", walk, "'");
        block_walk().store(walk == "rows" ? BlockWalk::kRows : BlockWalk::kChunks);
      },
      "sets the channels-last backward's walk ('rows' or 'chunks'; the same values either way)");
  m.def("vector_width", []() { return kW; }, "floats per vector");
  m.def(
      "scratch_poisoned", []() { return kPoisonScratch; },
      "whether memory written before it is read starts as NaN (a BN_POISON_SCRATCH build)");
  m.def(
      "stream_min_bytes", []() { return kCanStream ? stream_min_bytes().load() : int64_t{-1}; },
      "passes moving this many bytes or more stream their stores (-1: never, no vector ISA)");
  m.def(
      "set_stream_min_bytes",
      [](int64_t bytes) {
        TORCH_CHECK_VALUE(bytes >= 0, "the streaming threshold is a size in bytes >= 0, got ",
                          bytes);
        stream_min_bytes().store(bytes);
      },
      "sets the traffic from which passes stream their stores (the same values either way)");
  m.def(
      "streams",
      [](const Tensor& x, int64_t reads) {
        const Geometry g = as_kernel_layout(x).second;
        if (x.scalar_type() == at::kBFloat16) return streams(g, reads, x.data_ptr<BF16>());
        return streams(g, reads, x.data_ptr<float>());
      },
      "whether a row-by-row pass over x reading `reads` tensors like it streams its output (x "
      "stands for the output: the same layout and, for channels-last rows, the same "
      "alignment); planar rows off the vector width go as flat runs instead, which stream "
      "whenever the pass moves stream_min_bytes()");
}
