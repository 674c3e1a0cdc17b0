"""The training loop every method runs on (the contract with a method is in methods/base.py).

    run(method_cls, cfg) -> report

1. set up: device and processes (distributed.py), seeds, the run directory (config.yaml, log.txt,
   TensorBoard events), the method's networks, the data;
2. for each stage of the method, for each step: for each part (G, D, ...) in the method's order,
   its loss over `accumulation` micro-batches, gradients averaged over the processes, its optimizer
   and LR scheduler step; then the method's after_step hook and the student's EMA; progress,
   logs, samples and checkpoints on their schedules;
3. at the end: samples, export of the final model, evaluation and the report (main process only).

A run resumes exactly from its latest checkpoint (resume=True): weights, optimizer and scheduler
states, RNG states, the data position, the method's extra state and the logged history are all
restored, so a run killed and resumed logs the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import default_collate
from tqdm import tqdm

from gansparse import export, metrics

from . import checkpoint, distributed
from .config import ConfigError
from .data import build_dataset, build_loader, loader_state, resume_loader
from .report import save_image_grid, write_report

__all__ = ["make_scheduler", "run", "seed_everything"]


# --- set-up ----------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's random, numpy and torch (every device); `deterministic` also asks torch for
    deterministic algorithms (warning where an op has none) and turns off cuDNN autotuning."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict:
    numpy_state = np.random.get_state()  # ('MT19937', keys, position, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "position": numpy_state[2],
                       "has_gauss": numpy_state[3], "cached_gaussian": numpy_state[4]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a checkpoint stores the tuple as a list
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule of one stage of `steps` steps:

    - 'linear': the initial LR until decay_start * steps, then linearly down towards 0 (the
      factor 1 - (step - start) / (steps - start + 1), junyanz's n_epochs / n_epochs_decay rule);
    - 'step': multiplied by lr_gamma every lr_step_size steps (0: a third of the stage);
    - 'constant'.
    """
    policy = cfg["lr_policy"]
    if policy == "linear":
        start = int(cfg["decay_start"] * steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 1.0 - max(0, step - start) / float(steps - start + 1))
    if policy == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg["lr_step_size"] or max(1, steps // 3), cfg["lr_gamma"])
    if policy == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ConfigError(f"option 'lr_policy' must be 'linear', 'step' or 'constant', got {policy!r}")


class _Log:
    """log.txt (appended to, so a resumed run continues it) and the console, main process only."""

    def __init__(self, run_dir: Path | None) -> None:
        self.file = open(run_dir / "log.txt", "a") if run_dir else None

    def __call__(self, message: str, console: bool = True) -> None:
        if self.file is None:
            return
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.file.flush()
        if console:
            tqdm.write(message)

    def close(self) -> None:
        if self.file:
            self.file.close()


def _clear_previous_run(run_dir: Path, overwrite: bool) -> None:
    """A new run in the directory of an earlier one: delete that directory if `overwrite` (the
    earlier run's checkpoints, and files a method keeps there, would otherwise mix with the new
    run's), else refuse."""
    if not overwrite:
        raise FileExistsError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, choose another "
                              "--out, or pass --overwrite to delete it")
    shutil.rmtree(run_dir)


def _split(batch: dict, parts: int) -> list[dict]:
    """`batch` as `parts` micro-batches along dim 0 (tensors split, other values shared)."""
    if parts == 1:
        return [batch]
    chunks = {k: v.chunk(parts) if isinstance(v, torch.Tensor) else [v] * parts for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(parts)]


def _train_only(method, optimizer: torch.optim.Optimizer) -> None:
    """Only the parameters `optimizer` updates require gradients (the rest are constants in this
    part's loss, so e.g. G's loss through D builds no gradients of D's weights)."""
    own = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for net in method.nets.values():
        for p in net.parameters():
            p.requires_grad_(id(p) in own)


# --- the loop --------------------------------------------------------------------------------


