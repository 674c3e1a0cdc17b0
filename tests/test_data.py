"""train/data.py: synthetic sets, image folders (layouts, preprocessing, unreadable files) and the
deterministic, resumable loader."""
import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from train import data
from train.data import InfiniteBatchSampler, Preprocess, build_dataset, build_loader, loader_state, resume_loader

KIND_KEYS = {"paired": {"A", "B"}, "unpaired": {"A", "B"}, "conditional": {"image", "label"},
             "unconditional": {"image"}}


# --- synthetic sets ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", data.DATA_KINDS)
@pytest.mark.parametrize("resolution", [32, 37])
def test_synthetic_items(kind, resolution):
    dataset = build_dataset({"crop_size": resolution, "synthetic_size": 10, "num_classes": 6}, kind)
    assert len(dataset) == 10
    for index in (0, 9):
        item = dataset[index]
        assert set(item) == KIND_KEYS[kind]
        for key, value in item.items():
            if key == "label":
                assert value.dtype == torch.long and value.shape == () and 0 <= value < 6
                continue
            assert value.dtype == torch.float32 and value.shape == (3, resolution, resolution)
            assert value.min() >= -1 and value.max() <= 1
            assert value.std() > 0.1  # a scene, not a flat image


@pytest.mark.parametrize("kind", data.DATA_KINDS)
def test_synthetic_determinism(kind):
    cfg = {"crop_size": 24, "synthetic_size": 6, "seed": 3}

    def items(**overrides):
        dataset = build_dataset({**cfg, **overrides.pop("cfg", {})}, kind, **overrides)
        return [dataset[i] for i in range(6)]

    def same(x, y):
        return all(torch.equal(x[k], y[k]) for k in x)

    first, again = items(), items()
    assert all(same(x, y) for x, y in zip(first, again))
    assert not any(same(first[0], item) for item in first[1:])
    assert not any(same(x, y) for x, y in zip(first, items(cfg={"seed": 4})))
    assert not any(same(x, y) for x, y in zip(first, items(split="test")))


def test_synthetic_flip_per_draw():
    flipping = build_dataset({"crop_size": 24, "synthetic_size": 4}, "paired")
    fixed = build_dataset({"crop_size": 24, "synthetic_size": 4, "no_flip": True}, "paired")
    flips = set()
    for draw in range(4, 4 * 6):  # later epochs: the same scene, flipped or not
        item, scene = flipping[draw], fixed[draw % 4]
        flipped = torch.equal(item["A"], scene["A"].flip(-1))
        assert flipped or torch.equal(item["A"], scene["A"])
        assert torch.equal(item["B"], scene["B"].flip(-1) if flipped else scene["B"])  # A and B together
        assert torch.equal(fixed[draw]["A"], scene["A"])
        flips.add(flipped)
    assert flips == {True, False}
    # evaluation splits are never flipped
    test = build_dataset({"crop_size": 24, "synthetic_size": 4}, "paired", split="test")
    assert all(torch.equal(test[i]["A"], test[i + 4]["A"]) for i in range(4))


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_synthetic_direction(kind):
    cfg = {"crop_size": 24, "synthetic_size": 4, "no_flip": True}
    forward, backward = build_dataset(cfg, kind), build_dataset({**cfg, "direction": "BtoA"}, kind)
    for i in range(4):
        assert torch.equal(forward[i]["A"], backward[i]["B"]) and torch.equal(forward[i]["B"], backward[i]["A"])


def test_synthetic_paired_is_a_drawing_and_its_rendering():
    dataset = build_dataset({"crop_size": 48, "synthetic_size": 8, "no_flip": True}, "paired")
    for i in range(8):
        drawing, photo = dataset[i]["A"], dataset[i]["B"]
        assert torch.equal(drawing[0], drawing[1]) and torch.equal(drawing[0], drawing[2])  # black on white
        assert (drawing == 1).float().mean() > 0.5 and (drawing < -0.9).any()
        # the rendering differs from its empty background exactly around and inside the outlines:
        # every outline pixel is next to a painted pixel
        background = torch.from_numpy(data._gradient((0.72, 0.84, 0.95), (0.93, 0.88, 0.74), 48)) * 2 - 1
        painted = ((photo - background).abs().amax(0) > 0.05).float()[None, None]
        near_paint = torch.nn.functional.max_pool2d(painted, 3, 1, 1)[0, 0] > 0
        assert near_paint[drawing[0] < -0.5].all()
        assert painted.mean() > 0.01


