// Per-element math of the attention-map op family, shared by the CPU and CUDA kernels.
//
// The attention map of a feature f[N, C, H, W] is A[n, i] = scale * sum_c |f[n, c, i]|^p
// (scale = 1/C for a channel mean, 1 for a sum). Its gradient is
// dA/df[n, c, i] = scale * p * |f|^(p-1) * sign(f), which is 0 at f = 0 for every p >= 1,
// as torch's f.abs().pow(p) gives.
#pragma once

#include <cmath>
#include <type_traits>

#include "common.h"

namespace gansparse {
namespace attention {

GS_HD float power(float x, float y) { return powf(x, y); }
GS_HD double power(double x, double y) { return pow(x, y); }

// P is the exponent when it is 1, 2 or 4 (the common cases, multiplication only);
// P == 0 means "any p >= 1, given at run time".
template <int P, typename acc_t>
GS_HD acc_t pow_abs(acc_t x, acc_t p) {
  if constexpr (P == 1) {
    return x < acc_t(0) ? -x : x;
  } else if constexpr (P == 2) {
    return x * x;
  } else if constexpr (P == 4) {
    const acc_t s = x * x;
    return s * s;
  } else {
    return x == acc_t(0) ? acc_t(0) : power(x < acc_t(0) ? -x : x, p);
  }
}

template <int P, typename acc_t>
GS_HD acc_t pow_abs_grad(acc_t x, acc_t p) {
  if constexpr (P == 1) {
    return acc_t((x > acc_t(0)) - (x < acc_t(0)));
  } else if constexpr (P == 2) {
    return acc_t(2) * x;
  } else if constexpr (P == 4) {
    return acc_t(4) * x * x * x;
  } else {
    if (x == acc_t(0)) return acc_t(0);
    const acc_t mag = p * power(x < acc_t(0) ? -x : x, p - acc_t(1));
    return x < acc_t(0) ? -mag : mag;
  }
}

template <int P>
using Exponent = std::integral_constant<int, P>;

// Calls fn(Exponent<P>{}) with the compile-time exponent for p (0 for any other p).
template <typename Fn>
inline void dispatch_exponent(double p, Fn&& fn) {
  if (p == 1.0) {
    fn(Exponent<1>{});
  } else if (p == 2.0) {
    fn(Exponent<2>{});
  } else if (p == 4.0) {
    fn(Exponent<4>{});
  } else {
    fn(Exponent<0>{});
  }
}

}  // namespace attention
}  // namespace gansparse