def run(method_cls, cfg: dict, *, resume: bool = False) -> dict | None:
    """Train `method_cls` with the resolved options `cfg` (config.resolve) in cfg['out'] and return
    the report (None in processes other than the main one). resume=True continues the run from
    the latest checkpoint in cfg['out']. Global settings the run changes (determinism, the number
    of CPU threads) are restored when it returns."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    try:
        trainer = _Trainer(method_cls, cfg, resume)
        try:
            return trainer.train(resume)
        finally:
            trainer.close()
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_num_threads(threads)


class _Trainer:
    """The state of one run, and the loop over its stages and steps."""

    def __init__(self, method_cls, cfg: dict, resume: bool) -> None:
        self.cfg = cfg
        self.context, device = distributed.init(cfg["device"])
        per_process_batch, remainder = divmod(cfg["batch_size"], self.context.world_size)
        if remainder or per_process_batch % cfg["accumulation"]:
            raise ConfigError(f"option 'batch_size' ({cfg['batch_size']}) must split evenly over "
                             f"{self.context.world_size} process(es), then into {cfg['accumulation']} micro-batches")
        self.run_dir = Path(cfg["out"])
        main = self.context.is_main
        if main:
            if not resume and checkpoint.latest(self.run_dir) is not None:
                _clear_previous_run(self.run_dir, cfg["overwrite"])
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = _Log(self.run_dir if main else None)
        self.writer = None
        if main and cfg["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

        # Every process builds the same networks from the same seed; the training RNG streams then
        # differ per process (dropout, pools), as separate data shards would.
        seed_everything(cfg["seed"], cfg["deterministic"])
        self.method = method_cls(cfg, device)
        self.method.build()
        if main:  # after build(), which may settle options (e.g. a teacher's architecture)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        for net in self.method.nets.values():
            net.to(device)
        distributed.broadcast_parameters(list(self.method.nets.values()))
        seed_everything(cfg["seed"] + self.context.rank, cfg["deterministic"])

        self.dataset = build_dataset(cfg, self.method.data_kind, "train")
        count = min(cfg["num_samples"], len(self.dataset))
        self.sample_batch = default_collate([self.dataset[i] for i in range(count)])  # the same in every grid
        self.loader = build_loader(self.dataset, cfg["batch_size"], shuffle=True, seed=cfg["seed"],
                                   num_workers=cfg["num_workers"], drop_last=True,
                                   distributed=self.context.distributed)
        self.global_step = 0
        self.history: dict[str, list] = {}  # name -> [(global step, mean since the previous log line)]
        self.sparsity_history: dict[str, list] = {}  # mask name -> [(global step, sparsity)]
        # name -> [sum, steps] of each scalar to log since the last log line (a part that does not
        # update every step, e.g. a G with n_critic, logs its terms on its own steps only)
        self.running: dict[str, list] = {}
        self.ema = None

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        self.log.close()
        distributed.shutdown()

    # --- the loop ----------------------------------------------------------------------------

    def train(self, resume: bool) -> dict | None:
        cfg, method = self.cfg, self.method
        saved = self._load_latest() if resume else None
        if saved is None:
            self.log(f"{cfg['method']} run in {self.run_dir}: {self.context.world_size} process(es) on "
                     f"{method.device}, data {cfg['dataroot'] or 'synthetic ' + method.data_kind}, "
                     f"{len(self.dataset)} items")
        batches = iter(self.loader)  # endless: the run's batches from global_step on
        for stage_index, stage in enumerate(method.stages()):
            if saved is not None and stage_index < saved[1]["stage"]:
                continue
            method.begin_stage(stage)
            # The EMA restarts with each stage: a stage may change the student's structure.
            self.ema = (AveragedModel(method.student(), multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]),
                                      use_buffers=True) if cfg["ema"] > 0 else None)
            optimizers = method.optimizers()
            # Each LR schedule runs over its own part's updates (a method may skip a part on some steps).
            updates = {part: sum(method.updates(part, step) for step in range(stage.steps)) for part in optimizers}
            schedulers = {part: make_scheduler(opt, cfg, max(1, updates[part])) for part, opt in optimizers.items()}
            first_step = 0
            if saved is not None:  # the stage the checkpoint was written in
                self._restore(saved, optimizers, schedulers)
                first_step = saved[1]["stage_step"]
                finished, saved = saved[1]["stage_finished"], None
                if finished:
                    continue
            self._train_stage(stage_index, stage, first_step, optimizers, schedulers, batches)

        if not self.context.is_main:
            return None
        if self.ema is not None:  # the averaged weights are the result (BigGAN and StyleGAN evaluate theirs)
            method.student().load_state_dict(self.ema.module.state_dict())
        self._write_samples()
        if cfg["export"]:
            _export(method, self.run_dir, self.log)
        report = evaluate(method, cfg, self.log)
        method.extend_report(report, self.run_dir)
        report.update(method=cfg["method"], preset=cfg["preset"], steps=self.global_step, run_dir=str(self.run_dir))
        write_report(self.run_dir, report, self.history, self.sparsity_history)
        self.log(f"report: {self.run_dir / 'report.md'}")
        return report

    def _train_stage(self, stage_index: int, stage, first_step: int, optimizers: dict, schedulers: dict,
                     batches) -> None:
        cfg, method = self.cfg, self.method
        bar = tqdm(total=stage.steps, initial=first_step, desc=f"{cfg['method']}/{stage.name}",
                   disable=not self.context.is_main, dynamic_ncols=True)
        self._timer = (time.perf_counter(), first_step)
        stage_step = first_step  # steps of this stage done
        for step in range(first_step, stage.steps):
            batch = next(batches)
            for part, optimizer in optimizers.items():
                if not method.updates(part, step):
                    continue
                _train_only(method, optimizer)
                optimizer.zero_grad(set_to_none=True)
                logged = {}
                for micro_batch in _split(batch, cfg["accumulation"]):
                    loss, logs = method.loss(part, micro_batch, step)
                    (loss / cfg["accumulation"]).backward()
                    for name, value in logs.items():
                        logged[name] = logged.get(name, 0.0) + value / cfg["accumulation"]
                for name, value in logged.items():
                    total, steps = self.running.get(name, (0.0, 0))
                    self.running[name] = [total + value, steps + 1]
                distributed.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
                optimizer.step()
                schedulers[part].step()
            method.after_step(step)
            if self.ema is not None:
                self.ema.update_parameters(method.student())
            self.global_step += 1
            stage_step = step + 1
            bar.update(1)

            done = stage_step == stage.steps or method.stage_done(step)
            if self.global_step % cfg["log_every"] == 0 or done:
                self._log_step(stage, stage_step, schedulers, bar)
            if self.context.is_main and self.global_step % cfg["sample_every"] == 0:
                self._write_samples()
            if done:
                break
            if self.global_step % cfg["checkpoint_every"] == 0:
                self._save(stage_index, stage_step, False, optimizers, schedulers)
        bar.close()
        self._save(stage_index, stage_step, True, optimizers, schedulers)
        self.log(f"stage {stage.name} done at step {self.global_step}")

    def _log_step(self, stage, stage_step: int, schedulers: dict, bar: tqdm) -> None:
        """History, log.txt, TensorBoard and the progress bar: the means since the last log line."""
        means = distributed.mean_over_processes({name: total / steps for name, (total, steps) in self.running.items()})
        means.update({f"lr_{part}": scheduler.get_last_lr()[0] for part, scheduler in schedulers.items()})
        self.running = {}
        sparsity = self.method.sparsity()
        for name, value in means.items():
            self.history.setdefault(name, []).append((self.global_step, value))
        for name, value in sparsity.items():
            self.sparsity_history.setdefault(name, []).append((self.global_step, value))
        if not self.context.is_main:
            return
        seconds, steps_then = self._timer
        images_per_second = self.cfg["batch_size"] * (stage_step - steps_then) / (time.perf_counter() - seconds)
        self._timer = (time.perf_counter(), stage_step)
        mean_sparsity = sparsity.get("overall", float(np.mean(list(sparsity.values()))) if sparsity else 0.0)
        losses = {name: value for name, value in means.items() if not name.startswith("lr_")}
        bar.set_postfix({"img/s": f"{images_per_second:.1f}", **{k: f"{v:.3g}" for k, v in losses.items()},
                         "sparsity": f"{mean_sparsity:.3f}"})
        self.log(f"step {self.global_step} ({stage.name} {stage_step}/{stage.steps}) "
                 + " ".join(f"{name}={value:.6g}" for name, value in means.items())
                 + f" sparsity={mean_sparsity:.4f} img/s={images_per_second:.1f}", console=False)
        if self.writer:
            for name, value in {**means, **{f"sparsity/{k}": v for k, v in sparsity.items()}}.items():
                self.writer.add_scalar(name, value, self.global_step)

    # --- checkpoints ---------------------------------------------------------------------------

    def _save(self, stage_index: int, stage_step: int, finished: bool, optimizers: dict, schedulers: dict) -> None:
        rng = _gather_rng_states(self.context)  # a collective: every process takes part
        if not self.context.is_main:
            return
        tensors = dict(self.method.state_dict())
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        state = dict(stage=stage_index, stage_step=stage_step, stage_finished=finished, global_step=self.global_step,
                     optimizers={part: opt.state_dict() for part, opt in optimizers.items()},
                     schedulers={part: scheduler.state_dict() for part, scheduler in schedulers.items()},
                     rng=rng, loader=loader_state(self.loader, self.global_step), method=self.method.extra_state(),
                     running=self.running, history=self.history, sparsity_history=self.sparsity_history)
        path = checkpoint.save(self.run_dir, self.global_step, tensors, state, keep=self.cfg["keep_checkpoints"])
        self.log(f"checkpoint {path}", console=False)

    def _load_latest(self) -> tuple[dict, dict]:
        found = checkpoint.latest(self.run_dir)
        if found is None:
            raise checkpoint.CheckpointError(f"cannot resume: {self.run_dir / 'checkpoints'} holds no checkpoint")
        tensors, state = checkpoint.load(found)
        self.global_step = state["global_step"]
        self.history, self.sparsity_history = state["history"], state["sparsity_history"]
        self.running = state["running"]
        resume_loader(self.loader, state["loader"])
        self.log(f"resuming {self.run_dir} from {found.name}: stage {state['stage']}, step {state['stage_step']}")
        return tensors, state

    def _restore(self, saved: tuple[dict, dict], optimizers: dict, schedulers: dict) -> None:
        """The checkpoint's weights, EMA, method state, optimizer and scheduler states, and this
        process's RNG states (last, so nothing after them draws from the RNG before training)."""
        tensors, state = saved
        self.method.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("ema.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.method.load_extra_state(state["method"])
        for part, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][part])
            schedulers[part].load_state_dict(state["schedulers"][part])
        rng = state["rng"]
        _set_rng_state(rng[self.context.rank] if self.context.rank < len(rng) else rng[0])

    def _write_samples(self) -> None:
        images, columns = _sample_grid(self.method, self.sample_batch)
        path = self.run_dir / "samples" / f"step_{self.global_step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        save_image_grid(images, path, nrow=columns)
        if self.writer:
            rows = len(images) // columns
            grid = images.view(rows, columns, *images.shape[1:]).permute(2, 0, 3, 1, 4)  # [C, rows, H, columns, W]
            self.writer.add_image("samples", grid.flatten(3, 4).flatten(1, 2) * 0.5 + 0.5, self.global_step)


