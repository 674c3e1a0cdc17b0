// torch.library registration of the norm + mask + activation epilogue ops and their CPU and
// CUDA implementations. The kernels are in norm_act_cpu.cpp and norm_act_cuda.cu; the ops'
// contract is the docstring of gansparse/ops/conv_norm_act.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(GS_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_glue.h"
#endif

#include "norm_act_kernels.h"

namespace gansparse {
namespace norm_act {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// --- arguments -----------------------------------------------------------------------------

Stats parse_stats(c10::string_view name) {
  if (name == "batch") return Stats::kBatch;
  if (name == "instance") return Stats::kInstance;
  if (name == "given") return Stats::kGiven;
  if (name == "none") return Stats::kNone;
  TORCH_CHECK(false, "stats must be one of 'batch', 'instance', 'given' or 'none', got '", name, "'");
}

Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "leaky_relu") return Activation::kLeakyRelu;
  if (name == "none") return Activation::kNone;
  TORCH_CHECK(false, "activation must be one of 'relu', 'leaky_relu' or 'none', got '", name, "'");
}

void check_feature(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be a 4-D [N, C, H, W] tensor, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got dtype ",
              t.scalar_type());
  TORCH_CHECK(t.numel() > 0, name, " must not be empty, got shape ", t.sizes());
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& y) {
  TORCH_CHECK(t.device() == y.device(), name, " is on ", t.device(), " but y is on ", y.device());
}

// A [C] tensor, or with per_sample also an [N, C] one, floating point, on y's device.
void check_channel_tensor(const at::Tensor& t, const char* name, const at::Tensor& y, bool per_sample) {
  const int64_t n = y.size(0), c = y.size(1);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got dtype ",
              t.scalar_type());
  check_device(t, name, y);
  const bool is_per_channel = t.dim() == 1 && t.size(0) == c;
  const bool is_per_sample = per_sample && t.dim() == 2 && t.size(0) == n && t.size(1) == c;
  TORCH_CHECK(is_per_channel || is_per_sample, name, " must have shape [C] = [", c, "]",
              per_sample ? c10::str(" or [N, C] = [", n, ", ", c, "]") : std::string(),
              " for y of shape ", y.sizes(), ", got shape ", t.sizes());
}

void check_params(const at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma,
                  const OptionalTensor& beta) {
  if (mask) check_channel_tensor(*mask, "mask", y, /*per_sample=*/false);
  if (gamma) check_channel_tensor(*gamma, "gamma", y, /*per_sample=*/true);
  if (beta) check_channel_tensor(*beta, "beta", y, /*per_sample=*/true);
}

// mean and invstd: [C] for 'batch' and 'given', [N, C] for 'instance'.
void check_statistic(const at::Tensor& t, const char* name, const at::Tensor& y, Stats stats) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got dtype ",
              t.scalar_type());
  check_device(t, name, y);
  if (stats == Stats::kInstance) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == y.size(0) && t.size(1) == y.size(1), name,
                " must have shape [N, C] = [", y.size(0), ", ", y.size(1), "] with stats='instance', got shape ",
                t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == y.size(1), name, " must have shape [C] = [", y.size(1),
                "], got shape ", t.sizes());
  }
}

// --- layout and dtypes ---------------------------------------------------------------------

