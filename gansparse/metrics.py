"""Quality and speed measures of generators.

    psnr(fake, target), ssim(fake, target)        need no weights; images in [-1, 1] (data_range 2)
    lpips_distance(fake, target)                  LPIPS (lpips package), or None without its backbone
    fidelity_metrics(fake, real)                  FID, IS, KID through torch-fidelity, or {} without Inception
    cpu_latency_ms(model, x)                      median CPU time of one forward, 2 threads by default
    model_cost(model, x)                          params, MACs (gansparse.profile) and CPU latency
    evaluate_generator(generate, batches, ...)    all of the above that apply, as a dict of floats

Pretrained weights are read from the caches the libraries use, and never downloaded unless
download=True: torch-fidelity's Inception and torchvision's LPIPS backbones live in
torch.hub.get_dir()/checkpoints ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints).
When a file is missing or unreadable, one warning per file names it and the address to fetch it
from, and the measures that need it are left out; nothing raises. (lpips.LPIPS(pnet_rand=True)
builds without a backbone file, but with a random backbone its number is not LPIPS: never used here.)
"""
from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "psnr", "ssim", "lpips_distance", "fidelity_metrics", "cpu_latency_ms", "model_cost", "evaluate_generator",
    "to_uint8", "weights_file", "INCEPTION_URL", "LPIPS_BACKBONE_URLS",
]

#: torch-fidelity 0.4's Inception v3 (converted from the TensorFlow FID network)
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
#: the torchvision ImageNet weights lpips builds its backbones from, by lpips net name
LPIPS_BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}

_reported: set[Path] = set()  # files already warned about: one warning each per process
_loadable: set[Path] = set()  # Inception files already checked
_lpips_models: dict[str, nn.Module] = {}


# --- checks ----------------------------------------------------------------------------------


def _check_images(name: str, images, argument: str = "x") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: {argument} must be a tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.numel() == 0:
        raise ValueError(f"{name}: {argument} must be a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: {argument} must be floating point (images in [-1, 1]), got {images.dtype}")


def _check_pair(name: str, x, y) -> None:
    _check_images(name, x, "x")
    _check_images(name, y, "y")
    if x.shape != y.shape:
        raise ValueError(f"{name}: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{name}: x and y must be on the same device, got {x.device} and {y.device}")


def _reduce(values: torch.Tensor, reduction: str, name: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"{name}: reduction must be 'mean' or 'none', got {reduction!r}")


# --- measures without weights ----------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, *, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), per image [N] or their mean.
    data_range 2 for images in [-1, 1]; identical images give inf."""
    _check_pair("psnr", x, y)
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be positive, got {data_range}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    mse = (x.to(dtype) - y.to(dtype)).pow(2).flatten(1).mean(1)  # [N]
    return _reduce(10 * torch.log10(data_range ** 2 / mse), reduction, "psnr")


def _gaussian(size: int, sigma: float, dtype, device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, *, window_size: int = 11, sigma: float = 1.5,
         reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): local means, variances and covariance under a
    Gaussian window (11 x 11, sigma 1.5, over the positions where it fits inside the image), with
    C1 = (0.01 data_range)^2 and C2 = (0.03 data_range)^2; per channel, averaged over channels and
    positions. Per image [N] or their mean. Images smaller than the window use the largest odd
    window that fits."""
    _check_pair("ssim", x, y)
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be positive, got {data_range}")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"ssim: window_size must be a positive odd int, got {window_size}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    channels = x.shape[1]
    size = min(window_size, x.shape[2], x.shape[3])
    size -= 1 - size % 2  # odd
    window = _gaussian(size, sigma, dtype, x.device)
    vertical = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    horizontal = window.view(1, 1, 1, size).expand(channels, 1, 1, size)

    def blur(image):  # the separable Gaussian window, per channel, valid positions only
        return F.conv2d(F.conv2d(image, vertical, groups=channels), horizontal, groups=channels)

    mean_x, mean_y = blur(x), blur(y)
    var_x = blur(x * x) - mean_x ** 2
    var_y = blur(y * y) - mean_y ** 2
    cov = blur(x * y) - mean_x * mean_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    luminance = (2 * mean_x * mean_y + c1) / (mean_x ** 2 + mean_y ** 2 + c1)
    structure = (2 * cov + c2) / (var_x + var_y + c2)  # contrast and structure together
    similarity = luminance * structure
    return _reduce(similarity.flatten(1).mean(1), reduction, "ssim")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (clamped) -> uint8 in [0, 255], rounded; same shape."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --- pretrained weights ---------------------------------------------------------------------


