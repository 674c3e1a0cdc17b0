"""DMAD (`--method dmad`): its pieces against the paper's formulas on hand-built examples, and
small end-to-end runs (search to a MACs target, compact export, fine-tuning, resume)."""
import copy
import json
from pathlib import Path

import pytest
import torch

import gansparse
from _runs import assert_same_run, kill_at_checkpoint, train_teacher
from gansparse import export

from gansparse.masks import DMADMask, binarize_masks_, dmad_group_coefficients
from gansparse.models import (
    MobileResnetGenerator,
    NLayerDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    residual_mask_groups,
)
from train.distill import FeatureTaps, default_attention_layers, default_discriminator_layers
from train import checkpoint
from train.config import resolve
from train.methods.dmad import DMAD, coattention_loss, compact_student, parse_macs
from train.run import main
from train.teacher import load_teacher


def test_residual_group_is_the_stream_feeder_and_each_blocks_last_mask():
    G = ResnetGenerator(3, 3, ngf=4, norm="instance", n_blocks=9, mask="dmad")
    (group,) = residual_mask_groups(G)
    names = {id(m): n for n, m in G.named_modules()}
    # The reference layout's model.11 and model.13..21.conv_block.8 of the official code.
    assert [names[id(m)] for m in group] == ["model.8.mask"] + [f"model.{i}.conv_block.6.mask" for i in range(10, 19)]
    mobile = MobileResnetGenerator(3, 3, ngf=4, n_blocks=6, mask="dmad")  # the same layout, separable blocks
    (group,) = residual_mask_groups(mobile)
    names = {id(m): n for n, m in mobile.named_modules()}
    assert [names[id(m)] for m in group] == ["model.8.mask"] + [f"model.{i}.conv_block.7.mask" for i in range(10, 16)]
    assert residual_mask_groups(ResnetGenerator(3, 3, ngf=4, n_blocks=2)) == []  # no masks
    assert residual_mask_groups(UnetGenerator(3, 3, 5, ngf=4, mask="dmad")) == []


def test_group_coefficients_on_a_hand_built_group():
    # Three blocks, four channels; channel t is zero in (0, 1, 2, 3) of the masks.
    group = [DMADMask(4, bound=0.0) for _ in range(3)]
    with torch.no_grad():
        group[0].p.copy_(torch.tensor([1.0, -1.0, -1.0, -1.0]))
        group[1].p.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]))
        group[2].p.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0]))
    # lambda_GSPA_t = lambda * s / ||g_t||_0: s = 3 masks, non-zero counts 3, 2, 1, 0.
    expected = torch.tensor([0.1 * 3 / 3, 0.1 * 3 / 2, 0.1 * 3 / 1, 0.0])
    torch.testing.assert_close(dmad_group_coefficients(group, 0.1), expected)


