// CPU kernel of the direct sparse convolution (declared in sparse_conv_kernels.h), after Park et
// al., "Faster CNNs with Direct Sparse Convolutions" (ICLR 2017), and XNNPACK's f32 SpMM.
//
// Every case reduces to stride-1 correlations over a zero-padded copy of the input:
//   out[o, y0 + t * step_y, x0 + u * step_x] = act(bias[o] + sum_k w_k * plane[t * pitch + u + offset_k])
// where the sum runs over output channel o's nonzero weights, each stored with the precomputed
// offset of the input value it multiplies for output (t, u) = (0, 0).
// - conv, stride s: the padded input is split into s x s phase planes (plane (a, b) holds the
//   pixels (s * Y + a, s * X + b)), so a tap reads one plane contiguously along the output row.
//   One sub-problem, step 1.
// - transposed conv, stride s: output pixels with the same (y + pad) mod s form an output phase
//   that only the taps with i * dilation = that residue mod s reach; each phase is a stride-1
//   correlation of the (undilated) input with those taps, step s. No zero-inserted input is
//   ever read.
// - an unpadded stride-1 conv (1x1, say) reads the input in place.
// The padded copy spaces its planes an odd number of cache lines apart, so that the same pixel
// of many channels does not compete for the same few sets of L1 and L2.
//
// Inner loop (AVX2): output pixels on the vector lanes, up to 8 vectors (64 pixels) of
// accumulators held in registers while nonzeros stream past: per nonzero, one broadcast and one
// FMA per vector, each reading a vector of input at the nonzero's offset.
//
// Cache blocking: one output channel's taps read rows of every input channel, far more than
// L1 holds, so each output row block would come from L2, a vector per FMA. Instead the input
// channels are split into groups whose rows for one block of 64 output pixels fit in about half
// of L1 (see group_channels), and the nonzeros are sorted by (group, output channel). For a block
// of pixels, every group in turn serves every output channel of the task from L1, while the
// channels' partial sums wait in a small L1 buffer between groups (8 vector loads and stores per
// group and channel instead of per nonzero; the first group starts from zeros in registers).
// After the last group, bias + activation are applied and the block is stored.
//
// Parallel tasks are (sample, phase, block of output rows, block of output channels), taken in
// that order by whichever thread is free next: the nonzeros are not spread evenly over the
// channels, and on a shared machine one thread may be descheduled for a while. Threads working
// on neighbouring tasks also share the input rows those read.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_parallel.h"
#include "sparse_conv_kernels.h"

namespace gansparse {
namespace sparse_conv {
namespace {

constexpr int64_t kLanes = 8;                  // floats per AVX2 vector
constexpr int64_t kBlockPixels = 8 * kLanes;   // output pixels per register block
constexpr int64_t kRowsPerTask = 4;
constexpr int64_t kChannelsPerTask = 32;
constexpr int64_t kGroupInputBytes = 16 * 1024;  // input of one channel group for one pixel block
constexpr double kMinGroupNonzeros = 32;         // per output channel and channel group
// Multiply-adds per thread below which another thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;

struct Nonzero {
  int32_t offset;  // into the sample's padded input, for output (t, u) = (0, 0)
  float value;
};

// One stride-1 correlation: output pixels (y0 + t * step_y, x0 + u * step_x), t < rows, u < cols.
// Its nonzeros are sorted by (input channel group g, output channel o): those of (g, o) are
// [starts[g * c_out + o], starts[g * c_out + o + 1]).
struct Phase {
  int64_t rows, cols;
  int64_t y0, x0;
  std::vector<int32_t> starts;
  std::vector<Nonzero> nonzeros;
};

// Collects a phase's nonzeros in any order, then sorts them by (group, output channel).
class PhaseBuilder {
 public:
  PhaseBuilder(int64_t c_out, int64_t group_channels) : c_out_(c_out), group_channels_(group_channels) {}

  void add(int64_t o, int64_t c, int64_t offset, float value) {
    keys_.push_back(static_cast<int32_t>(c / group_channels_ * c_out_ + o));
    entries_.push_back({static_cast<int32_t>(offset), value});
  }

