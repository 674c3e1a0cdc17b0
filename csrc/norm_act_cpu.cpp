// CPU kernels of the norm + mask + activation epilogue (declared in norm_act_kernels.h).
//
// Forward, NCHW: a task is one channel (batch statistics) or one (n, c) row (the other modes).
// It computes the statistics of its rows, then writes their output while they are still in
// cache, so y comes from memory once and the output is written once. Forward, NHWC: the
// statistics are column reductions, taken over pixel ranges in parallel and then merged; one
// more pass over the pixels writes the output, vectorised along the contiguous channels.
// The backward has the same structure: the GradSums of each (n, c) (see norm_act_math.h), then
// grad_y, with pre and xhat recomputed from y and the statistics rather than saved.
//
// Statistics stay accurate for any number of values: each chunk of values that fits in L1 is
// reduced in the input precision twice (its mean, then the deviations from that mean, corrected
// by their residual sum: the "corrected two-pass" algorithm), and the chunks are merged in double
// with Chan's formula. The backward sums each chunk in the input precision and the chunks in
// double.
//
// The loops are compiled for AVX2+FMA and for baseline x86-64, and the CPU picks one at run
// time. The thread team is OpenMP, sized by the caller.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "norm_act_kernels.h"

namespace gansparse {
namespace norm_act {
namespace {

#define GS_INLINE inline __attribute__((always_inline))

// NCHW: values of a row per statistics chunk (8 KB of floats).
constexpr int64_t kRowChunk = 2048;
// NHWC: values (pixels x channels) per chunk of a column reduction.
constexpr int64_t kTileValues = 4096;
// NHWC: a column reduction is split into at least this many pixel ranges, so that the split,
// and with it the rounding of the result, is the same for any thread count up to kMinRanges / 2.
constexpr int64_t kMinRanges = 8;

template <typename T>
struct Problem {
  const T* y;
  const T* grad_out;  // backward only
  T* out;             // out (forward), or grad_y (backward; null when not asked for)
  Shape s;
  Epilogue<T> e;
  Stats stats;
  T slope;
};

// --- grouping ------------------------------------------------------------------------------

// Samples that share statistics: all of them for 'batch', one for the other modes (whose
// statistics, if any, are per sample or fixed).
int64_t samples_per_group(const Shape& s, Stats stats) { return stats == Stats::kBatch ? s.n : 1; }

// Channel c of the samples [n0, n1) of one group. Task t = group * C + c, so with one sample per
// group the tasks are the NCHW rows in memory order, and the statistics index of (group, c) is t.
struct RowGroup {
  int64_t c;
  int64_t n0;
  int64_t n1;
};

RowGroup row_group(const Shape& s, int64_t per_group, int64_t task) {
  const int64_t group = task / s.c;
  return {task % s.c, group * per_group, (group + 1) * per_group};
}

// NHWC: pixels per chunk of a column reduction.
int64_t tile_pixels(const Shape& s) { return std::max<int64_t>(1, kTileValues / s.c); }

// NHWC: a column reduction over each group's pixels is split into this many ranges per group:
// enough for every thread, but none shorter than a tile.
int64_t ranges_per_group(int64_t groups, int64_t group_pixels, int64_t tile, int num_threads) {
  const int64_t wanted = std::max<int64_t>(kMinRanges, 2 * static_cast<int64_t>(num_threads));
  return std::clamp<int64_t>((wanted + groups - 1) / groups, 1, (group_pixels + tile - 1) / tile);
}

// Task t = group * ranges + range of an NHWC column reduction: pixels [begin, end).
struct PixelRange {
  int64_t begin;
  int64_t end;
};

PixelRange pixel_range(int64_t group_pixels, int64_t ranges, int64_t task) {
  const int64_t group_start = task / ranges * group_pixels;
  const int64_t r = task % ranges;
  return {group_start + r * group_pixels / ranges, group_start + (r + 1) * group_pixels / ranges};
}

// --- statistics ----------------------------------------------------------------------------

// The moments of a chunk of `count` values from the sums of their deviations d from `shift`;
// the residual sum(d) corrects both the mean and m2.
template <typename T>
GS_INLINE Moments<double> chunk_moments(int64_t count, T shift, T dev, T sq) {
  const double n = static_cast<double>(count), d = dev;
  return {n, shift + d / n, sq - d * d / n};
}

template <typename T>
GS_INLINE Moments<double> row_moments(const T* x, int64_t len) {
  Moments<double> total{0, 0, 0};
  for (int64_t start = 0; start < len; start += kRowChunk) {
    const int64_t count = std::min(kRowChunk, len - start);
    const T* chunk = x + start;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < count; ++i) sum += chunk[i];
    const T shift = sum / static_cast<T>(count);
    T dev = 0, sq = 0;
#pragma omp simd reduction(+ : dev, sq)
    for (int64_t i = 0; i < count; ++i) {
      const T d = chunk[i] - shift;
      dev += d;
      sq += d * d;
    }
    total = merge(total, chunk_moments(count, shift, dev, sq));
  }
  return total;
}

// NHWC statistics: each task reduces a pixel range of one group tile by tile into per-channel
// moments; the ranges of a group are merged afterwards.
template <typename T>
void nhwc_statistics(const Problem<T>& p, T* mean_out, T* invstd_out, double eps, int num_threads) {
  const Shape s = p.s;
  const int64_t groups = s.n / samples_per_group(s, p.stats);
  const int64_t group_pixels = s.n / groups * s.hw;
  const int64_t tile = tile_pixels(s);
  const int64_t ranges = ranges_per_group(groups, group_pixels, tile, num_threads);
  std::vector<Moments<double>> partial(groups * ranges * s.c, Moments<double>{0, 0, 0});  // [G, R, C]
  parallel_for(groups * ranges, num_threads, [&](int64_t begin, int64_t end, auto) GS_INLINE_LAMBDA {
    const int64_t C = s.c;
    std::vector<T> buffers(3 * C);
    T* shift = buffers.data();
    T* dev = shift + C;
    T* sq = dev + C;
    for (int64_t task = begin; task < end; ++task) {
      const PixelRange range = pixel_range(group_pixels, ranges, task);
      Moments<double>* acc = partial.data() + task * C;
      for (int64_t first = range.begin; first < range.end; first += tile) {
        const int64_t count = std::min(tile, range.end - first);
        const T* x = p.y + first * C;  // [count, C]
        std::fill(buffers.begin(), buffers.end(), T(0));
        for (int64_t q = 0; q < count; ++q) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) shift[c] += x[q * C + c];
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) shift[c] /= static_cast<T>(count);
        for (int64_t q = 0; q < count; ++q) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d = x[q * C + c] - shift[c];
            dev[c] += d;
            sq[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) acc[c] = merge(acc[c], chunk_moments(count, shift[c], dev[c], sq[c]));
      }
    }
  });
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < s.c; ++c) {
      Moments<double> m = partial[g * ranges * s.c + c];
      for (int64_t r = 1; r < ranges; ++r) m = merge(m, partial[(g * ranges + r) * s.c + c]);
      mean_out[g * s.c + c] = static_cast<T>(m.mean);
      invstd_out[g * s.c + c] = static_cast<T>(inverse_std(m, eps));
    }
  }
}

