"""PPCD-GAN (`--method ppcd`): the sigmoid mask and its binarization trick, and class-aware attention
distillation, on hand-built values; small end-to-end runs (pruning to the ratio, compact export
equal to the masked student, resume after SIGKILL)."""
import json

import pytest
import torch
from PIL import Image
from torch import nn

from _runs import assert_same_run, kill_at_checkpoint, train_teacher
from gansparse import export
from gansparse.masks import SigmoidMask, named_masks
from gansparse.models import biggan
from train import checkpoint
from train.config import load_yaml
from train.objectives import get_objective
from train.methods import ppcd
from train.methods.ppcd import PPCD, ClassAwareTaps, class_aware_distill_loss, parse_blocks
from train.run import main


def test_sigmoid_mask_and_binarization_trick_on_hand_built_values():
    mask = SigmoidMask(4, temperature=5.0, pivot=0.005, compression_threshold=0.5)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([-2.0, -1.2, 0.0, 0.3]))
    # Eq. 1: sigmoid(5 * logits); Eq. 2: their sum.
    expected = torch.sigmoid(torch.tensor([-10.0, -6.0, 0.0, 1.5]))
    torch.testing.assert_close(mask.values(), expected)
    torch.testing.assert_close(mask.sparsity_loss(), expected.sum())
    # Eq. 3: two of four values are <= 0.005 (4.5e-5 and 2.5e-3): r = 0.5 is not > 0.5.
    assert mask.compression_ratio() == 0.5
    assert not mask.apply_binarization_trick_()
    torch.testing.assert_close(mask.values(), expected)
    mask.compression_threshold = 0.4  # r = 0.5 > 0.4: binarised and frozen
    assert mask.apply_binarization_trick_()
    assert mask.values().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert mask.sparsity_loss().item() == 0.0
    assert not mask.values().requires_grad  # a binarised mask no longer updates...
    with torch.no_grad():
        mask.logits.fill_(5.0)
    assert mask.values().tolist() == [0.0, 0.0, 1.0, 1.0]  # ...nor follows its logits


