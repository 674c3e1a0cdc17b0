"""Training data: image folders in the layouts the papers use, built-in synthetic sets, and a
deterministic, resumable loader.

    dataset = build_dataset(cfg, "unpaired")             # cfg['dataroot'] empty: synthetic data
    loader = build_loader(dataset, 8, seed=cfg["seed"])  # endless: one global batch per step
    resume_loader(loader, saved_loader_state)            # continue where a checkpoint left off
    for step, batch in zip(range(start, steps), loader): ...

Items, images as float tensors [3, H, W] in [-1, 1]:
    'paired', 'unpaired'  {'A': input image, 'B': target image}; `direction` 'BtoA' swaps them here,
                          so 'A' is always the generator's input
    'conditional'         {'image': ..., 'label': LongTensor[]}
    'unconditional'       {'image': ...}

Randomness: an index i >= len(dataset) is item i % len(dataset) drawn again in a later epoch (the
loader passes such indices). Every random choice of a draw (crop position, flip, the B image of an
unaligned pair) comes from a generator seeded by (seed, i), never from a global RNG, so the data a
step sees depends only on the seed and the step: not on worker processes, and not on a restart.
"""
from __future__ import annotations

import math
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DATA_KINDS", "DATA_DEFAULTS", "PREPROCESS_MODES", "IMAGE_EXTENSIONS",
    "build_dataset", "build_loader", "loader_state", "resume_loader",
    "ImageDataset", "Preprocess", "AlignedFolder", "UnalignedFolders", "ClassFolders", "ImageFolderFlat",
    "SyntheticPaired", "SyntheticUnpaired", "SyntheticConditional", "SyntheticUnconditional",
    "SHAPES", "InfiniteBatchSampler",
]

DATA_KINDS = ("paired", "unpaired", "conditional", "unconditional")
PREPROCESS_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")

#: the data options build_dataset reads, and their values when cfg lacks them
DATA_DEFAULTS = {
    "dataroot": None,         # None or '': the built-in synthetic set of the kind
    "crop_size": 256,         # the training resolution
    "load_size": None,        # None: crop_size (no resize jitter); junyanz trains at 286 -> 256
    "preprocess": "resize_and_crop",
    "no_flip": False,
    "direction": "AtoB",
    "serial_batches": False,  # unaligned folders: pair A[i] with B[i] instead of a random B
    "synthetic_size": 1000,
    "num_classes": 4,
    "seed": 0,
}

_LAYOUTS = {
    "paired": "{root}/{split}/*.png|jpg..., each image the input A and the target B side by side (pix2pix)",
    "unpaired": "{root}/{split}A/ and {root}/{split}B/ holding the images of each domain (CycleGAN)",
    "conditional": "{root}/{split}/<class>/*.png|jpg... or {root}/<class>/*.png|jpg... (ImageFolder)",
    "unconditional": "{root}/{split}/ or {root}/ holding images, subfolders included",
}


# --- building from a configuration ---------------------------------------------------------


