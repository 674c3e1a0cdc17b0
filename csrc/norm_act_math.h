// Math of the norm + affine + mask + activation epilogue (gansparse::norm_mask_act), shared by
// the CPU and CUDA kernels.
//
// For channel c of sample n:
//   xhat = (y - mean) * invstd        (mean 0 and invstd 1 when stats == 'none')
//   pre  = mask[c] * (gamma[n, c] * xhat + beta[n, c]) = (y - mean) * scale + shift
//   out  = act(pre)
// with scale = mask * gamma * invstd and shift = mask * beta, folded once per (n, c) into a Coef.
// Absent parameters are mask 1, gamma 1, beta 0.
//
// Backward. Let g = grad_out * act'(pre), the gradient reaching pre. Every reduction the
// backward needs follows from two sums per (n, c) over the pixels, GradSums {sum g, sum g * xhat}:
//   grad_beta[n, c] = mask * sum g,  grad_gamma[n, c] = mask * sum g * xhat   (summed over n
//   when the parameter is per channel),  grad_mask[c] = sum_n gamma * sum g * xhat + beta * sum g,
// and, with dxhat = mask * gamma * g, the means over the statistics' reduction set R (every
// sample for 'batch', one sample for 'instance') of dxhat and dxhat * xhat. Then
//   'batch', 'instance': grad_y = invstd * (dxhat - mean_R(dxhat) - xhat * mean_R(dxhat * xhat))
//   'given', 'none':     grad_y = invstd * dxhat
// which is affine in g and xhat with per-(n, c) coefficients, a GradCoef.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace gansparse {
namespace norm_act {

// Where the normalisation statistics come from.
enum class Stats { kBatch, kInstance, kGiven, kNone };
enum class Activation { kNone, kRelu, kLeakyRelu };

// 'batch' and 'instance' compute the statistics from y, so the gradient flows through them too.
GS_HD bool computes_stats(Stats stats) { return stats == Stats::kBatch || stats == Stats::kInstance; }

GS_HD float square_root(float x) { return sqrtf(x); }
GS_HD double square_root(double x) { return sqrt(x); }

// --- activation ----------------------------------------------------------------------------

// NaN stays NaN, as in torch.relu. leaky_relu is written as a sum of two selects, which is exact
// (one term is 0) and vectorises: GCC does not if-convert a multiply that only some lanes take,
// because it could raise a floating-point exception.
template <Activation A, typename T>
GS_HD T activate(T pre, T slope) {
  if constexpr (A == Activation::kRelu) {
    return pre < T(0) ? T(0) : pre;
  } else if constexpr (A == Activation::kLeakyRelu) {
    return (pre < T(0) ? T(0) : pre) + slope * (pre < T(0) ? pre : T(0));
  } else {
    return pre;
  }
}

// grad * act'(pre), with torch's derivatives at 0: 0 for relu, slope for leaky_relu.
template <Activation A, typename T>
GS_HD T activation_backward(T grad, T pre, T slope) {
  if constexpr (A == Activation::kRelu) {
    return pre > T(0) ? grad : T(0);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return (pre > T(0) ? grad : T(0)) + slope * (pre > T(0) ? T(0) : grad);
  } else {
    return grad;
  }
}

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls fn(ActivationTag<A>{}) with the activation as a compile-time constant.
template <typename Fn>
inline void dispatch_activation(Activation activation, Fn&& fn) {
  switch (activation) {
    case Activation::kRelu:
      fn(ActivationTag<Activation::kRelu>{});
      break;
    case Activation::kLeakyRelu:
      fn(ActivationTag<Activation::kLeakyRelu>{});
      break;
    case Activation::kNone:
      fn(ActivationTag<Activation::kNone>{});
      break;
  }
}

// --- statistics ----------------------------------------------------------------------------

// Count, mean and sum of squared deviations from the mean of a set of values.
template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;
};

