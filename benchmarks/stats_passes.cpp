// The least time of the channel-inner statistics' passes, measured standalone (no torch).
//
// A tensor of R rows of C channels (an (N, C) batch, or channels-last (N, C, H, W) as N*H*W
// rows), float32, repeated calls on the same data (in L2 or L3 as its size allows), one thread.
// Timed, per call, median of 15 rounds:
//   sum       one plain read of x (4 vector accumulators): the least any statistics can read;
//   copy      y = x (vector loads and stores): the yardstick of the speed targets;
//   one pass  sums of d = x - shift and of d^2 per channel, a chunk of 4 vectors of channels
//             walked down the rows (the kernels' later blocks: mean and M2 from them, guarded);
//   two pass  mean of d, then sum of (d - mean)^2 per chunk, the second pass meant to come from
//             L1 (the kernels' first block: the centre of every later block, and all of a small
//             batch);
//   padded    the same two passes over rows C + 16 floats apart: where C floats are a multiple
//             of 1 KB, a chunk's lines down 64 rows fall in a few of L1's sets (rows of 5 KB:
//             16 of a 48 KB L1's 64 sets, 16 lines to a set of 12 ways), so the second pass
//             reads L2; with the padding they spread over all sets.
// The kernels (src/batchnorm/ops/cpu/batch_norm.cpp) add the merges, constants, running
// statistics and the output pass; these loops bound what their statistics can cost.
//
// Build and run (AVX-512 machines):
//   g++ -O3 -march=native -o /tmp/stats_passes benchmarks/stats_passes.cpp
//   taskset -c 1 /tmp/stats_passes 64 1280 512 512 256 512
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kW = 16;  // floats per AVX-512 vector
constexpr int kK = 4;   // vectors per chunk of channels

__attribute__((noinline)) float plain_sum(const float* x, long n) {
  __m512 a[kK];
  for (auto& v : a) v = _mm512_setzero_ps();
  for (long i = 0; i + kK * kW <= n; i += kK * kW) {
    for (int k = 0; k < kK; ++k) a[k] = _mm512_add_ps(a[k], _mm512_loadu_ps(x + i + k * kW));
  }
  float lanes[kW];
  _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  float total = 0.f;
  for (float v : lanes) total += v;
  return total;
}

__attribute__((noinline)) void copy(const float* x, float* y, long n) {
  for (long i = 0; i + kW <= n; i += kW) _mm512_storeu_ps(y + i, _mm512_loadu_ps(x + i));
}

__attribute__((noinline)) void one_pass(const float* x, long R, long C, const float* shift,
                                        float* sum, float* squares) {
  for (long c = 0; c + kK * kW <= C; c += kK * kW) {
    __m512 s[kK], a[kK], q[kK];
    for (int k = 0; k < kK; ++k) {
      s[k] = _mm512_loadu_ps(shift + c + k * kW);
      a[k] = q[k] = _mm512_setzero_ps();
    }
    for (long r = 0; r < R; ++r) {
      const float* p = x + r * C + c;
      for (int k = 0; k < kK; ++k) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + k * kW), s[k]);
        a[k] = _mm512_add_ps(a[k], d);
        q[k] = _mm512_fmadd_ps(d, d, q[k]);
      }
    }
    for (int k = 0; k < kK; ++k) {
      _mm512_storeu_ps(sum + c + k * kW, a[k]);
      _mm512_storeu_ps(squares + c + k * kW, q[k]);
    }
  }
}