def build_dataset(cfg: dict, kind: str, split: str = "train") -> Dataset:
    """The dataset of `kind` for `split`: image folders under cfg['dataroot'], or the built-in
    synthetic set of that kind when dataroot is None or ''. See DATA_DEFAULTS for the keys read.

    Folders are cropped and flipped as in junyanz/pytorch-CycleGAN-and-pix2pix for split 'train';
    other splits are centre-cropped and never flipped. Synthetic images are drawn at crop_size.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"build_dataset: kind must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"build_dataset: split must be a non-empty string such as 'train', got {split!r}")
    opt = _data_options(cfg)
    train = split == "train"
    flip = train and not opt["no_flip"]
    if not opt["dataroot"]:
        common = dict(size=opt["synthetic_size"], resolution=opt["crop_size"], seed=opt["seed"], split=split,
                      flip=flip)
        if kind == "paired":
            return SyntheticPaired(**common, direction=opt["direction"])
        if kind == "unpaired":
            return SyntheticUnpaired(**common, direction=opt["direction"])
        if kind == "conditional":
            return SyntheticConditional(**common, num_classes=opt["num_classes"])
        return SyntheticUnconditional(**common)

    root = Path(opt["dataroot"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataroot {root} does not exist; {kind} data is expected as "
                                + _LAYOUTS[kind].format(root=root, split=split))
    preprocess = Preprocess(opt["preprocess"], opt["load_size"] or opt["crop_size"], opt["crop_size"],
                            flip=flip, random_crop=train)
    if kind == "paired":
        return AlignedFolder(root, split, preprocess, direction=opt["direction"], seed=opt["seed"])
    if kind == "unpaired":
        return UnalignedFolders(root, split, preprocess, direction=opt["direction"],
                                serial=opt["serial_batches"], seed=opt["seed"])
    if kind == "conditional":
        dataset = ClassFolders(root, split, preprocess, seed=opt["seed"])
        if len(dataset.classes) > opt["num_classes"]:
            raise ValueError(f"{root} has {len(dataset.classes)} classes but num_classes is {opt['num_classes']}; "
                             f"set num_classes to at least {len(dataset.classes)}")
        return dataset
    return ImageFolderFlat(root, split, preprocess, seed=opt["seed"])


def _data_options(cfg: dict) -> dict:
    opt = {key: cfg.get(key, default) for key, default in DATA_DEFAULTS.items()}
    for key in ("crop_size", "synthetic_size", "num_classes"):
        if not _is_int(opt[key]) or opt[key] < 1:
            raise ValueError(f"data option {key} must be a positive int, got {opt[key]!r}")
    if opt["load_size"] is not None and (not _is_int(opt["load_size"]) or opt["load_size"] < 1):
        raise ValueError(f"data option load_size must be a positive int or None, got {opt['load_size']!r}")
    if not _is_int(opt["seed"]) or opt["seed"] < 0:
        raise ValueError(f"data option seed must be a non-negative int, got {opt['seed']!r}")
    if opt["direction"] not in ("AtoB", "BtoA"):
        raise ValueError(f"data option direction must be 'AtoB' or 'BtoA', got {opt['direction']!r}")
    if opt["preprocess"] not in PREPROCESS_MODES:
        raise ValueError(f"data option preprocess must be one of {', '.join(PREPROCESS_MODES)}, "
                         f"got {opt['preprocess']!r}")
    return opt


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seed(*keys) -> int:
    """A 63-bit seed mixing non-negative ints and strings, stable across processes and runs."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


# --- the base of every dataset here ------------------------------------------------------


class ImageDataset(Dataset):
    """A dataset whose index may run past its length: index i is item i % len(self), and i also
    seeds the random choices of that draw (see the module docstring). Subclasses implement
    __len__ and item(index, rng)."""

    def __init__(self, seed: int, stream: str) -> None:
        self.seed = seed
        self.stream = stream  # separates the random choices of datasets sharing a seed

    def item(self, index: int, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def __getitem__(self, index) -> dict:
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = int(index)
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"{type(self).__name__}: index must be a non-negative int, got {index!r}")
        index = int(index)
        return self.item(index % len(self), np.random.default_rng(_seed(self.seed, self.stream, index)))