class _Block(nn.Module):
    """A feature read by a class-conditional BN the way models.biggan's blocks call theirs."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x, y):
        return self.norm(x, y, activation="relu")


def test_class_aware_attention_on_a_hand_built_example():
    # A class-conditional BN in eval mode with mean 0, var 1: (1 + gain[y]) * x (up to eps). Class
    # 0 keeps channel 1 only, class 1 channel 0 only.
    norm = biggan.ClassConditionalBatchNorm(2, 2, nn.Embedding, eps=1e-6).eval()
    with torch.no_grad():
        norm.gain.weight.copy_(torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
        norm.bias.weight.zero_()
    teacher = _Block(norm)
    taps = ClassAwareTaps(teacher, ["norm"])
    # Teacher features [2, 2, 1, 2]: channel 0 is 3 on pixel 0, channel 1 is 4 on pixel 1.
    feature = torch.tensor([[[[3.0, 0.0]], [[0.0, 4.0]]]]).repeat(2, 1, 1, 1)
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        taps.reset()
        teacher(feature, ids)
        (normalised,) = taps.outputs()
    # Sample 0 (class 0): map [0, 16] -> [0, 1]; sample 1 (class 1): [9, 0] -> [1, 0].
    torch.testing.assert_close(normalised[0], torch.tensor([[[0.0, 0.0]], [[0.0, 4.0]]]), rtol=1e-5, atol=0)
    torch.testing.assert_close(normalised[1], torch.tensor([[[3.0, 0.0]], [[0.0, 0.0]]]), rtol=1e-5, atol=0)
    # A student whose maps are [1, 0] for both: per image || . ||^2 = 2 and 0, batch mean 1.
    student = torch.tensor([[[[1.0, 0.0]]]]).repeat(2, 1, 1, 1)
    assert class_aware_distill_loss([student], [normalised]).item() == pytest.approx(1.0)
    # Without the class-conditional normalisation both targets are the maps [9, 16], normalised.
    raw = torch.tensor([9.0, 16.0]) / (81.0 + 256.0) ** 0.5
    plain = class_aware_distill_loss([student], [feature])
    assert plain.item() == pytest.approx(((torch.tensor([1.0, 0.0]) - raw) ** 2).sum().item())
    # Two blocks average (Eq. 6): the same block twice gives the same loss.
    assert class_aware_distill_loss([student, student], [normalised, normalised]).item() == pytest.approx(1.0)
    # A student with maps [4, 1] / 17^0.5: gradients flow to it, none to the teacher.
    student = torch.tensor([[[[2.0, 1.0]]]]).repeat(2, 1, 1, 1).requires_grad_(True)
    a = torch.tensor([4.0, 1.0]) / 17 ** 0.5
    expected = 0.5 * (((a - torch.tensor([0.0, 1.0])) ** 2).sum() + ((a - torch.tensor([1.0, 0.0])) ** 2).sum())
    loss = class_aware_distill_loss([student], [normalised])
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert student.grad.abs().sum() > 0 and not normalised.requires_grad
    taps.close()


def test_distill_blocks_are_one_based_and_checked():
    assert parse_blocks("2,3,4,5", 5) == [1, 2, 3, 4]
    assert parse_blocks(" 3, 2", 3) == [1, 2]
    for bad in ("", "0,2", "2,6", "two"):
        with pytest.raises(ValueError, match="option 'distill_blocks' must list block numbers in \\[1, 5\\]"):
            parse_blocks(bad, 5)


def _objective(**options):
    from train.config import resolve
    cfg = resolve(PPCD, "smoke", overrides=dict(num_classes=3, **options))
    return get_objective("biggan")(cfg, torch.device("cpu"))


def test_the_biggan_objective_builds_both_layouts_with_the_hinge_loss():
    sagan, big = _objective(), _objective(biggan_config="biggan", dim_z=18, shared_dim=8)
    assert big.dim_z == 16  # 3 blocks at 32x32: z splits into 4 chunks, the remainder is dropped
    G, D = big.build("G"), big.build("D")
    assert G.hier and G.G_shared and not sagan.build("G").G_shared and G.dim_z == big.dim_z
    batch = big.prepare({"image": torch.rand(4, 3, 32, 32) * 2 - 1, "label": torch.tensor([0, 1, 2, 0])})
    assert batch["z"].shape == (4, 16) and batch["y"].dtype == torch.int64 and int(batch["y"].max()) < 3
    assert big.prepare(batch)["z"] is batch["z"]  # idempotent: student and teacher share the draws
    nets = {"G": G, "D": D}
    terms, fakes = big.generator_terms(nets, batch)
    # BigGAN-PyTorch's hinge loss: G -mean D(fake); D mean relu(1 - D(real)) + mean relu(1 + D(fake)).
    torch.testing.assert_close(terms["G_gan"], -D(fakes["G"], batch["y"]).mean())
    d_terms = big.discriminator_terms(nets, batch, {"G": fakes["G"].detach()})
    torch.testing.assert_close(d_terms["D_real"], torch.relu(1 - D(batch["image"], batch["label"])).mean())
    torch.testing.assert_close(d_terms["D_fake"], torch.relu(1 + D(fakes["G"], batch["y"])).mean())
    assert big.generator_weights() == {"G_gan": 1.0} and set(big.discriminator_weights()) == set(d_terms)
    # A shared-embedding G is exported on embeddings, an SA-GAN one on class ids.
    assert big.example_inputs(2)[1].shape == (2, 8) and sagan.example_inputs(2)[1].dtype == torch.int64
    with pytest.raises(ValueError, match="option 'biggan_config' must be one of"):
        _objective(biggan_config="stylegan")
    with pytest.raises(ValueError, match="option 'crop_size' must be one of"):
        _objective(crop_size=48)


def test_lpips_diversity_pairs_images_of_one_class(monkeypatch):
    seen = []

    def distance(x, y):  # a stand-in for LPIPS: the mean absolute difference per pair
        seen.append((x.shape[0], x.clone()))
        return (x - y).abs().mean((1, 2, 3)).mean()

    monkeypatch.setattr(ppcd, "lpips_distance", distance)

    def by_class(z, ids):  # [N, 3, 2, 2]: the class only, whatever the latent
        return ids.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2) / 10

    assert ppcd.lpips_diversity(by_class, 4, n_classes=3, samples=12) == 0.0
    assert [count for count, _ in seen] == [2, 2, 2]  # 12 images: 2 pairs in each of 3 classes
    assert [float(images.mean()) for _, images in seen] == pytest.approx([0.0, 0.1, 0.2])

    def by_latent(z, ids):
        return z[:, :3, None, None].expand(-1, 3, 2, 2).tanh()

    assert ppcd.lpips_diversity(by_latent, 4, n_classes=3, samples=12) > 0
    monkeypatch.setattr(ppcd, "lpips_distance", lambda x, y: None)  # weights missing
    assert ppcd.lpips_diversity(by_latent, 4, n_classes=3, samples=12) is None


@pytest.mark.parametrize("option, value, message", [
    ("ratio", 1.0, "option 'ratio' .* must be in \\[0, 1\\)"),
    ("pivot", 0.0, "option 'pivot' must be in \\(0, 1\\)"),
    ("temperature", 0.0, "option 'temperature' must be positive"),
    ("lambda_pp", -1.0, "option 'lambda_pp' must be >= 0"),
    ("cad_norm", "batch", "option 'cad_norm' must be 'teacher' or 'none'"),
    ("model", "cyclegan", "ppcd compresses model 'biggan' only"),
])
def test_bad_options_are_named(option, value, message):
    from train.config import resolve
    cfg = resolve(PPCD, "smoke", overrides={option: value})
    with pytest.raises(ValueError, match=message):
        PPCD(cfg, torch.device("cpu"))


# --- end to end -----------------------------------------------------------------------------------

# Tiny, deterministic and on the CPU, so runs repeat exactly and take seconds.
TINY = ["--device", "cpu", "--deterministic", "true", "--crop_size", "32", "--load_size", "32", "--num_classes", "3",
        "--log_every", "1", "--sample_every", "1000", "--tensorboard", "false", "--synthetic_size", "64"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A dense BigGAN teacher trained for a few steps."""
    return train_teacher(tmp_path_factory.mktemp("teacher"), "--preset", "smoke_biggan", *TINY)


