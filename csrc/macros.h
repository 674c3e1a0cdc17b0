// Shared by the C++ (CPU) and CUDA translation units.
#pragma once

#if defined(__CUDACC__)
#define GS_HD __host__ __device__ __forceinline__
#else
#define GS_HD inline __attribute__((always_inline))
#endif
