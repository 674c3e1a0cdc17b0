// CUDA kernels of the norm + mask + activation epilogue (declared in norm_act_kernels.h). The
// math is norm_act_math.h, the same code the CPU kernels run.
//
// Forward: a reduction kernel computes Welford moments per (group, channel), a small kernel turns
// them into mean and invstd, and an elementwise kernel writes the output. Backward: a reduction
// kernel computes the GradSums of each (n, c), a per-channel kernel turns them into the GradCoefs
// of grad_y and the parameter gradients, and an elementwise kernel writes grad_y.
//
// Reductions, NCHW: one block per (group, channel). Its threads stride over the group's rows
// (threadIdx.y) and along each contiguous row (threadIdx.x), so warps read contiguous memory;
// the threads' states are combined with warp shuffles, then across warps in shared memory.
// Reductions, NHWC: a tiled column reduction. A block covers 32 consecutive channels, one per
// lane, so a warp reads 32 contiguous values of a pixel, and one range of a group's pixels, which
// its rows of threads stride over; there are enough ranges to fill the GPU, merged afterwards.
// Elementwise kernels view the tensor as [rows, cols] with contiguous rows (NCHW: (n, c) x HW;
// NHWC: pixels x C) and grid-stride over both. Indexing is 64-bit throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_convert.cuh"
#include "norm_act_kernels.h"
#include "norm_act_math.h"

namespace gansparse {
namespace norm_act {
namespace {

constexpr int kThreads = 256;            // threads per block
constexpr int kLanes = 32;               // NHWC reductions: channels per block
constexpr int kRowsPerBlock = 8;         // NHWC reductions: pixels a block reads at once
constexpr int64_t kMinPixelsPerThread = 16;
constexpr int64_t kTargetBlocks = 1024;  // NHWC reductions: enough blocks to fill any current GPU
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest
constexpr int64_t kMaxElementwiseBlocks = 8192;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --- block-level reductions ----------------------------------------------------------------

template <typename T>
__device__ __forceinline__ Moments<T> shuffle_down(const Moments<T>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.count, offset), __shfl_down_sync(kFullMask, s.mean, offset),
          __shfl_down_sync(kFullMask, s.m2, offset)};
}

template <typename T>
__device__ __forceinline__ GradSums<T> shuffle_down(const GradSums<T>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.g, offset), __shfl_down_sync(kFullMask, s.g_xhat, offset)};
}

template <typename State>
__device__ __forceinline__ State warp_reduce(State s) {
  for (int offset = kLanes / 2; offset > 0; offset /= 2) s = merge(s, shuffle_down(s, offset));
  return s;
}

// The merged state of every thread of the block (a multiple of 32 threads), valid in thread 0.
template <typename State>
__device__ State block_reduce(State s) {
  __shared__ State warp_states[kThreads / kLanes];
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = thread % kLanes, warp = thread / kLanes;
  const int warps = blockDim.x * blockDim.y / kLanes;
  s = warp_reduce(s);
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) s = warp_reduce(lane < warps ? warp_states[lane] : State{});
  __syncthreads();  // warp_states may be reused right away
  return s;
}

// --- what the reductions accumulate --------------------------------------------------------
// An op gives the State it accumulates, a per-(n, c) context computed once per row, and
// add(state, context, index) for one element.

template <typename T>
__device__ __forceinline__ void welford_add(Moments<T>& m, T x) {
  m.count += T(1);
  const T delta = x - m.mean;
  m.mean += delta / m.count;
  m.m2 += delta * (x - m.mean);
}

// Forward: the moments of y.
template <typename scalar_t>
struct MomentsOp {
  using acc_t = acc_type<scalar_t>;
  using State = Moments<acc_t>;
  struct Context {};

  const scalar_t* __restrict__ y;

  __device__ Context context(int64_t, int64_t) const { return {}; }
  __device__ void add(State& s, const Context&, int64_t i) const { welford_add(s, to_acc(y[i])); }
};