class Preprocess:
    """Resize, crop, flip and convert an image as junyanz/pytorch-CycleGAN-and-pix2pix does:
    'resize_and_crop' (to load_size square, then a crop_size crop), 'crop' (a crop of the original),
    'scale_width' (width to load_size, height by aspect but at least crop_size), 'scale_width_and_crop',
    'none' (sides rounded to multiples of 4). Bicubic resizing; crops random when random_crop, else
    centred. Draw the random choices with params(), then apply the same ones to images that must stay
    aligned."""

    def __init__(self, mode: str, load_size: int, crop_size: int, *, flip: bool, random_crop: bool) -> None:
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
        if mode in ("resize_and_crop", "scale_width_and_crop") and load_size < crop_size:
            raise ValueError(f"load_size ({load_size}) must be at least crop_size ({crop_size}) "
                             f"with preprocess {mode!r}")
        self.mode, self.load_size, self.crop_size = mode, load_size, crop_size
        self.flip, self.random_crop = flip, random_crop

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        if self.mode == "resize_and_crop":
            return self.load_size, self.load_size
        if self.mode.startswith("scale_width"):
            if width == self.load_size and height >= self.crop_size:
                return width, height
            return self.load_size, int(max(self.load_size * height / width, self.crop_size))
        if self.mode == "none":
            return int(round(width / 4) * 4), int(round(height / 4) * 4)
        return width, height

    def params(self, size: tuple[int, int], rng: np.random.Generator) -> dict:
        """The random choices for an image of `size` (width, height): crop corner and flip."""
        width, height = self.resized_size(*size)
        corner = None
        if self.mode.endswith("crop"):
            spare_x, spare_y = width - self.crop_size, height - self.crop_size
            if spare_x < 0 or spare_y < 0:
                raise ValueError(f"an image of {size[0]}x{size[1]} is {width}x{height} after preprocess "
                                 f"{self.mode!r}, smaller than crop_size {self.crop_size}")
            if self.random_crop:
                corner = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
            else:
                corner = spare_x // 2, spare_y // 2
        # drawn even when unused, so the choices drawn after it do not depend on the flip setting
        flip = bool(rng.random() < 0.5) and self.flip
        return {"corner": corner, "flip": flip}

    def __call__(self, image: Image.Image, params: dict) -> torch.Tensor:
        """[3, H, W] float in [-1, 1]."""
        size = self.resized_size(*image.size)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        if params["corner"] is not None:
            x, y = params["corner"]
            image = image.crop((x, y, x + self.crop_size, y + self.crop_size))
        if params["flip"]:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(image)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))  # [H, W, 3]
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# --- image folders -------------------------------------------------------------------------


class _FolderDataset(ImageDataset):
    """Image files read with PIL. An unreadable or corrupt file is skipped and counted in
    self.skipped, with one warning per dataset naming the first: at construction files whose
    header does not read are left out; a file that fails to decode later is replaced by the next
    readable file of its list (so the substitute is the same in every process)."""

    def __init__(self, root: Path, split: str, preprocess: Preprocess, seed: int) -> None:
        super().__init__(seed, stream=f"{type(self).__name__}/{split}")
        self.root, self.split, self.preprocess = Path(root), split, preprocess
        self.skipped = 0
        self._bad: set[Path] = set()
        self._warned = False

    def _images(self, folder: Path, kind: str) -> list[Path]:
        """The readable image files under folder (recursive, sorted)."""
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist; {kind} data is expected as "
                                    + _LAYOUTS[kind].format(root=self.root, split=self.split))
        readable = []
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            try:
                Image.open(path).close()  # opening parses the header
                readable.append(path)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                self._skip(path, error)
        if not readable:
            raise FileNotFoundError(f"{folder} holds no readable image ({', '.join(IMAGE_EXTENSIONS)}); "
                                    f"{kind} data is expected as "
                                    + _LAYOUTS[kind].format(root=self.root, split=self.split))
        return readable

    def _skip(self, path: Path, error: Exception) -> None:
        self._bad.add(path)
        self.skipped += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"skipping unreadable image {path} ({type(error).__name__}: {error}); further "
                          "unreadable images are skipped without a warning and counted in dataset.skipped",
                          RuntimeWarning, stacklevel=3)

    def _open(self, files: list[Path], index: int) -> Image.Image:
        """files[index] as RGB, or the next readable file after it."""
        for offset in range(len(files)):
            path = files[(index + offset) % len(files)]
            if path in self._bad:
                continue
            try:
                with Image.open(path) as image:
                    return image.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                self._skip(path, error)
        raise RuntimeError(f"none of the {len(files)} images of {files[0].parent} can be read")


