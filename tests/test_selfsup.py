"""Self-Supervised GAN Compression (`--method selfsup`): the consistency losses on hand-built values,
the pruning schedule through the method, and small end-to-end runs (target sparsity, sparsified
export, resume) on CycleGAN, pix2pix, DCGAN and StarGAN."""
import json
from pathlib import Path

import pytest
import torch

from _runs import assert_same_run, kill_at_checkpoint, train_teacher
from gansparse import export
from gansparse.sparse import SPARSE_LAYERS
from train import checkpoint
from train.config import resolve
from train.methods.selfsup import SelfSup, consistency_loss
from train.objectives import get_objective
from train.run import main


def _tensors(**values):
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}


def test_consistency_loss_on_hand_built_values():
    original = _tensors(gan=2.0, cycle=-4.0, unused=7.0)
    compressed = _tensors(gan=3.0, cycle=-1.0, unused=0.0)
    # 1 * |2 - 3| / 2 + 10 * |-4 - -1| / 4; terms without a weight do not count.
    assert consistency_loss(original, compressed, {"gan": 1.0, "cycle": 10.0}).item() == pytest.approx(8.0)
    assert consistency_loss(original, original, {"gan": 1.0, "cycle": 10.0}).item() == 0.0
    # Eq. 9 with lambda = 0.5: L_GC + 0.5 * L_DC.
    d_original, d_compressed = _tensors(D=0.5, D_inv=0.25), _tensors(D=0.25, D_inv=0.5)
    l_dc = consistency_loss(d_original, d_compressed, {"D": 1.0, "D_inv": 1.0})
    assert l_dc.item() == pytest.approx(0.5 + 1.0)


def test_consistency_loss_gradient_and_edge_cases():
    compressed = _tensors(gan=3.0, cycle=-5.0)
    for value in compressed.values():
        value.requires_grad_(True)
    loss = consistency_loss(_tensors(gan=2.0, cycle=-4.0), compressed, {"gan": 1.0, "cycle": 10.0})
    loss.backward()
    # d/dc w |o - c| / |o| = w sign(c - o) / |o|
    assert compressed["gan"].grad.item() == pytest.approx(1.0 / 2.0)
    assert compressed["cycle"].grad.item() == pytest.approx(-10.0 / 4.0)
    # An original term of exactly 0 gives a large but finite distance.
    assert torch.isfinite(consistency_loss(_tensors(gan=0.0), _tensors(gan=1.0), {"gan": 1.0}))
    with pytest.raises(ValueError, match="no loss term"):
        consistency_loss(_tensors(gan=1.0), _tensors(gan=1.0), {"gan": 1.0, "cycle": 10.0})


def _objective(cfg):
    return get_objective(cfg["model"])(cfg, torch.device("cpu"))


def test_term_weights_are_the_base_objectives():
    cyclegan = _objective(resolve(SelfSup, "smoke"))
    assert cyclegan.generator_weights() == {"G_gan": 1.0, "G_inv_gan": 1.0, "cycle_A": 10.0, "cycle_B": 10.0,
                                            "idt_A": 5.0, "idt_B": 5.0}
    assert cyclegan.discriminator_weights() == {"D": 1.0, "D_inv": 1.0}
    assert "idt_A" not in _objective(resolve(SelfSup, "smoke", overrides={"lambda_identity": 0})).generator_weights()
    pix2pix = _objective(resolve(SelfSup, "smoke_pix2pix"))
    assert pix2pix.generator_weights() == {"G_gan": 1.0, "G_L1": 100.0}
    assert pix2pix.discriminator_weights() == {"D": 1.0}


def test_paper_presets_train_a_tenth_of_the_dense_schedule():
    assert resolve(SelfSup, "horse2zebra")["steps"] == 26_680
    assert resolve(SelfSup, "edges2shoes")["steps"] == 18_684
    assert resolve(SelfSup, "cityscapes")["direction"] == "BtoA"
    assert resolve(SelfSup, "mnist")["steps"] == 25 * 469 // 10  # DCGAN: 25 epochs of MNIST at batch 128
    rafd = resolve(SelfSup, "rafd")
    assert (rafd["steps"], rafd["n_critic"], rafd["batch_size"], rafd["lr"]) == (20_000, 5, 16, 1e-4)


def test_stargan_terms_and_weights_are_the_official_ones():
    stargan = _objective(resolve(SelfSup, "smoke_stargan"))
    # alpha, beta and delta of Eq. 7-8: lambda_cls, lambda_rec and lambda_gp.
    assert stargan.generator_weights() == {"G_fake": 1.0, "G_cls": 1.0, "G_rec": 10.0}
    assert stargan.discriminator_weights() == {"D_real": 1.0, "D_fake": 1.0, "D_cls": 1.0, "D_gp": 10.0}
    assert _objective(resolve(SelfSup, "smoke_dcgan")).generator_weights() == {"G_gan": 1.0}