// Backward: the GradSums of each (n, c).
template <Activation A, typename scalar_t>
struct GradSumsOp {
  using acc_t = acc_type<scalar_t>;
  using State = GradSums<acc_t>;
  using Context = Coef<acc_t>;

  const scalar_t* __restrict__ y;
  const scalar_t* __restrict__ grad_out;
  Epilogue<acc_t> e;
  acc_t slope;

  __device__ Context context(int64_t n, int64_t c) const { return e.coef(n, c); }
  __device__ void add(State& s, const Context& k, int64_t i) const {
    s = merge(s, grad_terms<A>(to_acc(y[i]), to_acc(grad_out[i]), k, slope));
  }
};

// --- reduction kernels ---------------------------------------------------------------------
// Both reduce each (group, channel), a group being samples_per_group consecutive samples, into
// partial states [groups, ranges, C].

template <typename Op>
__global__ void reduce_nchw_kernel(Op op, Shape s, int64_t samples_per_group,
                                   typename Op::State* __restrict__ partials) {
  using State = typename Op::State;
  const int64_t tasks = s.n / samples_per_group * s.c;  // (group, channel)
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t c = task % s.c;
    const int64_t n0 = task / s.c * samples_per_group;
    State state{};
    for (int64_t n = n0 + threadIdx.y; n < n0 + samples_per_group; n += blockDim.y) {
      const typename Op::Context context = op.context(n, c);
      const int64_t row = (n * s.c + c) * s.hw;
      for (int64_t i = threadIdx.x; i < s.hw; i += blockDim.x) op.add(state, context, row + i);
    }
    state = block_reduce(state);
    if (threadIdx.x == 0 && threadIdx.y == 0) partials[task] = state;
  }
}

template <typename Op>
__global__ void reduce_nhwc_kernel(Op op, Shape s, int64_t samples_per_group, int64_t ranges,
                                   typename Op::State* __restrict__ partials) {
  using State = typename Op::State;
  __shared__ State rows[kRowsPerBlock][kLanes];
  const int64_t channel_tiles = ceil_div(s.c, kLanes);
  const int64_t group_pixels = samples_per_group * s.hw;
  const int64_t tasks = channel_tiles * (s.n / samples_per_group) * ranges;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t c = task % channel_tiles * kLanes + threadIdx.x;
    const int64_t range = task / channel_tiles;  // group * ranges + r
    const int64_t group_start = range / ranges * group_pixels;
    const int64_t begin = group_start + range % ranges * group_pixels / ranges;
    const int64_t end = group_start + (range % ranges + 1) * group_pixels / ranges;
    State state{};
    if (c < s.c) {
      // The sample changes at known pixels: no division per element.
      int64_t n = begin / s.hw;
      int64_t sample_end = (n + 1) * s.hw;
      typename Op::Context context = op.context(n, c);
      for (int64_t p = begin + threadIdx.y; p < end; p += blockDim.y) {
        if (p >= sample_end) {
          n = p / s.hw;
          sample_end = (n + 1) * s.hw;
          context = op.context(n, c);
        }
        op.add(state, context, p * s.c + c);
      }
    }
    rows[threadIdx.y][threadIdx.x] = state;
    __syncthreads();
    if (threadIdx.y == 0 && c < s.c) {
      for (int r = 1; r < kRowsPerBlock; ++r) state = merge(state, rows[r][threadIdx.x]);
      partials[range * s.c + c] = state;
    }
    __syncthreads();
  }
}

// Pixel ranges per group of an NHWC reduction: enough blocks for the GPU, but at least
// kMinPixelsPerThread pixels per thread.
int64_t nhwc_ranges(const Shape& s, int64_t groups) {
  const int64_t blocks_per_range = ceil_div(s.c, kLanes) * groups;
  const int64_t group_pixels = s.n / groups * s.hw;
  const int64_t most = std::max<int64_t>(1, group_pixels / (kRowsPerBlock * kMinPixelsPerThread));
  return std::clamp<int64_t>(ceil_div(kTargetBlocks, blocks_per_range), 1, most);
}

