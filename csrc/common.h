// Shared by the C++ (CPU) and CUDA translation units.
#pragma once

#if defined(__CUDACC__)
#define GS_HD __host__ __device__ __forceinline__
#else
#define GS_HD inline __attribute__((always_inline))
#endif

namespace gansparse {

// The type statistics, parameters and reductions are computed in: float, or double for double.
template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccOf<scalar_t>::type;

}  // namespace gansparse
