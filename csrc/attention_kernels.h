// Raw-pointer kernels of the attention-map op family. They include no torch headers, so the
// files that define them compile in seconds; attention_ops.cpp adapts them to at::Tensor.
#pragma once

#include <cstdint>

#if defined(GS_WITH_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

namespace gansparse {
namespace attention {

// A feature map seen as [N, C, HW], stored either as NCHW (channels_last == false) or as
// NHWC (channels_last == true), densely in both cases.
struct FeatureShape {
  int64_t n;
  int64_t c;
  int64_t hw;
  bool channels_last;
};

// maps[n, i] = scale * sum_c |f[n, c, i]|^p.
template <typename scalar_t>
void maps_forward_cpu(const scalar_t* f, scalar_t* maps, FeatureShape shape, double p, double scale,
                      int num_threads);

// grad_f[n, c, i] = grad_maps[n, i] * scale * d|f[n, c, i]|^p / df.
template <typename scalar_t>
void maps_backward_cpu(const scalar_t* grad_maps, const scalar_t* f, scalar_t* grad_f,
                       FeatureShape shape, double p, double scale, int num_threads);

#if defined(GS_WITH_CUDA)
// The CUDA launchers return the launch status; they do not synchronise.
template <typename scalar_t>
cudaError_t maps_forward_cuda(const scalar_t* f, scalar_t* maps, FeatureShape shape, double p, double scale,
                       cudaStream_t stream);

template <typename scalar_t>
cudaError_t maps_backward_cuda(const scalar_t* grad_maps, const scalar_t* f, scalar_t* grad_f,
                        FeatureShape shape, double p, double scale, cudaStream_t stream);
#endif

}  // namespace attention
}  // namespace gansparse
