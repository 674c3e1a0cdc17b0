// CPU kernels of StyleGAN2's ops (declared in stylegan2_ops_kernels.h).
//
// upfirdn2d, NCHW: a task is one output row of one channel. Its vertical taps come from taps_of;
// horizontally, for each kernel column the output columns that read an input sample form an
// arithmetic progression, and so do the input columns they read, so the row is accumulated one
// kernel tap at a time over contiguous (or evenly strided) runs, which the compiler vectorises.
// The progressions depend only on the column tap, so they are computed once per call.
// upfirdn2d, NHWC: a task is one output row of one sample; every tap adds a weighted input pixel,
// a contiguous vector of channels, to the output pixel.
// Bias-act: one pass over contiguous rows, forward and backward; the bias gradient is reduced
// from per-task partial sums in a fixed order, so it does not depend on the thread count.
//
// Loop bodies are compiled for AVX2+FMA and for baseline x86-64 and picked at run time
// (cpu_parallel.h).

// The leaky ReLU's slope is a select on z > 0, which GCC keeps as a branch (no vectorisation)
// while it must assume that the comparison may raise a floating-point exception. Nothing here
// reads the exception flags, so this file tells it not to; the results are the same.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpu_parallel.h"
#include "stylegan2_ops_kernels.h"

namespace gansparse {
namespace stylegan2 {
namespace {

#define GS_INLINE inline __attribute__((always_inline))

// The output columns o = start + s * step, s in [0, count), read input column
// first + s * input_step against one kernel column.
struct ColumnRun {
  int64_t start;
  int64_t step;
  int64_t first;
  int64_t input_step;
  int64_t count;
};

// The run of kernel column index `kx` (the tap t = taps - 1 - kx of the true convolution).
ColumnRun column_run(const Axis& a, int64_t kx) {
  const int64_t t = a.taps - 1 - kx;
  const int64_t step = a.up / std::gcd(a.up, a.down);  // output columns between two that read samples
  const int64_t input_step = step * a.down / a.up;
  // The first output column (mod step) whose position o * down + t - pad0 is a multiple of up.
  int64_t start = -1;
  for (int64_t r = 0; r < step && start < 0; ++r) {
    if ((((r * a.down + t - a.pad0) % a.up) + a.up) % a.up == 0) start = r;
  }
  if (start < 0) return {0, 1, 0, 0, 0};
  const int64_t first = floor_div(start * a.down + t - a.pad0, a.up);  // exact
  // Keep s with 0 <= first + s * input_step < in and start + s * step < out.
  const int64_t s_begin = first < 0 ? floor_div(-first + input_step - 1, input_step) : 0;
  const int64_t s_end = std::min(floor_div(a.in - 1 - first, input_step), floor_div(a.out - 1 - start, step)) + 1;
  if (s_end <= s_begin) return {0, 1, 0, 0, 0};
  return {start + s_begin * step, step, first + s_begin * input_step, input_step, s_end - s_begin};
}

template <typename T, Isa>
GS_INLINE void upfirdn_rows_nchw(const T* x, const T* kernel, T* out, const ResampleShape& s,
                                 const std::vector<ColumnRun>& runs, int64_t begin, int64_t end) {
  const int64_t H = s.y.in, W = s.x.in, OH = s.y.out, OW = s.x.out, KW = s.x.taps;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t plane = task / OH, oy = task % OH;
    T* row = out + task * OW;
    std::fill(row, row + OW, T(0));
    const TapRange ty = taps_of(s.y, oy);
    for (int64_t j = 0; j < ty.count; ++j) {
      const T* in_row = x + (plane * H + ty.first + j) * W;
      const T* k_row = kernel + (ty.kernel - j * s.y.up) * KW;
      for (int64_t kx = 0; kx < KW; ++kx) {
        const ColumnRun& r = runs[kx];
        const T w = k_row[kx];
        T* o = row + r.start;
        const T* i = in_row + r.first;
        if (r.step == 1 && r.input_step == 1) {
#pragma omp simd
          for (int64_t c = 0; c < r.count; ++c) o[c] += w * i[c];
        } else {
          for (int64_t c = 0; c < r.count; ++c) o[c * r.step] += w * i[c * r.input_step];
        }
      }
    }
  }
}

template <typename T, Isa>
GS_INLINE void upfirdn_rows_nhwc(const T* x, const T* kernel, T* out, const ResampleShape& s, int64_t begin,
                                 int64_t end) {
  const int64_t C = s.c, H = s.y.in, W = s.x.in, OH = s.y.out, OW = s.x.out, KW = s.x.taps;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / OH, oy = task % OH;
    const TapRange ty = taps_of(s.y, oy);
    for (int64_t ox = 0; ox < OW; ++ox) {
      T* px = out + (task * OW + ox) * C;
      std::fill(px, px + C, T(0));
      const TapRange tx = taps_of(s.x, ox);
      for (int64_t j = 0; j < ty.count; ++j) {
        const T* in_row = x + ((n * H + ty.first + j) * W + tx.first) * C;
        const T* k_row = kernel + (ty.kernel - j * s.y.up) * KW + tx.kernel;
        for (int64_t i = 0; i < tx.count; ++i) {
          const T w = k_row[-i * s.x.up];
          const T* in = in_row + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) px[c] += w * in[c];
        }
      }
    }
  }
}