// --- NHWC coefficient tables ---------------------------------------------------------------

// One sample's row of a CoefTable. The loops along the channels read its fields directly: GCC
// does not vectorise an `omp simd` loop that calls a member function of a local struct.
template <typename T>
struct CoefRow {
  const T* center;
  const T* invstd;
  const T* scale;
  const T* shift;
};

// The Coef of every (n, c) as arrays [N, C], for the loops along NHWC's contiguous channels.
template <typename T>
struct CoefTable {
  int64_t channels;
  std::vector<T> center, invstd, scale, shift;

  CoefTable(const Epilogue<T>& e, const Shape& s)
      : channels(s.c), center(s.n * s.c), invstd(s.n * s.c), scale(s.n * s.c), shift(s.n * s.c) {
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t c = 0; c < s.c; ++c) {
        const Coef<T> k = e.coef(n, c);
        const int64_t i = n * s.c + c;
        center[i] = k.center;
        invstd[i] = k.invstd;
        scale[i] = k.scale;
        shift[i] = k.shift;
      }
    }
  }

  CoefRow<T> row(int64_t n) const {
    const int64_t i = n * channels;
    return {center.data() + i, invstd.data() + i, scale.data() + i, shift.data() + i};
  }
};

template <typename T>
struct GradCoefRow {
  const T* grad_scale;
  const T* xhat_scale;
  const T* offset;
};

