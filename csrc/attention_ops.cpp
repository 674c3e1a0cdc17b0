// torch.library registration of the attention-map op family and its CPU and CUDA
// implementations. The kernels themselves are in attention_cpu.cpp and attention_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(GS_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_glue.h"
#endif

#include "attention_kernels.h"

namespace gansparse {
namespace attention {
namespace {

std::string arg(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

void check_feature(const at::Tensor& f, const std::string& name, const at::Tensor& first) {
  TORCH_CHECK(f.dim() == 4, name, " must be a 4-D [N, C, H, W] tensor, got shape ", f.sizes());
  TORCH_CHECK(at::isFloatingType(f.scalar_type()), name,
              " must be a floating-point tensor, got dtype ", f.scalar_type());
  TORCH_CHECK(f.numel() > 0, name, " must not be empty, got shape ", f.sizes());
  TORCH_CHECK(f.device() == first.device(), name, " is on ", f.device(),
              " but the first feature is on ", first.device());
}

void check_exponent(double p) {
  TORCH_CHECK(std::isfinite(p) && p >= 1.0, "p must be a finite number >= 1, got ", p);
}

// The layout a kernel reads: NCHW or NHWC, densely. Any other strides are copied to NCHW.
at::Tensor dense(const at::Tensor& f, bool* channels_last) {
  if (f.is_contiguous()) {
    *channels_last = false;
    return f;
  }
  if (f.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    *channels_last = true;
    return f;
  }
  *channels_last = false;
  return f.contiguous();
}

FeatureShape shape_of(const at::Tensor& f, bool channels_last) {
  return {f.size(0), f.size(1), f.size(2) * f.size(3), channels_last};
}

// A gradient is written once, end to end, often into memory the allocator has just taken from
// the system, where the first touch of every page is a page fault that zeroes it: with 4 KB
// pages, 4096 faults per 16 MB, which can cost more than the kernel itself. Asking Linux for
// 2 MB pages over the part of the tensor they can cover turns most of those into one fault per
// 2 MB. The advice changes how untouched pages are backed, never the contents; where
// transparent huge pages are off it does nothing, and a failure is harmless.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// The CPU kernels compute in float or double; half-precision inputs are widened.
at::Tensor cpu_compute_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble) ? t : t.to(at::kFloat);
}

template <typename Launch>
std::vector<at::Tensor> maps_forward(at::TensorList features, double p, bool mean, bool widen,
                                     Launch launch) {
  TORCH_CHECK(!features.empty(), "features must be a non-empty list of tensors");
  check_exponent(p);
  std::vector<at::Tensor> maps;
  maps.reserve(features.size());
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& input = features[i];
    check_feature(input, arg("features", i), features[0]);
    bool channels_last = false;
    const at::Tensor f = dense(widen ? cpu_compute_dtype(input) : input, &channels_last);
    at::Tensor out = at::empty({f.size(0), f.size(2), f.size(3)}, f.options());
    const double scale = mean ? 1.0 / static_cast<double>(f.size(1)) : 1.0;
    launch(f, out, shape_of(f, channels_last), p, scale);
    maps.push_back(out.scalar_type() == input.scalar_type() ? out : out.to(input.scalar_type()));
  }
  return maps;
}

template <typename Launch>
std::vector<at::Tensor> maps_backward(at::TensorList grads, at::TensorList features, double p,
                                      bool mean, bool widen, Launch launch) {
  TORCH_CHECK(!features.empty(), "features must be a non-empty list of tensors");
  TORCH_CHECK(grads.size() == features.size(), "grads has ", grads.size(),
              " tensors but features has ", features.size());
  check_exponent(p);
  std::vector<at::Tensor> result;
  result.reserve(features.size());
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& input = features[i];
    check_feature(input, arg("features", i), features[0]);
    const auto expected = std::vector<int64_t>{input.size(0), input.size(2), input.size(3)};
    TORCH_CHECK(grads[i].sizes() == at::IntArrayRef(expected), arg("grads", i), " must have shape ",
                at::IntArrayRef(expected), ", got ", grads[i].sizes());
    TORCH_CHECK(grads[i].device() == input.device(), arg("grads", i), " is on ", grads[i].device(),
                " but ", arg("features", i), " is on ", input.device());
    bool channels_last = false;
    const at::Tensor f = dense(widen ? cpu_compute_dtype(input) : input, &channels_last);
    const at::Tensor g = grads[i].to(f.scalar_type()).contiguous();
    at::Tensor grad_f = at::empty_like(
        f, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const double scale = mean ? 1.0 / static_cast<double>(f.size(1)) : 1.0;
    launch(g, f, grad_f, shape_of(f, channels_last), p, scale);
    result.push_back(grad_f.scalar_type() == input.scalar_type() ? grad_f
                                                                  : grad_f.to(input.scalar_type()));
  }
  return result;
}

std::vector<at::Tensor> maps_cpu(at::TensorList features, double p, bool mean) {
  return maps_forward(features, p, mean, /*widen=*/true,
                      [](const at::Tensor& f, at::Tensor& out, FeatureShape s, double p, double scale) {
                        AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "attention_maps_cpu", [&] {
                          maps_forward_cpu<scalar_t>(f.const_data_ptr<scalar_t>(),
                                                     out.mutable_data_ptr<scalar_t>(), s, p, scale,
                                                     at::get_num_threads());
                        });
                      });
}