// Outputs are laid out as torch.empty_like(y) lays them out, which is what the fake kernels
// promise. The kernels read and write NCHW or NHWC densely; for any other layout they run on
// NCHW copies.
bool runs_channels_last(const at::Tensor& like) {
  return !like.is_contiguous() && like.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// `out` itself when the kernels can write it directly, else a buffer to copy into it afterwards.
at::Tensor kernel_output(const at::Tensor& out, at::ScalarType dtype, bool channels_last) {
  if (out.scalar_type() == dtype && out.is_contiguous(memory_format(channels_last))) return out;
  return at::empty(out.sizes(), out.options().dtype(dtype).memory_format(memory_format(channels_last)));
}

void copy_back(at::Tensor& out, const at::Tensor& buffer) {
  if (!buffer.is_same(out)) out.copy_(buffer);
}

// The dtype the kernels run in: y's, or float for half-precision y on the CPU (widen).
at::ScalarType compute_dtype(const at::Tensor& y, bool widen) {
  const auto dtype = y.scalar_type();
  return (widen && dtype != at::kFloat && dtype != at::kDouble) ? at::kFloat : dtype;
}

// Statistics, parameters and reductions: float, or double for double.
at::ScalarType acc_dtype(const at::Tensor& y) { return y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// What a launcher needs: dense inputs in the kernels' dtype and layout, and the parameters in
// the accumulate dtype (undefined when absent).
struct Call {
  at::Tensor y;         // [N, C, H, W], compute dtype, dense NCHW or NHWC
  at::Tensor grad_out;  // backward only; like y
  Shape shape;
  Stats stats;
  Activation activation;
  double eps;
  double negative_slope;
  at::Tensor mask, gamma, beta, mean, invstd;
};

at::Tensor in_acc_dtype(const OptionalTensor& t, at::ScalarType acc) {
  return t ? t->to(acc).contiguous() : at::Tensor();
}

Call make_call(const at::Tensor& y, bool channels_last, bool widen, const OptionalTensor& mask,
               const OptionalTensor& gamma, const OptionalTensor& beta, Stats stats, Activation activation,
               double eps, double negative_slope) {
  Call call;
  call.y = y.to(compute_dtype(y, widen)).contiguous(memory_format(channels_last));
  call.shape = {y.size(0), y.size(1), y.size(2) * y.size(3), channels_last};
  call.stats = stats;
  call.activation = activation;
  call.eps = eps;
  call.negative_slope = negative_slope;
  const auto acc = acc_dtype(call.y);
  call.mask = in_acc_dtype(mask, acc);
  call.gamma = in_acc_dtype(gamma, acc);
  call.beta = in_acc_dtype(beta, acc);
  return call;
}

// The call's parameters as kernel pointers; mean and invstd are the call's (given or saved).
template <typename T>
Epilogue<T> epilogue_of(const Call& call) {
  auto pointer = [](const at::Tensor& t) -> const T* { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  auto sample_stride = [&](const at::Tensor& t) -> int64_t { return t.defined() && t.dim() == 2 ? call.shape.c : 0; };
  return {call.shape.c,
          pointer(call.mask),
          pointer(call.gamma),
          pointer(call.beta),
          pointer(call.mean),
          pointer(call.invstd),
          sample_stride(call.gamma),
          sample_stride(call.beta),
          call.stats == Stats::kInstance ? call.shape.c : 0};
}

template <typename T>
T* pointer_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// --- the ops, for any device ---------------------------------------------------------------

// Writes the epilogue of y into out (a new tensor, or y itself for the in-place op) and returns
// (mean, invstd). launch(call, out, mean_out, invstd_out) gets out in the compute dtype and the
// call's layout, and mean_out, invstd_out in the accumulate dtype, defined when the statistics are
// computed.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> forward(at::Tensor& out, const at::Tensor& y, const OptionalTensor& mask,
                                           const OptionalTensor& gamma, const OptionalTensor& beta,
                                           const OptionalTensor& mean, const OptionalTensor& invstd,
                                           c10::string_view stats_name, double eps, c10::string_view activation_name,
                                           double negative_slope, bool widen, Launch launch) {
  check_feature(y, "y");
  const Stats stats = parse_stats(stats_name);
  const Activation activation = parse_activation(activation_name);
  check_params(y, mask, gamma, beta);
  if (stats == Stats::kGiven) {
    TORCH_CHECK(mean.has_value() && invstd.has_value(), "stats='given' needs both mean and invstd");
    check_statistic(*mean, "mean", y, stats);
    check_statistic(*invstd, "invstd", y, stats);
  } else {
    TORCH_CHECK(!mean.has_value() && !invstd.has_value(),
                "mean and invstd are only read with stats='given', got stats='", stats_name, "'");
  }
  if (computes_stats(stats)) {
    TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", eps);
  }
  TORCH_CHECK(std::isfinite(negative_slope), "negative_slope must be finite, got ", negative_slope);

  const bool channels_last = runs_channels_last(out);
  Call call = make_call(y, channels_last, widen, mask, gamma, beta, stats, activation, eps, negative_slope);
  const auto acc = acc_dtype(call.y);
  call.mean = in_acc_dtype(mean, acc);
  call.invstd = in_acc_dtype(invstd, acc);
  at::Tensor mean_out, invstd_out;
  if (computes_stats(stats)) {
    const auto shape = stats == Stats::kInstance ? std::vector<int64_t>{y.size(0), y.size(1)}
                                                 : std::vector<int64_t>{y.size(1)};
    mean_out = at::empty(shape, y.options().dtype(acc));
    invstd_out = at::empty(shape, y.options().dtype(acc));
  }
  at::Tensor buffer = kernel_output(out, call.y.scalar_type(), channels_last);
  launch(call, buffer, mean_out, invstd_out);
  copy_back(out, buffer);
  if (!computes_stats(stats)) return {at::empty({0}, y.options()), at::empty({0}, y.options())};
  return {mean_out.to(y.scalar_type()), invstd_out.to(y.scalar_type())};
}

// launch(call, grad_y, grad_mask, grad_gamma, grad_beta): grad_y in the compute dtype and the
// call's layout, the others in the accumulate dtype; undefined ones are not asked for.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma,
    const OptionalTensor& beta, const at::Tensor& mean, const at::Tensor& invstd, c10::string_view stats_name,
    c10::string_view activation_name, double negative_slope, std::array<bool, 4> output_mask, bool widen,
    Launch launch) {
  check_feature(y, "y");
  check_feature(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == y.sizes(), "grad_out must have y's shape ", y.sizes(), ", got ", grad_out.sizes());
  check_device(grad_out, "grad_out", y);
  const Stats stats = parse_stats(stats_name);
  const Activation activation = parse_activation(activation_name);
  check_params(y, mask, gamma, beta);
  if (stats != Stats::kNone) {
    check_statistic(mean, "mean", y, stats);
    check_statistic(invstd, "invstd", y, stats);
  }
  TORCH_CHECK(std::isfinite(negative_slope), "negative_slope must be finite, got ", negative_slope);
  const std::array<const char*, 3> param_names{"mask", "gamma", "beta"};
  const std::array<const OptionalTensor*, 3> params{&mask, &gamma, &beta};
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(!output_mask[i + 1] || params[i]->has_value(), "output_mask[", i + 1, "] asks for the gradient of ",
                param_names[i], ", but ", param_names[i], " is None");
  }

  const auto empty = [&] { return at::empty({0}, y.options()); };
  at::Tensor grad_y = output_mask[0] ? at::empty_like(y) : empty();
  const bool channels_last = runs_channels_last(output_mask[0] ? grad_y : y);
  Call call = make_call(y, channels_last, widen, mask, gamma, beta, stats, activation, /*eps=*/0, negative_slope);
  const auto acc = acc_dtype(call.y);
  call.grad_out = grad_out.to(call.y.scalar_type()).contiguous(memory_format(channels_last));
  if (stats != Stats::kNone) {
    call.mean = mean.to(acc).contiguous();
    call.invstd = invstd.to(acc).contiguous();
  }
  std::array<at::Tensor, 3> param_grads;  // in the accumulate dtype
  for (size_t i = 0; i < params.size(); ++i) {
    if (output_mask[i + 1]) param_grads[i] = at::empty((*params[i])->sizes(), y.options().dtype(acc));
  }
  at::Tensor buffer = output_mask[0] ? kernel_output(grad_y, call.y.scalar_type(), channels_last) : at::Tensor();
  if (output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3]) {
    launch(call, buffer, param_grads[0], param_grads[1], param_grads[2]);
  }
  if (output_mask[0]) copy_back(grad_y, buffer);
  std::array<at::Tensor, 3> results;
  for (size_t i = 0; i < params.size(); ++i) {
    results[i] = output_mask[i + 1] ? param_grads[i].to((*params[i])->scalar_type()) : empty();
  }
  return {grad_y, results[0], results[1], results[2]};
}