def test_default_layers_are_the_papers():
    # The outputs of model.9 and of blocks model.12, model.15 and model.18, the last ones as the
    # inputs of the layers after them.
    G9 = ResnetGenerator(3, 3, ngf=4, norm="instance", n_blocks=9)
    assert default_attention_layers(G9) == ["model.9", "model.13.conv_block.0:in", "model.16.conv_block.0:in",
                                            "model.19:in"]
    assert default_attention_layers(ResnetGenerator(3, 3, ngf=4, n_blocks=3, padding_type="zero")) == [
        "model.9", "model.11.conv_block.0:in", "model.12.conv_block.0:in", "model.13:in"]
    assert default_attention_layers(MobileResnetGenerator(3, 3, ngf=4, n_blocks=9)) == default_attention_layers(G9)
    U = UnetGenerator(3, 3, 8, ngf=4)  # unet_256: 16 convolutions
    convs = [n for n, m in U.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert default_attention_layers(U) == [convs[1], convs[3], convs[11], convs[13]]
    assert default_discriminator_layers(NLayerDiscriminator(3, 4, n_layers=3)) == (["model.4", "model.10"],
                                                                                 "model.10")


def test_feature_taps_keep_the_first_forward_since_reset():
    G = ResnetGenerator(3, 3, ngf=4, norm="instance", n_blocks=3)
    taps = FeatureTaps(G, ["model.9", "model.13:in", ""])
    block_output = FeatureTaps(G, ["model.12"])  # a module that runs as one: its own output
    x, y = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    taps.reset(), block_output.reset()
    out = G(x)
    G(y)
    feature, block, kept = taps.outputs()
    assert torch.equal(kept, out)
    assert feature.shape == (1, 16, 4, 4)
    assert torch.equal(block, block_output.outputs()[0])
    taps.reset()
    with pytest.raises(RuntimeError, match="no output recorded"):
        taps.outputs()
    with pytest.raises(ValueError, match="no module named"):
        FeatureTaps(G, ["model.99"])


def test_coattention_target_on_a_hand_built_example():
    # One layer: student and teacher G maps at 2x2, two teacher D maps at 2x2 and 4x4.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).sqrt().view(1, 1, 2, 2)  # A_S = s^2
    g = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).sqrt().view(1, 1, 2, 2)
    d1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).sqrt().view(1, 1, 2, 2)
    d2 = torch.zeros(1, 1, 4, 4)
    d2[..., :2, :2] = 4.0 ** 0.5  # its area average to 2x2 is 4 at the top-left pixel only
    a_t = 0.5 * torch.tensor([1.0, 1.0, 0.0, 0.0]) + 0.25 * torch.tensor([0.0, 0.0, 1.0, 1.0]) \
        + 0.25 * torch.tensor([4.0, 0.0, 0.0, 0.0])
    a_s = torch.tensor([1.0, 0.0, 0.0, 1.0])
    expected = ((a_s / a_s.norm() - a_t / a_t.norm()) ** 2).sum()
    torch.testing.assert_close(coattention_loss([s], [g], [d1, d2], "sum"), expected)
    torch.testing.assert_close(coattention_loss([s], [g], [d1, d2], "mean"), expected / 4)


def test_parse_macs():
    assert parse_macs("", 1000) is None
    assert parse_macs("25%", 1000) == 250
    assert parse_macs("2.5G", 1) == 2_500_000_000
    assert parse_macs("400m", 1) == 400_000_000
    for bad in ("-1G", "abc", "0"):
        with pytest.raises(ValueError, match="target_macs"):
            parse_macs(bad, 1000)


@pytest.mark.parametrize("make", [
    lambda: ResnetGenerator(3, 3, ngf=8, norm="instance", n_blocks=3, mask="dmad"),
    lambda: ResnetGenerator(3, 3, ngf=8, norm="batch", n_blocks=3, mask="dmad"),
    lambda: UnetGenerator(3, 3, 5, ngf=8, norm="batch", mask="dmad"),
    lambda: MobileResnetGenerator(3, 3, ngf=8, n_blocks=3, mask="dmad"),
], ids=["resnet-instance", "resnet-batch", "unet-batch", "mobile"])
def test_compact_student_matches_the_binarised_masked_student(make):
    torch.manual_seed(1)
    G = make().eval()
    with torch.no_grad():
        for _, m in G.named_modules():
            if isinstance(m, DMADMask):
                m.p.copy_(torch.randn(m.channels))
    compact = compact_student(G, torch.randn(1, 3, 32, 32)).eval()
    binary = binarize_masks_(copy.deepcopy(G))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), binary(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in G.parameters())
    assert not any(m.frozen for m in G.modules() if isinstance(m, DMADMask))  # the student is untouched


# --- end to end --------------------------------------------------------------------------------