def test_synthetic_unpaired_domains_differ():
    dataset = build_dataset({"crop_size": 48, "synthetic_size": 8}, "unpaired")
    for i in range(8):
        plain, striped = dataset[i]["A"], dataset[i]["B"]
        black = lambda image: (image < -0.7).all(0)  # noqa: E731
        assert not black(plain).any()  # brown shapes on grass and sky
        assert black(striped).sum() > 4  # black stripes


def test_synthetic_conditional_classes():
    dataset = build_dataset({"crop_size": 24, "synthetic_size": 20, "num_classes": 10}, "conditional")
    assert [int(dataset[i]["label"]) for i in range(12)] == [i % 10 for i in range(12)]
    with pytest.raises(ValueError, match=r"num_classes must be an int in \[1, 32\]"):
        build_dataset({"num_classes": 33}, "conditional")


@pytest.mark.parametrize("kind, area", [
    ("circle", math.pi), ("square", 1.6 ** 2), ("triangle", math.sqrt(3)),  # half side r: sqrt(3) r^2
    ("cross", 2 * 2 * 0.66 - 0.66 ** 2),
])
def test_shape_distances(kind, area):
    """Each signed distance encloses its shape's area and is a distance: 0 on the outline, slope 1."""
    r, resolution = 0.4, 400
    shape = {"kind": data.SHAPES.index(kind), "x": 0.1, "y": -0.05, "size": r, "angle": 0.3}
    distance = torch.from_numpy(data._distance(shape, resolution)).double()
    covered = data._coverage(distance.numpy(), resolution).sum() * (2 / resolution) ** 2
    assert covered == pytest.approx(area * r * r, rel=0.01)
    assert distance[200 - 10, 200 + 20] < 0  # the centre (x 0.1, y -0.05) is inside
    grad_y, grad_x = torch.gradient(distance, spacing=2 / resolution)
    slope = torch.hypot(grad_x, grad_y)[distance.abs() < 0.1]
    assert (slope - 1).abs().median() < 0.02


def test_bad_options():
    with pytest.raises(ValueError, match="kind must be one of paired, unpaired"):
        build_dataset({}, "pairs")
    with pytest.raises(ValueError, match="preprocess must be one of"):
        build_dataset({"preprocess": "zoom"}, "paired")
    with pytest.raises(ValueError, match="crop_size must be a positive int, got 0"):
        build_dataset({"crop_size": 0}, "paired")
    with pytest.raises(ValueError, match="direction must be 'AtoB' or 'BtoA'"):
        build_dataset({"direction": "AB"}, "paired")
    with pytest.raises(IndexError, match="non-negative int"):
        build_dataset({}, "paired")[-1]


# --- image folders -----------------------------------------------------------------------------


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _gradient_image(width, height):
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.broadcast_to(np.concatenate([x + 0 * y, 0 * x + y, (x + y) / 2], 2), (height, width, 3))


def _corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an image at all")


def _truncated_png(path, width=20, height=20):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(_gradient_image(width, height), dtype=np.uint8)).save(buffer, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:-40])  # the header parses, the pixels do not


def test_aligned_folder(tmp_path):
    pair = np.zeros((20, 40, 3))
    pair[:, :20, 0] = 255  # A red
    pair[:, 20:, 2] = 255  # B blue
    _save(tmp_path / "train" / "0.png", pair)
    cfg = {"dataroot": str(tmp_path), "load_size": 16, "crop_size": 16, "no_flip": True}
    item = build_dataset(cfg, "paired")[0]
    assert item["A"].shape == item["B"].shape == (3, 16, 16)
    assert torch.allclose(item["A"][:, 4:-4, 4:-4], torch.tensor([1.0, -1, -1]).view(3, 1, 1))
    assert torch.allclose(item["B"][:, 4:-4, 4:-4], torch.tensor([-1.0, -1, 1]).view(3, 1, 1))
    swapped = build_dataset({**cfg, "direction": "BtoA"}, "paired")[0]
    assert torch.equal(swapped["A"], item["B"]) and torch.equal(swapped["B"], item["A"])