def weights_file(url: str) -> Path:
    """Where torch.hub (and so torchvision and torch-fidelity) keeps the file of `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _warn_once(path: Path, message: str) -> None:
    if path not in _reported:
        _reported.add(path)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _available(url: str, what: str, skipped: str, download: bool) -> Path | None:
    """The cached weights file of `url` if present (fetched first when download); otherwise None,
    after one warning naming the file and where to put it."""
    path = weights_file(url)
    if not path.is_file() and download:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as error:  # offline, proxy, disk: any failure means "not available"
            _warn_once(path, f"{skipped} skipped: downloading {url} ({what}) to {path} failed ({error})")
            return None
    if not path.is_file():
        _warn_once(path, f"{skipped} skipped: {path} ({what}) is missing. Download {url} and put it at {path} "
                         "(the torch.hub cache torchvision and torch-fidelity read; set TORCH_HOME to move it), "
                         "or pass download=True when online.")
        return None
    return path


def _unloadable(path: Path, url: str, what: str, skipped: str, error: Exception) -> None:
    _warn_once(path, f"{skipped} skipped: {path} ({what}) cannot be loaded ({type(error).__name__}: {error}); "
                     f"replace it with a fresh download of {url}")


# --- LPIPS ---------------------------------------------------------------------------------


def _lpips_model(net: str, download: bool) -> nn.Module | None:
    if net not in LPIPS_BACKBONE_URLS:
        raise ValueError(f"lpips_distance: net must be one of {', '.join(LPIPS_BACKBONE_URLS)}, got {net!r}")
    if net in _lpips_models:
        return _lpips_models[net]
    url, what = LPIPS_BACKBONE_URLS[net], f"the ImageNet weights of LPIPS's '{net}' backbone"
    path = _available(url, what, "LPIPS", download)
    if path is None:
        return None
    import lpips  # imported here: it imports torchvision, which gansparse does not need otherwise

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notices for lpips's pretrained=True
            model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
    except Exception as error:  # torchvision reads the cached file here
        _unloadable(path, url, what, "LPIPS", error)
        return None
    _lpips_models[net] = model
    return model


def lpips_distance(x: torch.Tensor, y: torch.Tensor, net: str = "alex", *, batch_size: int = 32,
                   download: bool = False, reduction: str = "mean") -> torch.Tensor | None:
    """LPIPS v0.1 (Zhang et al. 2018) between images in [-1, 1], per image [N] or their mean; lower
    is closer. None (with one warning naming the missing file) when the backbone weights are not in
    torchvision's cache."""
    _check_pair("lpips_distance", x, y)
    if x.shape[1] != 3:
        raise ValueError(f"lpips_distance: images must have 3 channels, got {x.shape[1]}")
    model = _lpips_model(net, download)
    if model is None:
        return None
    model.to(x.device)
    with torch.inference_mode():
        distances = torch.cat([model(x[i:i + batch_size].float(), y[i:i + batch_size].float()).flatten()
                               for i in range(0, len(x), batch_size)])
    return _reduce(distances, reduction, "lpips_distance")


# --- FID, IS, KID --------------------------------------------------------------------------


class _Uint8Images(torch.utils.data.Dataset):
    """What torch-fidelity reads: uint8 [3, H, W] tensors."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = to_uint8(images).cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def fidelity_metrics(fake: torch.Tensor, real: torch.Tensor | None = None, *, fid: bool = True, isc: bool = True,
                     kid: bool = True, batch_size: int = 64, device: torch.device | str | None = None,
                     download: bool = False) -> dict[str, float]:
    """FID, Inception Score and KID of generated images `fake` against `real` (both [N, 3, H, W] in
    [-1, 1], given to torch-fidelity as uint8) with torch-fidelity's Inception v3. Keys: 'fid',
    'is' and 'is_std', 'kid' and 'kid_std' (KID subsets of min(1000, N) images; IS over
    min(10, N) splits). FID and KID need `real`. {} (with one warning naming the missing file)
    when the Inception weights are not in the torch.hub cache. Few images give noisy values."""
    _check_images("fidelity_metrics", fake, "fake")
    if real is not None:
        _check_images("fidelity_metrics", real, "real")
    elif fid or kid:
        raise ValueError("fidelity_metrics: FID and KID need real images; pass real=..., or fid=False, kid=False")
    if not (fid or isc or kid):
        return {}
    what = "the Inception weights of torch-fidelity"
    weights = _available(INCEPTION_URL, what, "FID/IS/KID", download)
    if weights is None:
        return {}
    if weights not in _loadable:
        try:  # checked here, so that torch-fidelity's own errors are not taken for a bad file
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            _unloadable(weights, INCEPTION_URL, what, "FID/IS/KID", error)
            return {}
        _loadable.add(weights)
    import torch_fidelity  # imported here: it is heavy, and only these metrics need it

    device = torch.device(device) if device is not None else fake.device
    sizes = [len(fake)] + ([len(real)] if real is not None else [])
    results = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(fake), input2=_Uint8Images(real) if real is not None else None,
        fid=fid, isc=isc, kid=kid, cuda=device.type == "cuda", batch_size=batch_size,
        kid_subset_size=min(1000, *sizes), isc_splits=min(10, len(fake)),
        feature_extractor_weights_path=str(weights), cache=False, verbose=False, save_cpu_ram=True)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
             "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std"}
    return {names[key]: float(value) for key, value in results.items() if key in names}


# --- cost ---------------------------------------------------------------------------------


def cpu_latency_ms(model: nn.Module, *inputs: torch.Tensor, threads: int = 2, warmup: int = 3,
                   repeats: int = 10) -> float:
    """Median wall time in ms of model(*inputs) on the CPU with `threads` intra-op threads, in eval
    mode and torch.inference_mode, after `warmup` untimed runs. The thread count and the model's
    train/eval mode are restored afterwards."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"cpu_latency_ms: threads must be a positive int, got {threads!r}")
    if not isinstance(warmup, int) or warmup < 0 or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"cpu_latency_ms: warmup must be >= 0 and repeats >= 1, got {warmup!r} and {repeats!r}")
    for index, tensor in enumerate(inputs):
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu":
            raise ValueError(f"cpu_latency_ms: input {index} is on {tensor.device}; pass CPU tensors")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "cpu":
            raise ValueError(f"cpu_latency_ms: the model's {name} is on {tensor.device}; move the model to the CPU")
    previous_threads, was_training = torch.get_num_threads(), model.training
    try:
        torch.set_num_threads(threads)
        model.eval()
        times = []
        with torch.inference_mode():
            for run in range(warmup + repeats):
                start = time.perf_counter()
                model(*inputs)
                if run >= warmup:
                    times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)


