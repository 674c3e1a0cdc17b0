// torch.library registration of StyleGAN2's ops, upfirdn2d and the fused bias + leaky ReLU, and
// their CPU and CUDA implementations. The kernels are in stylegan2_ops_cpu.cpp and
// stylegan2_ops_cuda.cu; the ops' contracts are the docstrings of gansparse/ops/upfirdn2d.py and
// gansparse/ops/bias_act.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#if defined(GS_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_glue.h"
#endif

#include "stylegan2_ops_kernels.h"

namespace gansparse {
namespace stylegan2 {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The CPU kernels compute in float or double; half-precision inputs are widened.
at::ScalarType cpu_compute_dtype(at::ScalarType dtype) {
  return (dtype == at::kFloat || dtype == at::kDouble) ? dtype : at::kFloat;
}

// Below this many elements an op runs on one thread: waking a thread team costs more than the
// work.
constexpr int64_t kSerialElements = int64_t(1) << 15;

int cpu_threads(int64_t elements) { return elements < kSerialElements ? 1 : at::get_num_threads(); }

// The dense layout a kernel reads: NCHW, or NHWC for a channels_last 4-D tensor; any other
// strides are copied to NCHW.
at::Tensor dense(const at::Tensor& t, at::ScalarType dtype, bool* channels_last) {
  const at::Tensor cast = t.to(dtype);
  *channels_last = t.dim() == 4 && !cast.is_contiguous() && cast.is_contiguous(at::MemoryFormat::ChannelsLast);
  return *channels_last ? cast : cast.contiguous();
}

at::MemoryFormat layout(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// --- upfirdn2d -------------------------------------------------------------------------------

struct Resample {
  at::Tensor x;
  at::Tensor kernel;
  at::Tensor out;
  ResampleShape shape;
};

Resample prepare_upfirdn2d(const at::Tensor& x, const at::Tensor& kernel, int64_t up_x, int64_t up_y,
                           int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                           int64_t pad_y1, bool widen) {
  TORCH_CHECK(x.dim() == 4, "x must be a 4-D [N, C, H, W] tensor, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got dtype ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(kernel.dim() == 2 && kernel.numel() > 0, "kernel must be a non-empty [kH, kW] tensor, got shape ",
              kernel.sizes());
  TORCH_CHECK(kernel.scalar_type() == x.scalar_type(), "kernel has dtype ", kernel.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(kernel.device() == x.device(), "kernel is on ", kernel.device(), " but x is on ", x.device());
  TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "up and down must be >= 1, got up=(", up_x,
              ", ", up_y, "), down=(", down_x, ", ", down_y, ")");
  const int64_t out_h = (x.size(2) * up_y + pad_y0 + pad_y1 - kernel.size(0)) / down_y + 1;
  const int64_t out_w = (x.size(3) * up_x + pad_x0 + pad_x1 - kernel.size(1)) / down_x + 1;
  const bool empty = x.size(2) * up_y + pad_y0 + pad_y1 < kernel.size(0) ||
                     x.size(3) * up_x + pad_x0 + pad_x1 < kernel.size(1);
  TORCH_CHECK(!empty && out_h >= 1 && out_w >= 1, "the output would be empty: input ", x.sizes().slice(2),
              ", kernel ", kernel.sizes(), ", pad (", pad_x0, ", ", pad_x1, ", ", pad_y0, ", ", pad_y1, ")");
  const at::ScalarType dtype = widen ? cpu_compute_dtype(x.scalar_type()) : x.scalar_type();
  bool channels_last = false;
  at::Tensor xd = dense(x, dtype, &channels_last);
  at::Tensor kd = kernel.to(dtype).contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, xd.options().memory_format(layout(channels_last)));
  const ResampleShape shape{x.size(0), x.size(1),
                            Axis{x.size(2), out_h, up_y, down_y, pad_y0, kernel.size(0)},
                            Axis{x.size(3), out_w, up_x, down_x, pad_x0, kernel.size(1)}, channels_last};
  return {xd, kd, out, shape};
}

at::Tensor upfirdn2d_cpu_op(const at::Tensor& x, const at::Tensor& kernel, int64_t up_x, int64_t up_y,
                            int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                            int64_t pad_y1) {
  Resample r = prepare_upfirdn2d(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1, true);
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "upfirdn2d_cpu", [&] {
    upfirdn2d_cpu<scalar_t>(r.x.const_data_ptr<scalar_t>(), r.kernel.const_data_ptr<scalar_t>(),
                            r.out.mutable_data_ptr<scalar_t>(), r.shape, cpu_threads(r.out.numel()));
  });
  return r.out.to(x.scalar_type());
}

// --- fused bias + leaky ReLU ------------------------------------------------------------------

struct BiasAct {
  at::Tensor x;
  at::Tensor bias;  // undefined without a bias
  ChannelShape shape;
};

BiasAct prepare_bias_act(const at::Tensor& x, const OptionalTensor& bias, bool widen) {
  TORCH_CHECK(x.dim() >= 2, "x must be an [N, C, *] tensor, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got dtype ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "x must not be empty, got shape ", x.sizes());
  const int64_t c = x.size(1);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c, "bias must have shape [C] = [", c, "] for x of shape ",
                x.sizes(), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias has dtype ", bias->scalar_type(), " but x has dtype ",
                x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "bias is on ", bias->device(), " but x is on ", x.device());
  }
  const at::ScalarType dtype = widen ? cpu_compute_dtype(x.scalar_type()) : x.scalar_type();
  bool channels_last = false;
  at::Tensor xd = dense(x, dtype, &channels_last);
  const int64_t inner = x.numel() / (x.size(0) * c);
  // Without positions after the channels ([N, C]), the rows are the samples: C contiguous values.
  const ChannelShape shape{x.size(0), c, inner, channels_last || inner == 1};
  return {xd, bias ? bias->to(dtype).contiguous() : at::Tensor(), shape};
}

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor fused_leaky_relu_cpu(const at::Tensor& x, const OptionalTensor& bias, double negative_slope,
                                double scale) {
  BiasAct a = prepare_bias_act(x, bias, true);
  at::Tensor out = at::empty_like(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fused_leaky_relu_cpu", [&] {
    bias_act_forward_cpu<scalar_t>(a.x.const_data_ptr<scalar_t>(), optional_ptr<scalar_t>(a.bias),
                                   out.mutable_data_ptr<scalar_t>(), a.shape, negative_slope, scale,
                                   cpu_threads(out.numel()));
  });
  return out.to(x.scalar_type());
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have x's shape ", x.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out has dtype ", grad_out.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(), " but x is on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> fused_leaky_relu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                 const OptionalTensor& bias, double negative_slope,
                                                                 double scale, bool bias_grad) {
  BiasAct a = prepare_bias_act(x, bias, true);
  check_grad_out(grad_out, x);
  // grad_out is read in x's dense layout.
  const at::Tensor g = grad_out.to(a.x.scalar_type()).contiguous(a.x.suggest_memory_format());
  at::Tensor grad_x = at::empty_like(a.x);
  at::Tensor grad_bias = at::empty({bias_grad ? a.shape.c : 0}, a.x.options());
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fused_leaky_relu_backward_cpu", [&] {
    bias_act_backward_cpu<scalar_t>(g.const_data_ptr<scalar_t>(), a.x.const_data_ptr<scalar_t>(),
                                    optional_ptr<scalar_t>(a.bias), grad_x.mutable_data_ptr<scalar_t>(),
                                    bias_grad ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr, a.shape,
                                    negative_slope, scale, cpu_threads(grad_x.numel()));
  });
  return {grad_x.to(x.scalar_type()), grad_bias.to(x.scalar_type())};
}