int64_t reduction_ranges(const Shape& s, int64_t groups) { return s.channels_last ? nhwc_ranges(s, groups) : 1; }

// Reduces every (group, channel) into partials [groups, ranges, C]; returns ranges.
template <typename Op>
int64_t launch_reduction(const Op& op, const Shape& s, int64_t groups, typename Op::State* partials,
                         cudaStream_t stream) {
  const int64_t samples_per_group = s.n / groups;
  const int64_t ranges = reduction_ranges(s, groups);
  if (s.channels_last) {
    const int64_t tasks = ceil_div(s.c, kLanes) * groups * ranges;
    reduce_nhwc_kernel<<<std::min(tasks, kMaxBlocks), dim3(kLanes, kRowsPerBlock), 0, stream>>>(
        op, s, samples_per_group, ranges, partials);
  } else {
    // Threads along a row, and rows of threads over the group's samples when rows are short.
    const int64_t x = std::min<int64_t>(kThreads, ceil_div(s.hw, kLanes) * kLanes);
    const int64_t y = std::max<int64_t>(1, std::min<int64_t>(kThreads / x, samples_per_group));
    reduce_nchw_kernel<<<std::min(groups * s.c, kMaxBlocks), dim3(x, y), 0, stream>>>(op, s, samples_per_group,
                                                                                       partials);
  }
  return ranges;
}

int64_t blocks_for(int64_t threads) { return std::min(ceil_div(threads, kThreads), kMaxBlocks); }

// --- per-(group, channel) and per-channel kernels ------------------------------------------

template <typename T>
__global__ void finish_moments_kernel(const Moments<T>* __restrict__ partials, int64_t groups, int64_t ranges,
                                      int64_t channels, T eps, T* __restrict__ mean, T* __restrict__ invstd) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < groups * channels;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / channels, c = i % channels;
    Moments<T> m = partials[g * ranges * channels + c];
    for (int64_t r = 1; r < ranges; ++r) m = merge(m, partials[(g * ranges + r) * channels + c]);
    mean[i] = m.mean;
    invstd[i] = inverse_std(m, eps);
  }
}

// One thread per channel: adds up the ranges of its GradSums (when there are sums), writes the
// GradCoefs [N, C] (when grad_coefs is not null) and the parameter gradients.
template <typename T>
__global__ void channel_backward_kernel(Epilogue<T> e, Stats stats, Shape s, GradSums<T>* __restrict__ sums,
                                        int64_t ranges, GradCoef<T>* __restrict__ grad_coefs, ParamGrads<T> grads) {
  const int64_t sums_sample_stride = ranges * s.c;  // the sums of (n, c) end up in range 0
  const int64_t samples_per_group = stats == Stats::kBatch ? s.n : 1;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < s.c; c += int64_t(gridDim.x) * blockDim.x) {
    if (sums != nullptr) {
      for (int64_t n = 0; n < s.n; ++n) {
        GradSums<T>& total = sums[n * sums_sample_stride + c];
        for (int64_t r = 1; r < ranges; ++r) total = merge(total, sums[(n * ranges + r) * s.c + c]);
      }
    }
    if (grad_coefs != nullptr) {
      for (int64_t n0 = 0; n0 < s.n; n0 += samples_per_group) {
        const int64_t n1 = n0 + samples_per_group;
        const GradSums<T> mean_dxhat =
            computes_stats(stats)
                ? mean_dxhat_terms(e, sums, sums_sample_stride, n0, n1, c, T(samples_per_group * s.hw))
                : GradSums<T>{T(0), T(0)};
        for (int64_t n = n0; n < n1; ++n) grad_coefs[n * s.c + c] = input_grad_coef(e, stats, mean_dxhat, n, c);
      }
    }
    if (grads.mask != nullptr || grads.gamma != nullptr || grads.beta != nullptr) {
      param_grads(e, sums, sums_sample_stride, s.n, c, grads.mask, grads.gamma, grads.beta);
    }
  }
}

