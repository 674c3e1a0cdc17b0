"""The mask library: DMAD's quadratic mask, bound schedule and (group) sparsity losses, PPCD-GAN's
sigmoid mask and binarization trick, hard masks and the whole-model helpers."""
import math

import pytest
import torch
from torch import nn

from gansparse.masks import (
    DMADMask,
    HardMask,
    SigmoidMask,
    binarize_masks_,
    dmad_bound,
    dmad_group_coefficients,
    dmad_group_sparsity_loss,
    dmad_mask,
    make_mask,
    mask_losses,
    mask_sparsity,
    set_dmad_bound_,
)


def dmad_with(p, bound=1.0):
    mask = DMADMask(len(p), bound=bound)
    with torch.no_grad():
        mask.p.copy_(torch.tensor(p))
    return mask


def sigmoid_with(values, **kwargs):
    """A SigmoidMask whose values are `values` (temperature 1: logits = logit(values))."""
    mask = SigmoidMask(len(values), temperature=1.0, **kwargs)
    with torch.no_grad():
        mask.logits.copy_(torch.logit(torch.tensor(values, dtype=torch.float64)).float())
    return mask


# --- dmad_mask (Eq. 3) ---------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1.0, 0.5])
def test_dmad_mask_known_points(b):
    p = torch.tensor([-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0], dtype=torch.float64) * b
    expected = torch.tensor([0.0, 0.0, 0.125, 0.28125, 0.5, 0.71875, 0.875, 1.0, 1.0], dtype=torch.float64)
    assert torch.equal(dmad_mask(p, b), expected)


def test_dmad_mask_is_continuous_at_the_piece_boundaries():
    b, eps = 0.6, 1e-9
    for edge, value in ((-b, 0.0), (0.0, 0.5), (b, 1.0)):
        p = torch.tensor([edge - eps, edge, edge + eps], dtype=torch.float64)
        assert torch.allclose(dmad_mask(p, b), torch.full((3,), value, dtype=torch.float64), atol=1e-8)
    # Exact at the boundaries, from the defining case of each.
    assert dmad_mask(torch.tensor([-b, 0.0, b], dtype=torch.float64), b).tolist() == [0.0, 0.5, 1.0]


def test_dmad_mask_bound_zero_is_the_step_function():
    # Eq. 3 with b = 0: the first case (p <= -b) wins at p = 0.
    p = torch.tensor([-1.0, -1e-12, 0.0, 1e-12, 1.0], requires_grad=True)
    m = dmad_mask(p, 0.0)
    assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert not m.requires_grad  # zero masks get no gradient


def test_dmad_mask_accepts_a_tensor_bound_and_rejects_a_negative_one():
    p = torch.tensor([-0.5, 0.5])
    assert torch.equal(dmad_mask(p, torch.tensor(1.0)), dmad_mask(p, 1.0))
    with pytest.raises(ValueError, match="bound"):
        dmad_mask(p, -0.1)


