"""The shared training loop on tiny dense runs: every output file, the report's fields, the EMA,
gradient accumulation, LR schedules and the requires_grad toggling per part."""
import json

import pytest
import torch
import yaml

from gansparse import export
from train import checkpoint, loop
from train.config import resolve
from train.methods import get_method
from train.nets import build_generator
from train.run import main

Dense = get_method("dense")
TINY = dict(device="cpu", netG="resnet_1blocks", ngf=4, ndf=4, crop_size=32, load_size=32, batch_size=2,
            sample_every=1000, eval=False, export=False, tensorboard=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, preset="smoke", **options) -> dict:
    return resolve(Dense, preset, overrides={**TINY, "out": str(tmp_path), **options})


def final_tensors(run_dir):
    return checkpoint.load(checkpoint.latest(run_dir))[0]


def test_a_tiny_dense_run_writes_every_output(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["--method", "dense", "--preset", "smoke", "--out", str(run_dir), "--device", "cpu",
                 "--netG", "resnet_1blocks", "--ngf", "4", "--ndf", "4", "--crop_size", "32", "--batch_size", "2",
                 "--steps", "4", "--log_every", "2", "--sample_every", "2", "--checkpoint_every", "1",
                 "--keep_checkpoints", "2", "--eval_size", "4"]) == 0

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg == tiny_config(run_dir, steps=4, log_every=2, sample_every=2, checkpoint_every=1, keep_checkpoints=2,
                              eval_size=4, eval=True, export=True, tensorboard=True)
    log = (run_dir / "log.txt").read_text()
    assert "step 2 (train 2/4) G_gan=" in log and "step 4 (train 4/4)" in log
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    assert [p.name for p in checkpoint.checkpoint_dirs(run_dir)] == ["step_00000003", "step_00000004"]
    assert "plots/losses.png" in (run_dir / "report.md").read_text() and (run_dir / "plots" / "losses.png").is_file()

    report = json.loads((run_dir / "report.json").read_text())
    assert report["method"] == "dense" and report["steps"] == 4
    assert report["teacher"] is None  # dense trains the teacher itself
    student = report["student"]
    G = build_generator(cfg)
    assert student["params"] == sum(p.numel() for p in G.parameters())
    assert student["macs"] > 0 and student["cpu_latency_ms"] > 0 and isinstance(report["metrics"], dict)

    # The export is the trained G, as a plain model computing what G computes.
    G.load_state_dict({k[2:]: v for k, v in final_tensors(run_dir).items() if k.startswith("G.")})
    exported = export.load(run_dir / "export" / "generator.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), G.eval()(x), atol=1e-5, rtol=1e-5)


def test_pix2pix_is_evaluated_against_the_ground_truth(tmp_path):
    cfg = tiny_config(tmp_path, "smoke_pix2pix", netG="unet_32", steps=2, eval=True, eval_size=4,
                      eval_fidelity=False, eval_lpips=False)
    report = loop.run(Dense, cfg)
    assert report["teacher"] is None
    assert set(report["metrics"]) == {"psnr", "ssim"}
    assert json.loads((tmp_path / "report.json").read_text())["metrics"] == report["metrics"]


def test_sample_grids_leave_the_training_unchanged(tmp_path):
    # pix2pix samples in training mode (batch statistics, dropout): the grids must move neither the
    # RNG streams nor the batch norms' running statistics.
    options = dict(netG="unet_32", steps=3, checkpoint_every=3)
    loop.run(Dense, tiny_config(tmp_path / "quiet", "smoke_pix2pix", **options))
    loop.run(Dense, tiny_config(tmp_path / "sampled", "smoke_pix2pix", sample_every=1, **options))
    quiet, sampled = final_tensors(tmp_path / "quiet"), final_tensors(tmp_path / "sampled")
    assert any("running_mean" in key for key in quiet)
    assert quiet.keys() == sampled.keys()
    for key in quiet:
        assert torch.equal(quiet[key], sampled[key]), key
    assert len(list((tmp_path / "sampled" / "samples").glob("*.png"))) == 3


def test_the_ema_follows_its_recursion(tmp_path):
    decay = 0.75
    loop.run(Dense, tiny_config(tmp_path, steps=3, ema=decay, checkpoint_every=1, keep_checkpoints=3,
                                dropout=False))
    states = [checkpoint.load(path)[0] for path in checkpoint.checkpoint_dirs(tmp_path)]  # steps 1, 2, 3
    names = [k[len("ema.module."):] for k in states[0] if k.startswith("ema.module.")]
    assert names and set(names) == {k[2:] for k in states[0] if k.startswith("G.")}
    for name in names:
        first, previous, last = (state[f"ema.module.{name}"] for state in states)
        torch.testing.assert_close(first, states[0][f"G.{name}"])  # the first update copies G
        torch.testing.assert_close(last, decay * previous + (1 - decay) * states[2][f"G.{name}"])
    assert not torch.equal(states[2]["ema.module.model.1.weight"], states[2]["G.model.1.weight"])


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    # No norm, pool or dropout: every loss is a mean over samples, so two micro-batches of 2 give
    # the gradients of one batch of 4. (A conv before an instance norm has a bias whose gradient
    # is 0 up to rounding, which Adam's normalisation would blow up to +-lr.)
    options = dict(batch_size=4, steps=2, pool_size=0, dropout=False, norm="none")
    loop.run(Dense, tiny_config(tmp_path / "full", **options))
    loop.run(Dense, tiny_config(tmp_path / "accumulated", accumulation=2, **options))
    full, accumulated = final_tensors(tmp_path / "full"), final_tensors(tmp_path / "accumulated")
    assert full.keys() == accumulated.keys()
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-5, rtol=1e-4, msg=name)
    # and a different split of the same data would not match: the comparison can fail
    loop.run(Dense, tiny_config(tmp_path / "half", **{**options, "batch_size": 2}))
    assert not torch.allclose(final_tensors(tmp_path / "half")["G.model.1.weight"], full["G.model.1.weight"])


