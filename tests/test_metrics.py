"""gansparse.metrics: PSNR and SSIM against independent computations, LPIPS and torch-fidelity with
weights missing (one clear warning, the other measures carry on) and with weights in a cache
directory, CPU latency and model cost."""
import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from gansparse import metrics


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch.hub cache; the module forgets the files it saw or warned about."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    monkeypatch.setattr(metrics, "_reported", set())
    monkeypatch.setattr(metrics, "_loadable", set())
    monkeypatch.setattr(metrics, "_lpips_models", {})
    return tmp_path / "hub" / "checkpoints"


def _images(n=3, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


# --- PSNR, SSIM --------------------------------------------------------------------------------


def test_psnr():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[1] += 0.1  # MSE 0.01 on image 1 only
    values = metrics.psnr(x, y, reduction="none")
    assert values[0] == math.inf
    assert values[1].item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)
    assert metrics.psnr(x[1:], y[1:], data_range=1.0).item() == pytest.approx(20.0, rel=1e-5)


def _ssim_by_loops(x, y, data_range, size=11, sigma=1.5):
    """SSIM window by window in float64 numpy: the definition, computed another way."""
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = x.double().numpy(), y.double().numpy()
    per_image = []
    for a_image, b_image in zip(x, y):
        values = []
        for a_channel, b_channel in zip(a_image, b_image):
            for i in range(a_channel.shape[0] - size + 1):
                for j in range(a_channel.shape[1] - size + 1):
                    a, b = a_channel[i:i + size, j:j + size], b_channel[i:i + size, j:j + size]
                    ma, mb = (window * a).sum(), (window * b).sum()
                    va, vb = (window * (a - ma) ** 2).sum(), (window * (b - mb) ** 2).sum()
                    cov = (window * (a - ma) * (b - mb)).sum()
                    values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        per_image.append(np.mean(values))
    return torch.tensor(per_image)


@pytest.mark.parametrize("shape, window", [((2, 3, 14, 17), 11), ((1, 1, 7, 9), 7), ((1, 3, 8, 8), 7)])
def test_ssim_matches_the_definition(shape, window):
    x = torch.rand(shape, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, dtype=torch.float64)).clamp(-1, 1)
    expected = _ssim_by_loops(x, y, 2.0, size=window)  # windows larger than the image shrink to fit
    assert torch.allclose(metrics.ssim(x, y, reduction="none"), expected, rtol=1e-10, atol=1e-12)
    # float32, channels_last and non-contiguous inputs agree
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    y32 = y.float().transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.allclose(metrics.ssim(x32, y32, reduction="none"), expected.float(), atol=1e-5)


def test_ssim_properties():
    x = _images()
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    noisy = [metrics.ssim(x, (x + s * torch.randn_like(x)).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.8)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    assert metrics.ssim(x, x.flip(0)).item() == pytest.approx(metrics.ssim(x.flip(0), x).item())
    # flat images: only the luminance term is left, (2 a b + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, -0.4, (0.01 * 2) ** 2
    value = metrics.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert value.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_bad_images():
    x = _images()
    with pytest.raises(ValueError, match=r"ssim: x and y must have the same shape, got \(3, 3, 24, 24\) and"):
        metrics.ssim(x, x[:, :, :8])
    with pytest.raises(ValueError, match=r"psnr: x must be a non-empty \[N, C, H, W\] batch, got shape \(3, 24, 24\)"):
        metrics.psnr(x[0], x[0])
    with pytest.raises(TypeError, match="must be floating point"):
        metrics.psnr(metrics.to_uint8(x), metrics.to_uint8(x))
    with pytest.raises(ValueError, match="window_size must be a positive odd int"):
        metrics.ssim(x, x, window_size=4)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        metrics.psnr(x, x, reduction="sum")


def test_to_uint8():
    images = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 7)
    assert metrics.to_uint8(images).flatten().tolist() == [0, 0, 64, 128, 255, 255, 255]


# --- weights missing -------------------------------------------------------------------------


def test_missing_weights_warn_once_and_carry_on(hub_dir):
    fake, target = _images(seed=1), _images(seed=2)
    alexnet = hub_dir / "alexnet-owt-7be5be79.pth"
    inception = hub_dir / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.warns(RuntimeWarning) as caught:
        assert metrics.lpips_distance(fake, target) is None
        assert metrics.lpips_distance(fake, target) is None
        assert metrics.fidelity_metrics(fake, target) == {}
        results = metrics.evaluate_generator(lambda batch: batch["A"], [{"A": fake, "B": target}],
                                             teacher=lambda batch: batch["B"], target_key="B", real_key="B")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # one per missing file, however often it is needed
    assert messages[0].startswith(f"LPIPS skipped: {alexnet} (")
    assert f"Download {metrics.LPIPS_BACKBONE_URLS['alex']} and put it at {alexnet}" in messages[0]
    assert messages[1].startswith(f"FID/IS/KID skipped: {inception} (")
    assert f"Download {metrics.INCEPTION_URL} and put it at {inception}" in messages[1]
    # the measures that need no weights are there, the others are left out rather than faked
    assert set(results) == {"psnr", "ssim", "l1_vs_teacher", "psnr_vs_teacher", "ssim_vs_teacher"}
    assert results["psnr"] == pytest.approx(metrics.psnr(fake, target).item())
    assert results["l1_vs_teacher"] == pytest.approx((fake - target).abs().mean().item())


