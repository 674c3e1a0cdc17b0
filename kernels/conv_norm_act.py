"""Triton kernels of the fused masked conv + norm + affine + mask + activation. The contract of the
epilogue ops is the docstring of gansparse/ops/conv_norm_act.py.

Every kernel works on [BLOCK_P pixels, BLOCK_C channels] tiles of ONE sample (grid: pixel tiles,
channel tiles, samples), so a tile's statistics belong to one (sample, channel) pair and serve both
batch norm (reduced over samples too) and instance norm. Tensors are addressed through their
strides, so channels_last and other layouts run without copies.

Forward, with statistics ('batch', 'instance'):
  1. the conv kernel (or, for norm_mask_act, the moments kernel) writes the conv output and, per
     tile and channel, the tile's mean and sum of squared deviations (M2);
  2. the finalize kernel merges those with Chan's formula into mean and invstd, which is
     numerically safer than a global sum of squares;
  3. the apply kernel normalises, applies the affine, the mask and the activation.
Without statistics ('none', 'given') the conv kernel runs the whole epilogue before its store.

Backward of the epilogue, with z = mask * (gamma * y_hat + beta) and dz = grad_out * act'(z):
  1. the gradient-sums kernel writes per tile sum(dz) and sum(dz * y_hat);
  2. the gradient-finalize kernel turns them into the gradients of mask, gamma and beta, and for
     batch and instance norm into the means of dy_hat and dy_hat * y_hat;
  3. the gradient-input kernel writes grad_y = invstd * (dy_hat - mean(dy_hat) - y_hat *
     mean(dy_hat * y_hat)), or invstd * dy_hat for fixed statistics.
The conv's own backward is aten.convolution_backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from gansparse._dispatch import triton_interpreted
from gansparse.ops.conv_norm_act import _stats_mode, _update_running_stats, register_epilogue

ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2}
TWO_PASS_STATS = ("batch", "instance")


# --- helpers shared by the kernels ---------------------------------------------------------


@triton.jit
def _load_or(ptr, offsets, valid, default, ACC: tl.constexpr):
    """ptr[offsets] as ACC, or `default` everywhere when the optional input is absent (None)."""
    if ptr is None:
        values = tl.full(offsets.shape, default, ACC)
    else:
        values = tl.load(ptr + offsets, mask=valid, other=default).to(ACC)
    return values


@triton.jit
def _channel_params(n, c, c_valid, mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n,
                    mean_ptr, invstd_ptr, stats_stride_n, ACC: tl.constexpr):
    """Sample n's per-channel epilogue vectors. A stride_n of 0 shares a row between samples."""
    mean = _load_or(mean_ptr, n * stats_stride_n + c, c_valid, 0.0, ACC)
    invstd = _load_or(invstd_ptr, n * stats_stride_n + c, c_valid, 1.0, ACC)
    gamma = _load_or(gamma_ptr, n * gamma_stride_n + c, c_valid, 1.0, ACC)
    beta = _load_or(beta_ptr, n * beta_stride_n + c, c_valid, 0.0, ACC)
    mask = _load_or(mask_ptr, c, c_valid, 1.0, ACC)
    return mean, invstd, gamma, beta, mask


@triton.jit
def _pre_activation(y, mean, invstd, gamma, beta, mask):
    """(y_hat, z) of a [pixels, channels] tile: y_hat = (y - mean) * invstd, z = mask * (gamma * y_hat + beta)."""
    y_hat = (y - mean[None, :]) * invstd[None, :]
    return y_hat, mask[None, :] * (gamma[None, :] * y_hat + beta[None, :])


@triton.jit
def _activation(z, negative_slope, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * negative_slope)
    return z


@triton.jit
def _activation_grad(grad, z, negative_slope, ACT: tl.constexpr):
    # As torch's relu and leaky_relu backward: the negative side at z == 0.
    if ACT == 1:
        grad = tl.where(z > 0, grad, 0.0)
    elif ACT == 2:
        grad = tl.where(z > 0, grad, grad * negative_slope)
    return grad


