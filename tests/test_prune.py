"""Magnitude pruning (granularities, scopes), the AGP schedule and pruner, and pruned weights
staying exactly zero through optimizer steps."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gansparse.prune import AGPPruner, agp_sparsity, magnitude_
from gansparse.sparse import SparseConv2d, SparseConvTranspose2d, convert


def two_layer_model():
    return nn.Sequential(SparseConv2d(8, 12, 3, padding=1), nn.ReLU(), SparseConvTranspose2d(12, 4, 4, 2, 1))


def filters(layer):
    """The mask as [C_out, C_in, kH, kW]."""
    return layer.weight_mask.transpose(0, 1) if layer.transposed else layer.weight_mask


# --- AGP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("step, expected", [
    (-5, 0.05), (0, 0.05), (25, 0.5 - 0.45 * 0.75 ** 3), (50, 0.5 - 0.45 * 0.5 ** 3), (100, 0.5), (300, 0.5),
])
def test_agp_values_at_known_steps(step, expected):
    assert agp_sparsity(step, 0, 100, 0.05, 0.5) == pytest.approx(expected, abs=1e-12)


def test_agp_with_a_late_begin():
    # Zhu & Gupta's formula with t0 = 1000, n * dt = 3000: a quarter of the way, (3/4)^3 of the gap remains.
    assert agp_sparsity(1750, 1000, 4000, 0.0, 0.9) == pytest.approx(0.9 * (1 - 0.75 ** 3))


def test_paper_schedule_runs_from_5_percent_to_the_target_halfway():
    pruner = AGPPruner.self_supervised_gan_compression(two_layer_model(), total_steps=1000, final_sparsity=0.75)
    assert pruner.sparsity(0) == pytest.approx(0.05)
    assert pruner.sparsity(500) == pytest.approx(0.75)
    assert pruner.sparsity(999) == pytest.approx(0.75)
    assert 0.05 < pruner.sparsity(250) < 0.75


def test_pruner_prunes_every_frequency_steps_and_at_the_end():
    model = two_layer_model()
    pruner = AGPPruner(model, 0.8, begin_step=0, end_step=35, frequency=10, initial_sparsity=0.1)
    pruned = {}
    for step in range(50):
        sparsity = pruner.step()
        if sparsity is not None:
            pruned[step] = sparsity
    assert sorted(pruned) == [0, 10, 20, 30, 35]
    assert pruned[0] == pytest.approx(0.1) and pruned[35] == pytest.approx(0.8)
    for layer in model.modules():
        if isinstance(layer, (SparseConv2d, SparseConvTranspose2d)):
            assert 1 - layer.density == pytest.approx(0.8, abs=1 / layer.weight.numel())


def test_pruner_resumes_from_its_state():
    pruner = AGPPruner(two_layer_model(), 0.5, end_step=10, frequency=5)
    for _ in range(7):
        pruner.step()
    resumed = AGPPruner(two_layer_model(), 0.5, end_step=10, frequency=5)
    resumed.load_state_dict(pruner.state_dict())
    assert [resumed.step() for _ in range(4)] == [None, None, None, pytest.approx(0.5)]


# --- granularities -------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_element_pruning_removes_the_smallest_weights(sparsity):
    layer = SparseConv2d(8, 12, 3)
    weights = layer.weight.detach().clone()
    magnitude_(layer, sparsity)
    kept = layer.weight_mask.bool()
    assert int((~kept).sum()) == round(sparsity * weights.numel())
    if 0 < sparsity < 1:
        assert weights[kept].abs().min() >= weights[~kept].abs().max()
    assert (layer.weight[~kept] == 0).all()
    torch.testing.assert_close(layer.weight[kept], weights[kept])


@pytest.mark.parametrize("cls", [SparseConv2d, SparseConvTranspose2d])
def test_kernel_pruning_removes_whole_kernels(cls):
    layer = cls(8, 12, 3)
    magnitude_(layer, 0.75, "kernel")
    assert layer.granularity == "kernel"
    per_kernel = filters(layer).flatten(2)  # [C_out, C_in, kH * kW]
    assert ((per_kernel == 0).all(-1) | (per_kernel == 1).all(-1)).all()
    assert int((per_kernel[..., 0] == 0).sum()) == round(0.75 * 8 * 12)


@pytest.mark.parametrize("cls", [SparseConv2d, SparseConvTranspose2d])
def test_filter_pruning_removes_output_channels(cls):
    layer = cls(8, 12, 3)
    with torch.no_grad():
        weight = layer.weight.transpose(0, 1) if layer.transposed else layer.weight
        weight[:3] *= 0.01  # the three weakest output channels
    magnitude_(layer, 0.25, "filter")
    per_filter = filters(layer).flatten(1)  # [C_out, C_in * kH * kW]
    assert ((per_filter == 0).all(-1) | (per_filter == 1).all(-1)).all()
    assert (per_filter[:3] == 0).all() and (per_filter[3:] == 1).all()


@pytest.mark.parametrize("cls", [SparseConv2d, SparseConvTranspose2d])
def test_2_4_pruning_keeps_the_two_largest_of_every_four_input_channels(cls):
    layer = cls(8, 6, 3)
    weights = (layer.weight.transpose(0, 1) if layer.transposed else layer.weight).detach().clone()
    magnitude_(layer, 0.5, "2:4")
    groups = filters(layer).permute(0, 2, 3, 1).reshape(-1, 4)
    assert (groups.sum(-1) == 2).all()
    magnitudes = weights.abs().permute(0, 2, 3, 1).reshape(-1, 4)
    kept = groups.bool()
    assert (magnitudes[kept].view(-1, 2).min(-1).values >= magnitudes[~kept].view(-1, 2).max(-1).values).all()


def test_global_scope_spreads_the_sparsity_by_magnitude():
    model = two_layer_model()
    conv, convt = model[0], model[2]
    with torch.no_grad():
        conv.weight.mul_(10)  # much larger weights: pruned less than the other layer
    magnitude_(model, 0.6, scope="global")
    total = conv.weight.numel() + convt.weight.numel()
    pruned = sum(int((m.weight_mask == 0).sum()) for m in (conv, convt))
    assert abs(pruned - 0.6 * total) <= 1
    assert conv.density > convt.density


def test_pruned_weights_stay_pruned_when_pruning_more():
    layer = SparseConv2d(4, 4, 3)
    magnitude_(layer, 0.5)
    first = layer.weight_mask.clone()
    magnitude_(layer, 0.8)
    assert (layer.weight_mask <= first).all()


def test_convert_shares_parameters_and_masks_the_zeros():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[0] = 0
    layer = convert(nn.Sequential(conv))[0]
    assert isinstance(layer, SparseConv2d) and layer.weight is conv.weight
    assert (layer.weight_mask[0] == 0).all() and (layer.weight_mask[1:] == 1).all()


# --- optimizer steps -----------------------------------------------------------------------------


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
], ids=["Adam", "AdamW", "SGD-momentum"])
@pytest.mark.parametrize("copied", [False, True], ids=["original", "deep-copy"])
def test_pruned_weights_stay_exactly_zero_through_optimizer_steps(make_optimizer, copied):
    model = copy.deepcopy(two_layer_model()) if copied else two_layer_model()
    optimizer = make_optimizer(model.parameters())
    x = torch.randn(2, 8, 6, 6)

    def train_step():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    for _ in range(3):  # the optimizer builds momentum for every weight
        train_step()
    magnitude_(model, 0.7)  # then pruning happens mid-training, as AGP does
    for _ in range(5):
        train_step()
    for layer in (model[0], model[2]):
        pruned = layer.weight_mask == 0
        assert pruned.sum() > 0
        assert (layer.weight[pruned] == 0).all()
        assert (layer.weight[~pruned] != 0).all()


# --- bad input -----------------------------------------------------------------------------------

BAD_CALLS = [
    (lambda: magnitude_(two_layer_model(), 0.5, "row"), ValueError, "granularity must be one of"),
    (lambda: magnitude_(two_layer_model(), 0.5, "4:2"), ValueError, "0 < N < M"),
    (lambda: magnitude_(two_layer_model(), 0.5, scope="net"), ValueError, "scope must be one of"),
    (lambda: magnitude_(two_layer_model(), 1.5), ValueError, r"sparsity must be a number in \[0, 1\]"),
    (lambda: magnitude_(two_layer_model(), 0.75, "2:4"), ValueError, "2:4 pruning has sparsity 0.5"),
    (lambda: magnitude_(SparseConv2d(6, 4, 1), 0.5, "2:4"), ValueError, "has 6 input channels"),
    (lambda: magnitude_(nn.Sequential(nn.Conv2d(2, 2, 1)), 0.5), ValueError, "no SparseConv2d"),
    (lambda: magnitude_("model", 0.5), TypeError, "model must be an nn.Module"),
    (lambda: agp_sparsity(0, 10, 10, 0.0, 0.5), ValueError, "end_step must be greater than begin_step"),
    (lambda: agp_sparsity(0, 0, 10, 0.0, 1.5), ValueError, r"final_sparsity must be in \[0, 1\]"),
    (lambda: AGPPruner(two_layer_model(), 0.5, end_step=10, frequency=0), ValueError, "frequency must be"),
    (lambda: AGPPruner(two_layer_model(), 0.5, end_step=10, granularity="2:4"), ValueError, "one fixed sparsity"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
