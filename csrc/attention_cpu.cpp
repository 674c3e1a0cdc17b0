// CPU kernels of the attention-map op family (declared in attention_kernels.h).
//
// Each kernel is one pass over the feature map: forward reads it once, backward reads it and
// writes its gradient once. The per-task loops are compiled twice, for AVX2+FMA and for the
// baseline x86-64 instruction set, and the CPU picks one at run time, so the library never
// executes an instruction the machine lacks. The thread team is OpenMP, sized by the caller.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "attention_kernels.h"
#include "attention_math.h"

namespace gansparse {
namespace attention {
namespace {

#define GS_INLINE inline __attribute__((always_inline))

// Pixels per forward task on NCHW: the task's accumulators stay in L1 while it streams the
// task's slice of every channel.
constexpr int64_t kMaxBlock = 2048;

template <typename T>
struct Args {
  const T* f;
  const T* grad_maps;  // backward only
  T* out;              // maps (forward) or grad_f (backward)
  FeatureShape s;
  T p;
  T scale;
  int64_t block;  // forward NCHW only
};

// Forward, NCHW. Task t covers pixels [i0, i0 + len) of sample n, summing over channels four at
// a time so each accumulator is loaded and stored once per four rows.
template <int P, typename T>
GS_INLINE void forward_nchw(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.c, HW = a.s.hw, B = a.block;
  const int64_t blocks_per_sample = (HW + B - 1) / B;
  T acc[kMaxBlock];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / blocks_per_sample;
    const int64_t i0 = (t % blocks_per_sample) * B;
    const int64_t len = std::min(B, HW - i0);
    const T* base = a.f + n * C * HW + i0;
    std::fill(acc, acc + len, T(0));
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) {
      const T* r0 = base + c * HW;
      const T* r1 = r0 + HW;
      const T* r2 = r1 + HW;
      const T* r3 = r2 + HW;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        acc[i] += (pow_abs<P>(r0[i], a.p) + pow_abs<P>(r1[i], a.p)) +
                  (pow_abs<P>(r2[i], a.p) + pow_abs<P>(r3[i], a.p));
      }
    }
    for (; c < C; ++c) {
      const T* r = base + c * HW;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) acc[i] += pow_abs<P>(r[i], a.p);
    }
    T* out = a.out + n * HW + i0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = acc[i] * a.scale;
  }
}

// Forward, NHWC. Task t is one pixel; its channels are contiguous.
template <int P, typename T>
GS_INLINE void forward_nhwc(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.c;
  for (int64_t t = begin; t < end; ++t) {
    const T* px = a.f + t * C;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < C; ++c) acc += pow_abs<P>(px[c], a.p);
    a.out[t] = acc * a.scale;
  }
}

// Backward, NCHW. Task t is the row (n, c).
template <int P, typename T>
GS_INLINE void backward_nchw(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.c, HW = a.s.hw;
  for (int64_t t = begin; t < end; ++t) {
    const T* g = a.grad_maps + (t / C) * HW;
    const T* x = a.f + t * HW;
    T* y = a.out + t * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) y[i] = g[i] * a.scale * pow_abs_grad<P>(x[i], a.p);
  }
}

// Backward, NHWC. Task t is one pixel.
template <int P, typename T>
GS_INLINE void backward_nhwc(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.c;
  for (int64_t t = begin; t < end; ++t) {
    const T g = a.grad_maps[t] * a.scale;
    const T* x = a.f + t * C;
    T* y = a.out + t * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[c] = g * pow_abs_grad<P>(x[c], a.p);
  }
}

template <typename T>
using RangeFn = void (*)(const Args<T>&, int64_t, int64_t);

// One copy of a range function per instruction set. OpenMP stays outside them, so the
// outlined parallel regions need no target attribute of their own.
#define GS_ISA_VARIANTS(kernel)                                                        \
  template <int P, typename T>                                                         \
  __attribute__((target("avx2,fma"))) void kernel##_avx2(const Args<T>& a, int64_t b, \
                                                         int64_t e) {                  \
    kernel<P, T>(a, b, e);                                                             \
  }                                                                                    \
  template <int P, typename T>                                                         \
  void kernel##_default(const Args<T>& a, int64_t b, int64_t e) {                      \
    kernel<P, T>(a, b, e);                                                             \
  }