# Tiny, deterministic and on the CPU, so runs repeat exactly and take seconds.
TINY = ["--device", "cpu", "--deterministic", "true", "--netG", "resnet_2blocks", "--ngf", "4", "--ndf", "4",
        "--crop_size", "32", "--load_size", "32", "--batch_size", "2", "--pool_size", "3", "--log_every", "1",
        "--sample_every", "1000", "--tensorboard", "false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A dense CycleGAN teacher trained for a few steps."""
    return train_teacher(tmp_path_factory.mktemp("teacher"), "--preset", "smoke", *TINY)


def _dmad(teacher: Path, out: Path, *options: str) -> list[str]:
    return ["--method", "dmad", "--preset", "smoke", *TINY, "--teacher", str(teacher), "--out", str(out), *options]


def test_smoke_search_stops_at_the_macs_target_and_exports_the_compact_student(teacher, tmp_path, one_thread):
    out = tmp_path / "dmad"
    assert main(_dmad(teacher, out, "--steps", "60", "--finetune_steps", "4", "--target_macs", "50%",
                      "--macs_every", "4", "--eval", "true", "--eval_size", "4", "--eval_fidelity", "false",
                      "--eval_lpips", "false")) == 0
    report = json.loads((out / "report.json").read_text())
    teacher_macs, student_macs = report["teacher"]["macs"], report["student"]["macs"]
    assert student_macs <= 0.5 * teacher_macs
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["steps"] < 60 + 4  # the search stopped early, at the target
    _, state = checkpoint.load(checkpoint.latest(out))
    assert max(step for step, _ in state["sparsity_history"]["G.overall"]) < 60
    # The exported generator is the fine-tuned compact student, loadable without the training code.
    exported = export.load(out / "export" / "generator.safetensors")
    assert gansparse.profile(exported, torch.zeros(1, 3, 32, 32))["macs"] == student_macs


def test_resume_mid_search_gives_the_uninterrupted_run(teacher, tmp_path, one_thread):
    options = ["--steps", "12", "--finetune_steps", "6", "--checkpoint_every", "4", "--eval", "false",
               "--export", "false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    interrupted_at = kill_at_checkpoint(_dmad(teacher, killed, *options), killed, 4)
    assert 4 <= interrupted_at < 12  # inside the search stage

    assert main(_dmad(teacher, full, *options)) == 0
    assert main(["--resume", str(killed)]) == 0  # through the rest of the search and the fine-tuning
    assert_same_run(full, killed, 18)


def test_teachers_load_from_a_run_a_checkpoint_or_reference_files(teacher, tmp_path):
    cfg = resolve(DMAD, "smoke", overrides={"teacher": str(teacher), "ngf": 16})
    from_run = load_teacher(cfg, torch.device("cpu"))
    assert cfg["ngf"] == 4  # the architecture is the teacher's
    from_checkpoint = load_teacher(dict(cfg, teacher=str(checkpoint.latest(teacher))), torch.device("cpu"))
    # The reference's files: one state dict per network, named as junyanz's CycleGAN saves them.
    reference = tmp_path / "reference"
    reference.mkdir()
    for ours, theirs in (("G", "G_A"), ("G_inv", "G_B"), ("D", "D_A"), ("D_inv", "D_B")):
        torch.save(from_run[ours].state_dict(), reference / f"latest_net_{theirs}.pth")
    from_files = load_teacher(dict(cfg, teacher=str(reference)), torch.device("cpu"))
    for loaded in (from_checkpoint, from_files):
        for name, net in from_run.items():
            for (key, value), other in zip(net.state_dict().items(), loaded[name].state_dict().values()):
                assert torch.equal(value, other), (name, key)
    (reference / "latest_net_D_B.pth").unlink()
    with pytest.raises(FileNotFoundError, match="latest_net_D_B.pth is missing"):
        load_teacher(dict(cfg, teacher=str(reference)), torch.device("cpu"))


def test_a_missing_teacher_is_a_clear_error(tmp_path, capsys):
    assert main(["--method", "dmad", "--preset", "smoke", "--out", str(tmp_path / "run")]) == 1
    assert "error: option 'teacher' must be a directory" in capsys.readouterr().err