class AlignedFolder(_FolderDataset):
    """pix2pix pairs: each image under root/<split>/ is A and B side by side (A on the left);
    both halves get the same crop and flip. direction 'BtoA' returns the right half as 'A'."""

    def __init__(self, root, split: str, preprocess: Preprocess, *, direction: str = "AtoB", seed: int = 0):
        super().__init__(root, split, preprocess, seed)
        self.files = self._images(self.root / split, "paired")
        self.direction = direction

    def __len__(self) -> int:
        return len(self.files)

    def item(self, index: int, rng: np.random.Generator) -> dict:
        pair = self._open(self.files, index)
        half = pair.width // 2
        left, right = pair.crop((0, 0, half, pair.height)), pair.crop((half, 0, 2 * half, pair.height))
        params = self.preprocess.params(left.size, rng)
        a, b = self.preprocess(left, params), self.preprocess(right, params)
        return {"A": a, "B": b} if self.direction == "AtoB" else {"A": b, "B": a}


class UnalignedFolders(_FolderDataset):
    """CycleGAN domains root/<split>A/ and root/<split>B/. Item i is A[i % |A|] with B[i % |B|] when
    serial, else with a random B; the length is the larger domain. Each image has its own crop and
    flip. direction 'BtoA' swaps the folders."""

    def __init__(self, root, split: str, preprocess: Preprocess, *, direction: str = "AtoB",
                 serial: bool = False, seed: int = 0):
        super().__init__(root, split, preprocess, seed)
        first, second = ("A", "B") if direction == "AtoB" else ("B", "A")
        self.files_A = self._images(self.root / (split + first), "unpaired")
        self.files_B = self._images(self.root / (split + second), "unpaired")
        self.serial = serial

    def __len__(self) -> int:
        return max(len(self.files_A), len(self.files_B))

    def item(self, index: int, rng: np.random.Generator) -> dict:
        index_B = index % len(self.files_B) if self.serial else int(rng.integers(len(self.files_B)))
        a = self._open(self.files_A, index % len(self.files_A))
        b = self._open(self.files_B, index_B)
        return {"A": self.preprocess(a, self.preprocess.params(a.size, rng)),
                "B": self.preprocess(b, self.preprocess.params(b.size, rng))}


class ClassFolders(_FolderDataset):
    """ImageFolder layout: root/<split>/<class>/ when root/<split> exists, else root/<class>/.
    Labels number the class folders in sorted order (self.classes)."""

    def __init__(self, root, split: str, preprocess: Preprocess, *, seed: int = 0):
        super().__init__(root, split, preprocess, seed)
        base = self.root / split if (self.root / split).is_dir() else self.root
        self.classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        if not self.classes:
            raise FileNotFoundError(f"{base} has no class folders; conditional data is expected as "
                                    + _LAYOUTS["conditional"].format(root=self.root, split=split))
        self.files, self.labels = [], []
        for label, name in enumerate(self.classes):
            files = self._images(base / name, "conditional")
            self.files += files
            self.labels += [label] * len(files)

    def __len__(self) -> int:
        return len(self.files)

    def item(self, index: int, rng: np.random.Generator) -> dict:
        # a replaced unreadable file keeps the label of the slot, so classes stay balanced as listed
        image = self._open(self.files, index)
        return {"image": self.preprocess(image, self.preprocess.params(image.size, rng)),
                "label": torch.tensor(self.labels[index])}


class ImageFolderFlat(_FolderDataset):
    """Unconditional images: everything under root/<split>/ when it exists, else under root."""

    def __init__(self, root, split: str, preprocess: Preprocess, *, seed: int = 0):
        super().__init__(root, split, preprocess, seed)
        self.files = self._images(self.root / split if (self.root / split).is_dir() else self.root,
                                  "unconditional")

    def __len__(self) -> int:
        return len(self.files)

    def item(self, index: int, rng: np.random.Generator) -> dict:
        image = self._open(self.files, index)
        return {"image": self.preprocess(image, self.preprocess.params(image.size, rng))}


# --- synthetic scenes ------------------------------------------------------------------------
# Scenes of a few shapes, drawn from signed distance functions at the requested resolution.
# Coordinates: x right, y down, both in [-1, 1] across the image; distances in the same units.
# Drawn with numpy: these small arrays are slower under torch's intra-op threads on a busy machine.