std::vector<at::Tensor> maps_backward_cpu_op(at::TensorList grads, at::TensorList features, double p,
                                             bool mean) {
  return maps_backward(
      grads, features, p, mean, /*widen=*/true,
      [](const at::Tensor& g, const at::Tensor& f, at::Tensor& grad_f, FeatureShape s, double p,
         double scale) {
        advise_huge_pages(grad_f);
        AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "attention_maps_backward_cpu", [&] {
          maps_backward_cpu<scalar_t>(g.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                                      grad_f.mutable_data_ptr<scalar_t>(), s, p, scale,
                                      at::get_num_threads());
        });
      });
}

#if defined(GS_WITH_CUDA)
std::vector<at::Tensor> maps_cuda(at::TensorList features, double p, bool mean) {
  return maps_forward(
      features, p, mean, /*widen=*/false,
      [](const at::Tensor& f, at::Tensor& out, FeatureShape s, double p, double scale) {
        const c10::cuda::CUDAGuard guard(f.device());
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(),
                                        "attention_maps_cuda", [&] {
                                          C10_CUDA_CHECK(maps_forward_cuda(cuda_ptr<scalar_t>(f),
                                                            cuda_mutable_ptr<scalar_t>(out), s, p,
                                                            scale,
                                                            c10::cuda::getCurrentCUDAStream()));
                                        });
      });
}

std::vector<at::Tensor> maps_backward_cuda_op(at::TensorList grads, at::TensorList features,
                                              double p, bool mean) {
  return maps_backward(
      grads, features, p, mean, /*widen=*/false,
      [](const at::Tensor& g, const at::Tensor& f, at::Tensor& grad_f, FeatureShape s, double p,
         double scale) {
        const c10::cuda::CUDAGuard guard(f.device());
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, f.scalar_type(), "attention_maps_backward_cuda", [&] {
              C10_CUDA_CHECK(maps_backward_cuda(cuda_ptr<scalar_t>(g), cuda_ptr<scalar_t>(f),
                                                cuda_mutable_ptr<scalar_t>(grad_f), s, p, scale,
                                                c10::cuda::getCurrentCUDAStream()));
            });
      });
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(gansparse, m) {
  m.def("attention_maps(Tensor[] features, float p, bool mean) -> Tensor[]");
  m.def(
      "attention_maps_backward(Tensor[] grads, Tensor[] features, float p, bool mean) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(gansparse, CPU, m) {
  m.impl("attention_maps", &maps_cpu);
  m.impl("attention_maps_backward", &maps_backward_cpu_op);
}

#if defined(GS_WITH_CUDA)
TORCH_LIBRARY_IMPL(gansparse, CUDA, m) {
  m.impl("attention_maps", &maps_cuda);
  m.impl("attention_maps_backward", &maps_backward_cuda_op);
}
#endif

}  // namespace attention
}  // namespace gansparse
