"""What a run leaves for people to read: report.json, report.md with its plots, sample grids, and
the comparison table of the embedded default.

report (the dict given to write_report):
    method: str; steps: int
    student: {'params': int, 'macs': int, 'cpu_latency_ms': float, 'metrics': {name: float}, ...}
    teacher: the same for the teacher, or None (e.g. a dense run)
    metrics: {name: float}, the student's quality (what gansparse.metrics.evaluate_generator gives)
    anything else JSON-able (config, dataset, export path...) is written too.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["write_report", "comparison_table", "save_image_grid", "QUALITY_KEYS"]

#: quality measures in the order the tables show them; those against the teacher first
QUALITY_KEYS = ("l1_vs_teacher", "psnr_vs_teacher", "ssim_vs_teacher", "lpips_vs_teacher",
                "psnr", "ssim", "lpips", "fid", "kid", "is")
_COST_KEYS = ("params", "macs", "cpu_latency_ms")


# --- report.json and report.md --------------------------------------------------------------


def write_report(run_dir, report: dict, history: dict[str, list[tuple[int, float]]],
                 sparsity_history: dict[str, list[tuple[int, float]]]) -> None:
    """Write run_dir/report.json, run_dir/report.md and the plots it links (run_dir/plots/
    losses.png: each logged loss over the steps; plots/sparsity.png: each layer's mask sparsity).

    history: loss name -> [(step, value)]; sparsity_history: layer name -> [(step, sparsity in [0, 1])];
    either may be empty. Non-finite numbers are written as the strings 'inf', '-inf' and 'nan'.
    """
    _check_report(report)
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / "report.json", json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    figures = []
    if any(history.values()):
        _plot_losses(history, plots / "losses.png")
        figures.append(("Losses", "plots/losses.png"))
    if any(sparsity_history.values()):
        _plot_sparsity(sparsity_history, plots / "sparsity.png")
        figures.append(("Mask sparsity per layer", "plots/sparsity.png"))
    _write_text(run_dir / "report.md", _markdown(report, figures, sparsity_history))


def _check_report(report: dict) -> None:
    if not isinstance(report, dict):
        raise TypeError(f"write_report: report must be a dict, got {type(report).__name__}")
    missing = [key for key in ("method", "student", "steps") if key not in report]
    if missing:
        raise ValueError(f"write_report: report lacks {', '.join(missing)} (needs method, student, teacher, "
                         "metrics, steps)")
    for role in ("student", "teacher"):
        entry = report.get(role)
        if entry is None and role == "teacher":
            continue
        if not isinstance(entry, dict) or any(key not in entry for key in _COST_KEYS):
            raise ValueError(f"write_report: report[{role!r}] must be a dict with {', '.join(_COST_KEYS)}"
                             + (" (or None)" if role == "teacher" else "") + f", got {entry!r}")


def _json_safe(value):
    """Plain JSON values: tensors and numpy scalars to numbers, paths to strings, tuples to lists."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'inf', '-inf', 'nan': JSON has no such numbers
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"write_report: cannot write a {type(value).__name__} to report.json")


