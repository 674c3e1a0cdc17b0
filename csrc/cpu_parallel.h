// Thread team and instruction-set dispatch shared by the CPU kernels.
//
// Loop bodies are compiled twice, for AVX2+FMA and for the baseline x86-64 instruction set, and
// the CPU picks one copy at run time, so the library never executes an instruction the machine
// lacks. GANSPARSE_CPU_ISA=default forces the baseline copy.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

// Loop bodies are lambdas inlined into one function per instruction set (see parallel_for).
#define GS_INLINE_LAMBDA __attribute__((always_inline))

namespace gansparse {

// The instruction set a copy of a loop body is compiled for; a body may specialise on it (for
// non-temporal stores, say) or ignore it.
enum class Isa { baseline, avx2 };
template <Isa isa>
using IsaTag = std::integral_constant<Isa, isa>;

inline bool use_avx2() {
#if defined(__x86_64__)
  static const bool enabled = [] {
    const char* isa = std::getenv("GANSPARSE_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

// The instruction set the CPU kernels run with: "avx2" (AVX2 + FMA) or "default".
inline const char* cpu_isa() { return use_avx2() ? "avx2" : "default"; }

namespace detail {
template <typename Body>
void run_baseline(const Body& body, int64_t begin, int64_t end) {
  body(begin, end, IsaTag<Isa::baseline>{});
}

#if defined(__x86_64__)
template <typename Body>
__attribute__((target("avx2,fma"))) void run_avx2(const Body& body, int64_t begin, int64_t end) {
  body(begin, end, IsaTag<Isa::avx2>{});
}
#endif
}  // namespace detail

// Runs body(begin, end, isa) over [0, tasks), one contiguous range per thread, with the body
// compiled for the instruction set the CPU has. OpenMP stays outside the per-ISA functions, so
// the outlined parallel region needs no target attribute of its own.
template <typename Body>
void parallel_for(int64_t tasks, int num_threads, const Body& body) {
  if (tasks <= 0) return;
  void (*run)(const Body&, int64_t, int64_t) = detail::run_baseline<Body>;
#if defined(__x86_64__)
  if (use_avx2()) run = detail::run_avx2<Body>;
#endif
  if (num_threads <= 1 || tasks == 1 || omp_in_parallel()) {
    run(body, 0, tasks);
    return;
  }
  const int team = static_cast<int>(std::min<int64_t>(num_threads, tasks));
#pragma omp parallel num_threads(team)
  {
    const int64_t threads = omp_get_num_threads();
    const int64_t chunk = (tasks + threads - 1) / threads;
    const int64_t begin = omp_get_thread_num() * chunk;
    const int64_t end = std::min(tasks, begin + chunk);
    if (begin < end) run(body, begin, end);
  }
}

}  // namespace gansparse