def _ppcd(teacher, out, *options: str) -> list[str]:
    return ["--method", "ppcd", "--preset", "smoke", *TINY, "--teacher", str(teacher), "--out", str(out), *options]


def test_smoke_run_reaches_the_ratio_and_exports_the_masked_student(teacher, tmp_path, one_thread):
    out = tmp_path / "ppcd"
    assert main(_ppcd(teacher, out, "--steps", "80", "--eval", "false", "--latency_batch", "4")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] < 80  # stopped once every mask was binarised
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["student"]["macs"] < report["teacher"]["macs"]
    assert report["teacher"]["cpu_s_per_batch_4"] > 0 and report["student"]["cpu_s_per_batch_4"] > 0
    for name in ("teacher", "student"):  # one row per class, one column per latent
        grid = Image.open(out / "samples" / f"classes_{name}.png")
        assert report["class_grids"][name] == str(out / "samples" / f"classes_{name}.png")
        assert grid.size == (2 + 8 * 34, 2 + 3 * 34)

    # The student of the last checkpoint: every mask binarised past the ratio.
    cfg = load_yaml(out / "config.yaml")
    method = PPCD(cfg, torch.device("cpu"))
    method.build()
    tensors, _ = checkpoint.load(checkpoint.latest(out))
    method.load_state_dict(tensors)
    student = method.nets["G"]
    masks = dict(named_masks(student))
    assert len(masks) == 2 * len(student.blocks)
    for name, mask in masks.items():
        assert mask.frozen and (mask.values() == 0).float().mean().item() > cfg["ratio"], name
    # The exported generator is the masked student without the masked channels.
    exported = export.load(out / "export" / "generator.safetensors")
    z, ids = torch.randn(5, student.dim_z), torch.tensor([0, 1, 2, 1, 0])
    student.eval()
    with torch.no_grad():
        assert (exported(z, ids) - student(z, ids)).abs().max().item() <= 1e-5
    for index, block in enumerate(student.blocks):
        conv2 = exported.get_submodule(f"blocks.{index}.0.conv2")
        assert conv2.in_channels == int(block[0].bn2.mask.keep().sum())
        assert conv2.out_channels == int(block[0].conv2.mask.keep().sum())


def test_resume_after_sigkill_gives_the_uninterrupted_run(teacher, tmp_path, one_thread):
    options = ["--steps", "12", "--checkpoint_every", "4", "--stop_when_pruned", "false", "--eval", "false",
               "--export", "false", "--latency_batch", "0"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    interrupted_at = kill_at_checkpoint(_ppcd(teacher, killed, *options), killed, 4)
    assert 4 <= interrupted_at < 12
    assert main(_ppcd(teacher, full, *options)) == 0
    assert main(["--resume", str(killed)]) == 0
    assert_same_run(full, killed, 12)


def test_the_teacher_loads_from_biggan_pytorch_files(teacher, tmp_path, one_thread):
    # BigGAN-PyTorch's G.pth (here without G_ema.pth) holds our state_dict's keys unchanged; ppcd
    # trains its D afresh, so it needs no D.pth.
    tensors, _ = checkpoint.load(checkpoint.latest(teacher))
    reference = tmp_path / "reference"
    reference.mkdir()
    for name, file in (("G", "G.pth"),):
        torch.save({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}, reference / file)
    teacher_cfg = load_yaml(teacher / "config.yaml")
    out = tmp_path / "from_files"
    assert main(_ppcd(reference, out, "--steps", "2", "--eval", "false", "--export", "false", "--latency_batch", "0",
                      "--teacher_G_ch", str(teacher_cfg["G_ch"]), "--teacher_D_ch", str(teacher_cfg["D_ch"]),
                      "--dim_z", str(teacher_cfg["dim_z"]), "--shared_dim", str(teacher_cfg["shared_dim"]))) == 0
    loaded, _ = checkpoint.load(checkpoint.latest(out))
    for key, value in tensors.items():
        if key.startswith("G."):
            assert torch.equal(loaded["G_T." + key[2:]], value), key
