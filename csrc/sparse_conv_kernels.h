// Raw-pointer kernels of the direct sparse convolution (gansparse::sparse_conv2d). They include
// no torch headers; sparse_conv_ops.cpp adapts them to at::Tensor. The math is in
// sparse_conv_math.h.
#pragma once

#include <cstdint>

#if defined(GS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include "sparse_conv_math.h"

namespace gansparse {
namespace sparse_conv {

// The weight in CSR form by output channel (see sparse_conv_math.h): nonzeros
// [row_offsets[o], row_offsets[o + 1]) of values and columns belong to output channel o.
struct CsrWeight {
  const float* values;
  const int32_t* columns;
  const int32_t* row_offsets;  // [c_out + 1]
};

// Floats in the zero-padded copy of one input sample the CPU kernel reads. The caller checks that
// it fits in int32: the kernel's input offsets are int32, to halve their bandwidth.
int64_t padded_sample_floats(ConvShape shape);

// out [n, c_out, oh, ow] = act(conv(x [n, c_in, h, w], weight) + bias), all dense NCHW float;
// bias may be null.
void forward_cpu(const float* x, CsrWeight weight, const float* bias, float* out, ConvShape shape,
                 Activation activation, float negative_slope, int num_threads);

#if defined(GS_WITH_CUDA)
// Returns the launch status; does not synchronise.
cudaError_t forward_cuda(const float* x, CsrWeight weight, const float* bias, float* out, ConvShape shape,
                         Activation activation, float negative_slope, cudaStream_t stream);
#endif

}  // namespace sparse_conv
}  // namespace gansparse
