"""The 'srgan' base GAN (train/objectives/srgan.py): the LR input prepare() makes, each loss term on
hand-built values, BasicSR's checkpoint files as a teacher, the missing-VGG19 message, and a small
dense -> selfsup run to the target sparsity with a sparsified export equal to the masked student."""
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _runs import train_teacher
from gansparse import export
from gansparse.models import srgan
from gansparse.sparse import SPARSE_LAYERS
from train import checkpoint
from train.config import ConfigError, resolve
from train.loop import _sample_grid
from train.methods.dense import Dense
from train.methods.selfsup import SelfSup
from train.objectives.srgan import SRGAN, VGG19_URL
from train.run import main
from train.teacher import load_teacher

CPU = torch.device("cpu")


def _objective(**overrides) -> SRGAN:
    return SRGAN(resolve(Dense, "smoke_srgan", overrides={"device": "cpu", **overrides}), CPU)


# --- data ----------------------------------------------------------------------------------------


def test_prepare_downsamples_by_the_upscale_deterministically_and_once():
    objective = _objective()
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = objective.prepare({"image": hr})
    assert batch["lr"].shape == (2, 3, 8, 8)
    assert torch.equal(objective.prepare({"image": hr})["lr"], batch["lr"])  # no randomness
    again = objective.prepare(batch)
    assert again["lr"] is batch["lr"]  # idempotent: a prepared batch keeps its input
    assert objective.generator_inputs(batch) == (batch["lr"],)
    assert objective.example_inputs(3)[0].shape == (3, 3, 8, 8)


def test_the_downsampling_is_antialiased_bicubic():
    objective = _objective()
    side = 32
    x = torch.arange(side, dtype=torch.float32)
    ramp = (x / side - 0.5).expand(1, 3, side, side)  # linear along the width
    lr = objective.prepare({"image": ramp})["lr"]
    # A symmetric filter of unit sum keeps a linear image: pixel j is the ramp at the centre of
    # its 4x4 block (4 j + 1.5), away from the borders.
    expected = ((4 * torch.arange(8) + 1.5) / side - 0.5)[2:-2]
    torch.testing.assert_close(lr[0, :, 3, 2:-2], expected.expand(3, -1), rtol=0, atol=1e-5)
    # Antialiased, a bright pixel spreads over the LR pixels around it and keeps its mass (1/16 of
    # it per LR pixel); sampled without antialiasing, the LR pixel next to it would take 1/3 of it.
    impulse = torch.zeros(1, 3, side, side)
    impulse[..., 13, 17] = 1
    lr = objective.prepare({"image": impulse})["lr"]
    assert lr.max() < 0.1
    torch.testing.assert_close(lr.sum((2, 3)) * 16, torch.ones(1, 3), rtol=0, atol=0.02)
    # Bicubic overshoot at hard edges is clamped to the image range.
    edges = torch.where(x[None, :] < 14, -1.0, 1.0).expand(1, 3, side, side)
    assert objective.prepare({"image": edges})["lr"].abs().max() <= 1


def test_the_grid_input_is_the_lr_upsampled_and_the_ground_truth_the_hr_image():
    objective = _objective()
    batch = objective.prepare({"image": torch.rand(2, 3, 32, 32) * 2 - 1})
    assert objective.input_image(batch).shape == (2, 3, 32, 32)
    assert objective.target_key == "image"


# --- loss terms ----------------------------------------------------------------------------------


class ConstantD(nn.Module):
    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return torch.full((len(x), 1), self.logit)


class OffsetG(nn.Module):
    """SR = the HR image of the batch + offset, whatever the input."""

    def __init__(self, hr: torch.Tensor, offset: float) -> None:
        super().__init__()
        self.hr, self.offset = hr, offset

    def forward(self, lr):
        return self.hr + self.offset


