// CUDA kernel of the direct sparse convolution (declared in sparse_conv_kernels.h). The math is
// sparse_conv_math.h, the same code the CPU kernel runs.
//
// One thread per output value, grid-striding: it walks its output channel's nonzeros (the same
// CSR row for all the threads of a row of output pixels, so the weight loads are broadcasts
// from cache) and reads, for each tap, the input pixel input_coordinate() names, or nothing
// where the tap falls into the padding or, for a transposed conv, between input pixels.
// Neighbouring threads are neighbouring output pixels, so a tap's input reads coalesce.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sparse_conv_kernels.h"
#include "sparse_conv_math.h"

namespace gansparse {
namespace sparse_conv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

__global__ void forward_kernel(const float* __restrict__ x, CsrWeight weight, const float* __restrict__ bias,
                               float* __restrict__ out, ConvShape s, Activation activation, float negative_slope) {
  const int64_t total = s.n * s.c_out * s.oh * s.ow;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ox = index % s.ow;
    const int64_t oy = index / s.ow % s.oh;
    const int64_t o = index / (s.ow * s.oh) % s.c_out;
    const int64_t n = index / (s.ow * s.oh * s.c_out);
    const float* sample = x + n * s.c_in * s.h * s.w;
    float acc = bias != nullptr ? bias[o] : 0.f;
    for (int32_t k = weight.row_offsets[o]; k < weight.row_offsets[o + 1]; ++k) {
      const Tap tap = decode_column(weight.columns[k], s.kh, s.kw);
      const int64_t iy = input_coordinate(oy, tap.i, s.stride_h, s.pad_h, s.dilation_h, s.transposed, s.h);
      const int64_t ix = input_coordinate(ox, tap.j, s.stride_w, s.pad_w, s.dilation_w, s.transposed, s.w);
      if (iy >= 0 && ix >= 0) acc += weight.values[k] * sample[(tap.c * s.h + iy) * s.w + ix];
    }
    out[index] = activate(acc, activation, negative_slope);
  }
}

}  // namespace

cudaError_t forward_cuda(const float* x, CsrWeight weight, const float* bias, float* out, ConvShape shape,
                         Activation activation, float negative_slope, cudaStream_t stream) {
  const int64_t total = shape.n * shape.c_out * shape.oh * shape.ow;
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (total + kThreads - 1) / kThreads);
  forward_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, weight, bias, out, shape, activation,
                                                                         negative_slope);
  return cudaGetLastError();
}

}  // namespace sparse_conv
}  // namespace gansparse
