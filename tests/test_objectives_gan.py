"""The dcgan and stargan base GANs (train/objectives): their loss terms on hand-built networks whose
values are known, StarGAN's draws and gradient penalty, option errors, n_critic through the
training loop (G updated on every n_critic-th step only), and the official StarGAN checkpoints as a
teacher."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import _reference_stargan as reference
from _reference_nets import randomise_
from _runs import single_thread
from train import checkpoint, loop
from train.config import ConfigError, resolve
from train.methods.dense import Dense
from train.methods.selfsup import consistency_loss
from train.objectives import get_objective
from train.objectives.stargan import gradient_penalty
from train.teacher import load_teacher

CPU = torch.device("cpu")


def _objective(preset: str, **overrides):
    cfg = resolve(Dense, preset, overrides={"device": "cpu", **overrides})
    return get_objective(cfg["model"])(cfg, CPU)


class ConstantProbability(nn.Module):
    """A DCGAN discriminator answering p for every image (probabilities [N], as models.dcgan's)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        return torch.full((len(x),), self.p) + 0 * x.sum((1, 2, 3))


def test_dcgan_terms_are_the_examples_bce_on_probabilities():
    objective = _objective("smoke_dcgan")
    batch = objective.prepare({"image": torch.randn(3, 3, 64, 64)})
    assert batch["z"].shape == (3, 16)
    nets = {"G": objective.build("G"), "D": ConstantProbability(0.8)}
    g_terms, fakes = objective.generator_terms(nets, batch)
    assert fakes["G"].shape == (3, 3, 64, 64)
    # BCE on the probability itself, with no second sigmoid.
    assert g_terms["G_gan"].item() == pytest.approx(-math.log(0.8))
    d_terms = objective.discriminator_terms(nets, batch, {"G": fakes["G"].detach()})
    assert d_terms["D_real"].item() == pytest.approx(-math.log(0.8))
    assert d_terms["D_fake"].item() == pytest.approx(-math.log(0.2))
    assert objective.generator_weights() == {"G_gan": 1.0}
    assert objective.discriminator_weights() == {"D_real": 1.0, "D_fake": 1.0}
    # The example's initialisation: convs N(0, 0.02), batch-norm scales N(1, 0.02).
    G = _objective("mnist").build("G")
    assert G.main[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert G.main[1].weight.mean().item() == pytest.approx(1.0, abs=0.01)


class ScalingGenerator(nn.Module):
    """G(x, c) = k x, whatever the domain."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x, c):
        return self.k * x


class LinearCritic(nn.Module):
    """src(x) = a * sum(x) per image (gradient a everywhere), cls(x) = fixed logits."""

    def __init__(self, a: float, logits: torch.Tensor) -> None:
        super().__init__()
        self.a, self.logits = a, logits

    def forward(self, x):
        return (self.a * x.sum((1, 2, 3))).view(-1, 1, 1, 1), self.logits + 0 * x.sum()


def test_stargan_terms_on_hand_built_networks():
    objective = _objective("smoke_stargan", lambda_cls=2.0, lambda_rec=10.0, lambda_gp=10.0)
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    batch = objective.prepare({"image": x, "label": labels})
    logits = torch.randn(4, 4)
    a = 0.01
    nets = {"G": ScalingGenerator(0.5), "D": LinearCritic(a, logits)}
    g_terms, fakes = objective.generator_terms(nets, batch)
    sums = x.sum((1, 2, 3))
    torch.testing.assert_close(g_terms["G_fake"], -(a * 0.5 * sums).mean())
    torch.testing.assert_close(g_terms["G_cls"], 2.0 * F.cross_entropy(logits, batch["label_trg"]))
    torch.testing.assert_close(g_terms["G_rec"], 10.0 * (0.75 * x).abs().mean())  # |x - G(G(x))| = 0.75 |x|
    d_terms = objective.discriminator_terms(nets, batch, {"G": fakes["G"].detach()})
    torch.testing.assert_close(d_terms["D_real"], -(a * sums).mean())
    torch.testing.assert_close(d_terms["D_fake"], (a * 0.5 * sums).mean())
    torch.testing.assert_close(d_terms["D_cls"], 2.0 * F.cross_entropy(logits, labels))
    # The gradient of src is a at each of the 3 * 32 * 32 pixels, wherever the mixed images are.
    expected_gp = 10.0 * (a * math.sqrt(3 * 32 * 32) - 1) ** 2
    assert d_terms["D_gp"].item() == pytest.approx(expected_gp, rel=1e-4)  # a float32 norm of 3072 values
    assert objective.generator_weights() == {"G_fake": 1.0, "G_cls": 2.0, "G_rec": 10.0}
    assert objective.discriminator_weights() == {"D_real": 1.0, "D_fake": 1.0, "D_cls": 2.0, "D_gp": 10.0}


def test_stargan_draws_are_a_permutation_of_the_labels_and_kept_once_drawn():
    objective = _objective("smoke_stargan")
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    batch = objective.prepare({"image": torch.randn(6, 3, 32, 32), "label": labels})
    assert sorted(batch["label_trg"].tolist()) == sorted(labels.tolist())
    assert torch.equal(batch["c_trg"], F.one_hot(batch["label_trg"], 4).float())
    assert torch.equal(batch["c_org"], F.one_hot(labels, 4).float())
    assert batch["gp_alpha"].shape == (6, 1, 1, 1)
    assert objective.input_image(batch) is batch["image"]  # shown beside its translation in sample grids
    again = objective.prepare(batch)  # idempotent: the teacher's terms see the student's draws
    for key in ("label_trg", "gp_alpha", "c_trg"):
        assert torch.equal(again[key], batch[key])
    image, c = objective.example_inputs(3)
    assert image.shape == (3, 3, 32, 32) and torch.equal(c.argmax(1), torch.tensor([0, 1, 2]))


class SmoothCritic(nn.Module):
    """A critic whose input gradient varies with the input (StarGAN's D is piecewise linear: its
    input gradient is locally constant, so the penalty has no gradient in the images there)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)), torch.zeros(len(x), 4) + 0 * x.sum()