@pytest.mark.parametrize("criterion, pixel_distance", [("l1", 0.5), ("mse", 0.25)])
def test_terms_on_hand_built_values(criterion, pixel_distance):
    objective = _objective(pixel_criterion=criterion, pixel_weight=1e-2, gan_weight=5e-3, percep_weight=0.0)
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = objective.prepare({"image": hr})
    logit = 1.5
    nets = {"G": OffsetG(hr, 0.5), "D": ConstantD(logit)}
    terms, fakes = objective.generator_terms(nets, batch)
    assert torch.equal(fakes["G"], hr + 0.5)
    softplus = lambda v: torch.nn.functional.softplus(torch.tensor(v)).item()  # noqa: E731  BCE on logits
    assert terms.keys() == {"G_pix", "G_gan"} == objective.generator_weights().keys()
    assert terms["G_pix"].item() == pytest.approx(1e-2 * pixel_distance)
    assert terms["G_gan"].item() == pytest.approx(5e-3 * softplus(-logit))  # -log sigmoid(logit)
    d_terms = objective.discriminator_terms(nets, batch, fakes)
    assert d_terms["D_real"].item() == pytest.approx(softplus(-logit))
    assert d_terms["D_fake"].item() == pytest.approx(softplus(logit))  # -log(1 - sigmoid(logit))
    assert objective.discriminator_weights() == {"D_real": 1.0, "D_fake": 1.0}


def test_perceptual_term_is_the_weighted_l1_of_the_features():
    objective = _objective(percep_weight=0.0)
    objective.cfg["percep_weight"] = 2.0  # after construction: a stand-in feature network below
    objective.vgg = nn.AvgPool2d(4)
    hr = torch.rand(1, 3, 32, 32) * 2 - 1
    terms, _ = objective.generator_terms({"G": OffsetG(hr, -0.25), "D": ConstantD(0.0)},
                                         objective.prepare({"image": hr}))
    assert terms["G_percep"].item() == pytest.approx(2.0 * 0.25)
    assert objective.generator_weights() == {"G_pix": 1.0, "G_percep": 2.0, "G_gan": 5e-3}


def test_terms_of_weight_zero_are_left_out():
    assert _objective(pixel_weight=0.0).generator_weights() == {"G_gan": 5e-3}


@pytest.fixture
def empty_hub(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints" / VGG19_URL.rsplit("/", 1)[1]
    torch.hub.set_dir(previous)


def test_missing_vgg_weights_name_the_file_and_the_way_out(empty_hub, tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as error:
        _objective(percep_weight=1.0)
    message = str(error.value)
    assert str(empty_hub) in message and VGG19_URL in message and "--percep_weight 0" in message
    # Through the command line: an error line, no traceback, nothing downloaded.
    assert main(["--method", "dense", "--preset", "smoke_srgan", "--percep_weight", "1", "--out",
                 str(tmp_path / "run")]) == 1
    assert "error: the perceptual loss of model 'srgan' needs torchvision's ImageNet VGG19" in capsys.readouterr().err
    assert not empty_hub.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"crop_size": 48}, "option 'crop_size'.*power of two"),
    ({"upscale": 8}, r"option 'upscale' must be one of \(2, 3, 4\)"),
    ({"pixel_criterion": "l2"}, "option 'pixel_criterion'"),
    ({"gan_weight": -1.0}, "option 'gan_weight' must be >= 0"),
])
def test_bad_options_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _objective(**overrides)


# --- BasicSR's checkpoints -----------------------------------------------------------------------


def test_basicsr_checkpoint_files_load_as_the_teacher(tmp_path):
    cfg = resolve(SelfSup, "smoke_srgan", overrides={"device": "cpu", "teacher": str(tmp_path)})
    G = srgan.MSRResNet(num_feat=16, num_block=4)
    G_ema = srgan.MSRResNet(num_feat=16, num_block=4)
    D = srgan.VGGStyleDiscriminator(num_feat=16, input_size=32)
    # BasicSR's save_network: {'params': state_dict}, plus 'params_ema' for a G trained with an EMA.
    torch.save({"params": G.state_dict(), "params_ema": G_ema.state_dict()}, tmp_path / "net_g_latest.pth")
    torch.save({"params": D.state_dict()}, tmp_path / "net_d_latest.pth")
    nets = load_teacher(cfg, CPU)
    assert torch.equal(nets["G"].conv_first.weight, G_ema.conv_first.weight)  # the EMA G, as BasicSR tests
    assert torch.equal(nets["D"].linear1.weight, D.linear1.weight)
    assert nets["G"].signed  # on the loop's [-1, 1] images