def _write_text(path: Path, text: str) -> None:
    """Replace path atomically, so a reader never sees half a report."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    os.replace(temp, path)


def _human(value) -> str:
    """A count with an SI prefix: 11.38M, 56.80G."""
    if value is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:g}"


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _quality_names(metric_dicts: list[dict]) -> list[str]:
    """The measures present in any of the dicts: QUALITY_KEYS first, in order, then the others."""
    present = {name for metrics in metric_dicts for name in metrics}
    return [name for name in QUALITY_KEYS if name in present] + sorted(present - set(QUALITY_KEYS))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown(report: dict, figures: list[tuple[str, str]], sparsity_history: dict[str, list]) -> str:
    student, teacher = report["student"], report.get("teacher")
    lines = [f"# {report['method']}: run report", "", f"Steps: {report['steps']}", ""]

    lines += ["## Size and speed", "",
              "CPU latency: median of forward passes at batch 1, 2 threads, at the training resolution.", ""]
    models = [("teacher", teacher), ("student", student)] if teacher is not None else [("student", student)]
    # A method may add the CPU time of a larger batch, as 'cpu_s_per_batch_<N>' (e.g. PPCD-GAN's 64).
    keys = list(_COST_KEYS) + sorted(key for key in student if key.startswith("cpu_s_per_batch_"))
    rows = [[name, _human(entry["params"]), _human(entry["macs"])] + [_number(entry.get(key)) for key in keys[2:]]
            for name, entry in models]
    if teacher is not None:
        rows.append(["teacher / student"] + [_ratio(teacher.get(key), student[key]) for key in keys])
    batches = [f"CPU s / batch of {key.rpartition('_')[2]}" for key in keys[3:]]
    lines += _table(["model", "params", "MACs", "CPU latency (ms)", *batches], rows) + [""]

    quality = {"student": report.get("metrics") or student.get("metrics") or {}}
    if teacher is not None and teacher.get("metrics"):
        quality = {"teacher": teacher["metrics"], **quality}
    names = _quality_names(list(quality.values()))
    lines += ["## Quality", ""]
    if names:
        lines += _table(["measure", *quality], [[name, *(_number(m.get(name)) for m in quality.values())]
                                                for name in names])
    else:
        lines.append("No quality measure was computed.")
    lines.append("")

    lines += ["## Training", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path})", ""]
    if not figures:
        lines += ["No losses were logged.", ""]
    final_sparsity = {layer: series[-1] for layer, series in sparsity_history.items() if series}
    if final_sparsity:
        lines += ["### Final mask sparsity per layer", ""]
        lines += _table(["layer", "step", "sparsity"], [[layer, str(step), f"{value:.1%}"]
                                                        for layer, (step, value) in final_sparsity.items()]) + [""]
    else:
        lines += ["No mask sparsity was recorded: the student has no masks.", ""]

    others = {key: value for key, value in report.items()
              if key not in ("method", "steps", "student", "teacher", "metrics")}
    if others:
        lines += ["## Details", "", "```json", json.dumps(_json_safe(others), indent=2, allow_nan=False), "```", ""]
    return "\n".join(lines)


def _ratio(teacher_value, student_value) -> str:
    if not teacher_value or not student_value:
        return "-"
    return f"{teacher_value / student_value:.2f}x"


# --- plots ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: np.ndarray) -> np.ndarray:
    """Exponential moving average over about a twentieth of the points, for noisy GAN losses."""
    weight = 1 - 1 / max(1.0, len(values) / 20)
    out, running = np.empty_like(values), values[0]
    for i, value in enumerate(values):
        running = weight * running + (1 - weight) * value
        out[i] = running
    return out


def _plot_losses(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    plt = _pyplot()
    names = [name for name, points in history.items() if points]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        steps, values = (np.asarray(column, dtype=float) for column in zip(*history[name]))
        axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
        axis.plot(steps, _smooth(values), color="tab:blue", linewidth=1.5)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_sparsity(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    names = [name for name, points in history.items() if points]
    for name in names:
        steps, values = zip(*history[name])
        axis.plot(steps, values, linewidth=1, label=name if len(names) <= 16 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("sparsity (fraction masked)")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    if len(names) <= 16:
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        axis.set_title(f"{len(names)} layers")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- the comparison of several runs ---------------------------------------------------------


def comparison_table(reports: list[dict]) -> str:
    """A fixed-width text table of each report's student: params, MACs, CPU latency and the quality
    measures any report has (QUALITY_KEYS order; '-' where a report lacks one).

    The reference the sizes and times are divided by, "(x)": the first report without a teacher
    (the dense teacher run of the embedded default) when there is one, else the first teacher
    found, shown in a 'teacher' row of its own."""
    if not reports:
        raise ValueError("comparison_table: reports is empty")
    for report in reports:
        _check_report(report)
    rows = [(str(report["method"]), report["student"], report.get("metrics") or report["student"].get("metrics")
             or {}) for report in reports]
    dense = next((row for report, row in zip(reports, rows) if report.get("teacher") is None), None)
    teacher = next((report["teacher"] for report in reports if report.get("teacher") is not None), None)
    if dense is not None:
        reference, reference_name = dense[1], dense[0]
    elif teacher is not None:
        reference, reference_name = teacher, "teacher"
        rows.insert(0, ("teacher", teacher, teacher.get("metrics") or {}))
    else:
        reference = reference_name = None
    names = _quality_names([metrics for _, _, metrics in rows])

    def cell(entry, key):
        value = _human(entry[key]) if key != "cpu_latency_ms" else f"{entry[key]:.1f} ms"
        if reference is not None and entry is not reference:
            value += f" ({_ratio(reference[key], entry[key])})"
        return value

    header = ["method", "params", "MACs", "CPU latency", *names]
    body = [[label, cell(entry, "params"), cell(entry, "macs"), cell(entry, "cpu_latency_ms"),
             *(_number(metrics.get(name)) for name in names)] for label, entry, metrics in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row):
        return "  ".join(text.ljust(width) if i == 0 else text.rjust(width)
                         for i, (text, width) in enumerate(zip(row, widths)))

    lines = [line(header), "-" * len(line(header)), *map(line, body)]
    if reference is not None and len(rows) > 1:
        lines.append(f"(x): {reference_name}'s value divided by the method's")
    return "\n".join(lines)


# --- sample grids -------------------------------------------------------------------------


def save_image_grid(images, path, nrow: int = 8, padding: int = 2) -> Path:
    """Save images ([N, C, H, W] in [-1, 1], C 1 or 3, or a list of such batches or of [C, H, W]
    images, concatenated) as a PNG grid of `nrow` images per row on a white background."""
    if isinstance(images, (list, tuple)):
        images = torch.cat([image.unsqueeze(0) if image.dim() == 3 else image for image in images])
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise ValueError("save_image_grid: images must be a non-empty [N, C, H, W] tensor with C 1 or 3, got "
                         + (str(tuple(images.shape)) if isinstance(images, torch.Tensor) else type(images).__name__))
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"save_image_grid: nrow must be a positive int, got {nrow!r}")
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = images.expand(-1, 3, -1, -1)  # grey to RGB
    count, _, height, width = images.shape
    columns, rows = min(nrow, count), math.ceil(count / nrow)
    grid = torch.full((3, rows * (height + padding) + padding, columns * (width + padding) + padding), 255,
                      dtype=torch.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path
