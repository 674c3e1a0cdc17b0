"""The granularity study of Self-Supervised GAN Compression (Sec. 6 and appendix A.8 of
../shared/papers/self-supervised-gan-compression.txt): one trained teacher pruned with `--method
selfsup` at each granularity (the paper's element, 0D, and filter, 3D) to each final sparsity (25,
50, 75 and 90%), and the quality and CPU latency of the results in one table.

    python -m train.study --teacher DIR [--preset NAME] [--sparsities 0.25,0.5,0.75,0.9]
                          [--granularities element,filter] [--out runs/study] [--key value ...]

Every other `--key value` is an option of each selfsup run, resolved as train.run resolves it (the
loop's defaults < selfsup's < the preset < the command line). Each run writes into its own
directory of --out, <granularity>_<percent> (element_25, filter_90...), all from the same teacher
with the same seed. Running the study again keeps the finished runs (report.json present),
resumes an unfinished one from its latest checkpoint, and refuses a directory whose run had other
options (unless --overwrite, which the runs take as usual: each is started afresh).

Then, for every run and for the teacher:
- measured sparsity: the fraction of the generator's conv weights that are exactly 0;
- quality: the run's own evaluation (its report.json: L1, PSNR, SSIM and, when their weights are
  in the cache, LPIPS against the teacher's outputs on the test split; FID, KID and IS against the
  real images); the teacher row compares the teacher's test outputs with themselves through the
  same measures (PSNR inf, SSIM 1), its other measures are its own evaluation in the runs;
- CPU latency at batch 1 and the runs' resolution, with latency_threads threads: the teacher, the
  pruned generator run dense (masked dense convs), the pruned generator after gansparse.sparsify
  (per layer the sparse kernel where it measured faster than dense) and, for filter pruning,
  gansparse.export.compact of the pruned generator (the channels of whole pruned filters removed
  where that is exact). All of them are timed side by side in one process, in alternating rounds
  (the median of the rounds): times taken minutes apart on a shared machine do not compare.

Results in --out: study.md (the table), study.json (the same numbers) and study.png (quality and
latency against the target sparsity, one line per granularity).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate
from tqdm import tqdm

from gansparse import export, metrics
from gansparse.profile import profile

from . import checkpoint
from .config import LOOP_DEFAULTS, ConfigError, load_yaml, option_types, resolve
from .data import build_dataset
from .methods import get_method
from .report import QUALITY_KEYS, _json_safe
from .run import _overrides

__all__ = ["DEFAULT_GRANULARITIES", "DEFAULT_SPARSITIES", "GRANULARITIES", "main", "parse_granularities",
           "parse_sparsities", "study", "zero_fraction"]

#: the granularities a study sweeps: those of selfsup whose sparsity is free (N:M fixes it to 1 - N/M)
GRANULARITIES = ("element", "kernel", "filter")
DEFAULT_GRANULARITIES = ("element", "filter")
DEFAULT_SPARSITIES = (0.25, 0.5, 0.75, 0.9)
#: selfsup options the study sets itself, and the study option to use instead
_STUDY_OPTIONS = {"teacher": "--teacher", "sparsity": "--sparsities", "granularity": "--granularities",
                  "out": "--out", "eval": "nothing: the study reads each run's evaluation"}
_LATENCY_ROUNDS = 5
_LATENCY_FORMS = ("dense", "sparse", "compact")


@dataclass
class _Run:
    name: str  # its directory in --out
    granularity: str
    sparsity: float
    cfg: dict  # resolved options


# --- options ---------------------------------------------------------------------------------


def parse_sparsities(text: str) -> list[float]:
    """'0.25,0.5' -> [0.25, 0.5], sorted; ConfigError unless each is a distinct fraction in [0, 1)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = None
    if not values or any(not 0 <= value < 1 for value in values) or len(set(values)) != len(values):
        raise ConfigError(f"--sparsities must be distinct fractions in [0, 1), comma-separated (e.g. 0.25,0.5), "
                          f"got {text!r}")
    return sorted(values)


def parse_granularities(text: str) -> list[str]:
    """'element,filter' -> ['element', 'filter']; ConfigError naming the valid ones otherwise."""
    names = text.split(",")
    unknown = [name for name in names if name not in GRANULARITIES]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"--granularities must be distinct names of {', '.join(GRANULARITIES)} (an N:M pattern "
                          f"has the one sparsity 1 - N/M, nothing to sweep), comma-separated; got {text!r}")
    return names