@triton.jit
def _tile_coordinates(HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.program_id(2), p, p < HW, c, c < C


@triton.jit
def _tile_offsets(n, p, c, W, stride_n, stride_c, stride_h, stride_w):
    return n * stride_n + c[None, :] * stride_c + ((p // W) * stride_h + (p % W) * stride_w)[:, None]


@triton.jit
def _store_tile_moments(y, p_valid, c, c_valid, row, C, tile_mean_ptr, tile_m2_ptr):
    """Per channel, the mean and the sum of squared deviations of the tile's valid pixels."""
    count = tl.sum(p_valid.to(y.dtype), axis=0)
    tile_mean = tl.sum(tl.where(p_valid[:, None], y, 0.0), axis=0) / count
    centered = tl.where(p_valid[:, None], y - tile_mean[None, :], 0.0)
    tl.store(tile_mean_ptr + row * C + c, tile_mean, mask=c_valid)
    tl.store(tile_m2_ptr + row * C + c, tl.sum(centered * centered, axis=0), mask=c_valid)


# --- forward kernels -----------------------------------------------------------------------


@triton.jit
def _moments_kernel(
    y_ptr, tile_mean_ptr, tile_m2_ptr, C, HW, W,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, p, p_valid, c, c_valid = _tile_coordinates(HW, C, BLOCK_P, BLOCK_C)
    offsets = _tile_offsets(n, p, c, W, y_stride_n, y_stride_c, y_stride_h, y_stride_w)
    y = tl.load(y_ptr + offsets, mask=p_valid[:, None] & c_valid[None, :], other=0.0).to(ACC)
    row = n * tl.num_programs(0) + tl.program_id(0)
    _store_tile_moments(y, p_valid, c, c_valid, row, C, tile_mean_ptr, tile_m2_ptr)


@triton.jit
def _finalize_moments_kernel(
    tile_mean_ptr, tile_m2_ptr, mean_ptr, invstd_ptr, ROWS, TILES, C, HW, eps,
    TILE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the ROWS tile moments of group program_id(1) (a sample for instance norm, the whole
    batch for batch norm) into mean and invstd = 1 / sqrt(biased var + eps)."""
    group = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_valid = r < ROWS
        # Tile t of a sample holds TILE pixels, the last one what is left of HW.
        tile_count = tl.where(r_valid, tl.minimum(HW - (r % TILES) * TILE, TILE), 0).to(ACC)
        offsets = (group * ROWS + r)[:, None] * C + c[None, :]
        valid = r_valid[:, None] & c_valid[None, :]
        tile_mean = tl.load(tile_mean_ptr + offsets, mask=valid, other=0.0)
        tile_m2 = tl.load(tile_m2_ptr + offsets, mask=valid, other=0.0)
        chunk_count = tl.sum(tile_count, axis=0)
        chunk_mean = tl.sum(tile_count[:, None] * tile_mean, axis=0) / chunk_count
        deviation = tile_mean - chunk_mean[None, :]
        chunk_m2 = tl.sum(tile_m2 + tile_count[:, None] * deviation * deviation, axis=0)
        # Chan et al.: merge (count, mean, m2) with the chunk's.
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
        count = total
    tl.store(mean_ptr + group * C + c, mean, mask=c_valid)
    tl.store(invstd_ptr + group * C + c, 1.0 / tl.sqrt(m2 / count + eps), mask=c_valid)


@triton.jit
def _apply_kernel(
    y_ptr, out_ptr, C, HW, W,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w,
    mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n, mean_ptr, invstd_ptr, stats_stride_n,
    negative_slope,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = act(mask * (gamma * (y - mean) * invstd + beta)); out has y's strides."""
    n, p, p_valid, c, c_valid = _tile_coordinates(HW, C, BLOCK_P, BLOCK_C)
    offsets = _tile_offsets(n, p, c, W, y_stride_n, y_stride_c, y_stride_h, y_stride_w)
    valid = p_valid[:, None] & c_valid[None, :]
    y = tl.load(y_ptr + offsets, mask=valid, other=0.0).to(ACC)
    params = _channel_params(n, c, c_valid, mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n,
                             mean_ptr, invstd_ptr, stats_stride_n, ACC)
    _, z = _pre_activation(y, *params)
    out = _activation(z, negative_slope, ACT)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _input_coordinate(o, k, stride, padding, dilation, size, TRANSPOSED: tl.constexpr):
    """The input row (or column) that kernel tap k contributes to output row o, and whether it exists."""
    if TRANSPOSED:
        # A transposed conv sends input i to output i * stride - padding + k * dilation; output o
        # therefore gathers input (o + padding - k * dilation) / stride when that divides evenly.
        t = o + padding - k * dilation
        i = t // stride
        exists = (t >= 0) & (i * stride == t) & (i < size)
    else:
        i = o * stride - padding + k * dilation
        exists = (i >= 0) & (i < size)
    return i, exists


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, conv_out_ptr, out_ptr, tile_mean_ptr, tile_m2_ptr,
    H, W, OH, OW, C_OUT, C_IN_PER_GROUP, C_OUT_PER_GROUP, KH, KW,
    stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    w_stride_group, w_stride_out, w_stride_in, w_stride_kh, w_stride_kw,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w,
    mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n, mean_ptr, invstd_ptr, stats_stride_n,
    negative_slope,
    TRANSPOSED: tl.constexpr, GEMM: tl.constexpr, DOT_PRECISION: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Implicit-GEMM conv of a [BLOCK_P output pixels, BLOCK_C output channels] tile of one sample,
    reducing over k = (input channel, kh, kw) of the group, then bias and the epilogue: it writes
    the conv output (conv_out_ptr), the tile moments (tile_mean_ptr) and/or the final output
    (out_ptr), whichever are given."""
    n = tl.program_id(2)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_valid = p < OH * OW
    oh = (p // OW)[:, None]
    ow = (p % OW)[:, None]
    K = C_IN_PER_GROUP * KH * KW
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    if GEMM:
        # The tile's channels lie in one group: A[p, k] gathered from x, B[k, c] from the weight.
        tiles_per_group = tl.cdiv(C_OUT_PER_GROUP, BLOCK_C)
        group = tl.program_id(1) // tiles_per_group
        c_local = (tl.program_id(1) % tiles_per_group) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_valid = c_local < C_OUT_PER_GROUP
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_valid = k < K
            c_in, kh, kw = k // (KH * KW), (k // KW) % KH, k % KW
            ih, h_exists = _input_coordinate(oh, kh[None, :], stride_h, padding_h, dilation_h, H, TRANSPOSED)
            iw, w_exists = _input_coordinate(ow, kw[None, :], stride_w, padding_w, dilation_w, W, TRANSPOSED)
            a = tl.load(
                x_ptr + n * x_stride_n + (group * C_IN_PER_GROUP + c_in)[None, :] * x_stride_c
                + ih * x_stride_h + iw * x_stride_w,
                mask=p_valid[:, None] & k_valid[None, :] & h_exists & w_exists, other=0.0,
            )
            b = tl.load(
                w_ptr + group * w_stride_group + c_local[None, :] * w_stride_out + c_in[:, None] * w_stride_in
                + kh[:, None] * w_stride_kh + kw[:, None] * w_stride_kw,
                mask=k_valid[:, None] & c_valid[None, :], other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        c = group * C_OUT_PER_GROUP + c_local
    else:
        # Narrow groups (depthwise): each column is an output channel of its own group, and the
        # reduction over k runs as FMAs, one tap at a time.
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_valid = c < C_OUT
        group, c_local = c // C_OUT_PER_GROUP, c % C_OUT_PER_GROUP
        for k in range(0, K):
            c_in, kh, kw = k // (KH * KW), (k // KW) % KH, k % KW
            ih, h_exists = _input_coordinate(oh, kh, stride_h, padding_h, dilation_h, H, TRANSPOSED)
            iw, w_exists = _input_coordinate(ow, kw, stride_w, padding_w, dilation_w, W, TRANSPOSED)
            a = tl.load(
                x_ptr + n * x_stride_n + (group * C_IN_PER_GROUP + c_in)[None, :] * x_stride_c
                + ih * x_stride_h + iw * x_stride_w,
                mask=p_valid[:, None] & c_valid[None, :] & h_exists & w_exists, other=0.0,
            )
            b = tl.load(
                w_ptr + group * w_stride_group + c_local * w_stride_out + c_in * w_stride_in
                + kh * w_stride_kh + kw * w_stride_kw,
                mask=c_valid, other=0.0,
            )
            acc += a.to(ACC) * b.to(ACC)[None, :]
    acc += _load_or(bias_ptr, c, c_valid, 0.0, ACC)[None, :]

    offsets = _tile_offsets(n, p, c, OW, y_stride_n, y_stride_c, y_stride_h, y_stride_w)
    valid = p_valid[:, None] & c_valid[None, :]
    if conv_out_ptr is not None:
        tl.store(conv_out_ptr + offsets, acc.to(conv_out_ptr.dtype.element_ty), mask=valid)
    if tile_mean_ptr is not None:
        row = n * tl.num_programs(0) + tl.program_id(0)
        _store_tile_moments(acc, p_valid, c, c_valid, row, C_OUT, tile_mean_ptr, tile_m2_ptr)
    if out_ptr is not None:
        params = _channel_params(n, c, c_valid, mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n,
                                 mean_ptr, invstd_ptr, stats_stride_n, ACC)
        _, z = _pre_activation(acc, *params)
        out = _activation(z, negative_slope, ACT)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=valid)


# --- backward kernels ----------------------------------------------------------------------


@triton.jit
def _grad_tile(
    grad_out_ptr, y_ptr, n, p, p_valid, c, c_valid, W,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w, g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n, mean_ptr, invstd_ptr, stats_stride_n,
    negative_slope, ACT: tl.constexpr, ACC: tl.constexpr,
):
    """(dz, y_hat, params) of a tile: dz = grad_out * act'(z) is the gradient wrt z, zero off the tensor."""
    valid = p_valid[:, None] & c_valid[None, :]
    y_offsets = _tile_offsets(n, p, c, W, y_stride_n, y_stride_c, y_stride_h, y_stride_w)
    g_offsets = _tile_offsets(n, p, c, W, g_stride_n, g_stride_c, g_stride_h, g_stride_w)
    y = tl.load(y_ptr + y_offsets, mask=valid, other=0.0).to(ACC)
    grad_out = tl.load(grad_out_ptr + g_offsets, mask=valid, other=0.0).to(ACC)
    params = _channel_params(n, c, c_valid, mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n,
                             mean_ptr, invstd_ptr, stats_stride_n, ACC)
    y_hat, z = _pre_activation(y, *params)
    return _activation_grad(grad_out, z, negative_slope, ACT), y_hat, params


@triton.jit
def _grad_sums_kernel(
    grad_out_ptr, y_ptr, sum_dz_ptr, sum_dz_y_hat_ptr, C, HW, W,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w, g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n, mean_ptr, invstd_ptr, stats_stride_n,
    negative_slope,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, p, p_valid, c, c_valid = _tile_coordinates(HW, C, BLOCK_P, BLOCK_C)
    dz, y_hat, _ = _grad_tile(
        grad_out_ptr, y_ptr, n, p, p_valid, c, c_valid, W,
        y_stride_n, y_stride_c, y_stride_h, y_stride_w, g_stride_n, g_stride_c, g_stride_h, g_stride_w,
        mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n, mean_ptr, invstd_ptr, stats_stride_n,
        negative_slope, ACT, ACC,
    )
    row = n * tl.num_programs(0) + tl.program_id(0)
    tl.store(sum_dz_ptr + row * C + c, tl.sum(dz, axis=0), mask=c_valid)
    tl.store(sum_dz_y_hat_ptr + row * C + c, tl.sum(dz * y_hat, axis=0), mask=c_valid)


@triton.jit
def _accumulate_and_store(ptr, stride_n, n, c, c_valid, total, value, scale):
    """Adds sample n's `value` to an output that is per sample (stride_n > 0: written to row n) or
    shared by all samples (stride_n == 0: summed over n, the running total rewritten each sample).
    Stores scale * total and returns the new running total."""
    total = tl.where(stride_n == 0, total, 0.0) + value
    if ptr is not None:
        tl.store(ptr + n * stride_n + c, total * scale, mask=c_valid)
    return total


@triton.jit
def _grad_finalize_kernel(
    sum_dz_ptr, sum_dz_y_hat_ptr, N, TILES, C,
    mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n,
    grad_mask_ptr, grad_gamma_ptr, grad_beta_ptr, mean_dy_hat_ptr, mean_dy_hat_y_hat_ptr, means_stride_n,
    inv_count,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """From the per-tile sums, with dy_hat = dz * mask * gamma:
    grad_mask = sum(dz * (gamma * y_hat + beta)), grad_gamma = mask * sum(dz * y_hat),
    grad_beta = mask * sum(dz), and the means of dy_hat and dy_hat * y_hat that grad_y needs
    (per channel, or per sample and channel when means_stride_n > 0)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < C
    mask = _load_or(mask_ptr, c, c_valid, 1.0, ACC)
    grad_mask = tl.zeros([BLOCK_C], ACC)
    grad_gamma = tl.zeros([BLOCK_C], ACC)
    grad_beta = tl.zeros([BLOCK_C], ACC)
    mean_dy_hat = tl.zeros([BLOCK_C], ACC)
    mean_dy_hat_y_hat = tl.zeros([BLOCK_C], ACC)
    for n in range(0, N):
        sum_dz = tl.zeros([BLOCK_C], ACC)
        sum_dz_y_hat = tl.zeros([BLOCK_C], ACC)
        for t0 in range(0, TILES, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            offsets = (n * TILES + t)[:, None] * C + c[None, :]
            valid = (t < TILES)[:, None] & c_valid[None, :]
            sum_dz += tl.sum(tl.load(sum_dz_ptr + offsets, mask=valid, other=0.0), axis=0)
            sum_dz_y_hat += tl.sum(tl.load(sum_dz_y_hat_ptr + offsets, mask=valid, other=0.0), axis=0)
        gamma = _load_or(gamma_ptr, n * gamma_stride_n + c, c_valid, 1.0, ACC)
        beta = _load_or(beta_ptr, n * beta_stride_n + c, c_valid, 0.0, ACC)
        grad_mask = _accumulate_and_store(grad_mask_ptr, 0, n, c, c_valid, grad_mask,
                                          gamma * sum_dz_y_hat + beta * sum_dz, 1.0)
        grad_gamma = _accumulate_and_store(grad_gamma_ptr, gamma_stride_n, n, c, c_valid, grad_gamma,
                                           mask * sum_dz_y_hat, 1.0)
        grad_beta = _accumulate_and_store(grad_beta_ptr, beta_stride_n, n, c, c_valid, grad_beta,
                                          mask * sum_dz, 1.0)
        mean_dy_hat = _accumulate_and_store(mean_dy_hat_ptr, means_stride_n, n, c, c_valid, mean_dy_hat,
                                            mask * gamma * sum_dz, inv_count)
        mean_dy_hat_y_hat = _accumulate_and_store(mean_dy_hat_y_hat_ptr, means_stride_n, n, c, c_valid,
                                                  mean_dy_hat_y_hat, mask * gamma * sum_dz_y_hat, inv_count)


@triton.jit
def _grad_input_kernel(
    grad_out_ptr, y_ptr, grad_y_ptr, mean_dy_hat_ptr, mean_dy_hat_y_hat_ptr, means_stride_n, C, HW, W,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w, g_stride_n, g_stride_c, g_stride_h, g_stride_w,
    mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n, mean_ptr, invstd_ptr, stats_stride_n,
    negative_slope,
    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_y, with y's strides; the batch statistics' terms come in only when their means are given."""
    n, p, p_valid, c, c_valid = _tile_coordinates(HW, C, BLOCK_P, BLOCK_C)
    dz, y_hat, params = _grad_tile(
        grad_out_ptr, y_ptr, n, p, p_valid, c, c_valid, W,
        y_stride_n, y_stride_c, y_stride_h, y_stride_w, g_stride_n, g_stride_c, g_stride_h, g_stride_w,
        mask_ptr, gamma_ptr, gamma_stride_n, beta_ptr, beta_stride_n, mean_ptr, invstd_ptr, stats_stride_n,
        negative_slope, ACT, ACC,
    )
    _, invstd, gamma, _, mask = params
    dy_hat = dz * (mask * gamma)[None, :]
    if mean_dy_hat_ptr is not None:
        mean_dy_hat = tl.load(mean_dy_hat_ptr + n * means_stride_n + c, mask=c_valid, other=0.0)
        mean_dy_hat_y_hat = tl.load(mean_dy_hat_y_hat_ptr + n * means_stride_n + c, mask=c_valid, other=0.0)
        dy_hat = dy_hat - mean_dy_hat[None, :] - y_hat * mean_dy_hat_y_hat[None, :]
    grad_y = dy_hat * invstd[None, :]
    offsets = _tile_offsets(n, p, c, W, y_stride_n, y_stride_c, y_stride_h, y_stride_w)
    tl.store(grad_y_ptr + offsets, grad_y.to(grad_y_ptr.dtype.element_ty),
             mask=p_valid[:, None] & c_valid[None, :])


# --- launch helpers ------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(size: int, smallest: int, largest: int) -> int:
    return max(smallest, min(triton.next_power_of_2(size), largest))


def _tile_blocks(pixels: int, channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the per-tile epilogue kernels."""
    if triton_interpreted():
        # The interpreter costs about a millisecond per program: few, large programs.
        return _block(pixels, 1, 1024), _block(channels, 1, 64)
    return _block(pixels, 16, 128), _block(channels, 1, 32)


def _epilogue_args(mask, gamma, beta, mean, invstd) -> dict:
    """The epilogue kernels' per-channel arguments: each optional vector contiguous, with a row
    stride over samples that is 0 when one row serves every sample."""

    def per_sample_stride(t):
        return t.shape[-1] if t is not None and t.dim() == 2 else 0

    def contiguous(t):
        return t.contiguous() if t is not None else None

    return dict(
        mask_ptr=contiguous(mask),
        gamma_ptr=contiguous(gamma), gamma_stride_n=per_sample_stride(gamma),
        beta_ptr=contiguous(beta), beta_stride_n=per_sample_stride(beta),
        mean_ptr=contiguous(mean), invstd_ptr=contiguous(invstd), stats_stride_n=per_sample_stride(mean),
    )


def _stats_shape(stats: str, n: int, c: int) -> tuple[int, ...]:
    return {"batch": (c,), "instance": (n, c)}.get(stats, (0,))


def _finalize_moments(tile_mean, tile_m2, stats, hw, tile, eps):
    """mean and invstd (_stats_shape) from [N, TILES, C] tile moments, in their accumulation dtype."""
    n, tiles, c = tile_mean.shape
    groups = n if stats == "instance" else 1
    mean = tile_mean.new_empty((groups, c))
    invstd = tile_mean.new_empty((groups, c))
    block_c = _block(c, 1, 64)
    wrap_triton(_finalize_moments_kernel)[(triton.cdiv(c, block_c), groups)](
        tile_mean, tile_m2, mean, invstd, n * tiles // groups, tiles, c, hw, eps,
        TILE=tile, ACC=_acc_dtype(tile_mean.dtype), BLOCK_R=_block(n * tiles // groups, 1, 64), BLOCK_C=block_c,
    )
    shape = _stats_shape(stats, n, c)
    return mean.view(shape), invstd.view(shape)


def _apply(y, out, epilogue: dict, activation: str, negative_slope: float) -> None:
    n, c, h, w = y.shape
    block_p, block_c = _tile_blocks(h * w, c)
    wrap_triton(_apply_kernel)[(triton.cdiv(h * w, block_p), triton.cdiv(c, block_c), n)](
        y, out, c, h * w, w, *y.stride(), **epilogue, negative_slope=negative_slope,
        ACT=ACTIVATION_CODES[activation], ACC=_acc_dtype(y.dtype), BLOCK_P=block_p, BLOCK_C=block_c,
    )


def _empty(y):
    return y.new_empty((0,))


# --- the epilogue ops ----------------------------------------------------------------------


@triton_op("gansparse::norm_mask_act_triton", mutates_args=())
def norm_mask_act(
    y: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor | None,
    invstd: torch.Tensor | None,
    stats: str,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = y.shape
    out = torch.empty_like(y)
    if stats not in TWO_PASS_STATS:
        fixed = (mean, invstd) if stats == "given" else (None, None)
        _apply(y, out, _epilogue_args(mask, gamma, beta, *fixed), activation, negative_slope)
        return out, _empty(y), _empty(y)
    block_p, block_c = _tile_blocks(h * w, c)
    tiles = triton.cdiv(h * w, block_p)
    tile_mean = y.new_empty((n, tiles, c), dtype=_acc_torch_dtype(y.dtype))
    tile_m2 = torch.empty_like(tile_mean)
    wrap_triton(_moments_kernel)[(tiles, triton.cdiv(c, block_c), n)](
        y, tile_mean, tile_m2, c, h * w, w, *y.stride(),
        ACC=_acc_dtype(y.dtype), BLOCK_P=block_p, BLOCK_C=block_c,
    )
    mean, invstd = _finalize_moments(tile_mean, tile_m2, stats, h * w, block_p, eps)
    _apply(y, out, _epilogue_args(mask, gamma, beta, mean, invstd), activation, negative_slope)
    return out, mean.to(y.dtype), invstd.to(y.dtype)


@triton_op("gansparse::norm_mask_act_backward_triton", mutates_args=())
def norm_mask_act_backward(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    stats: str,
    activation: str,
    negative_slope: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = y.shape
    wants_y, wants_mask, wants_gamma, wants_beta = output_mask
    two_pass = stats in TWO_PASS_STATS
    per_sample_stats = stats == "instance"
    normalized = (mean, invstd) if stats != "none" else (None, None)
    epilogue = _epilogue_args(mask, gamma, beta, *normalized)
    acc = _acc_dtype(y.dtype)
    block_p, block_c = _tile_blocks(h * w, c)
    grid = (triton.cdiv(h * w, block_p), triton.cdiv(c, block_c), n)
    strides = (*y.stride(), *grad_out.stride())

    grad_y, grad_mask, grad_gamma, grad_beta = _gradients(y, mask, gamma, beta, output_mask)
    # grad_y's statistics terms, mean(dy_hat) and mean(dy_hat * y_hat), per channel or per sample
    # and channel as the statistics were taken.
    dy_hat_means = [None, None]
    if two_pass:
        dy_hat_means = [y.new_empty(_stats_shape(stats, n, c), dtype=_acc_torch_dtype(y.dtype)) for _ in range(2)]
    dy_hat_means_stride_n = c if per_sample_stats else 0
    if wants_mask or wants_gamma or wants_beta or (wants_y and two_pass):
        sum_dz = y.new_empty((n, grid[0], c), dtype=_acc_torch_dtype(y.dtype))
        sum_dz_y_hat = torch.empty_like(sum_dz)
        wrap_triton(_grad_sums_kernel)[grid](
            grad_out, y, sum_dz, sum_dz_y_hat, c, h * w, w, *strides, **epilogue,
            negative_slope=negative_slope, ACT=ACTIVATION_CODES[activation], ACC=acc,
            BLOCK_P=block_p, BLOCK_C=block_c,
        )
        block_c = _block(c, 1, 64)
        wrap_triton(_grad_finalize_kernel)[(triton.cdiv(c, block_c),)](
            sum_dz, sum_dz_y_hat, n, grid[0], c,
            epilogue["mask_ptr"], epilogue["gamma_ptr"], epilogue["gamma_stride_n"],
            epilogue["beta_ptr"], epilogue["beta_stride_n"],
            grad_mask if wants_mask else None, grad_gamma if wants_gamma else None,
            grad_beta if wants_beta else None, *dy_hat_means, dy_hat_means_stride_n,
            1.0 / (h * w if per_sample_stats else n * h * w),
            ACC=acc, BLOCK_T=_block(grid[0], 1, 64), BLOCK_C=block_c,
        )
    if wants_y:
        wrap_triton(_grad_input_kernel)[grid](
            grad_out, y, grad_y, *dy_hat_means, dy_hat_means_stride_n, c, h * w, w, *strides, **epilogue,
            negative_slope=negative_slope, ACT=ACTIVATION_CODES[activation], ACC=acc,
            BLOCK_P=block_p, BLOCK_C=block_c,
        )
    return grad_y, grad_mask, grad_gamma, grad_beta


def _gradients(y, mask, gamma, beta, output_mask):
    """Uninitialised (grad_y, grad_mask, grad_gamma, grad_beta), empty where not requested."""
    return tuple(torch.empty_like(t) if wanted else _empty(y)
                 for t, wanted in zip((y, mask, gamma, beta), output_mask))


# Explicit fake kernels: under TRITON_INTERPRET=1 wrap_triton cannot trace, so the fakes that
# triton_op derives by running the function would launch the interpreter on fake tensors.
@norm_mask_act_backward.register_fake
def _(grad_out, y, mask, gamma, beta, mean, invstd, stats, activation, negative_slope, output_mask):
    return _gradients(y, mask, gamma, beta, output_mask)


register_epilogue("gansparse::norm_mask_act_triton", norm_mask_act_backward)


# --- the fused conv op ---------------------------------------------------------------------


def _conv_output_size(size, kernel, stride, padding, dilation, output_padding, transposed) -> int:
    if transposed:
        return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout torch's conv gives its output: channels_last for a channels_last input."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _conv_outputs(x, weight, stride, padding, dilation, groups, transposed, output_padding, stats, save_conv_out):
    """Uninitialised out and conv_out of conv_norm_mask_act."""
    n, _, h, w = x.shape
    c_out = weight.shape[1] * groups if transposed else weight.shape[0]
    oh, ow = (_conv_output_size(*args, transposed)
              for args in zip((h, w), weight.shape[2:], stride, padding, dilation, output_padding))
    out = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    conv_out = torch.empty_like(out) if stats in TWO_PASS_STATS or save_conv_out else _empty(out)
    return out, conv_out


def _conv_tiling(pixels: int, c_out: int, groups: int, k: int):
    """(GEMM, BLOCK_P, BLOCK_C, BLOCK_K, channel tiles) of the conv kernel for a reduction over k."""
    interpreted = triton_interpreted()
    block_p = _block(pixels, 16, 1024 if interpreted else 64)
    c_out_per_group = c_out // groups
    # tl.dot needs 16 output channels per tile; narrower groups (depthwise) use the FMA path,
    # whose tiles span groups.
    if groups == 1 or c_out_per_group >= 16:
        block_c, block_k = _block(c_out_per_group, 16, 64), _block(k, 16, 64 if interpreted else 32)
        return True, block_p, block_c, block_k, groups * triton.cdiv(c_out_per_group, block_c)
    block_c = _block(c_out, 1, 64 if interpreted else 32)
    return False, block_p, block_c, 1, triton.cdiv(c_out, block_c)


@triton_op("gansparse::conv_norm_mask_act_triton", mutates_args=())
def conv_norm_mask_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor | None,
    invstd: torch.Tensor | None,
    stats: str,
    eps: float,
    activation: str,
    negative_slope: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    transposed: bool,
    output_padding: list[int],
    save_conv_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, conv_out, mean, invstd): the epilogue of norm_mask_act applied to conv(x) (see
    masked_conv_norm_act). conv_out is empty unless save_conv_out or the statistics need it."""
    out, conv_out = _conv_outputs(
        x, weight, stride, padding, dilation, groups, transposed, output_padding, stats, save_conv_out)
    n, c_out, oh, ow = out.shape
    _, c_in, h, w = x.shape
    kh, kw = weight.shape[2:]
    c_out_per_group = c_out // groups
    # The kernel addresses weight[group, c_out_local, c_in_local, kh, kw] through these strides.
    if transposed:  # weight [C_in, C_out/groups, kH, kW]
        w_stride_group, w_stride_out, w_stride_in = c_in // groups * weight.stride(0), weight.stride(1), weight.stride(0)
    else:  # weight [C_out, C_in/groups, kH, kW]
        w_stride_group, w_stride_out, w_stride_in = c_out_per_group * weight.stride(0), weight.stride(0), weight.stride(1)
    two_pass = stats in TWO_PASS_STATS
    gemm, block_p, block_c, block_k, channel_tiles = _conv_tiling(oh * ow, c_out, groups, c_in // groups * kh * kw)
    pixel_tiles = triton.cdiv(oh * ow, block_p)
    if two_pass:
        tile_mean = out.new_empty((n, pixel_tiles, c_out), dtype=_acc_torch_dtype(x.dtype))
        tile_m2 = torch.empty_like(tile_mean)
        epilogue = _epilogue_args(None, None, None, None, None)  # the apply kernel runs it
    else:
        tile_mean = tile_m2 = None
        fixed = (mean, invstd) if stats == "given" else (None, None)
        epilogue = _epilogue_args(mask, gamma, beta, *fixed)
    # As torch's conv: TF32 products for float32 where cuDNN would use them.
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"
    wrap_triton(_conv_kernel)[(pixel_tiles, channel_tiles, n)](
        x, weight, bias, conv_out if conv_out.numel() else None, None if two_pass else out, tile_mean, tile_m2,
        h, w, oh, ow, c_out, c_in // groups, c_out_per_group, kh, kw, *stride, *padding, *dilation,
        *x.stride(), w_stride_group, w_stride_out, w_stride_in, weight.stride(2), weight.stride(3),
        *out.stride(), **epilogue, negative_slope=negative_slope,
        TRANSPOSED=transposed, GEMM=gemm, DOT_PRECISION=precision, ACT=ACTIVATION_CODES[activation],
        ACC=_acc_dtype(x.dtype), BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
    )
    if not two_pass:
        return out, conv_out, _empty(out), _empty(out)
    mean, invstd = _finalize_moments(tile_mean, tile_m2, stats, oh * ow, block_p, eps)
    _apply(conv_out, out, _epilogue_args(mask, gamma, beta, mean, invstd), activation, negative_slope)
    return out, conv_out, mean.to(x.dtype), invstd.to(x.dtype)


@conv_norm_mask_act.register_fake
def _(x, weight, bias, mask, gamma, beta, mean, invstd, stats, eps, activation, negative_slope, stride, padding,
      dilation, groups, transposed, output_padding, save_conv_out):
    out, conv_out = _conv_outputs(
        x, weight, stride, padding, dilation, groups, transposed, output_padding, stats, save_conv_out)
    stats_shape = _stats_shape(stats, out.shape[0], out.shape[1])
    return out, conv_out, out.new_empty(stats_shape), out.new_empty(stats_shape)


def _conv_setup_context(ctx, inputs, output):
    (x, weight, bias, mask, gamma, beta, mean_in, invstd_in, stats, _eps, activation, negative_slope,
     stride, padding, dilation, groups, transposed, output_padding, _save_conv_out) = inputs
    _out, conv_out, mean_out, invstd_out = output
    mean, invstd = (mean_in, invstd_in) if stats == "given" else (mean_out, invstd_out)
    ctx.save_for_backward(x, weight, conv_out, mask, gamma, beta, mean, invstd)
    ctx.stats, ctx.activation, ctx.negative_slope = stats, activation, negative_slope
    ctx.bias_sizes = list(bias.shape) if bias is not None else None
    ctx.conv_args = (stride, padding, dilation, transposed, output_padding, groups)


def _conv_backward(ctx, grad_out, _grad_conv_out, _grad_mean, _grad_invstd):
    x, weight, conv_out, mask, gamma, beta, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    conv_grads = [needs[0], needs[1], needs[2] and ctx.bias_sizes is not None]
    output_mask = [any(conv_grads), needs[3] and mask is not None, needs[4] and gamma is not None,
                   needs[5] and beta is not None]
    grad_conv_out, grad_mask, grad_gamma, grad_beta = norm_mask_act_backward(
        grad_out, conv_out, mask, gamma, beta, mean, invstd, ctx.stats, ctx.activation, ctx.negative_slope,
        output_mask,
    )
    grad_x = grad_weight = grad_bias = None
    if any(conv_grads):
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_conv_out, x, weight, ctx.bias_sizes, *ctx.conv_args, conv_grads)
    grads = [g if wanted else None for g, wanted in zip((grad_x, grad_weight, grad_bias), conv_grads)]
    grads += [g if wanted else None for g, wanted in zip((grad_mask, grad_gamma, grad_beta), output_mask[1:])]
    return (*grads, *[None] * 13)


torch.library.register_autograd(
    "gansparse::conv_norm_mask_act_triton", _conv_backward, setup_context=_conv_setup_context)


def masked_conv_norm_act(x, weight, bias, mask, gamma, beta, running_mean, running_var, *, norm, training,
                         momentum, eps, activation, negative_slope, stride, padding, dilation, groups,
                         transposed, output_padding):
    """The Triton backend of gansparse.functional.masked_conv_norm_act (arguments checked there)."""
    stats, mean, invstd = _stats_mode(norm, training, running_mean, running_var, eps)
    inputs = (x, weight, bias, mask, gamma, beta)
    # Only backward reads the conv output: inference with fixed statistics writes `out` alone.
    save_conv_out = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    out, _conv_out, batch_mean, batch_invstd = conv_norm_mask_act(
        *inputs, mean, invstd, stats, float(eps), activation or "none", float(negative_slope),
        list(stride), list(padding), list(dilation), groups, transposed, list(output_padding), save_conv_out,
    )
    if stats == "batch" and running_mean is not None:
        _update_running_stats(running_mean, running_var, batch_mean, batch_invstd, eps, momentum,
                              out.numel() // out.shape[1])
    return out
