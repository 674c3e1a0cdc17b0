// Host-side glue of the CUDA kernels: at:: scalar types to the CUDA types the kernels are
// instantiated for. Shared by every op family's *_ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gansparse {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
auto cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}

// Null for an undefined tensor: an output that was not asked for.
template <typename T>
auto cuda_mutable_ptr(at::Tensor& t) {
  return t.defined() ? reinterpret_cast<typename CudaType<T>::type*>(t.mutable_data_ptr<T>()) : nullptr;
}

}  // namespace gansparse