// --- elementwise kernels -------------------------------------------------------------------

// Grid-strides over the [rows, cols] view of the tensor. context(n, c) is computed once per
// NCHW row, and per element for NHWC, whose channel changes along a row; then
// at(context, index) runs for the element.
template <typename ContextFn, typename At>
__device__ __forceinline__ void for_each_element(const Shape& s, ContextFn&& context, At&& at) {
  const int64_t rows = s.channels_last ? s.n * s.hw : s.n * s.c;
  const int64_t cols = s.channels_last ? s.c : s.hw;
  for (int64_t row = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; row < rows;
       row += int64_t(gridDim.y) * blockDim.y) {
    const int64_t n = s.channels_last ? row / s.hw : row / s.c;
    const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    const int64_t step = int64_t(gridDim.x) * blockDim.x;
    if (s.channels_last) {
      for (int64_t col = first; col < cols; col += step) at(context(n, col), row * cols + col);
    } else {
      const auto row_context = context(n, row % s.c);
      for (int64_t col = first; col < cols; col += step) at(row_context, row * cols + col);
    }
  }
}

struct Launch2d {
  dim3 grid;
  dim3 block;
};

Launch2d elementwise_launch(const Shape& s) {
  const int64_t rows = s.channels_last ? s.n * s.hw : s.n * s.c;
  const int64_t cols = s.channels_last ? s.c : s.hw;
  const int64_t x = std::min<int64_t>(kThreads, ceil_div(cols, kLanes) * kLanes);
  const int64_t y = kThreads / x;
  const int64_t grid_x = std::min<int64_t>(ceil_div(cols, x), kMaxElementwiseBlocks);
  const int64_t grid_y =
      std::min<int64_t>({ceil_div(rows, y), std::max<int64_t>(1, kMaxElementwiseBlocks / grid_x), 65535});
  return {dim3(grid_x, grid_y), dim3(x, y)};
}

// y and out may be the same tensor (the in-place op): no __restrict__.
template <Activation A, typename scalar_t>
__global__ void forward_kernel(const scalar_t* y, scalar_t* out, Shape s,
                               Epilogue<acc_type<scalar_t>> e, acc_type<scalar_t> slope) {
  using acc_t = acc_type<scalar_t>;
  for_each_element(
      s, [&](int64_t n, int64_t c) { return e.coef(n, c); },
      [&](const Coef<acc_t>& k, int64_t i) { out[i] = from_acc<scalar_t>(forward_value<A>(to_acc(y[i]), k, slope)); });
}

template <typename T>
struct ElementCoefs {
  Coef<T> forward;
  GradCoef<T> backward;
};

template <Activation A, typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                                scalar_t* __restrict__ grad_y, Shape s, Epilogue<acc_type<scalar_t>> e,
                                const GradCoef<acc_type<scalar_t>>* __restrict__ grad_coefs,
                                acc_type<scalar_t> slope) {
  using acc_t = acc_type<scalar_t>;
  for_each_element(
      s, [&](int64_t n, int64_t c) { return ElementCoefs<acc_t>{e.coef(n, c), grad_coefs[n * s.c + c]}; },
      [&](const ElementCoefs<acc_t>& k, int64_t i) {
        grad_y[i] = from_acc<scalar_t>(input_grad<A>(to_acc(y[i]), to_acc(grad_out[i]), k.forward, k.backward, slope));
      });
}

int64_t statistics_groups(const Shape& s, Stats stats) { return stats == Stats::kBatch ? 1 : s.n; }

bool needs_sums(Stats stats, bool param_grads) { return computes_stats(stats) || param_grads; }

size_t grad_sums_bytes(const Shape& s, Stats stats, bool param_grads, size_t acc_size) {
  if (!needs_sums(stats, param_grads)) return 0;
  return static_cast<size_t>(s.n * reduction_ranges(s, s.n) * s.c) * 2 * acc_size;
}

}  // namespace