// The GradCoef of every (n, c) as arrays [N, C].
template <typename T>
struct GradCoefTable {
  int64_t channels;
  std::vector<T> grad_scale, xhat_scale, offset;

  explicit GradCoefTable(const Shape& s)
      : channels(s.c), grad_scale(s.n * s.c), xhat_scale(s.n * s.c), offset(s.n * s.c) {}

  void set(int64_t n, int64_t c, const GradCoef<T>& gk) {
    grad_scale[n * channels + c] = gk.grad_scale;
    xhat_scale[n * channels + c] = gk.xhat_scale;
    offset[n * channels + c] = gk.offset;
  }

  GradCoefRow<T> row(int64_t n) const {
    const int64_t i = n * channels;
    return {grad_scale.data() + i, xhat_scale.data() + i, offset.data() + i};
  }
};

// --- forward -------------------------------------------------------------------------------

template <Activation A, typename T>
void forward_nchw(const Problem<T>& p, T* mean_out, T* invstd_out, double eps, int num_threads) {
  const Shape s = p.s;
  const int64_t per_group = samples_per_group(s, p.stats);
  parallel_for(s.n / per_group * s.c, num_threads, [&](int64_t begin, int64_t end, auto) GS_INLINE_LAMBDA {
    const int64_t HW = s.hw;
    const T slope = p.slope;
    for (int64_t task = begin; task < end; ++task) {
      const RowGroup r = row_group(s, per_group, task);
      if (computes_stats(p.stats)) {
        Moments<double> m{0, 0, 0};
        for (int64_t n = r.n0; n < r.n1; ++n) m = merge(m, row_moments(p.y + (n * s.c + r.c) * s.hw, s.hw));
        mean_out[task] = static_cast<T>(m.mean);
        invstd_out[task] = static_cast<T>(inverse_std(m, eps));
      }
      // The rows are still in cache from the statistics.
      for (int64_t n = r.n0; n < r.n1; ++n) {
        const Coef<T> k = p.e.coef(n, r.c);
        const T* y = p.y + (n * s.c + r.c) * HW;
        T* out = p.out + (n * s.c + r.c) * HW;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) out[i] = forward_value<A>(y[i], k, slope);
      }
    }
  });
}

template <Activation A, typename T>
void forward_nhwc(const Problem<T>& p, int num_threads) {
  const Shape s = p.s;
  const CoefTable<T> table(p.e, s);
  parallel_for(s.n * s.hw, num_threads, [&](int64_t begin, int64_t end, auto) GS_INLINE_LAMBDA {
    const int64_t C = s.c;
    const T slope = p.slope;
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const CoefRow<T> k = table.row(pixel / s.hw);
      const T* y = p.y + pixel * C;
      T* out = p.out + pixel * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        out[c] = forward_value<A>(y[c], Coef<T>{k.center[c], k.invstd[c], k.scale[c], k.shift[c]}, slope);
      }
    }
  });
}

// --- backward ------------------------------------------------------------------------------

template <Activation A, typename T>
GS_INLINE GradSums<T> row_grad_sums(const T* grad_out, const T* y, const Coef<T>& k, T slope, int64_t len) {
  GradSums<double> total{0, 0};
  for (int64_t start = 0; start < len; start += kRowChunk) {
    const int64_t end = std::min(len, start + kRowChunk);
    T g = 0, g_xhat = 0;
#pragma omp simd reduction(+ : g, g_xhat)
    for (int64_t i = start; i < end; ++i) {
      const GradSums<T> t = grad_terms<A>(y[i], grad_out[i], k, slope);
      g += t.g;
      g_xhat += t.g_xhat;
    }
    total.g += g;
    total.g_xhat += g_xhat;
  }
  return {static_cast<T>(total.g), static_cast<T>(total.g_xhat)};
}