# --- on a trained teacher -------------------------------------------------------------------------

# Tiny, deterministic and on the CPU, so runs repeat exactly and take seconds.
TINY = ["--device", "cpu", "--deterministic", "true", "--ngf", "4", "--ndf", "4", "--crop_size", "32",
        "--load_size", "32", "--batch_size", "2", "--log_every", "1", "--sample_every", "1000",
        "--tensorboard", "false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A dense CycleGAN teacher trained for a few steps."""
    return train_teacher(tmp_path_factory.mktemp("teacher"), "--preset", "smoke", *TINY, "--netG", "resnet_2blocks",
                         "--pool_size", "3")


@pytest.fixture(scope="module")
def pix2pix_teacher(tmp_path_factory):
    """A dense pix2pix (U-Net) teacher trained for a few steps."""
    return train_teacher(tmp_path_factory.mktemp("pix2pix_teacher"), "--preset", "smoke_pix2pix", *TINY)


def _method(teacher: Path, preset: str = "smoke", **overrides) -> SelfSup:
    cfg = resolve(SelfSup, preset, overrides={"device": "cpu", "teacher": str(teacher), **overrides})
    method = SelfSup(cfg, torch.device("cpu"))
    method.build()
    return method


def _students_layers(method: SelfSup) -> list[torch.nn.Module]:
    return [m for g, _ in method.directions() for m in method.nets[g].modules() if isinstance(m, SPARSE_LAYERS)]


def test_students_are_sparse_copies_of_the_teacher(teacher):
    method = _method(teacher)
    for g in ("G", "G_inv"):
        student, original = method.nets[g], method.nets[g + "_T"]
        convs = [m for m in original.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
        assert len(_students_layers(method)) == 2 * len(convs)
        assert not any(isinstance(m, SPARSE_LAYERS) for m in original.modules())
        assert all(not p.requires_grad for p in original.parameters())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(student(x), original(x), rtol=0, atol=0)
    assert method.sparsity()["overall"] == 0.0


def test_agp_schedule_through_the_method(teacher):
    steps, target = 40, 0.75
    method = _method(teacher, steps=steps, sparsity=target, prune_frequency=4)
    overall = []
    for step in range(steps):
        method.after_step(step)
        overall.append(method.sparsity()["overall"])
    assert overall[0] == pytest.approx(0.05, abs=0.01)  # 5% at the start
    assert overall[steps // 2] == pytest.approx(target, abs=0.01)  # the target halfway
    assert overall[-1] == overall[steps // 2]
    assert overall[steps // 4] < target and all(b >= a for a, b in zip(overall, overall[1:]))
    # Every layer of both students is at the target, and its pruned weights are 0.
    for layer in _students_layers(method):
        assert 1 - layer.density == pytest.approx(target, abs=0.5 / layer.weight.numel() + 1e-9)
        assert torch.all(layer.weight[layer.weight_mask == 0] == 0)


def test_coarse_and_n_m_granularities(teacher):
    method = _method(teacher, steps=4, sparsity=0.5, granularity="filter", prune_frequency=1)
    for step in range(4):
        method.after_step(step)
    layer = next(m for m in method.nets["G"].modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels >= 8)
    per_filter = layer.weight_mask.flatten(1).sum(1)
    assert set(per_filter.tolist()) <= {0.0, float(layer.weight_mask[0].numel())}  # whole filters go
    # 2:4 is pruned once, when the students are built, where the input channels split into fours.
    n_m = _method(teacher, granularity="2:4", sparsity=0.5)
    layers = _students_layers(n_m)
    for layer in layers:
        c_in = layer.weight.shape[0 if layer.transposed else 1]
        assert layer.density == (0.5 if c_in % 4 == 0 else 1.0)
        if c_in % 4 == 0:  # two of every four consecutive input channels at each position
            kept = layer.weight_mask.transpose(0, 1) if layer.transposed else layer.weight_mask
            assert torch.all(kept.unflatten(1, (-1, 4)).sum(2) == 2)
    assert any(layer.density == 1.0 for layer in layers) and any(layer.density == 0.5 for layer in layers)
    with pytest.raises(ValueError, match="1 - N/M = 0.5"):
        _method(teacher, granularity="2:4", sparsity=0.75)
    with pytest.raises(ValueError, match="option 'granularity'"):
        _method(teacher, granularity="channel")


def test_a_teacher_of_another_model_is_a_clear_error(teacher):
    with pytest.raises(ValueError, match="is a cyclegan model, but the options are for pix2pix"):
        _method(teacher, "smoke_pix2pix")


def test_sparsified_model_matches_the_masked_student(pix2pix_teacher, one_thread):
    method = _method(pix2pix_teacher, "smoke_pix2pix", steps=2, sparsity=0.75, prune_frequency=1)
    for step in range(2):
        method.after_step(step)
    sparse = method.final_model()
    masked = method.nets["G"].eval()
    for layer in (m for m in sparse.modules() if isinstance(m, SPARSE_LAYERS)):
        layer.to_sparse()  # without an example: the sparse kernel at density 0.25
    forms = {layer.inference for layer in sparse.modules() if isinstance(layer, SPARSE_LAYERS)}
    assert forms == {"sparse"}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = masked(x)
        assert (sparse(x) - expected).abs().max().item() <= 1e-5
        # The loop's export: compacted to plain torch convs with the pruned weights at 0.
        compact = export.compact(sparse, x[:1])
        assert (compact(x) - expected).abs().max().item() <= 1e-5


# --- end to end --------------------------------------------------------------------------------


def _selfsup(teacher: Path, out: Path, *options: str) -> list[str]:
    return ["--method", "selfsup", "--preset", "smoke", *TINY, "--pool_size", "3", "--teacher", str(teacher),
            "--out", str(out), *options]


def test_smoke_run_reaches_the_target_sparsity_and_exports_the_sparse_student(teacher, tmp_path, one_thread):
    out = tmp_path / "selfsup"
    assert main(_selfsup(teacher, out, "--steps", "12", "--prune_frequency", "2", "--eval", "true",
                         "--eval_size", "4", "--eval_fidelity", "false", "--eval_lpips", "false")) == 0
    tensors, state = checkpoint.load(checkpoint.latest(out))
    # The unpruned student computes the teacher's loss terms exactly at the first step.
    assert state["history"]["GC"][0] == (1, 0.0) and state["history"]["DC"][0] == (1, 0.0)
    assert state["history"]["GC"][-1][1] > 0
    assert state["sparsity_history"]["overall"][-1][1] == pytest.approx(0.5, abs=0.01)
    masks = [name for name in tensors if name.endswith(".weight_mask")]
    assert {name.split(".")[0] for name in masks} == {"G", "G_inv"}
    for name in masks:
        mask, weight = tensors[name], tensors[name.removesuffix("_mask")]
        assert 1 - mask.mean().item() == pytest.approx(0.5, abs=0.5 / mask.numel() + 1e-9), name
        assert torch.all(weight[mask == 0] == 0), name  # pruned weights are exactly 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["macs"] < report["teacher"]["macs"]
    # The exported generator computes the trained masked student.
    method = _method(teacher)
    method.load_state_dict(tensors)
    exported = export.load(out / "export" / "generator.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (exported(x) - method.nets["G"].eval()(x)).abs().max().item() <= 1e-5


def test_resume_after_sigkill_gives_the_uninterrupted_run(teacher, tmp_path, one_thread):
    options = ["--steps", "12", "--prune_frequency", "2", "--checkpoint_every", "4", "--eval", "false",
               "--export", "false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    interrupted_at = kill_at_checkpoint(_selfsup(teacher, killed, *options), killed, 4)
    assert 4 <= interrupted_at < 12  # mid-schedule: the pruner's position must be restored

    assert main(_selfsup(teacher, full, *options)) == 0
    assert main(["--resume", str(killed)]) == 0
    full_state, resumed_state = assert_same_run(full, killed, 12)
    assert resumed_state["method"]["pruners"] == full_state["method"]["pruners"]


def test_pix2pix_smoke_run(pix2pix_teacher, tmp_path, one_thread):
    out = tmp_path / "selfsup_pix2pix"
    assert main(["--method", "selfsup", "--preset", "smoke_pix2pix", *TINY, "--teacher", str(pix2pix_teacher),
                 "--steps", "6", "--prune_frequency", "1", "--eval", "false", "--out", str(out)]) == 0
    _, state = checkpoint.load(checkpoint.latest(out))
    assert state["sparsity_history"]["overall"][-1][1] == pytest.approx(0.5, abs=0.01)
    assert set(state["history"]) >= {"GC", "DC", "G_gan", "G_L1", "D"}
    assert (out / "export" / "generator.safetensors").exists()


# --- the synthesis and multi-domain base GANs ----------------------------------------------------

# Per base GAN: (preset, tiny options, loss terms logged, G's inputs for the export check).
GANS = {
    "dcgan": ("smoke_dcgan", ["--nz", "8", "--ngf", "4", "--ndf", "4"], {"G_gan", "D_real", "D_fake"},
              lambda: (torch.randn(2, 8),)),
    "stargan": ("smoke_stargan", ["--g_conv_dim", "4", "--d_conv_dim", "4", "--g_repeat_num", "1"],
                {"G_fake", "G_cls", "G_rec", "D_real", "D_fake", "D_cls", "D_gp"},
                lambda: (torch.randn(2, 3, 32, 32), torch.eye(4)[[1, 3]])),
}
GAN_RUN = ["--device", "cpu", "--deterministic", "true", "--batch_size", "2", "--log_every", "1",
           "--sample_every", "1000", "--tensorboard", "false"]


@pytest.fixture(scope="module")
def gan_teacher(tmp_path_factory):
    """gan_teacher(name): a dense teacher of base GAN `name` trained for a few steps (once per module)."""
    teachers = {}

    def teacher(name: str) -> Path:
        if name not in teachers:
            preset, options, _, _ = GANS[name]
            out = tmp_path_factory.mktemp(f"{name}_teacher")
            teachers[name] = train_teacher(out, "--preset", preset, *GAN_RUN, *options)
        return teachers[name]

    return teacher


def _gan_selfsup(name: str, teacher: Path, out: Path, *options: str) -> list[str]:
    return ["--method", "selfsup", "--preset", GANS[name][0], *GAN_RUN, "--teacher", str(teacher), "--out", str(out),
            *options]


@pytest.mark.parametrize("name", list(GANS))
def test_gan_smoke_run_reaches_the_target_sparsity_and_exports_the_sparse_student(name, gan_teacher, tmp_path,
                                                                                   one_thread):
    teacher = gan_teacher(name)
    out = tmp_path / name
    # StarGAN updates G on steps 5 and 10 (n_critic 5), D on every step.
    assert main(_gan_selfsup(name, teacher, out, "--steps", "10", "--prune_frequency", "1", "--eval", "true",
                             "--eval_size", "4", "--eval_fidelity", "false", "--eval_lpips", "false")) == 0
    tensors, state = checkpoint.load(checkpoint.latest(out))
    assert set(state["history"]) >= {"GC", "DC"} | GANS[name][2]
    assert state["history"]["GC"][-1][1] > 0
    assert state["sparsity_history"]["overall"][-1][1] == pytest.approx(0.5, abs=0.01)
    masks = [key for key in tensors if key.endswith(".weight_mask")]
    assert masks and {key.split(".")[0] for key in masks} == {"G"}
    for key in masks:
        mask, weight = tensors[key], tensors[key.removesuffix("_mask")]
        assert 1 - mask.mean().item() == pytest.approx(0.5, abs=0.5 / mask.numel() + 1e-9), key
        assert torch.all(weight[mask == 0] == 0), key  # pruned weights are exactly 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["macs"] < report["teacher"]["macs"]
    assert (out / "samples").is_dir()
    # The exported generator computes the trained masked student.
    method = _method(teacher, GANS[name][0])
    method.load_state_dict(tensors)
    exported = export.load(out / "export" / "generator.safetensors")
    inputs = GANS[name][3]()
    with torch.no_grad():
        assert (exported(*inputs) - method.nets["G"].eval()(*inputs)).abs().max().item() <= 1e-5


def test_stargan_resume_after_sigkill_gives_the_uninterrupted_run(gan_teacher, tmp_path, one_thread):
    # On StarGAN, whose G skips steps (n_critic): a resumed run must skip the same ones.
    name, teacher = "stargan", gan_teacher("stargan")
    options = ["--steps", "12", "--prune_frequency", "2", "--checkpoint_every", "3", "--eval", "false",
               "--export", "false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    interrupted_at = kill_at_checkpoint(_gan_selfsup(name, teacher, killed, *options), killed, 3)
    assert 3 <= interrupted_at < 12
    assert main(_gan_selfsup(name, teacher, full, *options)) == 0
    assert main(["--resume", str(killed)]) == 0
    full_state, resumed_state = assert_same_run(full, killed, 12)
    assert resumed_state["method"]["pruners"] == full_state["method"]["pruners"]
    assert [step for step, _ in full_state["history"]["GC"]] == [5, 10]


def test_a_missing_teacher_is_a_clear_error(tmp_path, capsys):
    assert main(["--method", "selfsup", "--preset", "smoke", "--out", str(tmp_path / "run")]) == 1
    assert "error: option 'teacher' must be a directory" in capsys.readouterr().err