def test_dmad_mask_gradcheck_away_from_the_kinks():
    b = 0.7
    # Every piece, including both sides of 0 (where the slope 1/b is continuous), away from -b and b.
    p = torch.tensor([-1.5, -0.6, -0.3, -0.05, 0.05, 0.3, 0.6, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dmad_mask(t, b), (p,))
    (grad,) = torch.autograd.grad(dmad_mask(p, b).sum(), p)
    q = p.detach() / b
    expected = torch.where(q.abs() >= 1, 0.0, (1 - q.abs()) / b)
    assert torch.allclose(grad, expected)


# --- dmad_bound (Eq. 4) -------------------------------------------------------------------------


def test_dmad_bound_official_schedule():
    assert dmad_bound(0, 1000) == 1.0
    # (step / 750) ** (1/3) = 1/2 at step 750 / 8.
    assert dmad_bound(750 / 8, 1000) == pytest.approx(0.5)
    assert dmad_bound(375, 1000) == pytest.approx(1 - 0.5 ** (1 / 3))
    assert dmad_bound(750, 1000) == 0.0
    assert dmad_bound(751, 1000) == 0.0
    assert dmad_bound(1000, 1000) == 0.0


def test_dmad_bound_paper_schedule_and_power():
    assert dmad_bound(125, 1000, search_end=1.0) == pytest.approx(0.5)
    assert dmad_bound(500, 1000, search_end=1.0) == pytest.approx(1 - 0.5 ** (1 / 3))
    assert dmad_bound(1000, 1000, search_end=1.0) == 0.0
    assert dmad_bound(250, 1000, search_end=1.0, power=0.5) == pytest.approx(0.5)
    # The cube root shrinks the bound at least as fast as a linear schedule.
    assert all(dmad_bound(e, 100, search_end=1.0) <= 1 - e / 100 for e in range(101))


@pytest.mark.parametrize("kwargs, name", [
    (dict(step=1, total_steps=0), "total_steps"),
    (dict(step=1, total_steps=10, search_end=0.0), "search_end"),
    (dict(step=1, total_steps=10, search_end=1.5), "search_end"),
    (dict(step=-1, total_steps=10), "step"),
    (dict(step=1, total_steps=10, power=0), "power"),
])
def test_dmad_bound_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dmad_bound(**kwargs)


# --- DMAD mask module and sparsity losses (Eq. 5, 6) -------------------------------------------


def test_dmad_mask_module_values_and_bound_in_state_dict():
    mask = dmad_with([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert torch.equal(mask(), dmad_mask(mask.p, 1.0))
    set_dmad_bound_(nn.Sequential(mask), 0.25)
    assert torch.equal(mask.values(), dmad_mask(mask.p, 0.25))
    # Through a parent module too, with the bound exactly as saved.
    restored = nn.Sequential(DMADMask(5))
    restored.load_state_dict(nn.Sequential(mask).state_dict())
    restored = restored[0]
    assert torch.equal(restored.values(), mask.values())
    assert restored.keep().tolist() == [False, False, False, True, True]
    assert mask.sparsity() == pytest.approx(2 / 5)  # -2 and -0.5 are <= -0.25


def test_dmad_mask_init_is_around_one_half():
    torch.manual_seed(0)
    mask = DMADMask(4096)
    assert mask.p.std().item() == pytest.approx(0.2, rel=0.05)
    assert mask.values().mean().item() == pytest.approx(0.5, abs=0.02)


def test_dmad_sparsity_loss_counts_in_bound_inputs_only():
    mask = dmad_with([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], bound=1.0)
    loss = mask.sparsity_loss()
    assert loss.item() == pytest.approx(0.5 + 1.0 + 1.5)
    loss.backward()
    assert mask.p.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    weighted = mask.sparsity_loss(torch.tensor([9.0, 9.0, 2.0, 3.0, 4.0, 9.0, 9.0]))
    assert weighted.item() == pytest.approx(2 * 0.5 + 3 * 1.0 + 4 * 1.5)
    assert mask.set_bound_(0.0).sparsity_loss().item() == 0.0


def test_dmad_group_coefficients_eq6():
    # Three blocks (s = 3), four channels, bound 1: p <= -1 is a zero mask.
    group = [dmad_with([-1.0, 0.2, 0.2, 0.5]), dmad_with([-2.0, -1.5, 0.3, -0.5]), dmad_with([-1.2, -1.0, -3.0, 0.9])]
    # ||g_t||_0 = 0, 1, 2, 3
    coefficients = dmad_group_coefficients(group, lambda_spa=0.01)
    assert torch.allclose(coefficients, torch.tensor([0.0, 0.03, 0.015, 0.01]))
    loss = dmad_group_sparsity_loss(group, lambda_spa=0.01)
    by_hand = 0.03 * 1.2 + 0.015 * (1.2 + 1.3) + 0.01 * (1.5 + 0.5 + 1.9)
    assert loss.item() == pytest.approx(by_hand)


def test_dmad_group_coefficients_all_zero_group():
    group = [dmad_with([-1.0, -3.0]), dmad_with([-2.0, -1.0])]
    assert dmad_group_coefficients(group).tolist() == [0.0, 0.0]
    assert dmad_group_sparsity_loss(group).item() == 0.0


def test_dmad_group_rejects_bad_groups():
    with pytest.raises(ValueError, match="masks"):
        dmad_group_coefficients([])
    with pytest.raises(ValueError, match=r"masks\[1\] has 3 channels"):
        dmad_group_coefficients([DMADMask(2), DMADMask(3)])
    with pytest.raises(TypeError, match=r"masks\[1\] must be a DMADMask"):
        dmad_group_coefficients([DMADMask(2), SigmoidMask(2)])


def test_mask_losses_sums_every_kind_and_groups():
    group = [dmad_with([-0.5, 0.5]), dmad_with([-1.5, 0.0])]
    alone = dmad_with([0.25, -0.25])
    sigmoid = sigmoid_with([0.2, 0.3])
    model = nn.ModuleDict(dict(a=group[0], b=group[1], c=alone, d=sigmoid, e=HardMask(2)))
    # Group: channel 0 has one non-zero mask (coefficient 2), channel 1 two (coefficient 1).
    group_loss = 2 * (-0.5 + 1) + 1 * ((0.5 + 1) + (0.0 + 1))
    assert dmad_group_sparsity_loss(group).item() == pytest.approx(group_loss)
    assert mask_losses(model, groups=[group]).item() == pytest.approx((1.25 + 0.75) + (0.2 + 0.3) + group_loss)
    # Without groups every DMAD mask takes the plain Eq. 5 loss.
    assert mask_losses(model).item() == pytest.approx(0.5 + 1.5 + 1.0 + 0.75 + 1.25 + 0.5)
    assert mask_losses(nn.Linear(2, 2)).item() == 0.0


# --- sigmoid mask (PPCD-GAN Eq. 1-3) -----------------------------------------------------------


def test_sigmoid_mask_values_and_l1_loss():
    mask = SigmoidMask(3, temperature=5.0)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([-1.0, 0.0, 0.4]))
    assert torch.allclose(mask(), torch.sigmoid(5 * torch.tensor([-1.0, 0.0, 0.4])))
    assert mask.sparsity_loss().item() == pytest.approx(mask.values().sum().item())
    # Default: every channel at 1/2, the steepest point of the sigmoid.
    assert SigmoidMask(4).values().tolist() == [0.5] * 4


def test_binarization_trick_triggers_only_above_the_threshold():
    # 10 channels, threshold 0.5: 5 values at or below the pivot are not enough (r = 0.5).
    values = [0.004, 0.005, 0.001, 0.003, 0.002, 0.2, 0.5, 0.9, 0.006, 0.7]
    mask = sigmoid_with(values, compression_threshold=0.5)
    assert mask.compression_ratio() == pytest.approx(0.5)
    assert not mask.apply_binarization_trick_()
    assert not mask.frozen and mask.values().requires_grad
    # A sixth one tips it over: values above the pivot become 1, the rest 0.
    mask = sigmoid_with(values[:5] + [0.0049] + values[6:], compression_threshold=0.5)
    assert mask.apply_binarization_trick_()
    assert mask.values().tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert mask.sparsity() == pytest.approx(0.6)


def test_binarized_sigmoid_mask_is_frozen():
    mask = sigmoid_with([0.001, 0.002, 0.9], compression_threshold=0.5)
    assert mask.apply_binarization_trick_()
    frozen = mask.values().clone()
    assert not mask.values().requires_grad
    assert mask.sparsity_loss().item() == 0.0
    optimizer = torch.optim.Adam(mask.parameters(), lr=1.0, weight_decay=0.1)
    x = torch.randn(3, requires_grad=True)
    ((mask() * x).sum() + mask.sparsity_loss()).backward()
    optimizer.step()
    assert mask.logits.grad is None
    assert torch.equal(mask.values(), frozen)
    # Frozen-ness is part of the state dict.
    restored = SigmoidMask(3, temperature=1.0)
    restored.load_state_dict(mask.state_dict())
    assert restored.frozen and torch.equal(restored.values(), frozen)


def test_hard_mask_is_frozen():
    mask = HardMask(4, torch.tensor([1, 0, 1, 1]))
    assert mask.values().tolist() == [1.0, 0.0, 1.0, 1.0]
    assert list(mask.parameters()) == []
    assert mask.frozen and mask.sparsity_loss().item() == 0.0
    assert mask.keep().tolist() == [True, False, True, True]
    assert mask.sparsity() == 0.25
    assert HardMask(3).values().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="values must be 0 or 1"):
        HardMask(2, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="values must have shape"):
        HardMask(2, torch.tensor([1.0, 1.0, 1.0]))


# --- factory and model helpers --------------------------------------------------------------------


def test_make_mask():
    assert isinstance(make_mask("sigmoid", 3), SigmoidMask)
    assert isinstance(make_mask("dmad", 3, bound=0.5), DMADMask)
    assert make_mask("hard", 3).values().tolist() == [1.0, 1.0, 1.0]
    assert make_mask("sigmoid", 2, dtype=torch.float64).values().dtype == torch.float64
    with pytest.raises(ValueError, match="kind must be one of"):
        make_mask("gumbel", 3)
    with pytest.raises(ValueError, match="channels"):
        make_mask("dmad", 0)


def test_mask_sparsity_and_binarize_masks():
    sigmoid = sigmoid_with([0.001, 0.5, 0.004, 0.9])
    dmad = dmad_with([-2.0, -0.1, 0.1, 2.0], bound=0.5)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ModuleDict(dict(s=sigmoid, d=dmad)))
    assert mask_sparsity(model) == {"1.s": 0.0, "1.d": 0.25, "overall": 1 / 8}
    assert binarize_masks_(model) is model
    # Sigmoid: pivot rule regardless of the threshold; DMAD: the value at bound 0, [p > 0].
    assert sigmoid.values().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert dmad.values().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert sigmoid.frozen and dmad.frozen
    assert mask_sparsity(model) == {"1.s": 0.5, "1.d": 0.5, "overall": 0.5}
    assert mask_losses(model).item() == 0.0
    # A frozen DMAD mask ignores later bounds.
    set_dmad_bound_(model, 1.0)
    assert dmad.values().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_sigmoid_mask_rejects_bad_settings():
    for kwargs, name in ((dict(temperature=0), "temperature"), (dict(pivot=1.0), "pivot"),
                         (dict(compression_threshold=1.0), "compression_threshold")):
        with pytest.raises(ValueError, match=name):
            SigmoidMask(2, **kwargs)


def test_default_temperature_spans_the_dmad_range():
    # m goes from the pivot to 1 - pivot over logits in about [-1.06, 1.06].
    edge = math.log(0.995 / 0.005) / 5.0
    mask = SigmoidMask(2)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([-edge, edge]))
    assert torch.allclose(mask.values(), torch.tensor([0.005, 0.995]))
    assert edge == pytest.approx(1.06, abs=0.01)


def test_dmad_mask_builds_on_the_meta_device():
    # Profiling builds full-size models on meta, where the bound's mirror must still be readable.
    with torch.device("meta"):
        mask = DMADMask(8, bound=0.5)
    assert mask.p.device.type == "meta"
    assert mask._bound == 0.5