SHAPES = ("circle", "square", "triangle", "cross")
# the colour of each shape kind in 'photo' renderings, so the photo follows from the drawing
_KIND_COLOURS = np.array([[0.85, 0.22, 0.18], [0.20, 0.42, 0.85], [0.95, 0.72, 0.15], [0.58, 0.30, 0.75]],
                         dtype=np.float32)
# class colours of SyntheticConditional: class c is shape SHAPES[c % 4] in colour c // 4
_CLASS_COLOURS = np.array([
    [0.85, 0.22, 0.18], [0.20, 0.42, 0.85], [0.95, 0.72, 0.15], [0.25, 0.65, 0.30],
    [0.58, 0.30, 0.75], [0.10, 0.10, 0.10], [0.95, 0.50, 0.70], [0.20, 0.75, 0.80],
], dtype=np.float32)


@lru_cache(maxsize=8)
def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each [S, S]."""
    centres = np.linspace(-1 + 1 / resolution, 1 - 1 / resolution, resolution, dtype=np.float32)
    x, y = np.meshgrid(centres, centres, indexing="xy")
    x.setflags(write=False)  # shared by every call: never modified in place
    y.setflags(write=False)
    return x, y


def _random_shapes(rng: np.random.Generator, count: int, size_range=(0.24, 0.42), spread=0.6) -> list[dict]:
    return [{"kind": int(rng.integers(len(SHAPES))), "x": float(rng.uniform(-spread, spread)),
             "y": float(rng.uniform(-spread, spread)), "size": float(rng.uniform(*size_range)),
             "angle": float(rng.uniform(0, 2 * math.pi))} for _ in range(count)]


def _local(shape: dict, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in the shape's frame: centred on it and rotated with it."""
    x, y = _grid(resolution)
    dx, dy = x - shape["x"], y - shape["y"]
    c, s = math.cos(shape["angle"]), math.sin(shape["angle"])
    return c * dx + s * dy, -s * dx + c * dy


