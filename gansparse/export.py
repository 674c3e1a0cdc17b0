"""Export a masked model to a compact plain-PyTorch model, and store it without pickle.

    compact_model = gansparse.export.compact(model, example_input)   # plain torch, channels removed
    gansparse.export.check_equivalence(model, compact_model, example_input)
    gansparse.export.save(compact_model, "generator.safetensors")
    same_model = gansparse.export.load("generator.safetensors")      # needs torch only, no pickle

What compact computes. Every mask m keeps the channels its keep() keeps, with their current
values (1 once binarised, e.g. 0.7 for a sigmoid mask still training), and zeroes the others:
the compact model equals `pruned_reference(model)`, the model in eval mode with every mask frozen
at those values (for binarised masks, the model itself), within float32 rounding (<= 1e-5). The
surviving mask values are folded into the layer they scale: a conv's weight and bias, or a norm's
affine. A gansparse.SparseConv2d / SparseConvTranspose2d becomes the plain conv with its pruned
weights at 0 (plain torch has no sparse conv), and a filter pruned whole is a removed channel. Exported models are for inference, so the analysis and the result use eval mode (batch
norms with their running statistics).

What goes. A channel of a tensor is removed when nothing that reads it needs it: it is, for every
input, sample and position, one constant (a masked channel is 0; after a batch norm it is the
constant beta - gamma * mean / sqrt(var + eps), and so on through per-channel layers), and every
layer reading it can absorb that constant:
- a conv or linear layer reading a constant 0 simply drops that input channel;
- a conv reading another constant k folds k * sum(weight[:, c]) into its bias, but only when that
  is exact: with zero padding, border outputs see fewer copies of k than inner ones, so a conv
  with zero padding (and any transposed conv, whose overlaps differ by position) keeps such a
  channel; reflection or replication padding, or none, keeps a constant constant, so the fold is
  exact there;
- a depthwise conv is a per-channel layer: its input and output channel c go together, and a
  constant input stays constant where its padding allows (a 0 input gives the bias);
- a product contracted over channels (the query-key product of self-attention) drops channel c
  from both factors when either factor's channel c is 0;
- StyleGAN2's modulated conv (x, style, input_mask) drops input channel c when its style is 0
  (input_mask[c] == 0: it leaves the conv and the demodulation alike, and its row of the style
  linear goes too) or, without demodulation, when x[c] is 0; it becomes plain ops in the form the
  module computes (fused: per-sample weights in a grouped conv; unfused: conv(x * style) times
  the demodulation), the input mask's values folded into the style linear;
- the model's outputs, the inputs of layers export does not know and class-conditional norms
  (whose per-sample affine turns a constant into a per-sample value) keep their channels.
Channels that layers tie together go together or stay together: the two sides of an addition
(so a residual stream channel goes only if it is masked in every block adding into the stream),
the inputs and output of per-channel layers (norms and their statistics, activations, padding,
pooling, CBN embeddings or linear maps, gansparse's upfirdn2d and fused_leaky_relu with its bias,
a mask the model multiplies by and every other read of that mask), the halves of a U-Net skip
concatenation, the query and key projections of an attention product. The conv producing a
removed channel loses that output channel, the layers reading it lose that input channel, the
layers in between lose its parameters. A tensor keeps at least one channel (a fully masked
layer keeps one zero channel).

How: tracing with torch.fx. gansparse layers are leaves of the trace; the traced graph is run once
on the example inputs by a torch.fx Interpreter, which follows every tensor's channel axis
through the graph (through views, transposes and reductions too, checked by running the op on a
tensor holding its channel index), ties channels in a union-find, marks which channels are
provably constant and reads their values. The result is a torch.fx GraphModule of plain torch
layers. Example inputs are needed for those values and for the shapes; a model may provide them
itself with a method `example_inputs()`. A model whose forward torch.fx cannot trace may provide
`exportable()`, the module to trace in its place (StyleGAN2's generator: z -> image with its noise
buffers, without the random style mixing).

Why not Torch-Pruning. Its DependencyGraph does trace through gansparse layers (through their
autograd graph), and it groups coupled channels well, but it answers a different question: which
indices must be pruned together. Export needs to know what each channel holds: which channels are
constant and what constant, whether a consumer can fold it exactly, where a mask sits relative to
a norm and an activation, and the mask's computation shows up in its groups as if it were part of
the network. Building that on top of its graph would mean mapping every gansparse op back onto its
nodes anyway; a torch.fx pass that interprets the graph gives all of it directly, and the same
graph is what save() stores.

save / load: one safetensors file. The tensors are the compact model's state_dict; its metadata
holds a JSON architecture: each module of the graph as a torch.nn class name and its constructor
arguments, and the torch.fx graph as a list of nodes (operation, target, arguments). Functions are
stored by name and looked up only in torch, torch.nn.functional, operator, builtins' getattr and
a table of gansparse's own ops (upfirdn2d, fused_leaky_relu: StyleGAN2's), modules only in
torch.nn, so loading runs no pickle and no code from the file, and needs no training code.
"""
from __future__ import annotations

import builtins
import copy
import functools
import inspect
import json
import operator
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import ConditionalBatchNorm2d, MaskedConv2d, MaskedConvNormAct, MaskedConvTranspose2d
from .masks import Mask, named_masks
from .ops.bias_act import fused_leaky_relu
from .ops.upfirdn2d import upfirdn2d
from .sparse import SparseConv2d, SparseConvTranspose2d

__all__ = ["check_equivalence", "compact", "effective_mask_values", "load", "pruned_reference", "save"]

_FORMAT = "gansparse.export/1"


@functools.cache
def _masked_norm_types() -> tuple[type, ...]:
    """The masked norms of the model zoo (imported late: the zoo imports gansparse)."""
    from gansparse.models.norms import ChannelMask, MaskedBatchNorm2d, MaskedInstanceNorm2d

    return (MaskedBatchNorm2d, MaskedInstanceNorm2d, ChannelMask)


@functools.cache
def _zoo_leaves() -> tuple[type, ...]:
    """The model zoo's layers compact converts as a whole: StyleGAN2's modulated conv."""
    from gansparse.models.stylegan2 import ModulatedConv2d

    return (ModulatedConv2d,)


# --- the model compact reproduces -----------------------------------------------------------------


def effective_mask_values(mask: Mask) -> torch.Tensor:
    """[C] the values compact uses: values() where keep(), 0 elsewhere."""
    with torch.no_grad():
        values = mask.values().detach()
        return torch.where(mask.keep(), values, torch.zeros_like(values))