def test_aligned_pairs_share_crop_and_flip(tmp_path):
    half = _gradient_image(24, 24)
    _save(tmp_path / "train" / "0.png", np.concatenate([half, half], 1))
    dataset = build_dataset({"dataroot": str(tmp_path), "load_size": 30, "crop_size": 20}, "paired")
    draws = [dataset[i] for i in range(12)]  # one image, 12 epochs
    for item in draws:
        assert item["A"].shape == (3, 20, 20) and torch.equal(item["A"], item["B"])
    assert len({tuple(item["A"][:, 0, 0].tolist()) for item in draws}) > 3  # crops and flips vary by draw
    # other splits: centred crop, no flip
    _save(tmp_path / "test" / "0.png", np.concatenate([half, half], 1))
    test = build_dataset({"dataroot": str(tmp_path), "load_size": 30, "crop_size": 20}, "paired", "test")
    assert all(torch.equal(test[i]["A"], test[0]["A"]) for i in range(1, 6))


def test_preprocess_modes():
    image = Image.fromarray(np.asarray(_gradient_image(30, 22), dtype=np.uint8))
    rng = np.random.default_rng(0)

    def shape(mode, load, crop):
        process = Preprocess(mode, load, crop, flip=False, random_crop=True)
        return tuple(process(image, process.params(image.size, rng)).shape[1:])

    assert shape("resize_and_crop", 32, 24) == (24, 24)
    assert shape("crop", 32, 16) == (16, 16)
    assert shape("scale_width", 40, 16) == (29, 40)  # height int(40 * 22 / 30)
    assert shape("scale_width", 20, 16) == (16, 20)  # ... but at least crop_size
    assert shape("scale_width_and_crop", 40, 24) == (24, 24)
    assert shape("none", 0, 0) == (24, 32)  # sides rounded to multiples of 4
    centred = Preprocess("crop", 0, 10, flip=False, random_crop=False)
    out = centred(image, centred.params(image.size, rng))
    reference = torch.from_numpy(np.asarray(image, dtype=np.float32)[6:16, 10:20]).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(out, reference)
    with pytest.raises(ValueError, match=r"an image of 30x22 .* smaller than crop_size 24"):
        process = Preprocess("crop", 0, 24, flip=False, random_crop=True)
        process.params(image.size, rng)
    with pytest.raises(ValueError, match=r"load_size \(16\) must be at least crop_size \(24\)"):
        Preprocess("resize_and_crop", 16, 24, flip=False, random_crop=True)


def test_unaligned_folders(tmp_path):
    for i in range(3):
        _save(tmp_path / "trainA" / f"{i}.png", np.full((8, 8, 3), 10 * i))
    for i in range(5):
        _save(tmp_path / "trainB" / f"{i}.jpg", np.full((8, 8, 3), 100 + 20 * i))
    cfg = {"dataroot": str(tmp_path), "load_size": 8, "crop_size": 8, "no_flip": True}
    value = lambda image: round((image[0, 0, 0].item() + 1) * 127.5)  # noqa: E731

    serial = build_dataset({**cfg, "serial_batches": True}, "unpaired")
    assert len(serial) == 5
    assert [(value(serial[i]["A"]), value(serial[i]["B"])) for i in range(6)] == \
        [(0, 100), (10, 120), (20, 140), (0, 160), (10, 180), (0, 100)]  # draw 5 is item 0

    shuffled = build_dataset(cfg, "unpaired")
    pairs = [value(shuffled[i]["B"]) for i in range(40)]
    assert pairs == [value(build_dataset(cfg, "unpaired")[i]["B"]) for i in range(40)]  # deterministic
    assert set(pairs) == {100, 120, 140, 160, 180} and pairs[:5] != [100, 120, 140, 160, 180]

    swapped = build_dataset({**cfg, "direction": "BtoA", "serial_batches": True}, "unpaired")
    assert (value(swapped[1]["A"]), value(swapped[1]["B"])) == (120, 10)