def test_unreadable_weights_warn(hub_dir):
    hub_dir.mkdir(parents=True)
    (hub_dir / "alexnet-owt-7be5be79.pth").write_bytes(b"truncated download")
    (hub_dir / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"truncated download")
    with pytest.warns(RuntimeWarning, match=r"LPIPS skipped: .*alexnet-owt-7be5be79.pth .* cannot be loaded"):
        assert metrics.lpips_distance(_images(), _images(seed=3)) is None
    with pytest.warns(RuntimeWarning, match=r"FID/IS/KID skipped: .*weights-inception-2015-12-05-6726825d.pth .* "
                                             r"cannot be loaded .* replace it with a fresh download of https://"):
        assert metrics.fidelity_metrics(_images(), _images(seed=3)) == {}


def test_download_failure_warns(hub_dir, monkeypatch):
    def offline(url, path, progress):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.warns(RuntimeWarning, match=r"downloading https://download.pytorch.org/models/alexnet-owt-7be5be79"
                                             r".pth .* failed \(Name or service not known\)"):
        assert metrics.lpips_distance(_images(), _images(seed=3), download=True) is None


def test_fidelity_needs_real_images_for_fid_and_kid():
    with pytest.raises(ValueError, match="FID and KID need real images"):
        metrics.fidelity_metrics(_images())


# --- weights in the cache ------------------------------------------------------------------


def test_lpips_with_cached_backbone(hub_dir):
    """A backbone file in the cache is used (an untrained AlexNet here: the plumbing, not the values)."""
    import torchvision

    hub_dir.mkdir(parents=True)
    layout = torchvision.models.alexnet().to("meta").state_dict()  # quick: no 61M random weights
    weights = {name: torch.randn(t.shape) * 0.1 if name.startswith("features") else torch.zeros(t.shape)
               for name, t in layout.items()}  # LPIPS uses only the convolutional features
    torch.save(weights, hub_dir / "alexnet-owt-7be5be79.pth")
    x, y = _images(n=2, size=32, seed=1), _images(n=2, size=32, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distances = metrics.lpips_distance(x, y, reduction="none")
        assert distances.shape == (2,) and (distances > 0).all()
        assert metrics.lpips_distance(x, x).item() == pytest.approx(0.0, abs=1e-6)
        results = metrics.evaluate_generator(lambda batch: batch["A"], [{"A": x, "B": y}], target_key="B",
                                             fidelity=False)
    assert results["lpips"] == pytest.approx(distances.mean().item(), rel=1e-5)


def test_fidelity_with_cached_inception(hub_dir):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # an untrained Inception with the real layout, built without its weights
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url"), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    hub_dir.mkdir(parents=True)
    torch.save(inception.state_dict(), hub_dir / "weights-inception-2015-12-05-6726825d.pth")
    fake, real = _images(n=2, size=16, seed=1), _images(n=2, size=16, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        # FID's 2048 x 2048 matrix square root takes half a minute on 2 cores: IS and KID run here
        results = metrics.fidelity_metrics(fake, real, fid=False)
    assert set(results) == {"is", "is_std", "kid", "kid_std"}
    assert all(math.isfinite(value) for value in results.values())

    # what reaches torch-fidelity: uint8 images, the cached weights, sizes that fit few images
    calls = []

    def calculate_metrics(**kwargs):
        calls.append(kwargs)
        return {"frechet_inception_distance": 12.5, "inception_score_mean": 2.0, "inception_score_std": 0.5,
                "kernel_inception_distance_mean": 0.01, "kernel_inception_distance_std": 0.002}

    with mock.patch("torch_fidelity.calculate_metrics", calculate_metrics):
        results = metrics.fidelity_metrics(_images(n=5), _images(n=7))
    assert results == {"fid": 12.5, "is": 2.0, "is_std": 0.5, "kid": 0.01, "kid_std": 0.002}
    (call,) = calls
    assert call["feature_extractor_weights_path"] == str(hub_dir / "weights-inception-2015-12-05-6726825d.pth")
    assert call["input1"][0].dtype == torch.uint8 and call["input1"][0].shape == (3, 24, 24)
    assert torch.equal(call["input2"][6], metrics.to_uint8(_images(n=7)[6]))
    assert call["kid_subset_size"] == 5 and call["isc_splits"] == 5 and call["fid"] and call["kid"]


# --- cost ----------------------------------------------------------------------------------


class _Probe(nn.Module):
    """Records the conditions of each forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled(), self.training))
        return self.conv(x)


def test_cpu_latency():
    probe = _Probe().train()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latency = metrics.cpu_latency_ms(probe, torch.randn(1, 3, 16, 16), threads=2, warmup=2, repeats=5)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert latency > 0 and probe.training
    assert probe.seen == [(2, True, False)] * 7


def test_cpu_latency_arguments():
    with pytest.raises(ValueError, match="threads must be a positive int"):
        metrics.cpu_latency_ms(_Probe(), torch.randn(1, 3, 8, 8), threads=0)
    with pytest.raises(ValueError, match="repeats >= 1"):
        metrics.cpu_latency_ms(_Probe(), torch.randn(1, 3, 8, 8), repeats=0)
    with pytest.raises(ValueError, match="input 0 is on meta; pass CPU tensors"):
        metrics.cpu_latency_ms(_Probe(), torch.randn(1, 3, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="the model's conv.weight is on meta"):
        metrics.cpu_latency_ms(_Probe().to("meta"), torch.randn(1, 3, 8, 8))


def test_model_cost():
    probe = _Probe().train()
    cost = metrics.model_cost(probe, torch.randn(1, 3, 10, 10), repeats=2)
    assert cost["params"] == 4 * 3 * 9 + 4
    assert cost["macs"] == cost["macs_effective"] == 8 * 8 * 4 * 3 * 9
    assert cost["cpu_latency_ms"] > 0 and probe.training