def model_cost(model: nn.Module, *inputs: torch.Tensor, threads: int = 2, repeats: int = 10) -> dict:
    """{'params', 'macs', 'macs_effective', 'cpu_latency_ms'} of model(*inputs) (CPU inputs, e.g.
    batch 1 at the training resolution): counts from gansparse.profile, latency from cpu_latency_ms."""
    from .profile import profile

    was_training = model.training
    try:
        stats = profile(model.eval(), *inputs)
    finally:
        model.train(was_training)
    return {"params": stats["params"], "macs": stats["macs"], "macs_effective": stats["macs_effective"],
            "cpu_latency_ms": cpu_latency_ms(model, *inputs, threads=threads, repeats=repeats)}


# --- everything at once ---------------------------------------------------------------------


def evaluate_generator(generate: Callable[[dict], torch.Tensor], batches: Iterable[dict], *,
                       teacher: Callable[[dict], torch.Tensor] | None = None, target_key: str | None = None,
                       real_key: str | None = None, lpips: bool = True, fidelity: bool = True,
                       download: bool = False) -> dict[str, float]:
    """Quality of a generator over data batches, as floats. generate(batch) and teacher(batch) give
    images [N, 3, H, W] in [-1, 1] (run under torch.inference_mode).

    target_key: the batch key of the aligned ground truth (paired data, e.g. 'B'): psnr, ssim and
        lpips against it.
    teacher: the teacher's outputs on the same batches: l1_vs_teacher (mean absolute difference, in
        [-1, 1] units), psnr_vs_teacher, ssim_vs_teacher, lpips_vs_teacher.
    real_key: the batch key of real images of the output domain ('B', 'image'): fid, kid(_std),
        is(_std) through fidelity_metrics. Without it only is(_std).
    Measures whose weights are missing are left out (one warning per missing file)."""
    fakes, targets, teachers, reals = [], [], [], []
    with torch.inference_mode():
        for batch in batches:
            fakes.append(generate(batch).float().cpu())
            if target_key is not None:
                targets.append(batch[target_key].float().cpu())
            if teacher is not None:
                teachers.append(teacher(batch).float().cpu())
            if real_key is not None:
                reals.append(batch[real_key].float().cpu())
    if not fakes:
        raise ValueError("evaluate_generator: batches is empty")
    fake = torch.cat(fakes)
    results: dict[str, float] = {}
    for suffix, reference in (("", targets), ("_vs_teacher", teachers)):
        if not reference:
            continue
        reference = torch.cat(reference)
        if suffix:
            results["l1_vs_teacher"] = float((fake - reference).abs().mean())
        results["psnr" + suffix] = float(psnr(fake, reference))
        results["ssim" + suffix] = float(ssim(fake, reference))
        distance = lpips_distance(fake, reference, download=download) if lpips else None
        if distance is not None:
            results["lpips" + suffix] = float(distance)
    if fidelity:
        real = torch.cat(reals) if reals else None
        results.update(fidelity_metrics(fake, real, fid=real is not None, kid=real is not None, download=download))
    return results