def test_class_and_flat_folders(tmp_path):
    for name, grey in (("cat", 50), ("ant", 150)):
        for i in range(2):
            _save(tmp_path / "train" / name / f"{i}.png", np.full((8, 8, 3), grey))
    _save(tmp_path / "train" / "ant" / "deeper" / "2.png", np.full((8, 8, 3), 150))
    cfg = {"dataroot": str(tmp_path), "load_size": 8, "crop_size": 8, "num_classes": 2}
    classes = build_dataset(cfg, "conditional")
    assert classes.classes == ["ant", "cat"] and len(classes) == 5
    labels = [int(classes[i]["label"]) for i in range(5)]
    greys = [round((classes[i]["image"][0, 0, 0].item() + 1) * 127.5) for i in range(5)]
    assert labels == [0, 0, 0, 1, 1] and greys == [150, 150, 150, 50, 50]
    with pytest.raises(ValueError, match="has 2 classes but num_classes is 1"):
        build_dataset({**cfg, "num_classes": 1}, "conditional")
    flat = build_dataset(cfg, "unconditional")
    assert len(flat) == 5 and set(flat[0]) == {"image"}


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    for i in range(4):
        _save(tmp_path / "train" / f"{i}.png", np.full((8, 8, 3), 40 * i))
    _corrupt(tmp_path / "train" / "1b.png")
    _corrupt(tmp_path / "train" / "2b.jpg")
    _truncated_png(tmp_path / "train" / "3b.png")
    cfg = {"dataroot": str(tmp_path), "load_size": 8, "crop_size": 8, "no_flip": True}
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image .*1b\.png") as caught:
        dataset = build_dataset(cfg, "unconditional")
    assert len(caught) == 1  # one warning for any number of bad files
    assert dataset.skipped == 2 and len(dataset) == 5  # the truncated file's header reads
    greys = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning when the truncated file fails to decode
        for i in range(5):
            greys.append(round((dataset[i]["image"][0, 0, 0].item() + 1) * 127.5))
    assert dataset.skipped == 3
    assert greys == [0, 40, 80, 120, 0]  # the truncated slot (last) is replaced by the next file, wrapping


def test_truncated_image_warns_when_first(tmp_path):
    _save(tmp_path / "train" / "a.png", np.zeros((8, 8, 3)))
    _truncated_png(tmp_path / "train" / "b.png")
    dataset = build_dataset({"dataroot": str(tmp_path), "load_size": 8, "crop_size": 8}, "unconditional")
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image .*b\.png"):
        dataset[1]
    assert dataset.skipped == 1


def test_missing_folders_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataroot .*absent does not exist; unpaired data is expected as "
                                                r".*absent/trainA/ and .*absent/trainB/"):
        build_dataset({"dataroot": str(tmp_path / "absent")}, "unpaired")
    (tmp_path / "trainA").mkdir()
    with pytest.raises(FileNotFoundError, match=r"trainA holds no readable image"):
        build_dataset({"dataroot": str(tmp_path)}, "unpaired")
    _save(tmp_path / "trainA" / "0.png", np.zeros((8, 8, 3)))
    with pytest.raises(FileNotFoundError, match=r"trainB does not exist"):
        build_dataset({"dataroot": str(tmp_path)}, "unpaired")
    with pytest.raises(FileNotFoundError, match=r"side by side \(pix2pix\)"):
        build_dataset({"dataroot": str(tmp_path)}, "paired", "val")
    with pytest.raises(FileNotFoundError, match=r"has no class folders"):
        build_dataset({"dataroot": str(tmp_path / "trainA")}, "conditional")


# --- the loader --------------------------------------------------------------------------------


def _synthetic(size=10):
    return build_dataset({"crop_size": 8, "synthetic_size": size}, "paired")


def _take(loader, count):
    return [batch for _, batch in zip(range(count), loader)]