def _plan(method_cls, teacher: str, preset: str | None, sparsities, granularities, out: Path,
          options: dict) -> list[_Run]:
    """The runs of the study, each with its options resolved."""
    for key, instead in _STUDY_OPTIONS.items():
        if key in options:
            raise ConfigError(f"option --{key} is set by the study for each run; use {instead}")
    runs = []
    for granularity in granularities:
        for sparsity in sparsities:
            name = f"{granularity}_{sparsity * 100:g}"
            study_options = dict(teacher=teacher, sparsity=sparsity, granularity=granularity, out=str(out / name),
                                 eval=True)
            runs.append(_Run(name, granularity, sparsity, resolve(method_cls, preset, None,
                                                                  {**options, **study_options})))
    return runs


# --- the runs --------------------------------------------------------------------------------


def _built(method_cls, cfg: dict):
    """A method of the run `cfg` with its networks built on the CPU (which loads the teacher)."""
    method = method_cls(dict(cfg), torch.device("cpu"))
    method.build()
    return method


def _check_earlier_run(run: _Run, settled: dict) -> None:
    """FileExistsError when the run's directory holds a run with other values of the options than
    `run`'s (and no --overwrite). `settled`: the options building the method fixes (the teacher's
    architecture), which a run's config.yaml holds."""
    run_dir = Path(run.cfg["out"])
    if run.cfg["overwrite"] or not (run_dir / "config.yaml").exists():
        return
    saved, expected = load_yaml(run_dir / "config.yaml"), {**run.cfg, **settled}
    # An option the saved config lacks was added to the code after that run: it ran at its default.
    differ = [key for key in expected
              if key in saved and key not in ("out", "overwrite") and saved[key] != expected[key]]
    if differ:
        raise FileExistsError(f"{run_dir} holds a run with other options ("
                              + ", ".join(f"{key}: {saved[key]!r} there, {expected[key]!r} now" for key in differ)
                              + "): rerun the study with its options, choose another --out, or pass --overwrite")


def _train(method_cls, run: _Run) -> None:
    """Runs `run`, resumes it from its latest checkpoint, or keeps it when it has finished."""
    from .loop import run as train  # imports tensorboard and the data pipeline: only when training

    run_dir, overwrite = Path(run.cfg["out"]), run.cfg["overwrite"]
    if (run_dir / "report.json").exists() and not overwrite:
        return
    train(method_cls, dict(run.cfg), resume=not overwrite and checkpoint.latest(run_dir) is not None)


def _trained(method_cls, cfg: dict):
    """The run's method rebuilt with the final weights of its latest checkpoint."""
    method = _built(method_cls, cfg)
    tensors, _ = checkpoint.load(checkpoint.latest(cfg["out"]))
    method.load_state_dict({key: value for key, value in tensors.items() if not key.startswith("ema.")})
    if cfg["ema"] > 0:  # the averaged weights are the run's result, as the loop makes them
        prefix = "ema.module."
        method.student().load_state_dict({key[len(prefix):]: value for key, value in tensors.items()
                                          if key.startswith(prefix)})
    return method


# --- measurements ----------------------------------------------------------------------------


def zero_fraction(model: nn.Module) -> float:
    """The fraction of the conv and deconv weights of `model` that are exactly 0."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _report_quality(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(the student's quality measures, the teacher's own) from the run's report.json."""
    report = json.loads((run_dir / "report.json").read_text())
    as_floats = lambda measures: {key: float(value) for key, value in measures.items()}  # noqa: E731 ('inf')
    return as_floats(report["metrics"]), as_floats(report["teacher"].get("metrics", {}))


@torch.inference_mode()
def _teacher_against_itself(method, cfg: dict) -> dict[str, float]:
    """The teacher's outputs on the test split (the items a run evaluates on) compared with
    themselves by the measures the runs' evaluation uses."""
    dataset = build_dataset(cfg, method.data_kind, "test")
    batch = default_collate([dataset[i] for i in range(min(cfg["eval_size"], len(dataset)))])
    with torch.random.fork_rng():
        torch.manual_seed(cfg["seed"])
        outputs = method.generate(method.prepare(batch), method.teacher())
    same = lambda _: outputs  # noqa: E731
    return metrics.evaluate_generator(same, [batch], teacher=same, lpips=cfg["eval_lpips"], fidelity=False)