def pruned_reference(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every mask frozen at effective_mask_values: what
    compact(model) computes. For a model whose masks are binarised it computes what `model`
    computes in eval mode."""
    reference = copy.deepcopy(model).eval()
    for _, mask in named_masks(reference):
        mask._freeze_(effective_mask_values(mask))
    return reference


def check_equivalence(masked_model: nn.Module, compact_model: nn.Module, *inputs, atol: float = 1e-5) -> float:
    """Test helper: assert that compact_model computes what pruned_reference(masked_model) does on
    `inputs` (both in eval mode, without gradients) within `atol`, and return the max abs difference.
    A model with `exportable()` is compared as that module, as compact compacts it.

    Works for models with one tensor output or a tuple / list of them. Raises AssertionError naming
    the difference otherwise."""
    reference = pruned_reference(_exportable(masked_model))
    was_training = compact_model.training
    compact_model.eval()
    try:
        with torch.no_grad():
            expected, actual = reference(*inputs), compact_model(*inputs)
    finally:
        compact_model.train(was_training)
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    actual = actual if isinstance(actual, (tuple, list)) else [actual]
    if len(expected) != len(actual):
        raise AssertionError(f"the masked model returns {len(expected)} outputs, the compact one {len(actual)}")
    worst = 0.0
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape:
            raise AssertionError(f"output {i}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        worst = max(worst, (e.double() - a.double()).abs().max().item() if e.numel() else 0.0)
    if not worst <= atol:
        raise AssertionError(f"the compact model differs from the masked one by {worst:.3g} (atol {atol:g})")
    return worst


# --- tracing ---------------------------------------------------------------------------------------

_GANSPARSE_LEAVES = (MaskedConv2d, MaskedConvTranspose2d, MaskedConvNormAct, ConditionalBatchNorm2d, SparseConv2d,
                     SparseConvTranspose2d)


class _Tracer(fx.Tracer):
    """torch.fx tracing with gansparse layers and masks as leaves (their ops are not traceable
    and compact replaces them as a whole)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _GANSPARSE_LEAVES + _masked_norm_types() + _zoo_leaves() + (Mask,)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many types; all mean "not traceable as written"
        raise ValueError(
            f"export could not trace {type(model).__name__} with torch.fx: {error}. The model's forward must be "
            "symbolically traceable (no control flow on tensor values); a part that is not can be made a leaf "
            "module without masks") from error
    return fx.GraphModule(model, graph)


def _check_module_types(gm: fx.GraphModule) -> None:
    """Every gansparse module the graph calls must be one compact knows exactly (a subclass may
    compute something else), called once."""
    known = _GANSPARSE_LEAVES + _masked_norm_types() + _zoo_leaves()
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        calls[node.target] = calls.get(node.target, 0) + 1
        if isinstance(module, known) and calls[node.target] > 1:
            raise NotImplementedError(f"export: module '{node.target}' ({type(module).__name__}) is called more than "
                                      "once; export converts each gansparse module for one call site")
        from_gansparse = type(module).__module__.split(".")[0] in ("gansparse", "models")
        if isinstance(module, (Mask,) + known) or from_gansparse:
            if not (isinstance(module, Mask) or type(module) in known):
                raise NotImplementedError(
                    f"export does not support module '{node.target}' of type {type(module).__qualname__}: the "
                    f"gansparse modules it converts are {', '.join(t.__name__ for t in known)} and masks")


# --- channel analysis ------------------------------------------------------------------------------


@dataclass
class _Flow:
    """The channels of one tensor in the graph."""

    axis: int              # its channel axis
    slots: list[int]       # per channel: the union-find id of the channels tied to it
    const: torch.Tensor    # bool [C]: provably one value for every input, sample and position


_PINNED = 0  # the union-find id every channel that must stay is tied to

_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                      nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Dropout,
                      nn.Dropout2d, nn.Identity, nn.BatchNorm2d, nn.InstanceNorm2d)
_POINTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardtanh,
                        F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.clamp, F.dropout,
                        operator.neg, torch.neg}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "neg", "clone"}