  Phase finish(int64_t rows, int64_t cols, int64_t y0, int64_t x0, int64_t groups) const {
    Phase phase{rows, cols, y0, x0, std::vector<int32_t>(groups * c_out_ + 1, 0),
                std::vector<Nonzero>(entries_.size())};
    for (int32_t key : keys_) ++phase.starts[key + 1];
    for (size_t k = 1; k < phase.starts.size(); ++k) phase.starts[k] += phase.starts[k - 1];
    std::vector<int32_t> next(phase.starts.begin(), phase.starts.end() - 1);
    for (size_t e = 0; e < entries_.size(); ++e) phase.nonzeros[next[keys_[e]]++] = entries_[e];
    return phase;
  }

 private:
  int64_t c_out_, group_channels_;
  std::vector<int32_t> keys_;
  std::vector<Nonzero> entries_;
};

// The zero-padded input of one sample: planes [c_in, split_h, split_w] of [plane_h, pitch],
// plane_stride floats apart. Input pixel (c, y, x) is at padded (Y, X) = (y + top, x + left),
// which lives in plane (c, Y % split_h, X % split_w) at (Y / split_h, X / split_w).
struct PaddedLayout {
  int64_t split_h, split_w;
  int64_t top, left;
  int64_t plane_h, pitch;
  int64_t plane_stride;