size_t forward_workspace_bytes_cuda(Shape s, Stats stats, size_t acc_size) {
  if (!computes_stats(stats)) return 0;
  const int64_t groups = statistics_groups(s, stats);
  return static_cast<size_t>(groups * reduction_ranges(s, groups) * s.c) * 3 * acc_size;  // Moments
}

template <typename scalar_t>
cudaError_t forward_cuda(const scalar_t* y, scalar_t* out, Shape s, Epilogue<acc_type<scalar_t>> e, Stats stats,
                         acc_type<scalar_t>* mean_out, acc_type<scalar_t>* invstd_out, double eps,
                         Activation activation, double negative_slope, void* workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (computes_stats(stats)) {
    const int64_t groups = statistics_groups(s, stats);
    auto* partials = static_cast<Moments<acc_t>*>(workspace);
    const int64_t ranges = launch_reduction(MomentsOp<scalar_t>{y}, s, groups, partials, stream);
    finish_moments_kernel<<<blocks_for(groups * s.c), kThreads, 0, stream>>>(
        partials, groups, ranges, s.c, static_cast<acc_t>(eps), mean_out, invstd_out);
    e.mean = mean_out;
    e.invstd = invstd_out;
  }
  const Launch2d launch = elementwise_launch(s);
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    forward_kernel<A, scalar_t><<<launch.grid, launch.block, 0, stream>>>(y, out, s, e,
                                                                          static_cast<acc_t>(negative_slope));
  });
  return cudaGetLastError();
}

size_t backward_workspace_bytes_cuda(Shape s, Stats stats, bool param_grads, size_t acc_size) {
  return grad_sums_bytes(s, stats, param_grads, acc_size) + static_cast<size_t>(s.n * s.c) * 3 * acc_size;  // GradCoefs
}

template <typename scalar_t>
cudaError_t backward_cuda(const scalar_t* grad_out, const scalar_t* y, scalar_t* grad_y, Shape s,
                          Epilogue<acc_type<scalar_t>> e, Stats stats, Activation activation, double negative_slope,
                          ParamGrads<acc_type<scalar_t>> grads, void* workspace, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const acc_t slope = static_cast<acc_t>(negative_slope);
  const size_t sums_bytes = grad_sums_bytes(s, stats, grads.any(), sizeof(acc_t));
  auto* sums = sums_bytes > 0 ? static_cast<GradSums<acc_t>*>(workspace) : nullptr;
  auto* grad_coefs =
      grad_y != nullptr ? reinterpret_cast<GradCoef<acc_t>*>(static_cast<char*>(workspace) + sums_bytes) : nullptr;
  const Launch2d launch = elementwise_launch(s);
  dispatch_activation(activation, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const int64_t ranges =
        sums != nullptr ? launch_reduction(GradSumsOp<A, scalar_t>{y, grad_out, e, slope}, s, s.n, sums, stream) : 1;
    channel_backward_kernel<<<blocks_for(s.c), kThreads, 0, stream>>>(e, stats, s, sums, ranges, grad_coefs, grads);
    if (grad_y != nullptr) {
      backward_kernel<A, scalar_t><<<launch.grid, launch.block, 0, stream>>>(grad_out, y, grad_y, s, e, grad_coefs,
                                                                             slope);
    }
  });
  return cudaGetLastError();
}

#define GS_INSTANTIATE(T)                                                                                      \
  template cudaError_t forward_cuda<T>(const T*, T*, Shape, Epilogue<acc_type<T>>, Stats, acc_type<T>*,       \
                                       acc_type<T>*, double, Activation, double, void*, cudaStream_t);         \
  template cudaError_t backward_cuda<T>(const T*, const T*, T*, Shape, Epilogue<acc_type<T>>, Stats, Activation, \
                                        double, ParamGrads<acc_type<T>>, void*, cudaStream_t);
GS_INSTANTIATE(float)
GS_INSTANTIATE(double)
GS_INSTANTIATE(__half)
GS_INSTANTIATE(__nv_bfloat16)

}  // namespace norm_act
}  // namespace gansparse