// NHWC GradSums [N, C]: each task sums a pixel range of one sample tile by tile; the ranges of
// a sample are added afterwards.
template <Activation A, typename T>
std::vector<GradSums<T>> nhwc_grad_sums(const Problem<T>& p, const CoefTable<T>& table, int num_threads) {
  const Shape s = p.s;
  const int64_t tile = tile_pixels(s);
  const int64_t ranges = ranges_per_group(s.n, s.hw, tile, num_threads);
  std::vector<GradSums<double>> partial(s.n * ranges * s.c, GradSums<double>{0, 0});  // [N, R, C]
  parallel_for(s.n * ranges, num_threads, [&](int64_t begin, int64_t end, auto) GS_INLINE_LAMBDA {
    const int64_t C = s.c;
    std::vector<T> buffers(2 * C);
    T* g = buffers.data();
    T* g_xhat = g + C;
    const T slope = p.slope;
    for (int64_t task = begin; task < end; ++task) {
      const PixelRange range = pixel_range(s.hw, ranges, task);
      const CoefRow<T> k = table.row(task / ranges);
      GradSums<double>* acc = partial.data() + task * C;
      for (int64_t first = range.begin; first < range.end; first += tile) {
        const int64_t count = std::min(tile, range.end - first);
        const T* y = p.y + first * C;  // [count, C]
        const T* grad_out = p.grad_out + first * C;
        std::fill(buffers.begin(), buffers.end(), T(0));
        for (int64_t q = 0; q < count; ++q) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const GradSums<T> t = grad_terms<A>(y[q * C + c], grad_out[q * C + c],
                                                Coef<T>{k.center[c], k.invstd[c], k.scale[c], k.shift[c]}, slope);
            g[c] += t.g;
            g_xhat[c] += t.g_xhat;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          acc[c].g += g[c];
          acc[c].g_xhat += g_xhat[c];
        }
      }
    }
  });
  std::vector<GradSums<T>> sums(s.n * s.c);
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t c = 0; c < s.c; ++c) {
      GradSums<double> total{0, 0};
      for (int64_t r = 0; r < ranges; ++r) total = merge(total, partial[(n * ranges + r) * s.c + c]);
      sums[n * s.c + c] = {static_cast<T>(total.g), static_cast<T>(total.g_xhat)};
    }
  }
  return sums;
}

// mean_R(dxhat) and mean_R(dxhat * xhat) of a group; not needed unless the statistics were computed.
template <typename T>
GS_INLINE GradSums<T> group_mean_dxhat(const Problem<T>& p, const std::vector<GradSums<T>>& sums,
                                       const RowGroup& r) {
  if (!computes_stats(p.stats)) return {T(0), T(0)};
  const T count = static_cast<T>((r.n1 - r.n0) * p.s.hw);
  return mean_dxhat_terms(p.e, sums.data(), p.s.c, r.n0, r.n1, r.c, count);
}

template <typename T>
void write_param_grads(const Problem<T>& p, const std::vector<GradSums<T>>& sums, const ParamGrads<T>& grads) {
  for (int64_t c = 0; c < p.s.c; ++c) {
    param_grads(p.e, sums.data(), p.s.c, p.s.n, c, grads.mask, grads.gamma, grads.beta);
  }
}

bool needs_sums(Stats stats, bool param_grads) { return computes_stats(stats) || param_grads; }

template <Activation A, typename T>
void backward_nchw(const Problem<T>& p, const ParamGrads<T>& grads, int num_threads) {
  const Shape s = p.s;
  const bool with_sums = needs_sums(p.stats, grads.any());
  std::vector<GradSums<T>> sums(with_sums ? s.n * s.c : 0);  // [N, C]
  const int64_t per_group = samples_per_group(s, p.stats);
  parallel_for(s.n / per_group * s.c, num_threads, [&](int64_t begin, int64_t end, auto) GS_INLINE_LAMBDA {
    const int64_t HW = s.hw;
    const T slope = p.slope;
    for (int64_t task = begin; task < end; ++task) {
      const RowGroup r = row_group(s, per_group, task);
      if (with_sums) {
        for (int64_t n = r.n0; n < r.n1; ++n) {
          const int64_t row = (n * s.c + r.c) * HW;
          sums[n * s.c + r.c] = row_grad_sums<A>(p.grad_out + row, p.y + row, p.e.coef(n, r.c), slope, HW);
        }
      }
      if (p.out == nullptr) continue;
      // The rows are still in cache from the sums.
      const GradSums<T> mean_dxhat = group_mean_dxhat(p, sums, r);
      for (int64_t n = r.n0; n < r.n1; ++n) {
        const Coef<T> k = p.e.coef(n, r.c);
        const GradCoef<T> gk = input_grad_coef(p.e, p.stats, mean_dxhat, n, r.c);
        const int64_t row = (n * s.c + r.c) * HW;
        const T* y = p.y + row;
        const T* grad_out = p.grad_out + row;
        T* grad_y = p.out + row;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) grad_y[i] = input_grad<A>(y[i], grad_out[i], k, gk, slope);
      }
    }
  });
  if (grads.any()) write_param_grads(p, sums, grads);
}