# Ops that map channel c of one tensor to channel c of another, keeping each channel's constants
# (checked on every call by running them on a tensor of channel indices, which also finds the
# output's channel axis).
_LAYOUT_MODULES = (nn.Flatten, nn.Unflatten, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                   nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_LAYOUT_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.movedim, torch.unsqueeze,
                     torch.squeeze, torch.mean, torch.amax, torch.amin, F.interpolate, F.max_pool2d, F.avg_pool2d,
                     F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_LAYOUT_METHODS = {"view", "reshape", "flatten", "transpose", "permute", "movedim", "unsqueeze", "squeeze",
                   "contiguous", "expand", "mean", "amax", "amin"}
_SHAPE_METHODS = {"view", "reshape", "expand"}  # their int arguments are sizes, one per output axis
_BINARY = {operator.add: "add", operator.iadd: "add", torch.add: "add", "add": "add", "add_": "add",
           operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", "sub": "sub", "sub_": "sub",
           operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", "mul": "mul", "mul_": "mul",
           operator.truediv: "div", operator.itruediv: "div", torch.div: "div", "div": "div", "div_": "div"}
_MATMUL = {torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm"}
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def _rules(*groups: tuple[set | dict, str]) -> dict:
    """{op: rule} from (ops, rule) groups; an op in two groups takes the first one's rule."""
    table = {}
    for ops, rule in reversed(groups):
        table.update(dict.fromkeys(ops, rule))
    return table


# The rule (a method of _ChannelAnalysis) for each function or method a traced graph calls. Module
# calls have theirs in _ChannelAnalysis._module; anything else is an op export does not see through.
_FUNCTION_RULES = _rules(
    (_POINTWISE_FUNCTIONS | _POINTWISE_METHODS, "_pointwise"),
    (_BINARY, "_binary"),
    (_CAT, "_cat"),
    (_MATMUL, "_matmul"),
    (_SOFTMAX, "_softmax"),
    ({upfirdn2d}, "_fir_filter"),
    ({fused_leaky_relu}, "_bias_act"),
    ({F.pad}, "_pad_function"),
    (_LAYOUT_FUNCTIONS | _LAYOUT_METHODS, "_layout"),
)


@functools.cache
def _module_rules() -> tuple[tuple[tuple[type, ...], str], ...]:
    """The rule (a method of _ChannelAnalysis) for each kind of module a traced graph calls, the
    first that matches (a tuple, as the zoo's types are imported late)."""
    return (
        ((nn.Conv2d, nn.ConvTranspose2d, MaskedConvNormAct), "_conv"),
        ((nn.Linear,), "_linear"),
        ((ConditionalBatchNorm2d,), "_conditional_norm"),
        (_masked_norm_types(), "_masked_norm"),
        ((nn.ConstantPad2d,), "_constant_pad"),  # includes nn.ZeroPad2d
        ((nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d), "_reflection_pad"),
        (_POINTWISE_MODULES, "_pointwise"),
        ((nn.Softmax,), "_softmax"),
        (_LAYOUT_MODULES, "_layout"),
        (_zoo_leaves(), "_modulated_conv"),
    )


# And how _Rewriter rewrites the functions and methods whose arguments hold channel counts or
# per-channel tensors (a method of _Rewriter).
_FUNCTION_REWRITES = _rules((_SHAPE_METHODS | {torch.reshape}, "shape_node"), ({fused_leaky_relu}, "bias_act_node"))


def _channel_state(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(value [C] of each channel at its first element, bool [C]: the channel holds one value),
    on the CPU."""
    flat = t.detach().movedim(axis, 0).reshape(t.shape[axis], -1)  # [C, everything else]
    if flat.shape[1] == 0:
        return torch.zeros(flat.shape[0], dtype=t.dtype), torch.ones(flat.shape[0], dtype=torch.bool)
    first = flat[:, 0]
    spread = (flat - first[:, None]).abs().amax(1)
    return first.cpu(), (spread <= 1e-6 * (1 + first.abs())).cpu()


def _conv_weight(conv: nn.Module) -> torch.Tensor:
    """The weight a conv computes with: a sparse conv's pruned weights are 0."""
    weight = conv.masked_weight() if isinstance(conv, (SparseConv2d, SparseConvTranspose2d)) else conv.weight
    return weight.detach()


def _zero_padding_exact(conv: nn.Module) -> bool:
    """Whether a constant input channel gives a constant output of `conv` (so it folds into the
    bias): no transposed conv, and no zero padding."""
    if conv.transposed:
        return False
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in conv.padding)


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _cuttable(arg) -> bool:
    """A per-channel tensor argument compact can cut to the kept channels: None, or a tensor of the
    model that only this call reads."""
    return arg is None or (isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1)


class _ChannelAnalysis(fx.Interpreter):
    """Runs the graph on example inputs and records, per node, the _Flow of its output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.parent = [_PINNED]
        self.flows: dict[fx.Node, _Flow | None] = {}
        # Per consumer node: the values [C] of its input channels (for folding constants).
        self.input_values: dict[fx.Node, torch.Tensor] = {}
        # Per modulated conv node: the values [C_in] of its input mask, which scale its styles.
        self.style_scales: dict[fx.Node, torch.Tensor] = {}
        self.mask_flows: dict[str, _Flow] = {}  # per mask the model reads: one flow for all its calls
        self.calls = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    # union-find
    def find(self, slot: int) -> int:
        while self.parent[slot] != slot:
            self.parent[slot] = self.parent[self.parent[slot]]
            slot = self.parent[slot]
        return slot

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            # The pinned root stays the root, so find(slot) == _PINNED means "stays".
            self.parent[max(a, b)] = min(a, b)

    def removed(self, slot: int) -> bool:
        return self.find(slot) != _PINNED

    def _new(self, axis: int, channels: int, const: torch.Tensor | None = None, pinned: bool = False) -> _Flow:
        start = len(self.parent)
        self.parent.extend(range(start, start + channels))
        flow = _Flow(axis, list(range(start, start + channels)),
                     const if const is not None else torch.zeros(channels, dtype=torch.bool))
        if pinned:
            self.pin(flow)
        return flow

    def pin(self, flow: _Flow | None, channels=None) -> None:
        if flow is not None:
            for c in range(len(flow.slots)) if channels is None else channels:
                self.union(flow.slots[c], _PINNED)

    # running
    def run_node(self, n: fx.Node):
        # The inputs' channel values as this node reads them (before an in-place op changes them).
        self.states = {arg: _channel_state(self.env[arg], self.flows[arg].axis)
                       for arg in n.all_input_nodes if self.flows.get(arg) is not None and _is_tensor(self.env[arg])}
        self.args_now, self.kwargs_now = self.fetch_args_kwargs_from_env(n)
        out = super().run_node(n)
        self.flows[n] = self._analyse(n, out)
        return out

    def _input(self, n: fx.Node, i: int = 0):
        """(node, flow) of the i-th positional argument."""
        arg = n.args[i] if i < len(n.args) else None
        return (arg, self.flows.get(arg)) if isinstance(arg, fx.Node) else (arg, None)

    def _unknown(self, n: fx.Node, out) -> _Flow | None:
        """An op export does not see through: its inputs keep their channels, its output is new."""
        for arg in n.all_input_nodes:
            self.pin(self.flows.get(arg))
        if _is_tensor(out) and out.dim() >= 2:
            return self._new(1, out.shape[1], pinned=True)
        return None

    def _const_zero(self, arg: fx.Node, flow: _Flow) -> torch.Tensor:
        values, uniform = self.states[arg]
        return flow.const & uniform & (values == 0)

    def _consume(self, n: fx.Node, arg: fx.Node, flow: _Flow | None, absorbs: Callable[[torch.Tensor], torch.Tensor]):
        """n reads `flow` and can do without channel c where absorbs(values)[c] and c is constant."""
        if flow is None:
            return
        values, uniform = self.states[arg]
        self.input_values[n] = values
        self.pin(flow, torch.nonzero(~(flow.const & uniform & absorbs(values))).flatten().tolist())

    def _analyse(self, n: fx.Node, out) -> _Flow | None:
        if n.op == "placeholder":
            return self._new(1, out.shape[1], pinned=True) if _is_tensor(out) and out.dim() >= 2 else None
        if n.op == "get_attr":
            return None
        if n.op == "output":
            for arg in n.all_input_nodes:
                self.pin(self.flows.get(arg))
            return None
        if not _is_tensor(out):
            holds_tensors = isinstance(out, (tuple, list)) and any(_is_tensor(o) for o in out)
            return self._unknown(n, out) if holds_tensors else None
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            if isinstance(module, Mask):
                return self._mask(n, module)
            stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
            if self.calls[n.target] > 1 and stateful:  # one set of weights cannot be cut two ways
                return self._unknown(n, out)
            return self._module(n, module, out)
        rule = _FUNCTION_RULES.get(n.target)
        return getattr(self, rule)(n, out) if rule is not None else self._unknown(n, out)

    @staticmethod
    def _condition(n: fx.Node):
        """The condition y of a call (x, y) of a conditional norm or a block holding one."""
        return n.args[1] if len(n.args) > 1 else n.kwargs.get("y")

    def _arg(self, n: fx.Node, name: str, position: int, default):
        if name in self.kwargs_now:
            return self.kwargs_now[name]
        return self.args_now[position] if position < len(self.args_now) else default

    def _module(self, n: fx.Node, module: nn.Module, out) -> _Flow | None:
        for types, rule in _module_rules():
            if isinstance(module, types):
                return getattr(self, rule)(n, out)
        return self._unknown(n, out)

    def _called(self, n: fx.Node) -> nn.Module:
        return self.module.get_submodule(n.target)

    def _conv(self, n: fx.Node, out) -> _Flow | None:
        module = self._called(n)
        arg, flow = self._input(n)
        conv = module.conv if isinstance(module, MaskedConvNormAct) else module
        if conv.groups == conv.in_channels == conv.out_channels and not isinstance(module, MaskedConvNormAct):
            return self._depthwise(n, conv, out)
        if conv.groups != 1:
            return self._unknown(n, out)
        conditional = isinstance(getattr(module, "norm", None), ConditionalBatchNorm2d)
        if conditional:
            self.pin(self.flows.get(self._condition(n)))
        exact = _zero_padding_exact(conv)
        self._consume(n, arg, flow, lambda v: (v == 0) | exact)
        # A filter of zeros outputs its bias everywhere (e.g. a filter pruned in a SparseConv2d),
        # a constant unless a per-sample affine follows.
        out_dim = 1 if conv.transposed else 0
        zero_filters = (_conv_weight(conv) == 0).transpose(0, out_dim).flatten(1).all(1).cpu() & (not conditional)
        return self._new(1, out.shape[1], zero_filters | self._mask_zero(module, out.shape[1]))

    def _linear(self, n: fx.Node, out) -> _Flow:
        arg, flow = self._input(n)
        if flow is not None and flow.axis != out.dim() - 1:
            self.pin(flow)
        else:
            self._consume(n, arg, flow, lambda v: torch.ones_like(v, dtype=torch.bool))
        return self._new(out.dim() - 1, out.shape[-1])

    def _conditional_norm(self, n: fx.Node, out) -> _Flow | None:
        self.pin(self.flows.get(self._condition(n)))
        # Its affine is per sample: a constant channel is no longer one value across samples.
        _, flow = self._input(n)
        return self._same(flow, torch.zeros_like(flow.const)) if flow is not None else None

    def _masked_norm(self, n: fx.Node, out) -> _Flow | None:
        _, flow = self._input(n)
        if flow is None:
            return None
        return self._same(flow, flow.const | self._mask_zero(self._called(n), len(flow.slots)))

    def _constant_pad(self, n: fx.Node, out) -> _Flow | None:
        module = self._called(n)
        return self._pad(n, out, module.padding, "constant", module.value)

    def _reflection_pad(self, n: fx.Node, out) -> _Flow | None:
        return self._pad(n, out, self._called(n).padding, "reflect", None)

    def _mask(self, n: fx.Node, mask: Mask) -> _Flow:
        """A mask read by the model (e.g. to multiply a tensor by it): a constant [C] whose channel c
        goes with whatever channel c it scales. Every call reads the same channels."""
        if n.target not in self.mask_flows:
            self.mask_flows[n.target] = self._new(0, mask.channels, torch.ones(mask.channels, dtype=torch.bool))
        return self.mask_flows[n.target]

    def _modulated_conv(self, n: fx.Node, out) -> _Flow:
        """StyleGAN2's modulated conv (x, style, input_mask): input channel c goes when its style is
        0 (input_mask[c] == 0), which takes it out of the conv and of the demodulation alike, or,
        without demodulation, when x[c] is 0. input_mask[c] and x[c] are the same channel."""
        conv = self._called(n)
        arg, flow = self._input(n)
        style = n.args[1] if len(n.args) > 1 else n.kwargs.get("style")
        self.pin(self.flows.get(style))
        mask = n.args[2] if len(n.args) > 2 else n.kwargs.get("input_mask")
        style_zero = torch.zeros(conv.in_channel, dtype=torch.bool)
        if mask is not None:
            mask_flow = self.flows.get(mask) if isinstance(mask, fx.Node) else None
            if mask_flow is None or mask_flow.axis != 0 or not bool(mask_flow.const.all()):
                raise NotImplementedError(f"export: the input_mask of modulated conv '{n.target}' must be a mask "
                                          "module of the model (a constant per channel)")
            values, _ = self.states[mask]
            self.style_scales[n] = values
            style_zero = values == 0
            if flow is not None:
                for s, t in zip(flow.slots, mask_flow.slots):
                    self.union(s, t)
        if flow is not None:
            removable = style_zero | (self._const_zero(arg, flow) & (not conv.demodulate))
            self.pin(flow, torch.nonzero(~removable | (flow.axis != 1)).flatten().tolist())
        return self._new(1, out.shape[1])

    @staticmethod
    def _mask_zero(module: nn.Module, channels: int) -> torch.Tensor:
        """bool [C]: the output channels the module's own mask sets to 0, whatever the input (its
        activation, if any, maps 0 to 0)."""
        mask = getattr(module, "mask", None)
        if not isinstance(mask, Mask):
            return torch.zeros(channels, dtype=torch.bool)
        return (effective_mask_values(mask) == 0).cpu()

    def _depthwise(self, n: fx.Node, conv: nn.Module, out) -> _Flow:
        """A depthwise conv is per channel: channel c out depends on channel c in only. A constant
        input stays constant where the conv's padding keeps it so (a 0 input gives the bias)."""
        arg, flow = self._input(n)
        own = self._mask_zero(conv, out.shape[1]) | (_conv_weight(conv) == 0).flatten(1).all(1).cpu()
        if flow is None:
            return self._new(1, out.shape[1], own, pinned=True)
        values, uniform = self.states[arg]
        stays_const = flow.const & uniform & ((values == 0) | _zero_padding_exact(conv))
        return self._same(flow, stays_const | own)

    def _same(self, flow: _Flow, const: torch.Tensor) -> _Flow:
        return _Flow(flow.axis, flow.slots, const.cpu())

    def _pointwise(self, n: fx.Node, out) -> _Flow | None:
        arg, flow = self._input(n)
        if flow is None:
            return None
        if out.shape != self.env[arg].shape:
            return self._unknown(n, out)
        return self._same(flow, flow.const)

    def _fir_filter(self, n: fx.Node, out) -> _Flow | None:
        """gansparse's upfirdn2d: channel c out of channel c in; with its zero padding, only a 0
        channel stays constant."""
        arg, flow = self._input(n)
        if flow is None:
            return None
        if flow.axis != 1:
            return self._unknown(n, out)
        return self._same(flow, self._const_zero(arg, flow))

    def _bias_act(self, n: fx.Node, out) -> _Flow | None:
        """gansparse's fused_leaky_relu(x, bias[C], ...): per channel, and bias[c] goes with channel c
        when the bias is a parameter of the model that compact can cut (read by this call only)."""
        arg, flow = self._input(n)
        if flow is None:
            return None
        if flow.axis != 1 or not _cuttable(n.args[1] if len(n.args) > 1 else n.kwargs.get("bias")):
            return self._unknown(n, out)
        return self._same(flow, flow.const)

    def _pad_function(self, n: fx.Node, out) -> _Flow | None:
        return self._pad(n, out, self.args_now[1], self._arg(n, "mode", 2, "constant"),
                         self._arg(n, "value", 3, None) or 0.0)

    def _pad(self, n: fx.Node, out, pad, mode: str, value: float) -> _Flow | None:
        arg, flow = self._input(n)
        if flow is None:
            return None
        padded_dims = len(pad) // 2 if isinstance(pad, (tuple, list)) else 2
        if flow.axis >= out.dim() - padded_dims:
            return self._unknown(n, out)
        if mode != "constant":  # reflect, replicate, circular: constants stay constant
            return self._same(flow, flow.const)
        values, uniform = self.states[arg]
        return self._same(flow, flow.const & uniform & (values == value))

    def _binary(self, n: fx.Node, out) -> _Flow | None:
        op = _BINARY[n.target]
        operands = list(n.args[:2])
        tracked = [(a, self.flows[a]) for a in operands if isinstance(a, fx.Node) and self.flows.get(a) is not None]
        if not tracked:
            return None
        axes = {flow.axis + out.dim() - self.env[a].dim() for a, flow in tracked}
        axis = axes.pop()
        if axes or any(len(flow.slots) != out.shape[axis] for _, flow in tracked):
            return self._unknown(n, out)
        const = torch.ones(out.shape[axis], dtype=torch.bool)
        for a in operands:
            if isinstance(a, fx.Node) and self.flows.get(a) is None and _is_tensor(self.env[a]):
                t = self.env[a]
                index = axis - (out.dim() - t.dim())
                if index >= 0 and t.shape[index] != 1:  # a per-channel tensor export does not track
                    return self._unknown(n, out)
                const &= False  # a tensor export does not follow may depend on the input
        for _, flow in tracked:
            const &= flow.const
        if op == "mul":
            for a, flow in tracked:
                const |= self._const_zero(a, flow)
        first = tracked[0][1]
        for _, flow in tracked[1:]:
            for s, t in zip(first.slots, flow.slots):
                self.union(s, t)
        return _Flow(axis, first.slots, const)

    def _cat(self, n: fx.Node, out) -> _Flow | None:
        parts = n.args[0]
        dim = self._arg(n, "dim", 1, 0) % out.dim()
        flows = [self.flows.get(p) if isinstance(p, fx.Node) else None for p in parts]
        if all(f is not None and f.axis == dim for f in flows):
            return _Flow(dim, [s for f in flows for s in f.slots], torch.cat([f.const for f in flows]))
        return self._unknown(n, out)

    def _matmul(self, n: fx.Node, out) -> _Flow | None:
        (a, fa), (b, fb) = self._input(n, 0), self._input(n, 1)
        if fa is None and fb is None:
            return None
        ta, tb = self.env[a] if isinstance(a, fx.Node) else None, self.env[b] if isinstance(b, fx.Node) else None
        if ta is None or tb is None or ta.dim() < 2 or tb.dim() < 2:
            return self._unknown(n, out)
        a_contracted = fa is not None and fa.axis == ta.dim() - 1
        b_contracted = fb is not None and fb.axis == tb.dim() - 2
        if a_contracted and b_contracted:
            # sum_c a[..., c] b[c, ...]: channel c goes from both when either factor's c is 0.
            zero = self._const_zero(a, fa) | self._const_zero(b, fb)
            for c, (s, t) in enumerate(zip(fa.slots, fb.slots)):
                self.union(s, t)
                if not zero[c]:
                    self.union(s, _PINNED)
            return None
        if fa is not None and fb is None and fa.axis == ta.dim() - 2:  # rows of a: out row c = a row c @ b
            return _Flow(out.dim() - 2, fa.slots, self._const_zero(a, fa))
        if fb is not None and fa is None and fb.axis == tb.dim() - 1:  # columns of b
            return _Flow(out.dim() - 1, fb.slots, self._const_zero(b, fb))
        return self._unknown(n, out)

    def _softmax(self, n: fx.Node, out) -> _Flow | None:
        arg, flow = self._input(n)
        if flow is None:
            return None
        module = self._called(n) if n.op == "call_module" else None
        dim = module.dim if module is not None else self._arg(n, "dim", 1, None)
        if dim is None or dim % out.dim() == flow.axis:
            return self._unknown(n, out)
        return self._same(flow, flow.const)

    def _layout(self, n: fx.Node, out) -> _Flow | None:
        """Runs the op on a tensor holding 1 + its channel index and finds that index again along
        one output axis, everywhere: then channel c of the output is channel c of the input."""
        arg, flow = self._input(n)
        if flow is None:
            return None
        x = self.env[arg]
        channels = len(flow.slots)
        index_shape = [1] * x.dim()
        index_shape[flow.axis] = channels
        probe = torch.arange(1, channels + 1, dtype=x.dtype, device=x.device).view(index_shape).expand_as(x)
        probe = probe.contiguous()
        args = (probe, *self.args_now[1:])
        if n.op == "call_module":
            probe_out = self.module.get_submodule(n.target)(*args, **self.kwargs_now)
        elif n.op == "call_method":
            probe_out = getattr(probe, n.target)(*args[1:], **self.kwargs_now)
        else:
            probe_out = n.target(*args, **self.kwargs_now)
        for axis in range(probe_out.dim()):
            if probe_out.shape[axis] != channels:
                continue
            expected_shape = [1] * probe_out.dim()
            expected_shape[axis] = channels
            expected = torch.arange(1, channels + 1, dtype=x.dtype, device=x.device).view(expected_shape)
            if bool(((probe_out - expected).abs() < 0.25).all()):
                return _Flow(axis, flow.slots, flow.const)
        return self._unknown(n, out)

    def ensure_one_channel(self) -> None:
        """A tensor keeps at least one channel: torch layers do not take 0 channels."""
        for flow in self.flows.values():
            if flow is not None and flow.slots and all(self.removed(s) for s in flow.slots):
                self.union(flow.slots[0], _PINNED)

    def kept(self, flow: _Flow | None) -> torch.Tensor | None:
        """Long [C']: the channels of `flow` that stay, or None for all of an untracked tensor."""
        if flow is None:
            return None
        return torch.tensor([c for c, s in enumerate(flow.slots) if not self.removed(s)], dtype=torch.long)


# --- building the plain modules --------------------------------------------------------------------


def _index(t: torch.Tensor | None, dim: int, keep: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or keep is None:
        return t
    return t.index_select(dim, keep.to(t.device))


def _plain_conv(conv: nn.Module, keep_in, keep_out, input_values, scale) -> nn.Module:
    """A plain nn.Conv2d / nn.ConvTranspose2d computing scale[c] * conv(x)[c] for the kept output
    channels c from the kept input channels, the constants of the removed ones folded into the
    bias. A depthwise conv keeps the same channels in and out (keep_out); other grouped convs
    keep all their channels."""
    weight = _conv_weight(conv)  # conv [out, in / groups, kh, kw]; transposed [in, out / groups, kh, kw]
    bias = conv.bias.detach() if conv.bias is not None else None
    groups = conv.groups
    if groups == 1:
        in_dim, out_dim = (0, 1) if conv.transposed else (1, 0)
        if keep_in is not None and input_values is not None:
            removed = torch.ones(weight.shape[in_dim], dtype=torch.bool)
            removed[keep_in] = False
            constants = torch.where(removed, input_values.cpu(), torch.zeros(())).to(weight)
            if bool((constants != 0).any()):  # only an exact fold gets here: a plain conv, no zero padding
                fold = torch.einsum("oikl,i->o", weight, constants)  # [out]
                bias = fold if bias is None else bias + fold
        weight = _index(_index(weight, in_dim, keep_in), out_dim, keep_out)
    elif groups == conv.in_channels == conv.out_channels and keep_out is not None:
        weight = _index(weight, 0, keep_out)  # [C', 1, kh, kw] either way
        groups = len(keep_out)
    else:
        keep_out = None
    bias = _index(bias, 0, keep_out)
    if scale is not None:
        scale = _index(scale.to(weight), 0, keep_out)
        if conv.transposed:  # output channel g * (out / groups) + j is weight[group g's inputs, j]
            shape = weight.shape
            weight = (weight.view(groups, shape[0] // groups, shape[1], *shape[2:])
                      * scale.view(groups, 1, shape[1], 1, 1)).view(shape)
        else:
            weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale if bias is not None else None
    in_channels, out_channels = (weight.shape[0], weight.shape[1] * groups) if conv.transposed else (
        weight.shape[1] * groups, weight.shape[0])
    common = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  groups=groups, bias=bias is not None, padding_mode=conv.padding_mode, device=weight.device,
                  dtype=weight.dtype)
    if conv.transposed:
        plain = nn.ConvTranspose2d(in_channels, out_channels, output_padding=conv.output_padding, **common)
    else:
        plain = nn.Conv2d(in_channels, out_channels, **common)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain


def _plain_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """`layer` (a new torch.nn layer) on weight's device and dtype, holding weight and bias."""
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """nn.Linear computing x @ weight.T + bias, weight [out, in]."""
    return _plain_weights(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), weight, bias)


def _device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _plain_norm(norm: nn.Module, keep, scale) -> nn.Module:
    """A plain nn.BatchNorm2d / nn.InstanceNorm2d of the kept channels, times scale[c]."""
    cls = nn.BatchNorm2d if isinstance(norm, nn.BatchNorm2d) else nn.InstanceNorm2d
    channels = norm.num_features if keep is None else len(keep)
    scale = _index(scale, 0, keep)
    scaled = scale is not None and not bool((scale == 1).all())
    plain = cls(channels, eps=norm.eps, momentum=norm.momentum, affine=norm.affine or scaled,
                track_running_stats=norm.track_running_stats)
    with torch.no_grad():
        if plain.affine:
            weight = _index(norm.weight.detach(), 0, keep) if norm.affine else torch.ones(channels)
            bias = _index(norm.bias.detach(), 0, keep) if norm.affine else torch.zeros(channels)
            if scaled:
                weight, bias = weight * scale.to(weight), bias * scale.to(bias)
            plain.weight.copy_(weight)
            plain.bias.copy_(bias)
        if norm.track_running_stats:
            plain.running_mean.copy_(_index(norm.running_mean, 0, keep))
            plain.running_var.copy_(_index(norm.running_var, 0, keep))
            plain.num_batches_tracked.copy_(norm.num_batches_tracked)
    return plain.to(_device(norm))


def _channel_scale(scale: torch.Tensor, keep) -> nn.Module:
    """x[:, c] * scale[c] for the kept channels, as a plain module."""
    scale = _index(scale, 0, keep)
    if scale is None or bool((scale == 1).all()):
        return nn.Identity()
    plain = nn.Conv2d(len(scale), len(scale), 1, groups=len(scale), bias=False, device=scale.device,
                      dtype=scale.dtype)
    with torch.no_grad():
        plain.weight.copy_(scale.view(-1, 1, 1, 1))
    return plain


def _affine_map(module: nn.Module, in_features: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], b [out]) of a module documented to be affine (a linear map of a condition
    vector, possibly spectrally normalised), read off its outputs and checked on a random input."""
    with torch.no_grad():
        param = next(module.parameters())
        eye = torch.eye(in_features, dtype=param.dtype, device=param.device)
        bias = module(torch.zeros(1, in_features, dtype=param.dtype, device=param.device))[0]
        weight = (module(eye) - bias).T
        probe = torch.randn(3, in_features, dtype=param.dtype, device=param.device)
        if not torch.allclose(module(probe), probe @ weight.T + bias, atol=1e-5, rtol=1e-4):
            raise NotImplementedError(f"export: the linear map '{name}' ({type(module).__name__}) is not affine")
    return weight, bias


def _plain_cbn(norm: ConditionalBatchNorm2d, keep, scale, name: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(batch norm without affine, gamma(y), beta(y)) as plain modules for the kept channels, with
    scale[c] folded into gamma and beta: gamma(y) is nn.Embedding / nn.Linear returning the
    per-sample gain directly (BigGAN's 1 + gain(y) folded into the bias)."""
    stats = nn.BatchNorm2d(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=False,
                           track_running_stats=norm.track_running_stats)
    if norm.track_running_stats:
        stats.load_state_dict({k: getattr(norm, k) for k in ("running_mean", "running_var", "num_batches_tracked")})
    stats = _plain_norm(stats, keep, None)
    channels = norm.num_features if keep is None else len(keep)
    scale = torch.ones(norm.num_features) if scale is None else scale
    maps = []
    for part, offset in ((norm.gain, 1.0), (norm.bias, 0.0)):
        if norm.num_classes is not None:
            with torch.no_grad():
                table = part(torch.arange(norm.num_classes, device=part.weight.device))  # [classes, C]
            table = _index(table * scale.to(table), 1, keep)
            plain = nn.Embedding(norm.num_classes, channels, device=table.device, dtype=table.dtype)
            with torch.no_grad():
                plain.weight.copy_(table)
        else:
            weight, bias = _affine_map(part, norm.cond_dim, f"{name}.{'gain' if offset else 'bias'}")
            bias = bias + offset
            s = scale.to(weight)
            weight, bias = _index(weight * s[:, None], 0, keep), _index(bias * s, 0, keep)
            plain = nn.Linear(norm.cond_dim, channels, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(weight)
                plain.bias.copy_(bias)
        maps.append(plain)
    return stats, maps[0], maps[1]


class _Rewriter:
    """Replaces the nodes of gansparse modules with plain ones, cut to the kept channels."""

    def __init__(self, gm: fx.GraphModule, analysis: _ChannelAnalysis) -> None:
        self.gm, self.analysis, self.graph = gm, analysis, gm.graph

    def keep(self, node) -> torch.Tensor | None:
        return self.analysis.kept(self.analysis.flows.get(node)) if isinstance(node, fx.Node) else None

    def set_module(self, target: str, module: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, module)

    def run(self) -> fx.GraphModule:
        # The kept channels of each module's input and output, read before rewriting moves inputs.
        kept = {node: (self.keep(node.args[0] if node.args else None), self.keep(node))
                for node in self.graph.nodes if node.op == "call_module"}
        for node in list(self.graph.nodes):
            if node.op == "call_module":
                self.module_node(node, self.gm.get_submodule(node.target), *kept[node])
            elif node.op in ("call_method", "call_function") and node.target in _FUNCTION_REWRITES:
                getattr(self, _FUNCTION_REWRITES[node.target])(node)
        for node in list(self.graph.nodes):  # e.g. the masks a modulated conv folded
            if node.op == "get_attr" and not node.users:
                self.graph.erase_node(node)
        self.graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
        return self.gm

    def module_node(self, node: fx.Node, module: nn.Module, keep_in, keep_out) -> None:
        input_values = self.analysis.input_values.get(node)
        mask = getattr(module, "mask", None)
        scale = effective_mask_values(mask) if isinstance(mask, Mask) else None
        if isinstance(module, Mask):  # read directly by the model: its values, as a constant buffer
            values = _index(effective_mask_values(module), 0, keep_out)
            with self.graph.inserting_before(node):
                constant = self.graph.get_attr(self.add_buffer(node.target, values))
            node.replace_all_uses_with(constant)
            self.graph.erase_node(node)
        elif isinstance(module, MaskedConvNormAct):
            self.conv_norm_act_node(node, module, keep_in, keep_out, input_values, scale)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            self.set_module(node.target, _plain_conv(module, keep_in, keep_out, input_values, scale))
        elif isinstance(module, ConditionalBatchNorm2d):
            self.replace_with_chain(node, node.target, None, module, keep_out, None, None)
        elif isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)):  # masked norms included
            self.set_module(node.target, _plain_norm(module, keep_out, scale))
        elif isinstance(module, _masked_norm_types()):  # ChannelMask
            self.channel_mask_node(node, scale, keep_out)
        elif isinstance(module, nn.Linear):
            self.set_module(node.target, self.plain_linear(module, keep_in, keep_out, input_values))
        elif isinstance(module, _zoo_leaves()):
            self.modulated_conv_node(node, module, keep_in, keep_out)

    def bias_act_node(self, node: fx.Node) -> None:
        """fused_leaky_relu's bias, cut to the kept channels."""
        self.cut_attribute(node.args[1] if len(node.args) > 1 else node.kwargs.get("bias"), self.keep(node))

    def cut_attribute(self, node: fx.Node | None, keep) -> None:
        """The per-channel tensor a get_attr node reads, cut to the kept channels in place (the
        analysis pins the channels of any other per-channel argument)."""
        if not isinstance(node, fx.Node) or node.op != "get_attr" or keep is None:
            return
        owner_name, _, name = node.target.rpartition(".")
        owner = self.gm.get_submodule(owner_name) if owner_name else self.gm
        tensor = getattr(owner, name)
        cut = tensor.detach().index_select(0, keep.to(tensor.device))
        if isinstance(tensor, nn.Parameter):
            setattr(owner, name, nn.Parameter(cut, requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(name, cut)

    def modulated_conv_node(self, node: fx.Node, conv: nn.Module, keep_in, keep_out) -> None:
        """StyleGAN2's modulated conv of the kept channels as plain layers, in the form the module
        computes (so that it rounds the same): with `fused`, per-sample weights in a grouped conv,

            style = modulation(w)                                  # [N, C_in], times the input mask
            weight = scaled_weight * style                         # [N, C_out, C_in, k, k]
            weight = weight * rsqrt(sum_{i, k} weight^2 + eps)     # with demodulation
            out = conv(x as [1, N * C_in, H, W], weight as [N * C_out, C_in, k, k], groups=N)

        otherwise modulated activations through a plain conv layer,

            out = conv(x * style) * rsqrt(demodulation(style^2) + eps)   # demodulation [C_out, C_in]

        demodulation's weight being sum_k scaled_weight[o, i, k]^2; the FIR blur of an up- or
        downsampling conv as gansparse's upfirdn2d."""
        if conv.modulation.activation:
            raise NotImplementedError(f"export: modulated conv '{node.target}' has an activation on its style")
        weight = _index(_index(conv.scale * conv.weight[0].detach(), 1, keep_in), 0, keep_out)  # [C_out, C_in, k, k]
        modulation = conv.modulation
        style_weight = modulation.weight.detach() * modulation.scale  # [C_in, style_dim]
        style_bias = modulation.bias.detach() * modulation.lr_mul
        input_mask = self.analysis.style_scales.get(node)
        if input_mask is not None:
            input_mask = input_mask.to(style_weight)
            style_weight, style_bias = style_weight * input_mask[:, None], style_bias * input_mask
        container = nn.Module()
        container.modulation = _linear(_index(style_weight, 0, keep_in), _index(style_bias, 0, keep_in))
        if conv.upsample or conv.downsample:
            container.register_buffer("blur_kernel", conv.blur.kernel.detach().clone())
        self.set_module(node.target, container)
        x, style = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["style"]
        with self.graph.inserting_before(node):
            style = self.graph.call_module(f"{node.target}.modulation", (style,))
            emit = self.fused_modulated_conv if conv.fused else self.unfused_modulated_conv
            out = emit(node.target, container, conv, weight, x, style)
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)

    def blur(self, target: str, conv: nn.Module, x: fx.Node) -> fx.Node:
        kernel = self.graph.get_attr(f"{target}.blur_kernel")
        return self.graph.call_function(upfirdn2d, (x, kernel), {"pad": tuple(conv.blur.pad)})

    def fused_modulated_conv(self, target: str, container: nn.Module, conv: nn.Module, weight: torch.Tensor,
                             x: fx.Node, style: fx.Node) -> fx.Node:
        graph, (c_out, c_in) = self.graph, weight.shape[:2]
        container.weight = nn.Parameter(weight[None])  # [1, C_out, C_in, k, k]
        modulated = graph.call_function(operator.mul, (graph.get_attr(f"{target}.weight"), graph.call_method(
            "view", (style, -1, 1, c_in, 1, 1))))  # [N, C_out, C_in, k, k]
        if conv.demodulate:
            power = graph.call_method("sum", (graph.call_method("pow", (modulated, 2)), [2, 3, 4]))  # [N, C_out]
            demodulation = graph.call_function(torch.rsqrt, (graph.call_function(operator.add, (power, conv.eps)),))
            modulated = graph.call_function(operator.mul, (modulated, graph.call_method(
                "view", (demodulation, -1, c_out, 1, 1, 1))))
        batch = graph.call_method("size", (x, 0))
        x = graph.call_method("unsqueeze", (graph.call_method("flatten", (x, 0, 1)), 0))  # [1, N * C_in, H, W]
        if conv.upsample:  # conv_transpose2d takes [C_in, C_out, k, k] per group
            per_group = graph.call_method("flatten", (graph.call_method("transpose", (modulated, 1, 2)), 0, 1))
            out = graph.call_function(F.conv_transpose2d, (x, per_group), {"stride": 2, "groups": batch})
            out = self.blur(target, conv, out)
        else:
            x = self.blur(target, conv, x) if conv.downsample else x
            stride, padding = (2, 0) if conv.downsample else (1, conv.padding)
            out = graph.call_function(F.conv2d, (x, graph.call_method("flatten", (modulated, 0, 1))),
                                      {"stride": stride, "padding": padding, "groups": batch})
        return graph.call_method("squeeze", (graph.call_method("unflatten", (out, 1, (batch, c_out))), 0))

    def unfused_modulated_conv(self, target: str, container: nn.Module, conv: nn.Module, weight: torch.Tensor,
                               x: fx.Node, style: fx.Node) -> fx.Node:
        graph, (c_out, c_in) = self.graph, weight.shape[:2]
        if conv.upsample:
            container.conv = _plain_weights(nn.ConvTranspose2d(c_in, c_out, conv.kernel_size, stride=2, bias=False),
                                            weight.transpose(0, 1))
        else:
            stride, padding = (2, 0) if conv.downsample else (1, conv.padding)
            container.conv = _plain_weights(nn.Conv2d(c_in, c_out, conv.kernel_size, stride, padding, bias=False),
                                            weight)
        out = graph.call_function(operator.mul, (x, graph.call_method("view", (style, -1, c_in, 1, 1))))
        out = graph.call_module(f"{target}.conv", (self.blur(target, conv, out) if conv.downsample else out,))
        out = self.blur(target, conv, out) if conv.upsample else out
        if conv.demodulate:
            container.demodulation = _linear(weight.square().sum([2, 3]), None)
            power = graph.call_module(f"{target}.demodulation", (graph.call_method("square", (style,)),))
            demodulation = graph.call_function(torch.rsqrt, (graph.call_function(operator.add, (power, conv.eps)),))
            out = graph.call_function(operator.mul, (out, graph.call_method("view", (demodulation, -1, c_out, 1, 1))))
        return out

    def channel_mask_node(self, node: fx.Node, scale, keep) -> None:
        """The mask alone: folded into the conv right before it when that conv feeds only the mask
        (and is not a grouped transposed conv, whose weight splits output channels by group), a
        plain per-channel scale otherwise."""
        source = node.args[0]
        conv = self.gm.get_submodule(source.target) if isinstance(source, fx.Node) and source.op == "call_module" \
            else None
        foldable = (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and len(source.users) == 1
                    and (conv.groups == 1 or not conv.transposed))
        if scale is None or not foldable:
            self.set_module(node.target, _channel_scale(scale, keep))
            return
        scale = _index(scale, 0, keep).to(conv.weight)
        out_dim = 1 if conv.transposed else 0
        with torch.no_grad():
            conv.weight.mul_(scale.view([-1 if d == out_dim else 1 for d in range(conv.weight.dim())]))
            if conv.bias is not None:
                conv.bias.mul_(scale)
        node.replace_all_uses_with(source)
        self.graph.erase_node(node)

    def add_buffer(self, target: str, value: torch.Tensor) -> str:
        name = target.replace(".", "_") + "_values"
        self.gm.register_buffer(name, value.clone())
        return name

    @staticmethod
    def plain_linear(linear: nn.Linear, keep_in, keep_out, input_values) -> nn.Linear:
        weight = linear.weight.detach()  # [out, in]
        bias = linear.bias.detach() if linear.bias is not None else None
        if keep_in is not None and input_values is not None:
            constants = input_values.to(weight).clone()
            constants[keep_in.to(constants.device)] = 0
            if bool((constants != 0).any()):
                bias = weight @ constants + (bias if bias is not None else 0)
        return _linear(_index(_index(weight, 1, keep_in), 0, keep_out), _index(bias, 0, keep_out))

    def conv_norm_act_node(self, node, module: MaskedConvNormAct, keep_in, keep_out, input_values, scale):
        norm_scale = scale if module.norm is not None else None
        conv = _plain_conv(module.conv, keep_in, keep_out, input_values, None if module.norm is not None else scale)
        act = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(module.negative_slope), None: None}[module.activation]
        self.replace_with_chain(node, node.target, conv, module.norm, keep_out, norm_scale, act)

    def replace_with_chain(self, node, target, conv, norm, keep, scale, act) -> None:
        """node(x[, y]) becomes act(norm(conv(x)[, y])) of plain modules in a container at `target`."""
        container = nn.Module()
        self.set_module(target, container)
        x = node.args[0]
        y = node.args[1] if len(node.args) > 1 else node.kwargs.get("y")
        with self.graph.inserting_before(node):
            if conv is not None:
                container.conv = conv
                x = self.graph.call_module(f"{target}.conv", (x,))
            if isinstance(norm, ConditionalBatchNorm2d):
                container.norm, container.gamma, container.beta = _plain_cbn(norm, keep, scale, target)
                x = self.graph.call_module(f"{target}.norm", (x,))
                gamma = self.graph.call_module(f"{target}.gamma", (y,))  # [N, C]
                beta = self.graph.call_module(f"{target}.beta", (y,))
                gamma = self.graph.call_method("view", (gamma, -1, _out_features(container.gamma), 1, 1))
                beta = self.graph.call_method("view", (beta, -1, _out_features(container.beta), 1, 1))
                x = self.graph.call_function(torch.addcmul, (beta, x, gamma))
            elif norm is not None:
                container.norm = _plain_norm(norm, keep, scale)
                x = self.graph.call_module(f"{target}.norm", (x,))
            if act is not None:
                container.act = act
                x = self.graph.call_module(f"{target}.act", (x,))
        node.replace_all_uses_with(x)
        self.graph.erase_node(node)

    def shape_node(self, node: fx.Node) -> None:
        """view / reshape / expand with the old channel count written in: write the new one."""
        flow = self.analysis.flows.get(node)
        source = self.analysis.flows.get(node.args[0]) if node.args else None
        if flow is None or source is None:
            return
        old, new = len(flow.slots), len(self.keep(node))
        if old == new:
            return
        sizes = list(node.args[1:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
        if packed:
            sizes = list(sizes[0])
        if flow.axis < len(sizes) and sizes[flow.axis] == old:
            sizes[flow.axis] = new
            node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


def _out_features(module: nn.Module) -> int:
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.out_features


def _exportable(model: nn.Module) -> nn.Module:
    """What compact traces: model.exportable() when the model has that method (a module computing
    the model's function with a forward torch.fx can trace, e.g. StyleGAN2's generator without its
    random style mixing), else the model itself."""
    provider = getattr(model, "exportable", None)
    if not callable(provider):
        return model
    exportable = provider()
    if not isinstance(exportable, nn.Module):
        raise TypeError(f"{type(model).__name__}.exportable() must return an nn.Module, got "
                        f"{type(exportable).__name__}")
    return exportable


def _example_inputs(model: nn.Module, example_inputs: tuple) -> tuple:
    if example_inputs:
        return example_inputs
    provider = getattr(model, "example_inputs", None)
    if callable(provider):
        inputs = provider()
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    raise ValueError(f"compact needs example inputs for {type(model).__name__}: pass them as compact(model, x, ...) "
                     "(any batch and size the model accepts; small ones are fine), or give the model a method "
                     "example_inputs()")


def compact(model: nn.Module, *example_inputs) -> fx.GraphModule:
    """A plain PyTorch copy of `model` (a torch.fx GraphModule, in eval mode) with the masked
    channels physically removed and the masks folded away; `model` is left untouched.

    example_inputs: inputs the model's forward accepts, used to run it once (the values of constant
    channels, the shapes); default `model.example_inputs()` when the model has that method.
    A model with a method `exportable()` is compacted as the module that method returns (e.g.
    StyleGAN2's Generator as its FixedNoiseGenerator, z -> image); example_inputs and the compact
    model's inputs are then that module's.
    The result computes what pruned_reference(model) computes (see the module docstring for what
    is removed, and check_equivalence to test it). Raises ValueError when the model cannot be
    traced by torch.fx, NotImplementedError for a gansparse module type it does not convert.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = _exportable(model)
    example_inputs = _example_inputs(model, example_inputs)
    working = pruned_reference(model)
    gm = _trace(working)
    _check_module_types(gm)
    analysis = _ChannelAnalysis(gm)
    with torch.no_grad():
        analysis.run(*example_inputs)
    analysis.ensure_one_channel()
    return _Rewriter(gm, analysis).run().eval()


# --- save / load ---------------------------------------------------------------------------------

_FUNCTION_NAMESPACES = {"torch": torch, "torch.nn.functional": F, "operator": operator}
# gansparse's own ops a compact model may call (StyleGAN2's resampling filters and bias + activation).
_GANSPARSE_FUNCTIONS = {"gansparse.functional.upfirdn2d": upfirdn2d,
                        "gansparse.functional.fused_leaky_relu": fused_leaky_relu}


def _function_name(fn) -> str:
    if fn is builtins.getattr:
        return "builtins.getattr"
    for name, function in _GANSPARSE_FUNCTIONS.items():
        if fn is function:
            return name
    for prefix, namespace in _FUNCTION_NAMESPACES.items():
        name = getattr(fn, "__name__", None)
        if name and getattr(namespace, name, None) is fn:
            return f"{prefix}.{name}"
    raise ValueError(f"save: the graph calls {fn!r}, which is not a function of torch, torch.nn.functional or "
                     f"operator, nor one of {', '.join(_GANSPARSE_FUNCTIONS)}")


def _function(name: str):
    if name == "builtins.getattr":
        return builtins.getattr
    if name in _GANSPARSE_FUNCTIONS:
        return _GANSPARSE_FUNCTIONS[name]
    prefix, _, attr = name.rpartition(".")
    namespace = _FUNCTION_NAMESPACES.get(prefix)
    fn = getattr(namespace, attr, None) if namespace is not None and not attr.startswith("_") else None
    if not callable(fn):
        raise ValueError(f"load: unknown function {name!r} in the architecture")
    return fn


def _encode(value):
    """A graph argument or constructor argument as JSON."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is Ellipsis:
        return {"ellipsis": True}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"save: cannot store the argument {value!r} of type {type(value).__name__}")


def _decode(value, nodes: dict[str, fx.Node]):
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, content), = value.items()
    if kind == "node":
        return nodes[content]
    if kind == "tuple":
        return tuple(_decode(v, nodes) for v in content)
    if kind == "dict":
        return {k: _decode(v, nodes) for k, v in content.items()}
    if kind == "slice":
        return slice(*(_decode(v, nodes) for v in content))
    if kind in ("dtype", "memory_format"):
        result = getattr(torch, content, None)
        if not isinstance(result, (torch.dtype, torch.memory_format)):
            raise ValueError(f"load: unknown {kind} {content!r}")
        return result
    if kind == "device":
        return torch.device(content)
    if kind == "ellipsis":
        return Ellipsis
    raise ValueError(f"load: unknown argument encoding {kind!r}")


