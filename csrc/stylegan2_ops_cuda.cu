// CUDA kernels of StyleGAN2's ops (declared in stylegan2_ops_kernels.h). The per-element math is
// stylegan2_ops_math.h, the same code the CPU kernels run.
//
// upfirdn2d: one thread per output element, reading only the taps that land on input samples
// (taps_of on each axis). Bias-act forward and backward: elementwise, grid-stride loops.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_convert.cuh"
#include "stylegan2_ops_kernels.h"

namespace gansparse {
namespace stylegan2 {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  // Enough blocks to fill any current GPU; the grid-stride loops cover the rest.
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
}

template <typename T>
__global__ void upfirdn2d_kernel(const T* __restrict__ x, const T* __restrict__ kernel, T* __restrict__ out,
                                 ResampleShape s) {
  using acc_t = acc_type<T>;
  const int64_t total = s.n * s.c * s.y.out * s.x.out;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, oy, ox;
    if (s.channels_last) {  // idx = ((n * OH + oy) * OW + ox) * C + c
      c = idx % s.c;
      ox = (idx / s.c) % s.x.out;
      oy = (idx / (s.c * s.x.out)) % s.y.out;
      n = idx / (s.c * s.x.out * s.y.out);
    } else {  // idx = ((n * C + c) * OH + oy) * OW + ox
      ox = idx % s.x.out;
      oy = (idx / s.x.out) % s.y.out;
      c = (idx / (s.x.out * s.y.out)) % s.c;
      n = idx / (s.x.out * s.y.out * s.c);
    }
    // Strides of the input pixel grid and the channel offset, per layout.
    const int64_t col_stride = s.channels_last ? s.c : 1;
    const int64_t row_stride = col_stride * s.x.in;
    const T* plane = s.channels_last ? x + n * s.y.in * row_stride + c : x + (n * s.c + c) * s.y.in * s.x.in;
    const TapRange ty = taps_of(s.y, oy);
    const TapRange tx = taps_of(s.x, ox);
    acc_t acc = 0;
    for (int64_t j = 0; j < ty.count; ++j) {
      const T* in_row = plane + (ty.first + j) * row_stride + tx.first * col_stride;
      const T* k_row = kernel + (ty.kernel - j * s.y.up) * s.x.taps + tx.kernel;
      for (int64_t i = 0; i < tx.count; ++i) acc += to_acc(in_row[i * col_stride]) * to_acc(k_row[-i * s.x.up]);
    }
    out[idx] = from_acc<T>(acc);
  }
}

// The channel of element idx of a bias-act tensor.
__device__ __forceinline__ int64_t channel_of(int64_t idx, const ChannelShape& s) {
  return s.channels_last ? idx % s.c : (idx / s.inner) % s.c;
}

template <typename T>
__global__ void bias_act_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                                        ChannelShape s, acc_type<T> slope, acc_type<T> scale) {
  using acc_t = acc_type<T>;
  const int64_t total = s.outer * s.c * s.inner;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t b = bias != nullptr ? to_acc(bias[channel_of(idx, s)]) : acc_t(0);
    out[idx] = from_acc<T>(leaky_relu_scaled(to_acc(x[idx]) + b, slope, scale));
  }
}

template <typename T>
__global__ void bias_act_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                         const T* __restrict__ bias, T* __restrict__ grad_x, ChannelShape s,
                                         acc_type<T> slope, acc_type<T> scale) {
  using acc_t = acc_type<T>;
  const int64_t total = s.outer * s.c * s.inner;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t b = bias != nullptr ? to_acc(bias[channel_of(idx, s)]) : acc_t(0);
    grad_x[idx] = from_acc<T>(to_acc(grad_out[idx]) * leaky_relu_scaled_grad(to_acc(x[idx]) + b, slope, scale));
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t upfirdn2d_cuda(const scalar_t* x, const scalar_t* kernel, scalar_t* out, ResampleShape s,
                           cudaStream_t stream) {
  upfirdn2d_kernel<scalar_t><<<blocks_for(s.n * s.c * s.y.out * s.x.out), kThreads, 0, stream>>>(x, kernel, out, s);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t bias_act_forward_cuda(const scalar_t* x, const scalar_t* bias, scalar_t* out, ChannelShape s,
                                  double negative_slope, double scale, cudaStream_t stream) {
  bias_act_forward_kernel<scalar_t><<<blocks_for(s.outer * s.c * s.inner), kThreads, 0, stream>>>(
      x, bias, out, s, acc_type<scalar_t>(negative_slope), acc_type<scalar_t>(scale));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t bias_act_backward_cuda(const scalar_t* grad_out, const scalar_t* x, const scalar_t* bias,
                                   scalar_t* grad_x, ChannelShape s, double negative_slope, double scale,
                                   cudaStream_t stream) {
  bias_act_backward_kernel<scalar_t><<<blocks_for(s.outer * s.c * s.inner), kThreads, 0, stream>>>(
      grad_out, x, bias, grad_x, s, acc_type<scalar_t>(negative_slope), acc_type<scalar_t>(scale));
  return cudaGetLastError();
}

#define GS_INSTANTIATE(T)                                                                                        \
  template cudaError_t upfirdn2d_cuda<T>(const T*, const T*, T*, ResampleShape, cudaStream_t);                  \
  template cudaError_t bias_act_forward_cuda<T>(const T*, const T*, T*, ChannelShape, double, double,            \
                                                cudaStream_t);                                                   \
  template cudaError_t bias_act_backward_cuda<T>(const T*, const T*, const T*, T*, ChannelShape, double, double, \
                                                 cudaStream_t);
GS_INSTANTIATE(float)
GS_INSTANTIATE(double)
GS_INSTANTIATE(__half)
GS_INSTANTIATE(__nv_bfloat16)

}  // namespace stylegan2
}  // namespace gansparse
