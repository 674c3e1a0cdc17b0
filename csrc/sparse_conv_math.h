// Math of the direct sparse convolution (gansparse::sparse_conv2d), shared by the CPU and CUDA
// kernels: the activation epilogue, how a weight's column decodes into a tap, and which input
// pixel a tap reads for an output pixel.
//
// The weight is in CSR form by output channel: row o holds the nonzero weights of output
// channel o, and the column of a nonzero is its flat index (c * KH + i) * KW + j into the
// [C_in, KH, KW] filter of that channel, for conv2d and conv_transpose2d alike (for the
// transposed conv, c is the input channel of torch's [C_in, C_out, KH, KW] weight).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace gansparse {
namespace sparse_conv {

enum class Activation { kNone, kRelu, kLeakyRelu, kTanh };

// NaN stays NaN, as in torch.relu.
GS_HD float activate(float pre, Activation activation, float negative_slope) {
  switch (activation) {
    case Activation::kRelu:
      return pre < 0.f ? 0.f : pre;
    case Activation::kLeakyRelu:
      return pre < 0.f ? negative_slope * pre : pre;
    case Activation::kTanh:
      return tanhf(pre);
    default:
      return pre;
  }
}

// Sizes and hyper-parameters of one call. Input [n, c_in, h, w], output [n, c_out, oh, ow].
struct ConvShape {
  int64_t n, c_in, h, w;
  int64_t c_out, oh, ow;
  int64_t kh, kw;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  bool transposed;
};

// One nonzero weight's position in its output channel's filter.
struct Tap {
  int64_t c;  // input channel
  int64_t i;  // kernel row
  int64_t j;  // kernel column
};

GS_HD Tap decode_column(int64_t column, int64_t kh, int64_t kw) {
  return {column / (kh * kw), column / kw % kh, column % kw};
}

// Floor division for a positive divisor, also for negative numerators.
GS_HD int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Along one axis: the input coordinate tap k reads for output coordinate `out`, or -1 when it
// reads none (zero padding, or, for a transposed conv, an output the tap does not reach).
//   conv:       in = out * stride - pad + k * dilation
//   transposed: out = in * stride - pad + k * dilation, solved for in
GS_HD int64_t input_coordinate(int64_t out, int64_t k, int64_t stride, int64_t pad, int64_t dilation,
                               bool transposed, int64_t in_size) {
  int64_t in;
  if (transposed) {
    const int64_t t = out + pad - k * dilation;
    if (t < 0 || t % stride != 0) return -1;
    in = t / stride;
  } else {
    in = out * stride - pad + k * dilation;
  }
  return in >= 0 && in < in_size ? in : -1;
}

}  // namespace sparse_conv
}  // namespace gansparse