template <Activation A, typename T>
void backward_nhwc(const Problem<T>& p, const ParamGrads<T>& grads, int num_threads) {
  const Shape s = p.s;
  const CoefTable<T> table(p.e, s);
  std::vector<GradSums<T>> sums;  // [N, C]
  if (needs_sums(p.stats, grads.any())) sums = nhwc_grad_sums<A>(p, table, num_threads);
  if (p.out != nullptr) {
    GradCoefTable<T> grad_table(s);
    const int64_t per_group = samples_per_group(s, p.stats);
    for (int64_t task = 0; task < s.n / per_group * s.c; ++task) {
      const RowGroup r = row_group(s, per_group, task);
      const GradSums<T> mean_dxhat = group_mean_dxhat(p, sums, r);
      for (int64_t n = r.n0; n < r.n1; ++n) grad_table.set(n, r.c, input_grad_coef(p.e, p.stats, mean_dxhat, n, r.c));
    }
    parallel_for(s.n * s.hw, num_threads, [&](int64_t begin, int64_t end, auto) GS_INLINE_LAMBDA {
      const int64_t C = s.c;
      const T slope = p.slope;
      for (int64_t pixel = begin; pixel < end; ++pixel) {
        const CoefRow<T> k = table.row(pixel / s.hw);
        const GradCoefRow<T> gk = grad_table.row(pixel / s.hw);
        const T* y = p.y + pixel * C;
        const T* grad_out = p.grad_out + pixel * C;
        T* grad_y = p.out + pixel * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          grad_y[c] = input_grad<A>(y[c], grad_out[c], Coef<T>{k.center[c], k.invstd[c], k.scale[c], k.shift[c]},
                                    GradCoef<T>{gk.grad_scale[c], gk.xhat_scale[c], gk.offset[c]}, slope);
        }
      }
    });
  }
  if (grads.any()) write_param_grads(p, sums, grads);
}

}  // namespace

template <typename scalar_t>
void forward_cpu(const scalar_t* y, scalar_t* out, Shape shape, Epilogue<scalar_t> e, Stats stats,
                 scalar_t* mean_out, scalar_t* invstd_out, double eps, Activation activation,
                 double negative_slope, int num_threads) {
  if (computes_stats(stats)) {
    e.mean = mean_out;
    e.invstd = invstd_out;
  }
  const Problem<scalar_t> p{y, nullptr, out, shape, e, stats, static_cast<scalar_t>(negative_slope)};
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    if (shape.channels_last) {
      if (computes_stats(stats)) nhwc_statistics(p, mean_out, invstd_out, eps, num_threads);
      forward_nhwc<A>(p, num_threads);
    } else {
      forward_nchw<A>(p, mean_out, invstd_out, eps, num_threads);
    }
  });
}

template <typename scalar_t>
void backward_cpu(const scalar_t* grad_out, const scalar_t* y, scalar_t* grad_y, Shape shape,
                  Epilogue<scalar_t> e, Stats stats, Activation activation, double negative_slope,
                  ParamGrads<scalar_t> grads, int num_threads) {
  const Problem<scalar_t> p{y, grad_out, grad_y, shape, e, stats, static_cast<scalar_t>(negative_slope)};
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    if (shape.channels_last) {
      backward_nhwc<A>(p, grads, num_threads);
    } else {
      backward_nchw<A>(p, grads, num_threads);
    }
  });
}

#define GS_INSTANTIATE(T)                                                                              \
  template void forward_cpu<T>(const T*, T*, Shape, Epilogue<T>, Stats, T*, T*, double, Activation, \
                               double, int);                                                         \
  template void backward_cpu<T>(const T*, const T*, T*, Shape, Epilogue<T>, Stats, Activation, double, \
                                ParamGrads<T>, int);
GS_INSTANTIATE(float)
GS_INSTANTIATE(double)

}  // namespace norm_act
}  // namespace gansparse