def _side_by_side(models: dict[tuple[str, str], nn.Module], inputs: tuple, threads: int) -> dict:
    """Median CPU latency (ms) of each model, measured in alternating rounds."""
    times = {key: [] for key in models}
    for _ in range(_LATENCY_ROUNDS):
        for key, model in models.items():
            times[key].append(metrics.cpu_latency_ms(model, *inputs, threads=threads, warmup=1, repeats=5))
    return {key: statistics.median(measured) for key, measured in times.items()}


def _rows(method_cls, runs: list[_Run], reference) -> tuple[list[dict], dict]:
    """The table's rows (the teacher first) and the measurement's conditions."""
    cfg = reference.cfg
    inputs = tuple(x.cpu() for x in reference.example_inputs(1))
    teacher = reference.teacher()
    teacher_macs = profile(copy.deepcopy(teacher).eval(), *inputs)["macs"]
    models = {("teacher", "dense"): teacher}
    rows = []
    for run in tqdm(runs, desc="study: measuring", unit="run"):
        method = _trained(method_cls, run.cfg)
        student = method.student().eval()
        models[run.name, "dense"] = student
        models[run.name, "sparse"] = method.final_model()
        row = dict(name=run.name, granularity=run.granularity, target_sparsity=run.sparsity,
                   measured_sparsity=zero_fraction(student), run_dir=run.cfg["out"])
        if run.granularity == "filter":
            models[run.name, "compact"] = compact = export.compact(copy.deepcopy(student), *inputs)
            row["compact_macs_fraction"] = profile(compact, *inputs)["macs"] / teacher_macs
        row["quality"], teacher_quality = _report_quality(Path(run.cfg["out"]))
        rows.append(row)
    teacher_quality.update(_teacher_against_itself(reference, cfg))
    rows.insert(0, dict(name="teacher", granularity="dense", target_sparsity=0.0,
                        measured_sparsity=zero_fraction(teacher), quality=teacher_quality, run_dir=cfg["teacher"]))

    load_before = os.getloadavg()[0]
    latency = _side_by_side(models, inputs, cfg["latency_threads"])
    conditions = dict(input_shapes=[list(x.shape) for x in inputs], latency_threads=cfg["latency_threads"],
                      latency_rounds=_LATENCY_ROUNDS, load_average=[load_before, os.getloadavg()[0]])
    teacher_ms = latency["teacher", "dense"]
    for row in rows:
        row["latency_ms"] = {form: latency[row["name"], form] for form in _LATENCY_FORMS
                             if (row["name"], form) in latency}
        row["speedup"] = {form: teacher_ms / ms for form, ms in row["latency_ms"].items()}
    return rows, conditions


# --- results ---------------------------------------------------------------------------------


def _quality_names(rows: list[dict]) -> list[str]:
    present = {name for row in rows for name in row["quality"]}
    return [name for name in QUALITY_KEYS if name in present]


