// CPU kernels of the attention-map op family (declared in attention_kernels.h).
//
// Each kernel is one pass over the feature map: forward reads it once, backward reads it and
// writes its gradient once. The per-task loops are compiled twice, for AVX2+FMA and for the
// baseline x86-64 instruction set, and the CPU picks one at run time, so the library never
// executes an instruction the machine lacks. The thread team is OpenMP, sized by the caller.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// GCC's AVX builtins, for the non-temporal stores of the AVX2 copy (see stream_store).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GS_STREAMING_STORES
#include <immintrin.h>
#endif

#include "attention_kernels.h"
#include "attention_math.h"
#include "cpu_parallel.h"

namespace gansparse {
namespace attention {
namespace {

#define GS_INLINE inline __attribute__((always_inline))

// Pixels per forward task on NCHW, at most: the task's accumulators (16 KB) stay in L1 while it
// streams the task's slice of every channel. The longer each slice, the better the hardware
// prefetchers follow it: 4096 float pixels (a whole 64x64 channel) read 64x64 features 15%
// faster than 2048.
template <typename T>
constexpr int64_t kMaxBlock = 16384 / sizeof(T);

// Gradients at least this large are written with non-temporal stores (AVX2 copy only). Those
// skip reading each destination line into the cache before overwriting it: on 16 MB gradients
// the backward is a quarter faster. On 4 MB ones it is not, and a gradient that fits in the
// cache is better left there, where autograd reads it next.
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

template <typename T>
struct Args {
  const T* f;
  const T* grad_maps;  // backward only
  T* out;              // maps (forward) or grad_f (backward)
  FeatureShape s;
  T p;
  T scale;
  int64_t block;   // forward NCHW only
  bool streaming;  // backward only: write grad_f with non-temporal stores
};

// Forward, NCHW. Task t covers pixels [i0, i0 + len) of sample n, summing over channels four at
// a time so each accumulator is loaded and stored once per four rows.
template <int P, typename T, Isa>
GS_INLINE void forward_nchw(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.c, HW = a.s.hw, B = a.block;
  const int64_t blocks_per_sample = (HW + B - 1) / B;
  T acc[kMaxBlock<T>];
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
template <int P, typename T, Isa>
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

// The non-temporal 32-byte store of the AVX2 copy. It calls GCC's builtins rather than the
// _mm256_stream_* intrinsics: those carry a target attribute that forbids inlining them into the
// ISA-neutral templates below, while a builtin is checked only in the function it lands in,
// which is always the AVX2 copy.
#if defined(GS_STREAMING_STORES)
typedef float Float8 __attribute__((vector_size(32), may_alias));
typedef double Double4 __attribute__((vector_size(32), may_alias));
GS_INLINE void stream_store(float* dst, const float* src) {
  __builtin_ia32_movntps256(dst, *reinterpret_cast<const Float8*>(src));
}
GS_INLINE void stream_store(double* dst, const double* src) {
  __builtin_ia32_movntpd256(dst, *reinterpret_cast<const Double4*>(src));
}
#endif

// Non-temporal stores are weakly ordered: a thread fences them once its range is written, so
// they are visible to whoever reads grad_f after the parallel region.
template <Isa isa>
GS_INLINE void fence_streaming(bool streaming) {
#if defined(GS_STREAMING_STORES)
  if constexpr (isa == Isa::avx2) {
    if (streaming) __builtin_ia32_sfence();
  }
#endif
}

// y[i] = coef(i) * d|x[i]|^p/dx for i < len. With `streaming` (honoured by the AVX2 copy), the
// 32-byte aligned part of y is written with non-temporal stores, 32 bytes at a time: the
// compiler keeps each group of lanes in one register between the math and the store.
template <int P, typename T, Isa isa, typename Coef>
GS_INLINE void backward_row(const T* x, T* y, int64_t len, T p, bool streaming, Coef coef) {
  int64_t done = 0;
#if defined(GS_STREAMING_STORES)
  if constexpr (isa == Isa::avx2) {
    constexpr int64_t kLanes = 32 / sizeof(T);
    if (streaming) {
      for (; done < len && reinterpret_cast<uintptr_t>(y + done) % 32 != 0; ++done) {
        y[done] = coef(done) * pow_abs_grad<P>(x[done], p);
      }
      for (; done + kLanes <= len; done += kLanes) {
        alignas(32) T lanes[kLanes];
        for (int64_t j = 0; j < kLanes; ++j) {
          lanes[j] = coef(done + j) * pow_abs_grad<P>(x[done + j], p);
        }
        stream_store(y + done, lanes);
      }
    }
  }
#endif
#pragma omp simd
  for (int64_t i = done; i < len; ++i) y[i] = coef(i) * pow_abs_grad<P>(x[i], p);
}

// Backward, NCHW. Task t is the row (n, c).
template <int P, typename T, Isa isa>
GS_INLINE void backward_nchw(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.c, HW = a.s.hw;
  for (int64_t t = begin; t < end; ++t) {
    const T* g = a.grad_maps + (t / C) * HW;
    backward_row<P, T, isa>(a.f + t * HW, a.out + t * HW, HW, a.p, a.streaming,
                            [&](int64_t i) { return g[i] * a.scale; });
  }
  fence_streaming<isa>(a.streaming);
}

// Backward, NHWC. Task t is one pixel.
template <int P, typename T, Isa isa>
GS_INLINE void backward_nhwc(const Args<T>& a, int64_t begin, int64_t end) {
  const int64_t C = a.s.c;
  for (int64_t t = begin; t < end; ++t) {
    const T g = a.grad_maps[t] * a.scale;
    backward_row<P, T, isa>(a.f + t * C, a.out + t * C, C, a.p, a.streaming,
                            [&](int64_t) { return g; });
  }
  fence_streaming<isa>(a.streaming);
}

// Pixel block of the NCHW forward: as large as L1 allows, yet small enough that every thread
// gets at least two tasks.
template <typename T>
int64_t forward_block(const FeatureShape& s, int num_threads) {
  const int64_t want_tasks = 2 * static_cast<int64_t>(std::max(num_threads, 1));
  const int64_t blocks_per_sample = std::max<int64_t>(1, (want_tasks + s.n - 1) / s.n);
  int64_t block = (s.hw + blocks_per_sample - 1) / blocks_per_sample;
  block = (block + 15) / 16 * 16;
  return std::clamp<int64_t>(block, 16, kMaxBlock<T>);
}

}  // namespace

template <typename scalar_t>
void maps_forward_cpu(const scalar_t* f, scalar_t* maps, FeatureShape shape, double p, double scale,
                      int num_threads) {
  Args<scalar_t> a{f, nullptr, maps, shape, scalar_t(p), scalar_t(scale), 0, false};
  dispatch_exponent(p, [&](auto exponent) {
    constexpr int P = decltype(exponent)::value;
    if (shape.channels_last) {
      parallel_for(shape.n * shape.hw, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
        forward_nhwc<P, scalar_t, decltype(isa)::value>(a, begin, end);
      });
    } else {
      a.block = forward_block<scalar_t>(shape, num_threads);
      const int64_t tasks = shape.n * ((shape.hw + a.block - 1) / a.block);
      parallel_for(tasks, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
        forward_nchw<P, scalar_t, decltype(isa)::value>(a, begin, end);
      });
    }
  });
}

template <typename scalar_t>
void maps_backward_cpu(const scalar_t* grad_maps, const scalar_t* f, scalar_t* grad_f,
                       FeatureShape shape, double p, double scale, int num_threads) {
  const int64_t grad_bytes = shape.n * shape.c * shape.hw * int64_t(sizeof(scalar_t));
  const bool streaming = grad_bytes >= kStreamingBytes;
  const Args<scalar_t> a{f, grad_maps, grad_f, shape, scalar_t(p), scalar_t(scale), 0, streaming};
  dispatch_exponent(p, [&](auto exponent) {
    constexpr int P = decltype(exponent)::value;
    if (shape.channels_last) {
      parallel_for(shape.n * shape.hw, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
        backward_nhwc<P, scalar_t, decltype(isa)::value>(a, begin, end);
      });
    } else {
      parallel_for(shape.n * shape.c, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
        backward_nchw<P, scalar_t, decltype(isa)::value>(a, begin, end);
      });
    }
  });
}

template void maps_forward_cpu<float>(const float*, float*, FeatureShape, double, double, int);
template void maps_forward_cpu<double>(const double*, double*, FeatureShape, double, double, int);
template void maps_backward_cpu<float>(const float*, const float*, float*, FeatureShape, double,
                                       double, int);
template void maps_backward_cpu<double>(const double*, const double*, double*, FeatureShape,
                                        double, double, int);

}  // namespace attention
}  // namespace gansparse