def test_lr_schedules():
    def lrs(policy, steps=10, **options):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = loop.make_scheduler(optimizer, {**resolve(Dense), "lr_policy": policy, **options}, steps)
        values = []
        for _ in range(steps):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    # constant for the first half, then linearly down: 1 - (step - 5) / 6
    assert lrs("linear", decay_start=0.5) == pytest.approx([1] * 6 + [5 / 6, 4 / 6, 3 / 6, 2 / 6])
    assert lrs("step", lr_step_size=4, lr_gamma=0.5) == pytest.approx([1] * 4 + [0.5] * 4 + [0.25] * 2)
    assert lrs("step", lr_step_size=0, lr_gamma=0.5)[2:4] == pytest.approx([1, 0.5])  # a third of the stage
    assert lrs("constant") == [1.0] * 10


def test_only_the_part_being_updated_requires_gradients():
    method = Dense(resolve(Dense, "smoke", overrides={"ngf": 4, "ndf": 4}), torch.device("cpu"))
    method.build()
    optimizers = method.optimizers()
    loop._train_only(method, optimizers["G"])
    assert all(p.requires_grad for name in ("G", "G_inv") for p in method.nets[name].parameters())
    assert not any(p.requires_grad for name in ("D", "D_inv") for p in method.nets[name].parameters())
    batch = {"A": torch.randn(1, 3, 32, 32), "B": torch.randn(1, 3, 32, 32)}
    method.loss("G", batch, 0)[0].backward()
    assert all(p.grad is None for p in method.nets["D"].parameters())
    loop._train_only(method, optimizers["D"])
    assert not any(p.requires_grad for p in method.nets["G"].parameters())
    assert all(p.requires_grad for p in method.nets["D"].parameters())


# --- the pieces methods share: GAN losses, the image pool, the network builders ----------------


def test_gan_losses_follow_their_formulas():
    from train.losses import GANLoss

    prediction = torch.tensor([[-2.0, 0.5], [1.5, 3.0]])
    assert GANLoss("lsgan")(prediction, True).item() == pytest.approx(((prediction - 1) ** 2).mean().item())
    assert GANLoss("lsgan")(prediction, False).item() == pytest.approx((prediction ** 2).mean().item())
    assert GANLoss("vanilla")(prediction, True).item() == pytest.approx(
        -torch.nn.functional.logsigmoid(prediction).mean().item())
    assert GANLoss("vanilla")(prediction, False).item() == pytest.approx(
        -torch.nn.functional.logsigmoid(-prediction).mean().item())
    assert GANLoss("hinge")(prediction, True).item() == pytest.approx((3 + 0.5 + 0 + 0) / 4)
    assert GANLoss("hinge")(prediction, False).item() == pytest.approx((0 + 1.5 + 2.5 + 4) / 4)
    assert GANLoss("hinge")(prediction, True, for_discriminator=False).item() == pytest.approx(-0.75)
    assert GANLoss("wgangp")(prediction, True).item() == pytest.approx(-0.75)
    assert GANLoss("wgangp")(prediction, False).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="mode must be one of"):
        GANLoss("wasserstein")


