// Raw-pointer kernels of StyleGAN2's ops: upfirdn2d and the fused bias + leaky ReLU. They include
// no torch headers, so the files that define them compile in seconds; stylegan2_ops.cpp adapts
// them to at::Tensor. The per-element math is in stylegan2_ops_math.h.
#pragma once

#include <cstdint>

#if defined(GS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include "stylegan2_ops_math.h"

namespace gansparse {
namespace stylegan2 {

// An upfirdn2d of x [N, C, H, W] into out [N, C, OH, OW], both stored densely as NCHW, or as
// NHWC when channels_last; kernel [taps_y, taps_x] is dense and of x's type.
struct ResampleShape {
  int64_t n;
  int64_t c;
  Axis y;
  Axis x;
  bool channels_last;
};

// A bias-act tensor seen as [outer, C, inner] (channels_last == false: NCHW-like, `inner`
// contiguous) or as [outer * inner, C] with C contiguous (channels_last == true).
struct ChannelShape {
  int64_t outer;
  int64_t c;
  int64_t inner;
  bool channels_last;
};

template <typename scalar_t>
void upfirdn2d_cpu(const scalar_t* x, const scalar_t* kernel, scalar_t* out, ResampleShape s, int num_threads);

// out = scale * leaky_relu(x + bias[c]); bias may be null.
template <typename scalar_t>
void bias_act_forward_cpu(const scalar_t* x, const scalar_t* bias, scalar_t* out, ChannelShape s,
                          double negative_slope, double scale, int num_threads);

// grad_x = grad_out * d out / dx, and, when grad_bias is not null, grad_bias[c] = the sum of
// grad_x over everything but the channels.
template <typename scalar_t>
void bias_act_backward_cpu(const scalar_t* grad_out, const scalar_t* x, const scalar_t* bias, scalar_t* grad_x,
                           scalar_t* grad_bias, ChannelShape s, double negative_slope, double scale,
                           int num_threads);

#if defined(GS_WITH_CUDA)
// The CUDA launchers return the launch status; they do not synchronise. grad_bias is reduced by
// the caller from grad_x.
template <typename scalar_t>
cudaError_t upfirdn2d_cuda(const scalar_t* x, const scalar_t* kernel, scalar_t* out, ResampleShape s,
                           cudaStream_t stream);

template <typename scalar_t>
cudaError_t bias_act_forward_cuda(const scalar_t* x, const scalar_t* bias, scalar_t* out, ChannelShape s,
                                  double negative_slope, double scale, cudaStream_t stream);

template <typename scalar_t>
cudaError_t bias_act_backward_cuda(const scalar_t* grad_out, const scalar_t* x, const scalar_t* bias,
                                   scalar_t* grad_x, ChannelShape s, double negative_slope, double scale,
                                   cudaStream_t stream);
#endif

}  // namespace stylegan2
}  // namespace gansparse