__attribute__((noinline)) void two_pass(const float* x, long R, long C, long ld,
                                        const float* shift, float* mean, float* m2) {
  const __m512 inv = _mm512_set1_ps(1.f / static_cast<float>(R));
  for (long c = 0; c + kK * kW <= C; c += kK * kW) {
    __m512 s[kK], a[kK], q[kK], mu[kK];
    for (int k = 0; k < kK; ++k) {
      s[k] = _mm512_loadu_ps(shift + c + k * kW);
      a[k] = q[k] = _mm512_setzero_ps();
    }
    for (long r = 0; r < R; ++r) {
      const float* p = x + r * ld + c;
      for (int k = 0; k < kK; ++k) {
        a[k] = _mm512_add_ps(a[k], _mm512_sub_ps(_mm512_loadu_ps(p + k * kW), s[k]));
      }
    }
    for (int k = 0; k < kK; ++k) mu[k] = _mm512_mul_ps(a[k], inv);
    for (long r = 0; r < R; ++r) {
      const float* p = x + r * ld + c;
      for (int k = 0; k < kK; ++k) {
        const __m512 d =
            _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(p + k * kW), s[k]), mu[k]);
        q[k] = _mm512_fmadd_ps(d, d, q[k]);
      }
    }
    for (int k = 0; k < kK; ++k) {
      _mm512_storeu_ps(mean + c + k * kW, mu[k]);
      _mm512_storeu_ps(m2 + c + k * kW, q[k]);
    }
  }
}

template <class F>
double median_us(F&& f, long calls) {
  std::vector<double> rounds;
  for (int i = 0; i < 15; ++i) {
    const auto start = std::chrono::steady_clock::now();
    for (long j = 0; j < calls; ++j) f();
    const std::chrono::duration<double, std::micro> took = std::chrono::steady_clock::now() - start;
    rounds.push_back(took.count() / static_cast<double>(calls));
  }
  std::sort(rounds.begin(), rounds.end());
  return rounds[rounds.size() / 2];
}

}  // namespace

// A whole positive number from text (strtol, all of it read), or -1.
static long positive(const char* text) {
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  return (end != text && *end == '\0' && v > 0) ? v : -1;
}

int main(int argc, char** argv) {
  if (argc < 3 || argc % 2 == 0) {
    std::fprintf(stderr, "usage: %s R C [R C ...]  (C a multiple of 64)\n", argv[0]);
    return 2;
  }
  for (int a = 1; a + 1 < argc; a += 2) {  // every pair checked before anything is timed
    const long R = positive(argv[a]), C = positive(argv[a + 1]);
    if (R < 1 || C < 1 || C % (kK * kW) != 0) {
      std::fprintf(stderr, "R a whole number >= 1 and C a multiple of %d, got '%s' x '%s'\n",
                   kK * kW, argv[a], argv[a + 1]);
      return 2;
    }
  }
  std::printf("%7s %6s %8s %8s %8s %8s %9s %9s %9s\n", "R", "C", "sum_us", "copy_us", "one_us",
              "two_us", "padded_us", "one/copy", "two/copy");
  for (int a = 1; a + 1 < argc; a += 2) {
    const long R = positive(argv[a]), C = positive(argv[a + 1]);
    std::vector<float> x(R * (C + kW)), y(R * C), shift(C), out1(C), out2(C);
    unsigned seed = 1;
    for (auto& v : x) {
      seed = seed * 1664525u + 1013904223u;
      v = static_cast<float>(seed >> 8) * 0x1p-24f;
    }
    std::copy(x.begin(), x.begin() + C, shift.begin());  // centred on the first row
    const long calls = std::max(1L, 20000000 / (R * C));
    volatile float sink = 0.f;
    const double s = median_us([&] { sink = plain_sum(x.data(), R * C); }, calls);
    const double c = median_us([&] { copy(x.data(), y.data(), R * C); }, calls);
    const double one = median_us(
        [&] { one_pass(x.data(), R, C, shift.data(), out1.data(), out2.data()); }, calls);
    const double two = median_us(
        [&] { two_pass(x.data(), R, C, C, shift.data(), out1.data(), out2.data()); }, calls);
    const double padded = median_us(
        [&] { two_pass(x.data(), R, C, C + kW, shift.data(), out1.data(), out2.data()); }, calls);
    std::printf("%7ld %6ld %8.2f %8.2f %8.2f %8.2f %9.2f %9.2f %9.2f\n", R, C, s, c, one, two,
                padded, one / c, two / c);
  }
  return 0;
}