// --- CPU -----------------------------------------------------------------------------------

void launch_forward_cpu(const Call& call, at::Tensor& out, at::Tensor& mean_out, at::Tensor& invstd_out) {
  AT_DISPATCH_FLOATING_TYPES(call.y.scalar_type(), "norm_mask_act_cpu", [&] {
    forward_cpu<scalar_t>(call.y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), call.shape,
                          epilogue_of<scalar_t>(call), call.stats, pointer_or_null<scalar_t>(mean_out),
                          pointer_or_null<scalar_t>(invstd_out), call.eps, call.activation, call.negative_slope,
                          at::get_num_threads());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_mask_act_cpu(
    const at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma, const OptionalTensor& beta,
    const OptionalTensor& mean, const OptionalTensor& invstd, c10::string_view stats, double eps,
    c10::string_view activation, double negative_slope) {
  at::Tensor out = at::empty_like(y);
  auto [mean_out, invstd_out] = forward(out, y, mask, gamma, beta, mean, invstd, stats, eps, activation,
                                        negative_slope, /*widen=*/true, launch_forward_cpu);
  return {out, mean_out, invstd_out};
}

std::tuple<at::Tensor, at::Tensor> norm_mask_act_inplace_cpu(
    at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma, const OptionalTensor& beta,
    const OptionalTensor& mean, const OptionalTensor& invstd, c10::string_view stats, double eps,
    c10::string_view activation, double negative_slope) {
  return forward(y, y, mask, gamma, beta, mean, invstd, stats, eps, activation, negative_slope, /*widen=*/true,
                 launch_forward_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_mask_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma,
    const OptionalTensor& beta, const at::Tensor& mean, const at::Tensor& invstd, c10::string_view stats,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask) {
  return backward(grad_out, y, mask, gamma, beta, mean, invstd, stats, activation, negative_slope, output_mask,
                  /*widen=*/true,
                  [](const Call& call, at::Tensor& grad_y, at::Tensor& grad_mask, at::Tensor& grad_gamma,
                     at::Tensor& grad_beta) {
                    AT_DISPATCH_FLOATING_TYPES(call.y.scalar_type(), "norm_mask_act_backward_cpu", [&] {
                      const ParamGrads<scalar_t> grads{pointer_or_null<scalar_t>(grad_mask),
                                                       pointer_or_null<scalar_t>(grad_gamma),
                                                       pointer_or_null<scalar_t>(grad_beta)};
                      backward_cpu<scalar_t>(call.grad_out.const_data_ptr<scalar_t>(),
                                             call.y.const_data_ptr<scalar_t>(), pointer_or_null<scalar_t>(grad_y),
                                             call.shape, epilogue_of<scalar_t>(call), call.stats, call.activation,
                                             call.negative_slope, grads, at::get_num_threads());
                    });
                  });
}

// --- CUDA ----------------------------------------------------------------------------------

#if defined(GS_WITH_CUDA)
at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void launch_forward_cuda(const Call& call, at::Tensor& out, at::Tensor& mean_out, at::Tensor& invstd_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.y.scalar_type(), "norm_mask_act_cuda", [&] {
    using kernel_t = typename CudaType<scalar_t>::type;
    using acc_t = acc_type<kernel_t>;
    at::Tensor scratch = workspace(call.y, forward_workspace_bytes_cuda(call.shape, call.stats, sizeof(acc_t)));
    C10_CUDA_CHECK(forward_cuda<kernel_t>(
        cuda_ptr<scalar_t>(call.y), cuda_mutable_ptr<scalar_t>(out), call.shape, epilogue_of<acc_t>(call),
        call.stats, pointer_or_null<acc_t>(mean_out), pointer_or_null<acc_t>(invstd_out), call.eps,
        call.activation, call.negative_slope, scratch.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_mask_act_cuda(
    const at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma, const OptionalTensor& beta,
    const OptionalTensor& mean, const OptionalTensor& invstd, c10::string_view stats, double eps,
    c10::string_view activation, double negative_slope) {
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y);
  auto [mean_out, invstd_out] = forward(out, y, mask, gamma, beta, mean, invstd, stats, eps, activation,
                                        negative_slope, /*widen=*/false, launch_forward_cuda);
  return {out, mean_out, invstd_out};
}

std::tuple<at::Tensor, at::Tensor> norm_mask_act_inplace_cuda(
    at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma, const OptionalTensor& beta,
    const OptionalTensor& mean, const OptionalTensor& invstd, c10::string_view stats, double eps,
    c10::string_view activation, double negative_slope) {
  const c10::cuda::CUDAGuard guard(y.device());
  return forward(y, y, mask, gamma, beta, mean, invstd, stats, eps, activation, negative_slope, /*widen=*/false,
                 launch_forward_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_mask_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y, const OptionalTensor& mask, const OptionalTensor& gamma,
    const OptionalTensor& beta, const at::Tensor& mean, const at::Tensor& invstd, c10::string_view stats,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(y.device());
  return backward(
      grad_out, y, mask, gamma, beta, mean, invstd, stats, activation, negative_slope, output_mask,
      /*widen=*/false,
      [](const Call& call, at::Tensor& grad_y, at::Tensor& grad_mask, at::Tensor& grad_gamma, at::Tensor& grad_beta) {
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, call.y.scalar_type(), "norm_mask_act_backward_cuda", [&] {
              using kernel_t = typename CudaType<scalar_t>::type;
              using acc_t = acc_type<kernel_t>;
              const ParamGrads<acc_t> grads{pointer_or_null<acc_t>(grad_mask), pointer_or_null<acc_t>(grad_gamma),
                                            pointer_or_null<acc_t>(grad_beta)};
              at::Tensor scratch =
                  workspace(call.y, backward_workspace_bytes_cuda(call.shape, call.stats, grads.any(), sizeof(acc_t)));
              C10_CUDA_CHECK(backward_cuda<kernel_t>(
                  cuda_ptr<scalar_t>(call.grad_out), cuda_ptr<scalar_t>(call.y), cuda_mutable_ptr<scalar_t>(grad_y),
                  call.shape, epilogue_of<acc_t>(call), call.stats, call.activation, call.negative_slope, grads,
                  scratch.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
            });
      });
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(gansparse, m) {
  m.def(
      "norm_mask_act(Tensor y, Tensor? mask, Tensor? gamma, Tensor? beta, Tensor? mean, Tensor? invstd, "
      "str stats, float eps, str activation, float negative_slope) -> (Tensor, Tensor, Tensor)");
  // The same, written over y: masked_conv_norm_act uses it when nothing needs a gradient.
  m.def(
      "norm_mask_act_(Tensor(a!) y, Tensor? mask, Tensor? gamma, Tensor? beta, Tensor? mean, Tensor? invstd, "
      "str stats, float eps, str activation, float negative_slope) -> (Tensor, Tensor)");
  m.def(
      "norm_mask_act_backward(Tensor grad_out, Tensor y, Tensor? mask, Tensor? gamma, Tensor? beta, "
      "Tensor mean, Tensor invstd, str stats, str activation, float negative_slope, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gansparse, CPU, m) {
  m.impl("norm_mask_act", &norm_mask_act_cpu);
  m.impl("norm_mask_act_", &norm_mask_act_inplace_cpu);
  m.impl("norm_mask_act_backward", &norm_mask_act_backward_cpu);
}

#if defined(GS_WITH_CUDA)
TORCH_LIBRARY_IMPL(gansparse, CUDA, m) {
  m.impl("norm_mask_act", &norm_mask_act_cuda);
  m.impl("norm_mask_act_", &norm_mask_act_inplace_cuda);
  m.impl("norm_mask_act_backward", &norm_mask_act_backward_cuda);
}
#endif

}  // namespace norm_act
}  // namespace gansparse
