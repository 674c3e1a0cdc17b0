// Raw-pointer kernels of the norm + mask + activation epilogue (gansparse::norm_mask_act). They
// include no torch headers, so the files that define them compile in seconds; norm_act_ops.cpp
// adapts them to at::Tensor. The math is in norm_act_math.h.
#pragma once

#include "common.h"

#include <cstddef>
#include <cstdint>

#if defined(GS_WITH_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

#include "norm_act_math.h"

namespace gansparse {
namespace norm_act {

// y seen as [N, C, HW], stored densely as NCHW, or as NHWC when channels_last.
struct Shape {
  int64_t n;
  int64_t c;
  int64_t hw;
  bool channels_last;
};


// Where the backward writes the parameter gradients, shaped like mask [C], gamma and beta
// ([C] or [N, C]). A null pointer is a gradient not asked for.
template <typename T>
struct ParamGrads {
  T* mask;
  T* gamma;
  T* beta;

  bool any() const { return mask != nullptr || gamma != nullptr || beta != nullptr; }
};

// Forward: out = act(mask * (gamma * (y - mean) * invstd + beta)); out may be y. For
// Stats::kBatch and kInstance the kernel computes mean and invstd into mean_out and invstd_out
// ([C], [N, C]) and ignores e.mean, e.invstd; for kGiven it reads e.mean, e.invstd [C]; for kNone
// it reads none.
template <typename scalar_t>
void forward_cpu(const scalar_t* y, scalar_t* out, Shape shape, Epilogue<scalar_t> e, Stats stats,
                 scalar_t* mean_out, scalar_t* invstd_out, double eps, Activation activation,
                 double negative_slope, int num_threads);

// Backward: grad_y (skipped when null) and the parameter gradients. e.mean, e.invstd are the
// statistics the forward used (null for kNone).
template <typename scalar_t>
void backward_cpu(const scalar_t* grad_out, const scalar_t* y, scalar_t* grad_y, Shape shape,
                  Epilogue<scalar_t> e, Stats stats, Activation activation, double negative_slope,
                  ParamGrads<scalar_t> grads, int num_threads);

#if defined(GS_WITH_CUDA)
// The CUDA launchers take a device workspace of the size the *_workspace_bytes functions give;
// they return the launch status and do not synchronise.
size_t forward_workspace_bytes_cuda(Shape shape, Stats stats, size_t acc_size);

template <typename scalar_t>
cudaError_t forward_cuda(const scalar_t* y, scalar_t* out, Shape shape, Epilogue<acc_type<scalar_t>> e,
                         Stats stats, acc_type<scalar_t>* mean_out, acc_type<scalar_t>* invstd_out,
                         double eps, Activation activation, double negative_slope, void* workspace,
                         cudaStream_t stream);

size_t backward_workspace_bytes_cuda(Shape shape, Stats stats, bool param_grads, size_t acc_size);

template <typename scalar_t>
cudaError_t backward_cuda(const scalar_t* grad_out, const scalar_t* y, scalar_t* grad_y, Shape shape,
                          Epilogue<acc_type<scalar_t>> e, Stats stats, Activation activation,
                          double negative_slope, ParamGrads<acc_type<scalar_t>> grads, void* workspace,
                          cudaStream_t stream);
#endif

}  // namespace norm_act
}  // namespace gansparse