#if defined(__x86_64__)
GS_ISA_VARIANTS(forward_nchw)
GS_ISA_VARIANTS(forward_nhwc)
GS_ISA_VARIANTS(backward_nchw)
GS_ISA_VARIANTS(backward_nhwc)
#define GS_PICK(kernel, P, T) (use_avx2() ? kernel##_avx2<P, T> : kernel##_default<P, T>)
#else
#define GS_PICK(kernel, P, T) (kernel<P, T>)
#endif

bool use_avx2() {
#if defined(__x86_64__)
  static const bool enabled = [] {
    const char* isa = std::getenv("GANSPARSE_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

// Splits [0, tasks) into one contiguous range per thread.
template <typename T>
void parallel_ranges(RangeFn<T> fn, const Args<T>& a, int64_t tasks, int num_threads) {
  if (tasks <= 0) return;
  if (num_threads <= 1 || tasks == 1 || omp_in_parallel()) {
    fn(a, 0, tasks);
    return;
  }
  const int team = static_cast<int>(std::min<int64_t>(num_threads, tasks));
#pragma omp parallel num_threads(team)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t chunk = (tasks + nt - 1) / nt;
    const int64_t begin = omp_get_thread_num() * chunk;
    const int64_t end = std::min(tasks, begin + chunk);
    if (begin < end) fn(a, begin, end);
  }
}

// Pixel block of the NCHW forward: as large as L1 allows, yet small enough that every thread
// gets at least two tasks.
int64_t forward_block(const FeatureShape& s, int num_threads) {
  const int64_t want_tasks = 2 * static_cast<int64_t>(std::max(num_threads, 1));
  const int64_t blocks_per_sample = std::max<int64_t>(1, (want_tasks + s.n - 1) / s.n);
  int64_t block = (s.hw + blocks_per_sample - 1) / blocks_per_sample;
  block = (block + 15) / 16 * 16;
  return std::clamp<int64_t>(block, 16, kMaxBlock);
}

}  // namespace

const char* cpu_isa() { return use_avx2() ? "avx2" : "default"; }

template <typename scalar_t>
void maps_forward_cpu(const scalar_t* f, scalar_t* maps, FeatureShape shape, float p, float scale,
                      int num_threads) {
  Args<scalar_t> a{f, nullptr, maps, shape, scalar_t(p), scalar_t(scale), 0};
  dispatch_exponent(p, [&](auto exponent) {
    constexpr int P = decltype(exponent)::value;
    if (shape.channels_last) {
      parallel_ranges(GS_PICK(forward_nhwc, P, scalar_t), a, shape.n * shape.hw, num_threads);
    } else {
      a.block = forward_block(shape, num_threads);
      const int64_t tasks = shape.n * ((shape.hw + a.block - 1) / a.block);
      parallel_ranges(GS_PICK(forward_nchw, P, scalar_t), a, tasks, num_threads);
    }
  });
}

template <typename scalar_t>
void maps_backward_cpu(const scalar_t* grad_maps, const scalar_t* f, scalar_t* grad_f,
                       FeatureShape shape, float p, float scale, int num_threads) {
  const Args<scalar_t> a{f, grad_maps, grad_f, shape, scalar_t(p), scalar_t(scale), 0};
  dispatch_exponent(p, [&](auto exponent) {
    constexpr int P = decltype(exponent)::value;
    if (shape.channels_last) {
      parallel_ranges(GS_PICK(backward_nhwc, P, scalar_t), a, shape.n * shape.hw, num_threads);
    } else {
      parallel_ranges(GS_PICK(backward_nchw, P, scalar_t), a, shape.n * shape.c, num_threads);
    }
  });
}

template void maps_forward_cpu<float>(const float*, float*, FeatureShape, float, float, int);
template void maps_forward_cpu<double>(const double*, double*, FeatureShape, float, float, int);
template void maps_backward_cpu<float>(const float*, const float*, float*, FeatureShape, float,
                                       float, int);
template void maps_backward_cpu<double>(const double*, const double*, double*, FeatureShape,
                                        float, float, int);

}  // namespace attention
}  // namespace gansparse