def _constructor_arguments(module: nn.Module, name: str) -> dict:
    """The constructor arguments of a torch.nn module, read back from its attributes."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:
        raise ValueError(f"save: module '{name}' is a {cls.__qualname__}, not a torch.nn layer; call "
                         "gansparse.export.compact first")
    arguments = {}
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or parameter.name in ("device", "dtype"):
            continue
        if hasattr(module, parameter.name):
            value = getattr(module, parameter.name)
            if parameter.name == "bias" and (value is None or isinstance(value, torch.Tensor)):
                value = value is not None
            if isinstance(value, torch.Tensor):
                raise ValueError(f"save: module '{name}' ({cls.__name__}) keeps its argument {parameter.name!r} "
                                 "as a tensor")
            arguments[parameter.name] = value
        elif parameter.default is parameter.empty:
            raise ValueError(f"save: cannot read the argument {parameter.name!r} of module '{name}' ({cls.__name__})")
    return arguments


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Store a compact model (from compact(), or any torch.fx-traceable model of torch.nn layers)
    in one safetensors file: its state_dict, and the architecture as JSON in the file's metadata.
    Written atomically (a temporary file renamed over `path`)."""
    from safetensors.torch import save_file

    gm = model if isinstance(model, fx.GraphModule) else _trace(model)
    modules, attributes, nodes = {}, [], []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            module = gm.get_submodule(target)
            modules[target] = {"type": type(module).__name__,
                               "arguments": _encode(_constructor_arguments(module, target))}
        elif node.op == "get_attr":
            attributes.append(target)
        elif node.op == "call_function":
            target = _function_name(target)
        nodes.append({"name": node.name, "op": node.op, "target": target, "args": _encode(node.args),
                      "kwargs": _encode(dict(node.kwargs))})
    architecture = {"format": _FORMAT, "modules": modules, "attributes": attributes, "graph": nodes}
    tensors = {k: v.detach().contiguous() for k, v in gm.state_dict().items()}
    for target in attributes:  # plain tensor attributes are not in the state_dict
        tensors.setdefault(target, operator.attrgetter(target)(gm).detach().contiguous())
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"gansparse.export": json.dumps(architecture)})
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> fx.GraphModule:
    """The model save() stored at `path`, as a torch.fx GraphModule in eval mode on `device`.
    Builds only torch.nn layers and torch functions; runs no pickle."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=str(device)) as file:
        metadata = file.metadata() or {}
        if "gansparse.export" not in metadata:
            raise ValueError(f"{path} is not a model saved by gansparse.export.save (no architecture in its metadata)")
        tensors = {k: file.get_tensor(k) for k in file.keys()}
    architecture = json.loads(metadata["gansparse.export"])
    if architecture.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown format {architecture.get('format')!r}, expected {_FORMAT!r}")
    root: dict[str, object] = {}
    for target, spec in architecture["modules"].items():
        cls = getattr(nn, spec["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"load: module '{target}' has unknown type {spec['type']!r}")
        root[target] = cls(**_decode(spec["arguments"], {}))
    for target in architecture["attributes"]:
        root[target] = tensors[target]
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for spec in architecture["graph"]:
        args, kwargs = _decode(spec["args"], nodes), _decode(spec["kwargs"], nodes)
        target = _function(spec["target"]) if spec["op"] == "call_function" else spec["target"]
        if spec["op"] == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(spec["op"], target, args, kwargs, name=spec["name"])
        nodes[spec["name"]] = node
    gm = fx.GraphModule(root, graph)
    gm.load_state_dict(tensors, strict=True)
    return gm.to(device).eval()