#if defined(GS_WITH_CUDA)
at::Tensor upfirdn2d_cuda_op(const at::Tensor& x, const at::Tensor& kernel, int64_t up_x, int64_t up_y,
                             int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                             int64_t pad_y1) {
  Resample r = prepare_upfirdn2d(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1, false);
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.x.scalar_type(), "upfirdn2d_cuda", [&] {
    C10_CUDA_CHECK(upfirdn2d_cuda(cuda_ptr<scalar_t>(r.x), cuda_ptr<scalar_t>(r.kernel),
                                  cuda_mutable_ptr<scalar_t>(r.out), r.shape, c10::cuda::getCurrentCUDAStream()));
  });
  return r.out;
}

template <typename T>
auto optional_cuda_ptr(const at::Tensor& t) -> decltype(cuda_ptr<T>(t)) {
  return t.defined() ? cuda_ptr<T>(t) : nullptr;
}

at::Tensor fused_leaky_relu_cuda(const at::Tensor& x, const OptionalTensor& bias, double negative_slope,
                                 double scale) {
  BiasAct a = prepare_bias_act(x, bias, false);
  at::Tensor out = at::empty_like(a.x);
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fused_leaky_relu_cuda", [&] {
    C10_CUDA_CHECK(bias_act_forward_cuda(cuda_ptr<scalar_t>(a.x), optional_cuda_ptr<scalar_t>(a.bias),
                                         cuda_mutable_ptr<scalar_t>(out), a.shape, negative_slope, scale,
                                         c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_leaky_relu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const OptionalTensor& bias, double negative_slope,
                                                                  double scale, bool bias_grad) {
  BiasAct a = prepare_bias_act(x, bias, false);
  check_grad_out(grad_out, x);
  const at::Tensor g = grad_out.contiguous(a.x.suggest_memory_format());
  at::Tensor grad_x = at::empty_like(a.x);
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fused_leaky_relu_backward_cuda",
                                  [&] {
    C10_CUDA_CHECK(bias_act_backward_cuda(cuda_ptr<scalar_t>(g), cuda_ptr<scalar_t>(a.x),
                                          optional_cuda_ptr<scalar_t>(a.bias), cuda_mutable_ptr<scalar_t>(grad_x),
                                          a.shape, negative_slope, scale, c10::cuda::getCurrentCUDAStream()));
  });
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  at::Tensor grad_bias = bias_grad ? grad_x.sum(dims) : at::empty({0}, x.options());
  return {grad_x, grad_bias};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(gansparse, m) {
  m.def(
      "upfirdn2d(Tensor x, Tensor kernel, int up_x, int up_y, int down_x, int down_y, int pad_x0, int pad_x1, "
      "int pad_y0, int pad_y1) -> Tensor");
  m.def("fused_leaky_relu(Tensor x, Tensor? bias, float negative_slope, float scale) -> Tensor");
  m.def(
      "fused_leaky_relu_backward(Tensor grad_out, Tensor x, Tensor? bias, float negative_slope, float scale, "
      "bool bias_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gansparse, CPU, m) {
  m.impl("upfirdn2d", &upfirdn2d_cpu_op);
  m.impl("fused_leaky_relu", &fused_leaky_relu_cpu);
  m.impl("fused_leaky_relu_backward", &fused_leaky_relu_backward_cpu);
}

#if defined(GS_WITH_CUDA)
TORCH_LIBRARY_IMPL(gansparse, CUDA, m) {
  m.impl("upfirdn2d", &upfirdn2d_cuda_op);
  m.impl("fused_leaky_relu", &fused_leaky_relu_cuda);
  m.impl("fused_leaky_relu_backward", &fused_leaky_relu_backward_cuda);
}
#endif

}  // namespace stylegan2
}  // namespace gansparse
