// torch.library registration of the direct sparse convolution gansparse::sparse_conv2d and its
// CPU and CUDA implementations. The kernels are in sparse_conv_cpu.cpp and sparse_conv_cuda.cu;
// the op's contract is the docstring of gansparse/ops/sparse_conv.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#if defined(GS_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "sparse_conv_kernels.h"

namespace gansparse {
namespace sparse_conv {
namespace {

Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "leaky_relu") return Activation::kLeakyRelu;
  if (name == "tanh") return Activation::kTanh;
  TORCH_CHECK(false, "activation must be one of 'none', 'relu', 'leaky_relu' or 'tanh', got '", name, "'");
}

void check_pair(at::IntArrayRef values, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, name, " must have 2 values, got ", values);
  TORCH_CHECK(values[0] >= minimum && values[1] >= minimum, name, " must be >= ", minimum, ", got ", values);
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

int64_t output_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dilation, bool transposed,
                    int64_t output_padding) {
  if (transposed) return (in - 1) * stride - 2 * pad + dilation * (k - 1) + output_padding + 1;
  return (in + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
}

// Checks every argument (the CSR structure too, which costs one pass over the indices) and
// returns the call's shape.
ConvShape check_arguments(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                          const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                          double negative_slope) {
  TORCH_CHECK(x.dim() == 4, "x must be a 4-D [N, C, H, W] tensor, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 (the compiled kernels' dtype), got ",
              x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "x must not be empty, got shape ", x.sizes());
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  check_pair(output_padding, "output_padding", 0);
  for (int d = 0; d < 2; ++d) {
    if (transposed) {
      TORCH_CHECK(output_padding[d] < std::max(stride[d], dilation[d]),
                  "output_padding must be smaller than stride or dilation, got output_padding ", output_padding,
                  ", stride ", stride, ", dilation ", dilation);
    } else {
      TORCH_CHECK(output_padding[d] == 0, "output_padding must be 0 for a conv that is not transposed, got ",
                  output_padding);
    }
  }
  TORCH_CHECK(std::isfinite(negative_slope), "negative_slope must be finite, got ", negative_slope);
  check_vector(values, "values", at::kFloat, x);
  check_vector(columns, "columns", at::kInt, x);
  check_vector(row_offsets, "row_offsets", at::kInt, x);
  TORCH_CHECK(columns.numel() == values.numel(), "columns must have one entry per value (", values.numel(),
              "), got ", columns.numel());
  TORCH_CHECK(row_offsets.numel() >= 2, "row_offsets must have C_out + 1 >= 2 entries, got ", row_offsets.numel());

  ConvShape s{};
  s.n = x.size(0);
  s.c_in = x.size(1);
  s.h = x.size(2);
  s.w = x.size(3);
  s.c_out = row_offsets.numel() - 1;
  s.kh = kernel_size[0];
  s.kw = kernel_size[1];
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  s.transposed = transposed;
  s.oh = output_size(s.h, s.kh, s.stride_h, s.pad_h, s.dilation_h, transposed, output_padding[0]);
  s.ow = output_size(s.w, s.kw, s.stride_w, s.pad_w, s.dilation_w, transposed, output_padding[1]);
  TORCH_CHECK(s.oh > 0 && s.ow > 0, "the output would be empty: x of shape ", x.sizes(), " with kernel_size ",
              kernel_size, ", stride ", stride, ", padding ", padding, " and dilation ", dilation, " gives ", s.oh,
              " x ", s.ow);
  if (bias) {
    check_vector(*bias, "bias", at::kFloat, x);
    TORCH_CHECK(bias->numel() == s.c_out, "bias must have C_out = ", s.c_out, " entries, got ", bias->numel());
  }

  const int64_t filter_size = s.c_in * s.kh * s.kw;
  TORCH_CHECK(filter_size <= std::numeric_limits<int32_t>::max(), "C_in * kH * kW must fit in int32, got ",
              filter_size);
  const int64_t nnz = values.numel();
  TORCH_CHECK(row_offsets[0].item<int64_t>() == 0 && row_offsets[-1].item<int64_t>() == nnz,
              "row_offsets must start at 0 and end at the number of values (", nnz, ")");
  TORCH_CHECK(row_offsets.diff().ge(0).all().item<bool>(), "row_offsets must be non-decreasing");
  if (nnz > 0) {
    TORCH_CHECK(columns.min().item<int64_t>() >= 0 && columns.max().item<int64_t>() < filter_size,
                "columns must lie in [0, C_in * kH * kW) = [0, ", filter_size, ") for x with C_in = ", s.c_in,
                " and kernel_size ", kernel_size);
  }
  TORCH_CHECK(padded_sample_floats(s) <= std::numeric_limits<int32_t>::max(),
              "one padded input sample must have fewer than 2^31 values, x has shape ", x.sizes());
  return s;
}

template <typename Launch>
at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                         const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                         c10::string_view activation, double negative_slope, Launch launch) {
  const Activation act = parse_activation(activation);
  const ConvShape s = check_arguments(x, values, columns, row_offsets, bias, kernel_size, stride, padding, dilation,
                                      transposed, output_padding, negative_slope);
  const at::Tensor input = x.contiguous(), value_vector = values.contiguous();
  const at::Tensor column_vector = columns.contiguous(), offset_vector = row_offsets.contiguous();
  const at::Tensor bias_vector = bias ? bias->contiguous() : at::Tensor();
  const CsrWeight weight{value_vector.const_data_ptr<float>(), column_vector.const_data_ptr<int32_t>(),
                         offset_vector.const_data_ptr<int32_t>()};
  at::Tensor out = at::empty({s.n, s.c_out, s.oh, s.ow}, x.options());
  launch(input.const_data_ptr<float>(), weight, bias ? bias_vector.const_data_ptr<float>() : nullptr,
         out.mutable_data_ptr<float>(), s, act, static_cast<float>(negative_slope));
  return out;
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                             const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                             c10::string_view activation, double negative_slope) {
  return sparse_conv2d(x, values, columns, row_offsets, bias, kernel_size, stride, padding, dilation, transposed,
                       output_padding, activation, negative_slope,
                       [](const float* in, CsrWeight weight, const float* b, float* out, ConvShape s, Activation act,
                          float slope) { forward_cpu(in, weight, b, out, s, act, slope, at::get_num_threads()); });
}

#if defined(GS_WITH_CUDA)
at::Tensor sparse_conv2d_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& columns,
                              const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                              c10::string_view activation, double negative_slope) {
  const c10::cuda::CUDAGuard guard(x.device());
  return sparse_conv2d(x, values, columns, row_offsets, bias, kernel_size, stride, padding, dilation, transposed,
                       output_padding, activation, negative_slope,
                       [](const float* in, CsrWeight weight, const float* b, float* out, ConvShape s, Activation act,
                          float slope) {
                         C10_CUDA_CHECK(forward_cuda(in, weight, b, out, s, act, slope,
                                                     c10::cuda::getCurrentCUDAStream()));
                       });
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(gansparse, m) {
  m.def(
      "sparse_conv2d(Tensor x, Tensor values, Tensor columns, Tensor row_offsets, Tensor? bias, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool transposed, "
      "int[2] output_padding, str activation, float negative_slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(gansparse, CPU, m) { m.impl("sparse_conv2d", &sparse_conv2d_cpu); }

#if defined(GS_WITH_CUDA)
TORCH_LIBRARY_IMPL(gansparse, CUDA, m) { m.impl("sparse_conv2d", &sparse_conv2d_cuda); }
#endif

}  // namespace sparse_conv
}  // namespace gansparse
