// CUDA kernels of the attention-map op family (declared in attention_kernels.h). The
// per-element math is attention_math.h, the same code the CPU kernels run.
//
// Forward, NCHW: a block covers 64 consecutive pixels of one sample; its 4 rows of threads take
// every 4th channel, so each warp reads 128 contiguous bytes per channel, and the rows are summed
// in shared memory. Forward, NHWC: one warp per pixel, lanes striding over the contiguous
// channels, summed with warp shuffles. Backward is elementwise with a grid-stride loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "attention_kernels.h"
#include "cuda_convert.cuh"
#include "attention_math.h"

namespace gansparse {
namespace attention {
namespace {


constexpr int kPixels = 64;    // NCHW forward: pixels per block
constexpr int kSlices = 4;     // NCHW forward: channel slices per block
constexpr int kWarps = 8;      // NHWC forward: pixels (warps) per block
constexpr int kThreads = 256;  // backward

template <int P, typename T>
__global__ void forward_nchw_kernel(const T* __restrict__ f, T* __restrict__ maps, FeatureShape s,
                                    acc_type<T> p, acc_type<T> scale) {
  using acc_t = acc_type<T>;
  __shared__ acc_t partial[kSlices][kPixels];
  const int64_t n = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  acc_t acc = 0;
  if (i < s.hw) {
    const T* px = f + n * s.c * s.hw + i;
    for (int64_t c = threadIdx.y; c < s.c; c += kSlices) acc += pow_abs<P>(to_acc(px[c * s.hw]), p);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && i < s.hw) {
    for (int r = 1; r < kSlices; ++r) acc += partial[r][threadIdx.x];
    maps[n * s.hw + i] = from_acc<T>(acc * scale);
  }
}

template <int P, typename T>
__global__ void forward_nhwc_kernel(const T* __restrict__ f, T* __restrict__ maps, FeatureShape s,
                                    acc_type<T> p, acc_type<T> scale) {
  using acc_t = acc_type<T>;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (pixel >= s.n * s.hw) return;  // uniform across the warp
  const T* px = f + pixel * s.c;
  acc_t acc = 0;
  for (int64_t c = threadIdx.x; c < s.c; c += 32) acc += pow_abs<P>(to_acc(px[c]), p);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (threadIdx.x == 0) maps[pixel] = from_acc<T>(acc * scale);
}

template <int P, typename T>
__global__ void backward_kernel(const T* __restrict__ grad_maps, const T* __restrict__ f,
                                T* __restrict__ grad_f, FeatureShape s, acc_type<T> p, acc_type<T> scale) {
  using acc_t = acc_type<T>;
  const int64_t total = s.n * s.c * s.hw;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    // Index of this element's pixel in the [N, HW] map.
    const int64_t pixel =
        s.channels_last ? idx / s.c : (idx / (s.c * s.hw)) * s.hw + idx % s.hw;
    const acc_t g = to_acc(grad_maps[pixel]) * scale;
    grad_f[idx] = from_acc<T>(g * pow_abs_grad<P>(to_acc(f[idx]), p));
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

template <typename scalar_t>
cudaError_t maps_forward_cuda(const scalar_t* f, scalar_t* maps, FeatureShape s, double p, double scale,
                       cudaStream_t stream) {
  dispatch_exponent(p, [&](auto exponent) {
    constexpr int P = decltype(exponent)::value;
    if (s.channels_last) {
      const dim3 block(32, kWarps);
      forward_nhwc_kernel<P, scalar_t><<<ceil_div(s.n * s.hw, kWarps), block, 0, stream>>>(
          f, maps, s, p, scale);
    } else {
      const dim3 block(kPixels, kSlices);
      const dim3 grid(ceil_div(s.hw, kPixels), s.n);
      forward_nchw_kernel<P, scalar_t><<<grid, block, 0, stream>>>(f, maps, s, p, scale);
    }
  });
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t maps_backward_cuda(const scalar_t* grad_maps, const scalar_t* f, scalar_t* grad_f,
                        FeatureShape s, double p, double scale, cudaStream_t stream) {
  // Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
  const int64_t blocks = std::min<int64_t>(ceil_div(s.n * s.c * s.hw, kThreads), 65535);
  dispatch_exponent(p, [&](auto exponent) {
    constexpr int P = decltype(exponent)::value;
    backward_kernel<P, scalar_t><<<blocks, kThreads, 0, stream>>>(grad_maps, f, grad_f, s, p, scale);
  });
  return cudaGetLastError();
}

#define GS_INSTANTIATE(T)                                                                       \
  template cudaError_t maps_forward_cuda<T>(const T*, T*, FeatureShape, double, double,        \
                                            cudaStream_t);                                     \
  template cudaError_t maps_backward_cuda<T>(const T*, const T*, T*, FeatureShape, double, double, \
                                             cudaStream_t);
GS_INSTANTIATE(float)
GS_INSTANTIATE(double)
GS_INSTANTIATE(__half)
GS_INSTANTIATE(__nv_bfloat16)

}  // namespace attention
}  // namespace gansparse