// The moments of the union of two sets (Chan, Golub and LeVeque). Unlike
// sum(x^2) - count * mean^2, it does not cancel when the mean is large against the spread.
template <typename T>
GS_HD Moments<T> merge(const Moments<T>& a, const Moments<T>& b) {
  const T count = a.count + b.count;
  if (count == T(0)) return a;
  const T delta = b.mean - a.mean;
  const T b_share = b.count / count;
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

// 1 / sqrt(biased variance + eps).
template <typename T>
GS_HD T inverse_std(const Moments<T>& m, T eps) {
  return T(1) / square_root(m.m2 / m.count + eps);
}

// --- per-(n, c) parameters -----------------------------------------------------------------

// pre = (y - center) * scale + shift, xhat = (y - center) * invstd.
template <typename T>
struct Coef {
  T center;
  T invstd;
  T scale;
  T shift;
};

// The epilogue's parameters, all in the accumulate type T. Null pointers are absent parameters.
// A per-sample tensor [N, C] has sample stride C, a per-channel one [C] has sample stride 0.
template <typename T>
struct Epilogue {
  int64_t channels;
  const T* mask;    // [C]
  const T* gamma;   // [C] or [N, C]
  const T* beta;    // [C] or [N, C]
  const T* mean;    // [C] ('batch', 'given') or [N, C] ('instance'); null for 'none'
  const T* invstd;  // like mean
  int64_t gamma_sample_stride;
  int64_t beta_sample_stride;
  int64_t stats_sample_stride;

  GS_HD T mask_at(int64_t c) const { return mask != nullptr ? mask[c] : T(1); }
  GS_HD T gamma_at(int64_t n, int64_t c) const {
    return gamma != nullptr ? gamma[n * gamma_sample_stride + c] : T(1);
  }
  GS_HD T beta_at(int64_t n, int64_t c) const {
    return beta != nullptr ? beta[n * beta_sample_stride + c] : T(0);
  }
  GS_HD T mean_at(int64_t n, int64_t c) const {
    return mean != nullptr ? mean[n * stats_sample_stride + c] : T(0);
  }
  GS_HD T invstd_at(int64_t n, int64_t c) const {
    return invstd != nullptr ? invstd[n * stats_sample_stride + c] : T(1);
  }
  GS_HD Coef<T> coef(int64_t n, int64_t c) const {
    const T inv = invstd_at(n, c);
    const T m = mask_at(c);
    return {mean_at(n, c), inv, m * gamma_at(n, c) * inv, m * beta_at(n, c)};
  }
};

// --- per-element forward and backward ------------------------------------------------------

template <typename T>
GS_HD T pre_activation(T y, const Coef<T>& k) {
  return (y - k.center) * k.scale + k.shift;
}

template <typename T>
GS_HD T normalized(T y, const Coef<T>& k) {
  return (y - k.center) * k.invstd;
}

template <Activation A, typename T>
GS_HD T forward_value(T y, const Coef<T>& k, T slope) {
  return activate<A>(pre_activation(y, k), slope);
}

// Sums of g and g * xhat (see the file comment).
template <typename T>
struct GradSums {
  T g;
  T g_xhat;
};

template <typename T>
GS_HD GradSums<T> merge(const GradSums<T>& a, const GradSums<T>& b) {
  return {a.g + b.g, a.g_xhat + b.g_xhat};
}

// One element's terms of GradSums. pre is recomputed exactly as the forward computed it, so
// act' sees the same sign the forward did.
template <Activation A, typename T>
GS_HD GradSums<T> grad_terms(T y, T grad_out, const Coef<T>& k, T slope) {
  const T g = activation_backward<A>(grad_out, pre_activation(y, k), slope);
  return {g, g * normalized(y, k)};
}

// grad_y = grad_scale * g + xhat_scale * xhat + offset.
template <typename T>
struct GradCoef {
  T grad_scale;
  T xhat_scale;
  T offset;
};

template <Activation A, typename T>
GS_HD T input_grad(T y, T grad_out, const Coef<T>& k, const GradCoef<T>& gk, T slope) {
  const T g = activation_backward<A>(grad_out, pre_activation(y, k), slope);
  return gk.grad_scale * g + gk.xhat_scale * normalized(y, k) + gk.offset;
}

// --- per-channel backward combination ------------------------------------------------------
// sums[n * sums_sample_stride + c] holds the GradSums of channel c of sample n.

// mean_R(dxhat) and mean_R(dxhat * xhat) for the reduction set R = samples [n0, n1) of
// channel c, `count` values in all.
template <typename T>
GS_HD GradSums<T> mean_dxhat_terms(const Epilogue<T>& e, const GradSums<T>* sums,
                                   int64_t sums_sample_stride, int64_t n0, int64_t n1, int64_t c,
                                   T count) {
  GradSums<T> total{T(0), T(0)};
  for (int64_t n = n0; n < n1; ++n) {
    const T gamma = e.gamma_at(n, c);
    const GradSums<T>& s = sums[n * sums_sample_stride + c];
    total.g += gamma * s.g;
    total.g_xhat += gamma * s.g_xhat;
  }
  const T weight = e.mask_at(c) / count;
  return {weight * total.g, weight * total.g_xhat};
}

// The GradCoef of (n, c); mean_dxhat is mean_dxhat_terms of its reduction set, unused unless
// the statistics were computed.
template <typename T>
GS_HD GradCoef<T> input_grad_coef(const Epilogue<T>& e, Stats stats, const GradSums<T>& mean_dxhat,
                                  int64_t n, int64_t c) {
  const T invstd = e.invstd_at(n, c);
  const T grad_scale = invstd * e.mask_at(c) * e.gamma_at(n, c);
  if (!computes_stats(stats)) return {grad_scale, T(0), T(0)};
  return {grad_scale, -invstd * mean_dxhat.g_xhat, -invstd * mean_dxhat.g};
}

// Writes the gradients of mask[c] and of channel c of gamma and beta (shaped like them); a
// null output is skipped.
template <typename T>
GS_HD void param_grads(const Epilogue<T>& e, const GradSums<T>* sums, int64_t sums_sample_stride,
                       int64_t num_samples, int64_t c, T* grad_mask, T* grad_gamma, T* grad_beta) {
  const T mask = e.mask_at(c);
  T mask_sum = 0, gamma_sum = 0, beta_sum = 0;
  for (int64_t n = 0; n < num_samples; ++n) {
    const GradSums<T>& s = sums[n * sums_sample_stride + c];
    mask_sum += e.gamma_at(n, c) * s.g_xhat + e.beta_at(n, c) * s.g;
    gamma_sum += s.g_xhat;
    beta_sum += s.g;
    if (grad_gamma != nullptr && e.gamma_sample_stride != 0) grad_gamma[n * e.channels + c] = mask * s.g_xhat;
    if (grad_beta != nullptr && e.beta_sample_stride != 0) grad_beta[n * e.channels + c] = mask * s.g;
  }
  if (grad_mask != nullptr) grad_mask[c] = mask_sum;
  if (grad_gamma != nullptr && e.gamma_sample_stride == 0) grad_gamma[c] = mask * gamma_sum;
  if (grad_beta != nullptr && e.beta_sample_stride == 0) grad_beta[c] = mask * beta_sum;
}

}  // namespace norm_act
}  // namespace gansparse