def _markdown(rows: list[dict], conditions: dict) -> str:
    names = _quality_names(rows)
    number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    header = ["run", "granularity", "target sparsity", "measured sparsity", *names,
              *(f"{form} (ms)" for form in _LATENCY_FORMS), *(f"speed-up {form}" for form in _LATENCY_FORMS),
              "compact MACs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"], row["granularity"], f"{row['target_sparsity']:.0%}", f"{row['measured_sparsity']:.1%}",
                 *(number(row["quality"].get(name), ".4g") for name in names),
                 *(number(row["latency_ms"].get(form), ".2f") for form in _LATENCY_FORMS),
                 *(number(row["speedup"].get(form), ".2f") + ("x" if form in row["speedup"] else "")
                   for form in _LATENCY_FORMS),
                 number(row.get("compact_macs_fraction"), ".1%")]
        lines.append("| " + " | ".join(cells) + " |")
    threads, load = conditions["latency_threads"], conditions["load_average"]
    shape = " and ".join("x".join(map(str, s)) for s in conditions["input_shapes"])
    lines += [
        "",
        "Measured sparsity: the fraction of the generator's conv weights that are exactly 0. Quality: each run's "
        "evaluation on the test split (report.json); `_vs_teacher` measures compare with the teacher's outputs, "
        "so the teacher row compares the teacher with itself.",
        "",
        f"CPU latency: batch 1 ({shape}), {threads} thread{'s' * (threads > 1)}, every model timed side by side in "
        f"{conditions['latency_rounds']} alternating rounds (median); load average {load[0]:.2f} before, "
        f"{load[1]:.2f} after. dense: the pruned generator with masked dense convs (the teacher's own convs in its "
        "row); sparse: after gansparse.sparsify (each layer runs the sparse kernel where it measured faster than "
        "dense); compact (filter pruning): gansparse.export.compact, which removes the channel of a whole pruned "
        "filter wherever every layer reading it can drop it (channels of a residual stream stay unless pruned in "
        "every block adding into it, and the output layer keeps its channels), its MACs as a fraction of the "
        "teacher's in the last column. Speed-up: the teacher's latency divided by the row's.",
    ]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    teacher, runs = rows[0], rows[1:]
    figure, (quality, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for granularity in dict.fromkeys(row["granularity"] for row in runs):
        mine = [row for row in runs if row["granularity"] == granularity]
        percent = [100 * row["target_sparsity"] for row in mine]
        quality.plot(percent, [row["quality"]["psnr_vs_teacher"] for row in mine], "o-", label=granularity)
        line, = latency.plot(percent, [row["latency_ms"]["sparse"] for row in mine], "o-",
                             label=f"{granularity}: sparse kernel")
        for form, style in (("dense", ":"), ("compact", "s--")):
            if form in mine[0]["latency_ms"]:
                latency.plot(percent, [row["latency_ms"][form] for row in mine], style, color=line.get_color(),
                             label=f"{granularity}: {form}")
    latency.axhline(teacher["latency_ms"]["dense"], color="black", linewidth=1, label="teacher (dense)")
    quality.set_ylabel("PSNR against the teacher (dB)")
    latency.set_ylabel("CPU latency, batch 1 (ms)")
    latency.set_ylim(bottom=0)  # heights compare as ratios
    for axis in (quality, latency):
        axis.set_xlabel("target sparsity (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def study(teacher: str, preset: str | None = None, sparsities=DEFAULT_SPARSITIES,
          granularities=DEFAULT_GRANULARITIES, out: str | Path = "runs/study", options: dict | None = None) -> dict:
    """Runs (or resumes) the study's selfsup runs, measures them and writes study.md, study.json and
    study.png into `out`; returns study.json's content. `options`: other selfsup options
    (command-line strings or values), for every run."""
    method_cls = get_method("selfsup")
    out = Path(out)
    runs = _plan(method_cls, teacher, preset, sparsities, granularities, out, options or {})
    reference = _built(method_cls, runs[0].cfg)  # loads the teacher: a bad one fails before any run starts
    settled = {key: value for key, value in reference.cfg.items() if runs[0].cfg[key] != value}
    for run in runs:
        _check_earlier_run(run, settled)
    for run in tqdm(runs, desc="study", unit="run"):
        _train(method_cls, run)
    rows, conditions = _rows(method_cls, runs, reference)
    result = dict(teacher=teacher, preset=preset, rows=rows, **conditions)
    (out / "study.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    (out / "study.md").write_text(_markdown(rows, conditions))
    _plot(rows, out / "study.png")
    tqdm.write((out / "study.md").read_text())
    return result


# --- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.study", allow_abbrev=False,
        description="The granularity study of Self-Supervised GAN Compression: prune one teacher with selfsup at "
                    "each granularity to each sparsity, and tabulate quality against the teacher and CPU latency "
                    "(study.md, study.json, study.png in --out). A rerun keeps finished runs and resumes an "
                    "unfinished one.",
        epilog="Every other --key value (or --key=value) is an option of each selfsup run, e.g. --steps 40; see "
               "`python -m train.run --help --method selfsup`. The study sets teacher, sparsity, granularity, out "
               "and eval itself.")
    parser.add_argument("--teacher", default="", help="the teacher: a `--method dense` run directory (or one of its "
                                                      "checkpoints) or a directory of the reference's checkpoints")
    parser.add_argument("--preset", help="a preset of selfsup (e.g. smoke); default: none")
    parser.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)),
                        help="final sparsities, fractions in [0, 1) (default: %(default)s)")
    parser.add_argument("--granularities", default=",".join(DEFAULT_GRANULARITIES),
                        help=f"pruning granularities, of {', '.join(GRANULARITIES)} (default: %(default)s)")
    parser.add_argument("--out", default="runs/study", help="the study's directory (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = _parser().parse_known_args(argv)
    try:
        method_cls = get_method("selfsup")
        options = _overrides(rest, option_types({**LOOP_DEFAULTS, **method_cls.defaults}))
        sparsities, granularities = parse_sparsities(args.sparsities), parse_granularities(args.granularities)
        study(args.teacher, args.preset, sparsities, granularities, args.out, options)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (checkpoint.CheckpointError, FileExistsError, FileNotFoundError) as error:  # e.g. a missing teacher
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