  int64_t sample_size(int64_t channels) const { return channels * split_h * split_w * plane_stride; }
  int64_t plane_start(int64_t c, int64_t a, int64_t b) const {
    return ((c * split_h + a) * split_w + b) * plane_stride;
  }
};

constexpr int64_t kLineFloats = 16;  // floats per 64-byte cache line

// An odd number of cache lines that holds `floats`.
int64_t odd_lines(int64_t floats) {
  const int64_t lines = (floats + kLineFloats - 1) / kLineFloats;
  return (lines | 1) * kLineFloats;
}

bool reads_in_place(const ConvShape& s) {
  return !s.transposed && s.pad_h == 0 && s.pad_w == 0 && s.stride_h == 1 && s.stride_w == 1;
}

struct Plan {
  bool in_place;  // read x itself: no padding, stride 1
  PaddedLayout layout;
  int64_t groups, group_channels;
  std::vector<Phase> phases;
};

// Input channels per group. Small enough that the rows of a group the taps read for one block
// of pixels and one output row stay in L1: a conv's tap (i, j) reads row i * dilation / stride of
// column phase j * dilation % stride, so kh rows in each of min(kw, stride_w) phase planes; an
// output phase of a transposed conv reads only its taps, (kh - 1) * dilation / stride + 1 rows of
// the one plane. But large enough that an output channel has about kMinGroupNonzeros nonzeros
// in a group, to pay for loading and storing its partial sums: at high sparsity the group
// outgrows L1 and its rows come from L2, as without groups.
int64_t group_channels(const ConvShape& s, int64_t nnz) {
  const int64_t rows = s.transposed ? (s.kh - 1) * s.dilation_h / s.stride_h + 1 : s.kh * std::min(s.kw, s.stride_w);
  const int64_t row_floats = kBlockPixels + (s.kw - 1) * s.dilation_w / s.stride_w;
  const int64_t bytes = rows * row_floats * static_cast<int64_t>(sizeof(float));
  const int64_t phases = s.transposed ? s.stride_h * s.stride_w : 1;
  // Nonzeros per input channel, output channel and phase, times kMinGroupNonzeros.
  const double per_channel = static_cast<double>(nnz) / (s.c_out * s.c_in * phases);
  const int64_t for_nonzeros = per_channel > 0 ? static_cast<int64_t>(kMinGroupNonzeros / per_channel) : s.c_in;
  return std::clamp<int64_t>(std::max(kGroupInputBytes / bytes, for_nonzeros), 1, s.c_in);
}

// The output coordinates of one transposed-conv output phase along one axis: outputs first * s +
// residue - pad for first <= T <= last, i.e. `count` of them from y0 with step s.
struct AxisPhase {
  int64_t first, count, y0;
};

AxisPhase transposed_axis_phase(int64_t residue, int64_t out_size, int64_t stride, int64_t pad) {
  const int64_t first = -floor_div(residue - pad, stride);
  const int64_t last = floor_div(out_size - 1 + pad - residue, stride);
  return {first, std::max<int64_t>(0, last - first + 1), first * stride + residue - pad};
}

// Padding of the transposed conv's input on one side, and the padded length: enough for
// every phase's first output to read its deepest tap, and for the last to read the end.
void transposed_axis_padding(int64_t in_size, int64_t out_size, int64_t k, int64_t stride, int64_t pad,
                             int64_t dilation, int64_t* before, int64_t* length) {
  const int64_t deepest = (k - 1) * dilation / stride;
  int64_t min_first = 0, max_last = in_size - 1;
  bool any = false;
  for (int64_t r = 0; r < stride; ++r) {
    const AxisPhase p = transposed_axis_phase(r, out_size, stride, pad);
    if (p.count == 0) continue;
    min_first = any ? std::min(min_first, p.first) : p.first;
    max_last = std::max(max_last, p.first + p.count - 1);
    any = true;
  }
  *before = std::max<int64_t>(0, deepest - min_first);
  *length = *before + max_last + 1;
}

// The layout the kernel reads: x's own (one plane [h, w] per channel) when reads_in_place.
PaddedLayout padded_layout(const ConvShape& s) {
  if (reads_in_place(s)) return {1, 1, 0, 0, s.h, s.w, s.h * s.w};
  PaddedLayout layout{s.stride_h, s.stride_w, s.pad_h, s.pad_w, 0, 0, 0};
  if (!s.transposed) {
    layout.plane_h = (s.h + 2 * s.pad_h + s.stride_h - 1) / s.stride_h;
    layout.pitch = (s.w + 2 * s.pad_w + s.stride_w - 1) / s.stride_w;
  } else {
    layout.split_h = layout.split_w = 1;
    transposed_axis_padding(s.h, s.oh, s.kh, s.stride_h, s.pad_h, s.dilation_h, &layout.top, &layout.plane_h);
    transposed_axis_padding(s.w, s.ow, s.kw, s.stride_w, s.pad_w, s.dilation_w, &layout.left, &layout.pitch);
  }
  layout.plane_stride = odd_lines(layout.plane_h * layout.pitch);
  return layout;
}

Plan make_plan(CsrWeight weight, const ConvShape& s) {
  Plan plan;
  plan.layout = padded_layout(s);
  plan.in_place = reads_in_place(s);
  plan.group_channels = group_channels(s, weight.row_offsets[s.c_out]);
  plan.groups = (s.c_in + plan.group_channels - 1) / plan.group_channels;
  const PaddedLayout& layout = plan.layout;
  if (!s.transposed) {
    PhaseBuilder builder(s.c_out, plan.group_channels);
    for (int64_t o = 0; o < s.c_out; ++o) {
      for (int64_t k = weight.row_offsets[o]; k < weight.row_offsets[o + 1]; ++k) {
        const Tap tap = decode_column(weight.columns[k], s.kh, s.kw);
        const int64_t dy = tap.i * s.dilation_h, dx = tap.j * s.dilation_w;
        const int64_t offset = layout.plane_start(tap.c, dy % s.stride_h, dx % s.stride_w) +
                               dy / s.stride_h * layout.pitch + dx / s.stride_w;
        builder.add(o, tap.c, offset, weight.values[k]);
      }
    }
    plan.phases.push_back(builder.finish(s.oh, s.ow, 0, 0, plan.groups));
    return plan;
  }
  for (int64_t ry = 0; ry < s.stride_h; ++ry) {
    for (int64_t rx = 0; rx < s.stride_w; ++rx) {
      const AxisPhase py = transposed_axis_phase(ry, s.oh, s.stride_h, s.pad_h);
      const AxisPhase px = transposed_axis_phase(rx, s.ow, s.stride_w, s.pad_w);
      if (py.count == 0 || px.count == 0) continue;
      PhaseBuilder builder(s.c_out, plan.group_channels);
      for (int64_t o = 0; o < s.c_out; ++o) {
        for (int64_t k = weight.row_offsets[o]; k < weight.row_offsets[o + 1]; ++k) {
          const Tap tap = decode_column(weight.columns[k], s.kh, s.kw);
          const int64_t dy = tap.i * s.dilation_h, dx = tap.j * s.dilation_w;
          if (dy % s.stride_h != ry || dx % s.stride_w != rx) continue;
          // Output T of this phase reads input row T - dy / stride (padded: + top).
          const int64_t row = py.first - dy / s.stride_h + layout.top;
          const int64_t col = px.first - dx / s.stride_w + layout.left;
          builder.add(o, tap.c, layout.plane_start(tap.c, 0, 0) + row * layout.pitch + col, weight.values[k]);
        }
      }
      plan.phases.push_back(builder.finish(py.count, px.count, py.y0, px.y0, plan.groups));
    }
  }
  return plan;
}

// Writes the padded (and phase-split) copy of every sample of x into `padded`.
void pad_input(const float* x, float* padded, const ConvShape& s, const PaddedLayout& layout, int num_threads) {
  parallel_for(s.n * s.c_in, num_threads, [&](int64_t begin, int64_t end, auto) GS_INLINE_LAMBDA {
    const int64_t planes_per_channel = layout.split_h * layout.split_w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.c_in, c = task % s.c_in;
      float* sample = padded + n * layout.sample_size(s.c_in);
      std::memset(sample + layout.plane_start(c, 0, 0), 0, planes_per_channel * layout.plane_stride * sizeof(float));
      const float* channel = x + task * s.h * s.w;  // [h, w]
      for (int64_t y = 0; y < s.h; ++y) {
        const int64_t Y = y + layout.top;
        for (int64_t b = 0; b < layout.split_w; ++b) {
          // Input columns x = X - left with X % split_w == b, X / split_w = first_col + q.
          const int64_t first_x = ((b - layout.left) % layout.split_w + layout.split_w) % layout.split_w;
          float* dst = sample + layout.plane_start(c, Y % layout.split_h, b) + Y / layout.split_h * layout.pitch;
          const float* src = channel + y * s.w;
          for (int64_t xi = first_x; xi < s.w; xi += layout.split_w) dst[(xi + layout.left) / layout.split_w] = src[xi];
        }
      }
    }
  });
}

// --- register blocks -------------------------------------------------------------------------

// acc[0, count) (+)= sum over the nonzeros of value * in[offset + p], starting from 0 when
// `first`; the portable copy, which the compiler vectorises for the baseline instruction set.
void block_portable(const float* in, const Nonzero* nz, const Nonzero* end, int64_t count, float* acc, bool first) {
  if (first) std::fill(acc, acc + count, 0.f);
  for (; nz != end; ++nz) {
    const float* row = in + nz->offset;
    const float w = nz->value;
#pragma omp simd
    for (int64_t p = 0; p < count; ++p) acc[p] += w * row[p];
  }
}

// out[p * step] = act(acc[p] + bias) for p < count.
template <Activation A>
GS_INLINE_LAMBDA inline void store_block(const float* acc, int64_t count, float bias, float slope, float* out,
                                         int64_t step) {
  if (step == 1) {
#pragma omp simd
    for (int64_t p = 0; p < count; ++p) out[p] = activate(acc[p] + bias, A, slope);
  } else {
    for (int64_t p = 0; p < count; ++p) out[p * step] = activate(acc[p] + bias, A, slope);
  }
}

GS_INLINE_LAMBDA inline void store_any(const float* acc, int64_t count, float bias, Activation activation, float slope,
                                       float* out, int64_t step) {
  switch (activation) {
    case Activation::kRelu: return store_block<Activation::kRelu>(acc, count, bias, slope, out, step);
    case Activation::kLeakyRelu: return store_block<Activation::kLeakyRelu>(acc, count, bias, slope, out, step);
    case Activation::kTanh: return store_block<Activation::kTanh>(acc, count, bias, slope, out, step);
    default: return store_block<Activation::kNone>(acc, count, bias, slope, out, step);
  }
}

void store_portable(const float* acc, int64_t count, float bias, Activation activation, float slope, float* out,
                    int64_t step) {
  store_any(acc, count, bias, activation, slope, out, step);
}

#if defined(__x86_64__)
#define GS_AVX2 __attribute__((target("avx2,fma")))

// acc_io[0, 8 V) (+)= the nonzeros' products, with V vectors of accumulators in registers that
// start from 0 with kFirst, else from acc_io (32-byte aligned, 8 V long even when fewer pixels
// are valid). With kMasked the last vector loads only the lanes `last` selects, so no read
// passes the end of the output row.
template <int V, bool kMasked, bool kFirst>
GS_AVX2 void block_avx2(const float* in, const Nonzero* nz, const Nonzero* end, __m256i last, float* acc_io) {
  __m256 acc[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) acc[v] = kFirst ? _mm256_setzero_ps() : _mm256_load_ps(acc_io + v * kLanes);
  for (; nz != end; ++nz) {
    const float* row = in + nz->offset;
    const __m256 w = _mm256_set1_ps(nz->value);
#pragma GCC unroll 8
    for (int v = 0; v < V - 1; ++v) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + v * kLanes), acc[v]);
    const float* tail = row + (V - 1) * kLanes;
    const __m256 x = kMasked ? _mm256_maskload_ps(tail, last) : _mm256_loadu_ps(tail);
    acc[V - 1] = _mm256_fmadd_ps(w, x, acc[V - 1]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) _mm256_store_ps(acc_io + v * kLanes, acc[v]);
}

template <bool kFirst>
GS_AVX2 void block_avx2_count(const float* in, const Nonzero* nz, const Nonzero* end, int64_t count, float* acc) {
  if (count == kBlockPixels) return block_avx2<8, false, kFirst>(in, nz, end, __m256i{}, acc);
  const int vectors = static_cast<int>((count + kLanes - 1) / kLanes);
  const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count - (vectors - 1) * kLanes)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  switch (vectors) {
    case 1: return block_avx2<1, true, kFirst>(in, nz, end, last, acc);
    case 2: return block_avx2<2, true, kFirst>(in, nz, end, last, acc);
    case 3: return block_avx2<3, true, kFirst>(in, nz, end, last, acc);
    case 4: return block_avx2<4, true, kFirst>(in, nz, end, last, acc);
    case 5: return block_avx2<5, true, kFirst>(in, nz, end, last, acc);
    case 6: return block_avx2<6, true, kFirst>(in, nz, end, last, acc);
    case 7: return block_avx2<7, true, kFirst>(in, nz, end, last, acc);
    default: return block_avx2<8, true, kFirst>(in, nz, end, last, acc);
  }
}