def _gather_rng_states(context: distributed.Context) -> list[dict]:
    """Every process's RNG state, in rank order (a resumed job restores each process's own)."""
    state = _rng_state()
    if not context.distributed:
        return [state]
    gathered = [None] * context.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


# --- samples, export and evaluation ----------------------------------------------------------


@contextlib.contextmanager
def _side_effect_free(method):
    """Run the method's networks without moving the training's RNG streams (dropout, noise inputs)
    or the networks' buffers (a batch norm in training mode updates its running statistics), so a
    run that samples or evaluates at other steps, or resumes, trains the same."""
    devices = [method.device] if method.device.type == "cuda" else []
    buffers = [(buffer, buffer.clone()) for net in method.nets.values() for buffer in net.buffers()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


@torch.no_grad()
def _sample_grid(method, batch: dict) -> tuple[torch.Tensor, int]:
    """(images [N * columns, C, H, W] in [-1, 1], columns): per sample, its input as an image (if
    any), the student's output, the teacher's (if any) on the same input and draws, and the
    ground truth (if any)."""
    # Its own draws (e.g. latents) are the same at every step, so the grids show the progress.
    with _side_effect_free(method):
        torch.manual_seed(0)
        batch = method.prepare(batch)
        shown_input, target_key = method.input_image(batch), method.target_key()
        columns = [] if shown_input is None else [shown_input]
        columns.append(method.generate(batch))
        teacher = method.teacher()
        if teacher is not None:
            columns.append(method.generate(batch, teacher))
        if target_key is not None:
            columns.append(batch[target_key])
    columns = [c.detach().float().cpu().clamp(-1, 1) for c in columns]
    return torch.stack(columns, 1).flatten(0, 1), len(columns)


def _export(method, run_dir: Path, log: _Log) -> Path:
    """method.final_model() as a compact plain-PyTorch model (gansparse.export.compact, unless the
    method already returns a compact torch.fx GraphModule), saved in export/generator.safetensors."""
    model = copy.deepcopy(method.final_model()).cpu().eval()
    inputs = tuple(x.cpu() for x in method.example_inputs(1))
    if isinstance(model, torch.fx.GraphModule):
        compact, note = model, ""
    else:
        compact = export.compact(model, *inputs)
        note = f" (max difference to the trained model {export.check_equivalence(model, compact, *inputs):.2g})"
    path = run_dir / "export" / "generator.safetensors"
    path.parent.mkdir(exist_ok=True)
    export.save(compact, path)
    log(f"exported the final model to {path}{note}")
    return path


def evaluate(method, cfg: dict, log: _Log) -> dict:
    """The report's measurements. 'student' (the final model) and 'teacher' (None when the method
    has none): params, MACs and CPU latency at batch 1 and the preset's resolution (the shapes in
    'input_shapes'), with latency_threads threads (gansparse.metrics.model_cost). With cfg['eval'], quality on the first
    eval_size items of the test split (gansparse.metrics.evaluate_generator) in 'metrics' for the
    student and teacher['metrics'] for the teacher: PSNR and SSIM against the ground truth
    (method.target_key(), e.g. paired data's), L1 / PSNR / SSIM / LPIPS of the student against
    the teacher's outputs, FID / IS / KID against the real target images. Measures whose weights
    are missing are left out, with one warning naming the file."""
    teacher = method.teacher()
    inputs = tuple(x.cpu() for x in method.example_inputs(1))
    threads = cfg["latency_threads"]
    report = {"student": metrics.model_cost(copy.deepcopy(method.final_model()).cpu(), *inputs, threads=threads),
              "teacher": None if teacher is None else metrics.model_cost(copy.deepcopy(teacher).cpu(), *inputs,
                                                                         threads=threads),
              "metrics": {}, "input_shapes": [list(x.shape) for x in inputs]}
    if cfg["eval"]:
        dataset = build_dataset(cfg, method.data_kind, "test")
        count = min(cfg["eval_size"], len(dataset))
        batches = [default_collate([dataset[i] for i in range(start, min(start + cfg["batch_size"], count))])
                   for start in range(0, count, cfg["batch_size"])]
        options = dict(target_key=method.target_key(),
                       real_key="B" if "B" in batches[0] else "image", lpips=cfg["eval_lpips"],
                       fidelity=cfg["eval_fidelity"])
        run_teacher = (lambda batch: method.generate(batch, teacher)) if teacher is not None else None
        with _side_effect_free(method):
            torch.manual_seed(cfg["seed"])
            batches = [method.prepare(batch) for batch in batches]  # student and teacher get the same draws
            report["metrics"] = metrics.evaluate_generator(method.generate, batches, teacher=run_teacher, **options)
            if run_teacher is not None:
                report["teacher"]["metrics"] = metrics.evaluate_generator(run_teacher, batches, **options)
    for who, entry, quality in (("teacher", report["teacher"], (report["teacher"] or {}).get("metrics", {})),
                                ("student", report["student"], report["metrics"])):
        if entry is not None:
            log(f"{who}: " + ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if isinstance(v, (int, float)))
                + "".join(f", {k}={v:.4g}" for k, v in quality.items()))
    return report