// Bias-act rows: a row is `len` values of one channel (NCHW-like) or the C channels of one
// position (channels_last).
template <typename T, Isa>
GS_INLINE void bias_act_rows(const T* x, const T* bias, T* out, const ChannelShape& s, T slope, T scale,
                             int64_t begin, int64_t end) {
  const int64_t len = s.channels_last ? s.c : s.inner;
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * len;
    T* yr = out + r * len;
    if (s.channels_last && bias != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) yr[i] = leaky_relu_scaled(xr[i] + bias[i], slope, scale);
    } else if (s.channels_last) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) yr[i] = leaky_relu_scaled(xr[i], slope, scale);
    } else {
      const T b = bias ? bias[r % s.c] : T(0);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) yr[i] = leaky_relu_scaled(xr[i] + b, slope, scale);
    }
  }
}

// Backward over rows [begin, end); with `partial` (per-channel sums of grad_x over these rows,
// zeroed by the caller: [C] for channels_last, one value per row otherwise).
template <typename T, Isa>
GS_INLINE void bias_act_backward_rows(const T* grad_out, const T* x, const T* bias, T* grad_x,
                                      const ChannelShape& s, T slope, T scale, T* partial, int64_t begin,
                                      int64_t end) {
  const int64_t len = s.channels_last ? s.c : s.inner;
  for (int64_t r = begin; r < end; ++r) {
    const T* g = grad_out + r * len;
    const T* xr = x + r * len;
    T* gx = grad_x + r * len;
    if (s.channels_last) {
      if (bias != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) gx[i] = g[i] * leaky_relu_scaled_grad(xr[i] + bias[i], slope, scale);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) gx[i] = g[i] * leaky_relu_scaled_grad(xr[i], slope, scale);
      }
      if (partial) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) partial[i] += gx[i];
      }
    } else {
      const T b = bias ? bias[r % s.c] : T(0);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < len; ++i) {
        gx[i] = g[i] * leaky_relu_scaled_grad(xr[i] + b, slope, scale);
        sum += gx[i];
      }
      if (partial) partial[r] = sum;
    }
  }
}

int64_t rows_of(const ChannelShape& s) { return s.channels_last ? s.outer * s.inner : s.outer * s.c; }

// Channels-last rows are reduced in this many fixed blocks (independent of the thread count).
constexpr int64_t kReductionBlocks = 64;

}  // namespace

template <typename scalar_t>
void upfirdn2d_cpu(const scalar_t* x, const scalar_t* kernel, scalar_t* out, ResampleShape s, int num_threads) {
  if (s.channels_last) {
    parallel_for(s.n * s.y.out, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
      upfirdn_rows_nhwc<scalar_t, decltype(isa)::value>(x, kernel, out, s, begin, end);
    });
    return;
  }
  std::vector<ColumnRun> runs(s.x.taps);
  for (int64_t kx = 0; kx < s.x.taps; ++kx) runs[kx] = column_run(s.x, kx);
  parallel_for(s.n * s.c * s.y.out, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
    upfirdn_rows_nchw<scalar_t, decltype(isa)::value>(x, kernel, out, s, runs, begin, end);
  });
}

template <typename scalar_t>
void bias_act_forward_cpu(const scalar_t* x, const scalar_t* bias, scalar_t* out, ChannelShape s,
                          double negative_slope, double scale, int num_threads) {
  parallel_for(rows_of(s), num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
    bias_act_rows<scalar_t, decltype(isa)::value>(x, bias, out, s, scalar_t(negative_slope), scalar_t(scale),
                                                  begin, end);
  });
}

template <typename scalar_t>
void bias_act_backward_cpu(const scalar_t* grad_out, const scalar_t* x, const scalar_t* bias, scalar_t* grad_x,
                           scalar_t* grad_bias, ChannelShape s, double negative_slope, double scale,
                           int num_threads) {
  const int64_t rows = rows_of(s);
  const scalar_t slope = scalar_t(negative_slope), gain = scalar_t(scale);
  if (grad_bias == nullptr) {
    parallel_for(rows, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
      bias_act_backward_rows<scalar_t, decltype(isa)::value>(grad_out, x, bias, grad_x, s, slope, gain, nullptr,
                                                             begin, end);
    });
    return;
  }
  std::vector<double> total(s.c, 0.0);
  if (s.channels_last) {
    const int64_t blocks = std::min(rows, kReductionBlocks);
    std::vector<scalar_t> partial(blocks * s.c, scalar_t(0));
    parallel_for(blocks, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
      for (int64_t b = begin; b < end; ++b) {
        bias_act_backward_rows<scalar_t, decltype(isa)::value>(grad_out, x, bias, grad_x, s, slope, gain,
                                                               partial.data() + b * s.c, rows * b / blocks,
                                                               rows * (b + 1) / blocks);
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < s.c; ++c) total[c] += partial[b * s.c + c];
    }
  } else {
    std::vector<scalar_t> partial(rows);
    parallel_for(rows, num_threads, [&](int64_t begin, int64_t end, auto isa) GS_INLINE_LAMBDA {
      bias_act_backward_rows<scalar_t, decltype(isa)::value>(grad_out, x, bias, grad_x, s, slope, gain,
                                                             partial.data(), begin, end);
    });
    for (int64_t r = 0; r < rows; ++r) total[r % s.c] += partial[r];
  }
  for (int64_t c = 0; c < s.c; ++c) grad_bias[c] = scalar_t(total[c]);
}

#define GS_INSTANTIATE(T)                                                                                 \
  template void upfirdn2d_cpu<T>(const T*, const T*, T*, ResampleShape, int);                             \
  template void bias_act_forward_cpu<T>(const T*, const T*, T*, ChannelShape, double, double, int);      \
  template void bias_act_backward_cpu<T>(const T*, const T*, const T*, T*, T*, ChannelShape, double, double, \
                                         int);
GS_INSTANTIATE(float)
GS_INSTANTIATE(double)

}  // namespace stylegan2
}  // namespace gansparse