GS_AVX2 void block_avx2_any(const float* in, const Nonzero* nz, const Nonzero* end, int64_t count, float* acc,
                            bool first) {
  if (first) return block_avx2_count<true>(in, nz, end, count, acc);
  block_avx2_count<false>(in, nz, end, count, acc);
}

GS_AVX2 void store_avx2(const float* acc, int64_t count, float bias, Activation activation, float slope, float* out,
                        int64_t step) {
  store_any(acc, count, bias, activation, slope, out, step);
}
#endif

}  // namespace

int64_t padded_sample_floats(ConvShape shape) { return padded_layout(shape).sample_size(shape.c_in); }

void forward_cpu(const float* x, CsrWeight weight, const float* bias, float* out, ConvShape s,
                 Activation activation, float negative_slope, int num_threads) {
  const Plan plan = make_plan(weight, s);
  const int64_t work = s.n * s.oh * s.ow * std::max<int64_t>(weight.row_offsets[s.c_out], s.c_out) /
                       (s.transposed ? s.stride_h * s.stride_w : 1);
  num_threads = static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, num_threads));
  const int64_t sample_size = plan.layout.sample_size(s.c_in), pitch = plan.layout.pitch;
  std::unique_ptr<float[]> padded;  // uninitialised: pad_input writes every value
  const float* input = x;
  if (!plan.in_place) {
    padded.reset(new float[s.n * sample_size]);
    pad_input(x, padded.get(), s, plan.layout, num_threads);
    input = padded.get();
  }
  const int64_t step_h = s.transposed ? s.stride_h : 1, step_w = s.transposed ? s.stride_w : 1;
  const int64_t phases = static_cast<int64_t>(plan.phases.size());
  int64_t max_rows = 0;
  for (const Phase& phase : plan.phases) max_rows = std::max(max_rows, phase.rows);
  const int64_t row_blocks = (max_rows + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t channel_blocks = (s.c_out + kChannelsPerTask - 1) / kChannelsPerTask;
  const int64_t tasks = s.n * phases * row_blocks * channel_blocks;

  std::atomic<int64_t> next_task{0};
  const int64_t workers = std::min<int64_t>(num_threads, tasks);
  parallel_for(workers, num_threads, [&](int64_t, int64_t, auto isa) GS_INLINE_LAMBDA {
    alignas(32) float partial[kChannelsPerTask * kBlockPixels];  // [channel of the task, pixel]
    for (int64_t task = next_task++; task < tasks; task = next_task++) {
      const int64_t channel_block = task % channel_blocks;
      const int64_t row_block = task / channel_blocks % row_blocks;
      const int64_t g = task / (channel_blocks * row_blocks) % phases;
      const int64_t n = task / (channel_blocks * row_blocks * phases);
      const Phase& phase = plan.phases[g];
      const float* sample = input + n * sample_size;
      const int64_t row_end = std::min(phase.rows, (row_block + 1) * kRowsPerTask);
      const int64_t o_begin = channel_block * kChannelsPerTask;
      const int64_t o_count = std::min(s.c_out, o_begin + kChannelsPerTask) - o_begin;
      for (int64_t t = row_block * kRowsPerTask; t < row_end; ++t) {
        for (int64_t u = 0; u < phase.cols; u += kBlockPixels) {
          const int64_t count = std::min(kBlockPixels, phase.cols - u);
          const float* in = sample + t * pitch + u;
          bool started[kChannelsPerTask] = {};  // whether a channel's partial sums are in `partial` yet
          for (int64_t group = 0; group < plan.groups; ++group) {
            const int32_t* starts = phase.starts.data() + group * s.c_out + o_begin;
            for (int64_t k = 0; k < o_count; ++k) {
              const Nonzero* nz = phase.nonzeros.data() + starts[k];
              const Nonzero* nz_end = phase.nonzeros.data() + starts[k + 1];
              if (nz == nz_end) continue;
              float* acc = partial + k * kBlockPixels;
#if defined(__x86_64__)
              if constexpr (decltype(isa)::value == Isa::avx2) {
                block_avx2_any(in, nz, nz_end, count, acc, !started[k]);
              } else {
                block_portable(in, nz, nz_end, count, acc, !started[k]);
              }
#else
              block_portable(in, nz, nz_end, count, acc, !started[k]);
#endif
              started[k] = true;
            }
          }
          for (int64_t k = 0; k < o_count; ++k) {
            const int64_t o = o_begin + k;
            float* acc = partial + k * kBlockPixels;
            if (!started[k]) std::fill(acc, acc + count, 0.f);  // no nonzeros: the bias alone
            float* out_row = out + ((n * s.c_out + o) * s.oh + phase.y0 + t * step_h) * s.ow + phase.x0;
            const float b = bias != nullptr ? bias[o] : 0.f;
#if defined(__x86_64__)
            if constexpr (decltype(isa)::value == Isa::avx2) {
              store_avx2(acc, count, b, activation, negative_slope, out_row + u * step_w, step_w);
            } else {
              store_portable(acc, count, b, activation, negative_slope, out_row + u * step_w, step_w);
            }
#else
            store_portable(acc, count, b, activation, negative_slope, out_row + u * step_w, step_w);
#endif
          }
        }
      }
    }
  });
}

}  // namespace sparse_conv
}  // namespace gansparse