def test_the_gradient_penalty_is_in_l_dc_and_differentiable_in_the_compressed_generator():
    """Eq. 8 with StarGAN: L_DC holds delta |GP_o - GP_c| / |GP_o| with delta = lambda_gp, and
    GP_c is differentiable in the compressed generator's weights through its fakes."""
    objective = _objective("smoke_stargan")
    batch = objective.prepare({"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 1])})
    D = SmoothCritic()
    original, compressed = ScalingGenerator(0.5), ScalingGenerator(0.4)
    _, fakes_original = objective.generator_terms({"G": original, "D": D}, batch)
    _, fakes_compressed = objective.generator_terms({"G": compressed, "D": D}, batch)
    d_original = objective.discriminator_terms({"D": D}, batch, {"G": fakes_original["G"].detach()})
    d_compressed = objective.discriminator_terms({"D": D}, batch, fakes_compressed)
    weights = objective.discriminator_weights()
    l_dc = consistency_loss(d_original, d_compressed, weights)
    gp_part = 10.0 * (d_original["D_gp"] - d_compressed["D_gp"]).abs() / d_original["D_gp"].abs()
    rest = consistency_loss(d_original, d_compressed, {k: w for k, w in weights.items() if k != "D_gp"})
    torch.testing.assert_close(l_dc, rest + gp_part)
    (grad,) = torch.autograd.grad(d_compressed["D_gp"], compressed.k)
    assert grad.abs().item() > 0


def test_gradient_penalty_matches_the_autograd_definition_in_float64():
    critic = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(1)).double()
    mixed = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    critic(mixed)
    penalty = gradient_penalty(critic, mixed)
    expected = torch.stack([((torch.func.grad(lambda x: critic(x[None]).sum())(m)).norm() - 1) ** 2 for m in mixed])
    torch.testing.assert_close(penalty, expected.mean())


@pytest.mark.parametrize("preset, overrides, option", [
    ("smoke_stargan", {"crop_size": 36}, "crop_size"),
    ("smoke_stargan", {"n_critic": 0}, "n_critic"),
    ("smoke_stargan", {"lambda_gp": -1.0}, "lambda_gp"),
    ("smoke_stargan", {"num_classes": 1}, "num_classes"),
    ("smoke_stargan", {"g_repeat_num": -1}, "g_repeat_num"),
    ("smoke_dcgan", {"crop_size": 32}, "crop_size"),
    ("smoke_dcgan", {"nz": 0}, "nz"),
])
def test_bad_options_are_config_errors_naming_the_option(preset, overrides, option):
    with pytest.raises(ConfigError, match=f"option '{option}'"):
        _objective(preset, **overrides)


class RecordingDense(Dense):
    """Dense that records, after each step, whether G's and D's parameters changed."""

    runs: list = []

    def build(self) -> None:
        super().build()
        self.changed = []
        self._last = self._snapshot()
        RecordingDense.runs.append(self)

    def _snapshot(self):
        return {name: [p.detach().clone() for p in self.nets[name].parameters()] for name in ("G", "D")}

    def after_step(self, step: int) -> None:
        now = self._snapshot()
        self.changed.append({name: any(not torch.equal(a, b) for a, b in zip(self._last[name], now[name]))
                             for name in now})
        self._last = now


def test_n_critic_updates_the_generator_every_n_critic_steps_only(tmp_path):
    out = tmp_path / "run"
    cfg = resolve(RecordingDense, "smoke_stargan", overrides=dict(
        device="cpu", out=str(out), steps=7, n_critic=3, g_conv_dim=4, d_conv_dim=4, g_repeat_num=1, batch_size=2,
        log_every=1, sample_every=1000, checkpoint_every=1000, eval=False, export=False, tensorboard=False,
        lr_policy="linear", decay_start=0.0))
    with single_thread():
        loop.run(RecordingDense, cfg)
    changed = RecordingDense.runs.pop().changed
    assert [c["G"] for c in changed] == [False, False, True, False, False, True, False]
    assert all(c["D"] for c in changed)
    history = checkpoint.load(checkpoint.latest(out))[1]["history"]
    # G's terms are logged on its own steps, D's on every step.
    assert [step for step, _ in history["G_rec"]] == [3, 6]
    assert [step for step, _ in history["D_gp"]] == list(range(1, 8))
    # Each LR schedule runs over its part's own updates: G's 2, D's 7 (linear decay from the start).
    assert history["lr_G"][-1][1] == pytest.approx(1e-4 * (1 - 2 / 3))
    assert history["lr_D"][-1][1] == pytest.approx(1e-4 * (1 - 7 / 8))


def test_the_official_stargan_checkpoints_load_as_a_teacher(tmp_path):
    G, D = randomise_(reference.Generator(4, 4, 1)), randomise_(reference.Discriminator(32, 4, 4, 3))
    torch.save(G.state_dict(), tmp_path / "200000-G.ckpt")  # the official files: plain state_dicts
    torch.save(D.state_dict(), tmp_path / "200000-D.ckpt")
    cfg = resolve(Dense, "smoke_stargan", overrides=dict(device="cpu", g_conv_dim=4, d_conv_dim=4, g_repeat_num=1))
    cfg["teacher"] = str(tmp_path)
    teacher = load_teacher(cfg, CPU)
    x, c = torch.randn(2, 3, 32, 32), torch.eye(4)[[0, 2]]
    with torch.no_grad():
        assert torch.equal(teacher["G"](x, c), G.train()(x, c))  # the official code's (training-mode) outputs
        assert all(torch.equal(a, b) for a, b in zip(teacher["D"](x), D(x)))