def test_gradient_penalty_of_a_linear_critic():
    from train.losses import gradient_penalty

    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1, bias=False))
    with torch.no_grad():
        critic[1].weight.fill_(0.5)  # ||grad|| = 0.5 * sqrt(12) everywhere
    penalty = gradient_penalty(critic, torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), weight=10.0)
    assert penalty.item() == pytest.approx(10 * (0.5 * 12 ** 0.5 - 1) ** 2, rel=1e-5)


def test_image_pool_fills_then_mixes_history_and_restores():
    import random

    from train.losses import ImagePool

    images = torch.arange(400.0).view(400, 1, 1, 1)
    assert ImagePool(0).query(images) is images
    pool = ImagePool(3)
    torch.testing.assert_close(pool.query(images[:3]), images[:3])  # filling: returned as they are
    random.seed(0)
    from_history = 0
    for start in range(3, 400, 4):
        before, new = [i.item() for i in pool.images], images[start:start + 4]
        out = pool.query(new)
        # an image returned from the pool leaves it and the new one takes its place
        after = [i.item() for i in pool.images]
        assert sorted(out.flatten().tolist() + after) == sorted(before + new.flatten().tolist())
        from_history += sum(o.item() != n.item() for o, n in zip(out, new))
    assert 0.4 < from_history / 397 < 0.6  # half of the time
    restored = ImagePool(3)
    restored.load_state_dict(pool.state_dict())
    assert [i.item() for i in restored.images] == [i.item() for i in pool.images]
    with pytest.raises(ValueError, match="size must be an int >= 0"):
        ImagePool(-1)


def test_network_builders():
    options = dict(ngf=4, ndf=4, norm="instance", dropout=False, n_layers_D=2)
    resnet = build_generator({**options, "netG": "resnet_2blocks"})
    assert sum(type(m).__name__ == "ResnetBlock" for m in resnet.modules()) == 2
    unet = build_generator({**options, "netG": "unet_64"})
    assert unet(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    for bad in ("unet_48", "unet_16", "resnet", "mobile"):
        with pytest.raises(ValueError, match="netG must be"):
            build_generator({**options, "netG": bad})
    from train.nets import build_discriminator

    conditional = build_discriminator({**options, "netD": "n_layers"}, input_nc=6)
    assert conditional(torch.randn(1, 6, 32, 32)).shape[1] == 1
    with pytest.raises(ValueError, match="netD must be"):
        build_discriminator({**options, "netD": "patch"})
    # junyanz's initialisation: N(0, 0.02) conv weights, zero biases
    weights = torch.cat([m.weight.flatten() for m in resnet.modules() if isinstance(m, torch.nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.1)


def test_a_new_run_does_not_mix_with_an_earlier_one(tmp_path, capsys):
    argv = ["--method", "dense", "--preset", "smoke", "--out", str(tmp_path), "--device", "cpu", "--netG",
            "resnet_1blocks", "--ngf", "4", "--ndf", "4", "--crop_size", "32", "--batch_size", "2", "--eval", "false",
            "--tensorboard", "false", "--export", "false", "--sample_every", "1000", "--checkpoint_every", "1"]
    assert main([*argv, "--steps", "3"]) == 0
    assert main([*argv, "--steps", "2"]) == 1
    assert f"{tmp_path} already holds a run: continue it with --resume {tmp_path}" in capsys.readouterr().err
    (tmp_path / "search").mkdir()  # e.g. a method's files: they belong to the earlier run too
    assert main([*argv, "--steps", "2", "--overwrite"]) == 0
    assert not (tmp_path / "search").exists()
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step_00000001", "step_00000002"]
    assert (tmp_path / "log.txt").read_text().count("dense run in") == 1


def test_threads_are_set_for_the_run_and_restored(tmp_path):
    torch.set_num_threads(2)
    seen = []

    class Recording(Dense):
        def after_step(self, step):
            seen.append(torch.get_num_threads())

    loop.run(Recording, tiny_config(tmp_path, steps=1, threads=1))
    assert seen == [1] and torch.get_num_threads() == 2


def test_the_discriminators_take_lr_D():
    method = Dense(tiny_config("unused", lr=1e-3, lr_D=4e-3), torch.device("cpu"))
    method.build()
    optimizers = method.optimizers()
    assert [group["lr"] for group in optimizers["G"].param_groups] == [1e-3]
    assert [group["lr"] for group in optimizers["D"].param_groups] == [4e-3]
    same = Dense(tiny_config("unused", lr=1e-3), torch.device("cpu"))
    same.build()
    assert same.optimizers()["D"].param_groups[0]["lr"] == 1e-3