def _same_batches(first, second):
    return len(first) == len(second) and all(
        torch.equal(x["A"], y["A"]) and torch.equal(x["B"], y["B"]) for x, y in zip(first, second))


def test_sampler_epochs():
    sampler = InfiniteBatchSampler(10, 3, seed=1)
    assert sampler.batches_per_epoch == 3
    epochs = [sum((sampler.batch(3 * e + b) for b in range(3)), []) for e in range(3)]
    for e, indices in enumerate(epochs):
        assert len(set(indices)) == 9 and set(indices) <= set(range(10))  # 9 distinct items, the 10th left over
    assert epochs[0] != epochs[1]
    assert [sampler.batch(s) for s in range(9)] == [InfiniteBatchSampler(10, 3, seed=1).batch(s) for s in range(9)]
    assert sampler.batch(0) != InfiniteBatchSampler(10, 3, seed=2).batch(0)
    # item draws of later epochs are offset, for fresh augmentation
    drawing = InfiniteBatchSampler(10, 3, seed=1, epoch_indices=True)
    assert drawing.batch(4) == [i + 10 for i in sampler.batch(4)]
    # without drop_last the short batch ends the epoch, and an epoch visits every item once
    keep = InfiniteBatchSampler(10, 4, shuffle=False, drop_last=False)
    assert [keep.batch(s) for s in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_sampler_shards_global_batches():
    whole = InfiniteBatchSampler(12, 4, seed=5)
    ranks = [InfiniteBatchSampler(12, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in range(7):
        assert ranks[0].batch(step) + ranks[1].batch(step) == whole.batch(step)
    with pytest.raises(ValueError, match="batch_size 5 .* divisible by the 2 processes"):
        InfiniteBatchSampler(12, 5, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        InfiniteBatchSampler(12, 16)


def test_loader_resumes_exactly():
    dataset = _synthetic()
    uninterrupted = _take(build_loader(dataset, 4, seed=7), 8)  # 2 batches per epoch: 4 epochs
    assert not _same_batches(uninterrupted[:1], uninterrupted[2:3])  # epochs are reshuffled
    first = build_loader(dataset, 4, seed=7)
    before = _take(first, 3)
    state = loader_state(first, 3)
    torch.save(state, io.BytesIO())  # plain values
    resumed = build_loader(_synthetic(), 4, seed=7)
    resume_loader(resumed, state)
    assert _same_batches(before + _take(resumed, 5), uninterrupted)
    with pytest.raises(ValueError, match=r"differs from the checkpointed one in batch_size 4 -> 2"):
        resume_loader(build_loader(dataset, 2, seed=7), state)
    with pytest.raises(ValueError, match=r"seed 7 -> 8"):
        resume_loader(build_loader(dataset, 4, seed=8), state)


def test_loader_workers_see_the_same_batches():
    dataset = _synthetic()
    assert _same_batches(_take(build_loader(dataset, 2, seed=3, num_workers=2), 6),
                         _take(build_loader(dataset, 2, seed=3), 6))


def test_loader_arguments():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        build_loader(_synthetic(), 2, distributed=True)
    with pytest.raises(ValueError, match="num_workers must be a non-negative int"):
        build_loader(_synthetic(), 2, num_workers=-1)
    with pytest.raises(TypeError, match="made by train.data.build_loader"):
        loader_state(torch.utils.data.DataLoader(_synthetic()), 0)
    # other datasets are indexed within their length
    tensors = torch.utils.data.TensorDataset(torch.arange(5))
    batches = [b[0].tolist() for b in _take(build_loader(tensors, 2, shuffle=False), 4)]
    assert batches == [[0, 1], [2, 3], [0, 1], [2, 3]]


def test_loader_under_torch_distributed(tmp_path):
    """With a process group, the rank and the number of processes come from it (one process here;
    the shares of several are checked on the sampler above)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_loader(_synthetic(), 4, seed=2, distributed=True)
        sampler = loader.batch_sampler
        assert (sampler.rank, sampler.world_size) == (0, 1)
        assert _same_batches(_take(loader, 3), _take(build_loader(_synthetic(), 4, seed=2), 3))
    finally:
        dist.destroy_process_group()