def _box(px: np.ndarray, py: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    qx, qy = np.abs(px) - half_x, np.abs(py) - half_y
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _distance(shape: dict, resolution: int) -> np.ndarray:
    """Signed distance to the shape's outline, negative inside, [S, S]."""
    px, py = _local(shape, resolution)
    r = shape["size"]
    kind = SHAPES[shape["kind"]]
    if kind == "circle":
        return np.hypot(px, py) - r
    if kind == "square":
        return _box(px, py, 0.8 * r, 0.8 * r)
    if kind == "cross":
        return np.minimum(_box(px, py, r, 0.33 * r), _box(px, py, 0.33 * r, r))
    # equilateral triangle of half side `half` (circumradius 1.15 r): fold onto one edge's half-plane
    half, k = r, math.sqrt(3.0)
    px, py = np.abs(px) - half, -py + half / k
    outside_edge = px + k * py > 0
    px, py = np.where(outside_edge, (px - k * py) / 2, px), np.where(outside_edge, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * half, 0)
    return -np.hypot(px, py) * np.sign(py)


def _coverage(distance: np.ndarray, resolution: int) -> np.ndarray:
    """Anti-aliased inside-ness in [0, 1]: the fraction of the pixel inside the outline."""
    return np.clip(0.5 - distance * (resolution / 2), 0, 1)


def _gradient(top, bottom, resolution: int) -> np.ndarray:
    _, y = _grid(resolution)
    t = (y + 1) / 2  # 0 at the top, 1 at the bottom
    top, bottom = np.float32(top).reshape(3, 1, 1), np.float32(bottom).reshape(3, 1, 1)
    return top * (1 - t) + bottom * t  # [3, S, S]


def _shaded(shape: dict, distance: np.ndarray, colour: np.ndarray, resolution: int) -> np.ndarray:
    """A shape's colour lit as a bulge (darker at the outline) with a pattern of its kind: rings on
    circles, concentric squares on squares, bands on triangles, diamonds on crosses. [3, S, S]."""
    px, py = _local(shape, resolution)
    depth = np.clip(-distance / (0.5 * shape["size"]), 0, 1)
    kind = SHAPES[shape["kind"]]
    coordinate = {"circle": np.hypot(px, py), "square": np.maximum(np.abs(px), np.abs(py)),
                  "triangle": py, "cross": np.abs(px) + np.abs(py)}[kind]
    pattern = np.cos(2 * math.pi * coordinate / (0.4 * shape["size"]))
    return colour.reshape(3, 1, 1) * (0.55 + 0.45 * np.sqrt(depth)) * (1 + 0.12 * pattern)


def _paint(canvas: np.ndarray, shapes: list[dict], fill, resolution: int) -> np.ndarray:
    """Shapes over canvas [3, S, S] in order; fill(shape, distance) gives each one's pixels."""
    for shape in shapes:
        distance = _distance(shape, resolution)
        alpha = _coverage(distance, resolution)
        canvas = canvas * (1 - alpha) + fill(shape, distance) * alpha
    return canvas


def _photo(shapes: list[dict], resolution: int) -> np.ndarray:
    """Shapes coloured by kind, shaded and patterned, on a sky-to-sand gradient. [3, S, S] in [0, 1]."""
    background = _gradient((0.72, 0.84, 0.95), (0.93, 0.88, 0.74), resolution)
    return _paint(background, shapes, lambda s, d: _shaded(s, d, _KIND_COLOURS[s["kind"]], resolution),
                  resolution)


def _drawing(shapes: list[dict], resolution: int) -> np.ndarray:
    """The visible outlines of the same shapes, black on white, like an edge map. [3, S, S]."""
    half_width = max(1.0, resolution / 96) / resolution  # about 2 px at 96 px, never thinner than 2 px
    canvas = np.ones((resolution, resolution), np.float32)
    for shape in shapes:
        distance = _distance(shape, resolution)
        canvas = np.maximum(canvas, _coverage(distance + half_width, resolution))  # hide what it covers
        canvas = canvas * (1 - _coverage(np.abs(distance) - half_width, resolution))
    return np.broadcast_to(canvas, (3, resolution, resolution))


def _to_model_range(image: np.ndarray, flip: bool) -> torch.Tensor:
    """[3, S, S] in [0, 1] -> a float32 tensor in [-1, 1], mirrored left-right when flip."""
    image = np.clip(image, 0, 1) * 2 - 1
    return torch.from_numpy(np.ascontiguousarray(image[..., ::-1] if flip else image, dtype=np.float32))


class _Synthetic(ImageDataset):
    """`size` scenes, each deterministic from (seed, split, index), drawn at `resolution`; flipped
    horizontally per draw when `flip`."""

    def __init__(self, size: int, resolution: int, *, seed: int = 0, split: str = "train", flip: bool = False):
        for name, value in (("size", size), ("resolution", resolution)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        super().__init__(seed, stream=f"{type(self).__name__}/{split}/draw")
        self.size, self.resolution, self.split, self.flip = size, resolution, split, flip

    def __len__(self) -> int:
        return self.size

    def scene_rng(self, index: int, part: str = "") -> np.random.Generator:
        return np.random.default_rng(_seed(self.seed, f"{type(self).__name__}/{self.split}/scene{part}", index))

    def flipped(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < 0.5) and self.flip


class SyntheticPaired(_Synthetic):
    """pix2pix-like pairs: A is a line drawing of 1-3 shapes (circles, squares, triangles, crosses),
    B the rendering of the same scene, each kind in its own colour, shaded and patterned."""

    def __init__(self, size: int, resolution: int, *, direction: str = "AtoB", **kwargs):
        super().__init__(size, resolution, **kwargs)
        self.direction = direction

    def item(self, index: int, rng: np.random.Generator) -> dict:
        scene = self.scene_rng(index)
        shapes = _random_shapes(scene, int(scene.integers(1, 4)))
        flip = self.flipped(rng)
        drawing = _to_model_range(_drawing(shapes, self.resolution), flip)
        photo = _to_model_range(_photo(shapes, self.resolution), flip)
        return {"A": drawing, "B": photo} if self.direction == "AtoB" else {"A": photo, "B": drawing}


class SyntheticUnpaired(_Synthetic):
    """horse2zebra-like domains from independent scenes of 1-2 shapes on grass under a sky:
    A has plain brown shapes, B black-and-white striped ones."""

    def __init__(self, size: int, resolution: int, *, direction: str = "AtoB", **kwargs):
        super().__init__(size, resolution, **kwargs)
        self.direction = direction

    def _scene(self, index: int, domain: str) -> torch.Tensor:
        scene = self.scene_rng(index, domain)
        horizon = float(scene.uniform(-0.35, 0.05))
        shapes = _random_shapes(scene, int(scene.integers(1, 3)), size_range=(0.25, 0.4), spread=0.5)
        _, y = _grid(self.resolution)
        ground = (y > horizon).astype(np.float32)  # [S, S]
        sky = _gradient((0.55, 0.75, 0.95), (0.80, 0.90, 0.98), self.resolution)
        grass = _gradient((0.45, 0.65, 0.30), (0.28, 0.50, 0.20), self.resolution)
        background = sky * (1 - ground) + grass * ground
        if domain == "A":
            brown = np.float32([0.55, 0.36, 0.20]) * np.float32(scene.uniform(0.8, 1.15))
            return _paint(background, shapes, lambda s, d: _shaded(s, d, brown, self.resolution), self.resolution)

        def striped(shape, distance):
            px, _ = _local(shape, self.resolution)
            stripes = np.clip(np.cos(2 * math.pi * px / (0.45 * shape["size"])) * 4, -1, 1) * 0.42 + 0.52
            depth = np.clip(-distance / (0.5 * shape["size"]), 0, 1)
            return stripes * (0.75 + 0.25 * np.sqrt(depth))  # broadcasts to [3, S, S]

        return _paint(background, shapes, striped, self.resolution)

    def item(self, index: int, rng: np.random.Generator) -> dict:
        first, second = ("A", "B") if self.direction == "AtoB" else ("B", "A")
        return {"A": _to_model_range(self._scene(index, first), self.flipped(rng)),
                "B": _to_model_range(self._scene(index, second), self.flipped(rng))}


class SyntheticConditional(_Synthetic):
    """One shape per image on a grey gradient; the label is the class, shape kind SHAPES[c % 4] in
    colour c // 4 (up to 32 classes). Labels cycle through the classes with the index."""

    def __init__(self, size: int, resolution: int, *, num_classes: int = 4, **kwargs):
        super().__init__(size, resolution, **kwargs)
        if not _is_int(num_classes) or not 1 <= num_classes <= len(SHAPES) * len(_CLASS_COLOURS):
            raise ValueError(f"SyntheticConditional: num_classes must be an int in [1, "
                             f"{len(SHAPES) * len(_CLASS_COLOURS)}], got {num_classes!r}")
        self.num_classes = num_classes

    def item(self, index: int, rng: np.random.Generator) -> dict:
        label = index % self.num_classes
        scene = self.scene_rng(index)
        shape = _random_shapes(scene, 1, size_range=(0.35, 0.6), spread=0.3)[0]
        shape["kind"] = label % len(SHAPES)
        shade = float(scene.uniform(0.75, 0.95))
        background = _gradient((shade, shade, shade), (shade - 0.15,) * 3, self.resolution)
        colour = _CLASS_COLOURS[label // len(SHAPES)]
        image = _paint(background, [shape], lambda s, d: _shaded(s, d, colour, self.resolution), self.resolution)
        return {"image": _to_model_range(image, self.flipped(rng)), "label": torch.tensor(label)}


class SyntheticUnconditional(_Synthetic):
    """Scenes of 1-3 shapes rendered as SyntheticPaired's B images."""

    def item(self, index: int, rng: np.random.Generator) -> dict:
        scene = self.scene_rng(index)
        shapes = _random_shapes(scene, int(scene.integers(1, 4)))
        return {"image": _to_model_range(_photo(shapes, self.resolution), self.flipped(rng))}


# --- the loader ------------------------------------------------------------------------------


class InfiniteBatchSampler(Sampler[list[int]]):
    """Batches forever, starting at batch `start_step`. Epoch e visits the dataset in the order of
    a permutation seeded by (seed, e) (or in index order without shuffle); batch s is slice
    s % batches_per_epoch of epoch s // batches_per_epoch, so any step's batch is computable.

    batch_size is the global batch: with world_size > 1 each rank takes its contiguous share
    batch_size // world_size of every batch. Indices of epoch e are offset by e * dataset_size
    when `epoch_indices` (for ImageDataset: a fresh draw of the same item)."""

    def __init__(self, dataset_size: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1, epoch_indices: bool = False) -> None:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) must be divisible by the "
                             f"{world_size} processes")
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last must be True when the data is split over processes, so that every "
                             "process gets an equal share of every batch")
        if dataset_size < 1 or (drop_last and dataset_size < batch_size):
            raise ValueError(f"the dataset has {dataset_size} items, fewer than one batch of {batch_size}")
        self.dataset_size, self.batch_size, self.shuffle, self.seed = dataset_size, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch_indices = epoch_indices
        self.batches_per_epoch = dataset_size // batch_size if drop_last else math.ceil(dataset_size / batch_size)
        self.start_step = 0
        self._order_cache: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(_seed(self.seed, "epoch", epoch))
                order = torch.randperm(self.dataset_size, generator=generator)
            else:
                order = torch.arange(self.dataset_size)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def batch(self, step: int) -> list[int]:
        """This rank's indices of global batch `step`."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        batch = self._order(epoch)[offset * self.batch_size:(offset + 1) * self.batch_size]
        share = len(batch) // self.world_size
        batch = batch[self.rank * share:(self.rank + 1) * share]
        if self.epoch_indices:
            batch = batch + epoch * self.dataset_size
        return batch.tolist()

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = True, distributed: bool = False) -> DataLoader:
    """An endless DataLoader of global batches of `batch_size` (under DDP, `distributed=True`, each
    process gets its batch_size // world_size share of every one), in an order fixed by `seed`.
    Iterating it yields batch 0, 1, 2...; resume_loader() makes it start at a later batch. Epochs
    have no end: use zip(range(steps), loader), and loader.batch_sampler.batches_per_epoch."""
    rank, world_size = 0, 1
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs torch.distributed initialised "
                               "(run under torchrun)")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    sampler = InfiniteBatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                   rank=rank, world_size=world_size,
                                   epoch_indices=isinstance(dataset, ImageDataset))
    # workers get seeds from this generator, so datasets that do use torch's global RNG stay reproducible
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)


# the number of processes may change on resume: the global batches stay the same
_STATE_KEYS = ("dataset_size", "batch_size", "shuffle", "seed", "drop_last")


def loader_state(loader: DataLoader, step: int) -> dict:
    """What to checkpoint so resume_loader can continue after `step` batches were taken: plain
    values (loadable with weights_only=True)."""
    sampler = _sampler(loader)
    return {"step": int(step), **{key: getattr(sampler, key) for key in _STATE_KEYS}}


def resume_loader(loader: DataLoader, state: dict) -> None:
    """Make the next iteration of `loader` start at batch state['step'], the batch an
    uninterrupted run would take next. Raises ValueError when the loader was built differently
    (another dataset size, batch size, seed...), since the batches would then differ."""
    sampler = _sampler(loader)
    changed = [f"{key} {state.get(key)!r} -> {getattr(sampler, key)!r}" for key in _STATE_KEYS
               if state.get(key) != getattr(sampler, key)]
    if changed:
        raise ValueError("cannot resume the data order: the loader differs from the checkpointed one in "
                         + ", ".join(changed))
    sampler.start_step = int(state["step"])


def _sampler(loader: DataLoader) -> InfiniteBatchSampler:
    if not isinstance(loader.batch_sampler, InfiniteBatchSampler):
        raise TypeError("expected a DataLoader made by train.data.build_loader")
    return loader.batch_sampler