# --- dense -> selfsup ----------------------------------------------------------------------------

TINY = ["--device", "cpu", "--deterministic", "true", "--num_feat", "8", "--num_block", "2", "--num_feat_D", "4",
        "--batch_size", "2", "--log_every", "1", "--sample_every", "1000", "--tensorboard", "false"]


def test_smoke_run_dense_then_selfsup_to_the_target_sparsity(tmp_path, one_thread):
    teacher = train_teacher(tmp_path / "teacher", "--preset", "smoke_srgan", *TINY)
    out = tmp_path / "selfsup"
    assert main(["--method", "selfsup", "--preset", "smoke_srgan", *TINY, "--teacher", str(teacher), "--steps", "8",
                 "--prune_frequency", "2", "--eval", "true", "--eval_size", "4", "--eval_fidelity", "false",
                 "--eval_lpips", "false", "--out", str(out)]) == 0
    tensors, state = checkpoint.load(checkpoint.latest(out))
    assert set(state["history"]) >= {"GC", "DC", "G_pix", "G_gan", "D_real", "D_fake"}
    assert state["history"]["GC"][0] == (1, 0.0)  # the unpruned student computes the teacher's terms
    assert state["sparsity_history"]["overall"][-1][1] == pytest.approx(0.5, abs=0.01)
    masks = [name for name in tensors if name.endswith(".weight_mask")]
    assert len(masks) == 9  # every conv of G
    for name in masks:
        mask, weight = tensors[name], tensors[name.removesuffix("_mask")]
        assert 1 - mask.mean().item() == pytest.approx(0.5, abs=0.5 / mask.numel() + 1e-9), name
        assert torch.all(weight[mask == 0] == 0), name  # pruned weights are exactly 0
    report = json.loads((out / "report.json").read_text())
    assert {"psnr", "ssim", "psnr_vs_teacher"} <= report["metrics"].keys()  # PSNR / SSIM against the HR image

    cfg = resolve(SelfSup, "smoke_srgan", overrides={"device": "cpu", "teacher": str(teacher), "num_feat": 8,
                                                     "num_block": 2, "num_feat_D": 4})
    method = SelfSup(cfg, CPU)
    method.build()
    method.load_state_dict(tensors)
    assert all(isinstance(method.nets["G"].get_submodule(name.split(".", 1)[1].rsplit(".", 1)[0]), SPARSE_LAYERS)
               for name in masks)
    # The exported generator (the sparsified student, compacted) computes the masked student.
    exported = export.load(out / "export" / "generator.safetensors")
    lr = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert (exported(lr) - method.nets["G"].eval()(lr)).abs().max().item() <= 1e-5
    # Sample grids: the LR input upsampled, the student's SR, the teacher's SR, the HR image.
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    images, columns = _sample_grid(method, {"image": hr})
    assert columns == 4 and images.shape == (8, 3, 32, 32)
    torch.testing.assert_close(images[3::4], hr)
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(-1, 1)
    torch.testing.assert_close(images[0::4], F.interpolate(lr, scale_factor=4, mode="bicubic").clamp(-1, 1))


def test_perceptual_features_are_vgg19_conv5_4_before_its_relu(empty_hub):
    from torchvision.models import vgg19

    torch.manual_seed(0)
    features = vgg19().features.eval()  # random weights in torchvision's layout, the classifier left out
    empty_hub.parent.mkdir(parents=True)
    torch.save({f"features.{key}": value for key, value in features.state_dict().items()}, empty_hub)
    objective = _objective(percep_weight=1.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = features[:35](((x + 1) / 2 - mean[:, None, None]) / std[:, None, None])
    assert isinstance(features[34], nn.Conv2d) and expected.shape == (2, 512, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(objective.vgg(x), expected, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in objective.vgg.parameters())
