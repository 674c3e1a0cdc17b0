// Per-element math of StyleGAN2's ops (upfirdn2d and the fused bias + leaky ReLU), shared by the
// CPU and CUDA kernels.
//
// upfirdn2d, along one axis: the input x[0..in) is upsampled by inserting up - 1 zeros after each
// sample, padded by pad0 in front, and convolved (a true convolution) with k[0..taps); output o
// reads the upsampled, padded signal at o * down + t for t in [0, taps), against k[taps - 1 - t].
// Only the positions that hold an input sample contribute: o * down + t - pad0 = m * up, with
// 0 <= m < in. Those m are consecutive, and their kernel indices step down by `up`.
#pragma once

#include <cstdint>

#include "common.h"

namespace gansparse {
namespace stylegan2 {

// One axis of an upfirdn2d.
struct Axis {
  int64_t in;    // input samples
  int64_t out;   // output samples
  int64_t up;    // upsampling factor, >= 1
  int64_t down;  // downsampling factor, >= 1
  int64_t pad0;  // padding before the upsampled signal (negative: cropping)
  int64_t taps;  // kernel length along this axis
};

// The input samples output o reads: input[first + j] against kernel[kernel - j * up], for
// j in [0, count).
struct TapRange {
  int64_t first;
  int64_t kernel;
  int64_t count;
};

GS_HD int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

GS_HD TapRange taps_of(const Axis& a, int64_t o) {
  const int64_t base = o * a.down - a.pad0;  // upsampled input position read at t = 0
  int64_t first = floor_div(base + a.up - 1, a.up);       // the first m with m * up >= base
  int64_t last = floor_div(base + a.taps - 1, a.up);      // the last m with m * up <= base + taps - 1
  if (first < 0) first = 0;
  if (last > a.in - 1) last = a.in - 1;
  const int64_t count = last >= first ? last - first + 1 : 0;
  return {first, a.taps - 1 - (first * a.up - base), count};
}

// Fused bias + leaky ReLU on the biased value z = x + bias: the slope is chosen as torch's
// leaky_relu chooses it (z > 0), and the gain multiplies the result. The slope is a select
// between two values, not a conditional multiplication, so that compilers vectorise it.
template <typename acc_t>
GS_HD acc_t leaky_relu_slope(acc_t z, acc_t negative_slope) {
  return z > acc_t(0) ? acc_t(1) : negative_slope;
}

template <typename acc_t>
GS_HD acc_t leaky_relu_scaled(acc_t z, acc_t negative_slope, acc_t scale) {
  return z * leaky_relu_slope(z, negative_slope) * scale;
}

// d out / d z.
template <typename acc_t>
GS_HD acc_t leaky_relu_scaled_grad(acc_t z, acc_t negative_slope, acc_t scale) {
  return leaky_relu_slope(z, negative_slope) * scale;
}

}  // namespace stylegan2
}  // namespace gansparse
