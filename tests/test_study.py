"""The granularity study (`python -m train.study`): a tiny study of a tiny teacher (2 granularities x 2
sparsities, one run of them interrupted beforehand), its table, JSON and plot, a rerun, and the
command's errors."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from _runs import kill_at_checkpoint, single_thread, train_teacher
from gansparse.sparse import SPARSE_LAYERS
from train import checkpoint
from train.config import load_yaml
from train.methods import get_method
from train.study import main

TINY = ["--device", "cpu", "--deterministic", "true", "--ngf", "4", "--ndf", "4", "--crop_size", "32",
        "--load_size", "32", "--batch_size", "2", "--log_every", "1", "--sample_every", "1000",
        "--tensorboard", "false", "--pool_size", "3"]
# What every run of the study takes: 6 steps, pruned at every step (the target from step 3 on).
RUN_OPTIONS = [*TINY, "--steps", "6", "--prune_frequency", "1", "--checkpoint_every", "2", "--eval_size", "4",
               "--eval_fidelity", "false", "--eval_lpips", "false"]
NAMES = ["teacher", "element_25", "element_50", "filter_25", "filter_50"]


def _study(teacher: Path, out: Path, *options: str) -> list[str]:
    return ["--teacher", str(teacher), "--preset", "smoke", "--sparsities", "0.25,0.5", "--out", str(out),
            *RUN_OPTIONS, *options]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return train_teacher(tmp_path_factory.mktemp("teacher"), "--preset", "smoke", *TINY, "--netG", "resnet_2blocks")


@pytest.fixture(scope="module")
def done(teacher, tmp_path_factory):
    """(study directory, step at which its element_50 run had been killed before the study ran)."""
    out = tmp_path_factory.mktemp("study")
    # An interrupted study: its element_50 run killed after a checkpoint (the run the study would start).
    killed = out / "element_50"
    interrupted_at = kill_at_checkpoint(["--method", "selfsup", "--preset", "smoke", *RUN_OPTIONS, "--teacher",
                                         str(teacher), "--sparsity", "0.5", "--granularity", "element", "--eval",
                                         "true", "--out", str(killed)], killed, 2)
    with single_thread():
        assert main(_study(teacher, out)) == 0
    return out, interrupted_at


def _table(out: Path) -> list[dict[str, str]]:
    """study.md's table as one dict per row, by column name."""
    lines = [line for line in (out / "study.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def _percent(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def test_table_json_and_plot_agree(done):
    out, _ = done
    table, rows = _table(out), json.loads((out / "study.json").read_text())["rows"]
    assert [row["run"] for row in table] == [row["name"] for row in rows] == NAMES
    for cells, row in zip(table, rows):
        assert cells["granularity"] == row["granularity"]
        assert _percent(cells["target sparsity"]) == pytest.approx(row["target_sparsity"])
        assert _percent(cells["measured sparsity"]) == pytest.approx(row["measured_sparsity"], abs=5e-4)
        for name in ("l1_vs_teacher", "psnr_vs_teacher", "ssim_vs_teacher"):
            assert float(cells[name]) == pytest.approx(float(row["quality"][name]), rel=1e-3, abs=1e-6)
        for form in ("dense", "sparse", "compact"):
            if form in row["latency_ms"]:
                assert float(cells[f"{form} (ms)"]) == pytest.approx(row["latency_ms"][form], abs=0.006)
                assert float(cells[f"speed-up {form}"].rstrip("x")) == pytest.approx(row["speedup"][form], abs=0.006)
            else:
                assert cells[f"{form} (ms)"] == cells[f"speed-up {form}"] == "-"
    # Filter pruning also has the compact model (whole filters removed); the others have no such column.
    assert [("compact" in row["latency_ms"]) for row in rows] == [False, False, False, True, True]
    assert all(0 < row["compact_macs_fraction"] < 1 for row in rows[3:])
    with Image.open(out / "study.png") as plot:
        assert plot.format == "PNG" and plot.width > 100 and plot.height > 100


def test_measured_sparsity_and_quality(done):
    out, _ = done
    rows = json.loads((out / "study.json").read_text())["rows"]
    teacher = rows[0]
    assert teacher["measured_sparsity"] == 0.0 and teacher["latency_ms"].keys() == {"dense"}
    assert teacher["speedup"] == {"dense": 1.0}
    # The teacher against its own outputs: the measures' bounds.
    assert teacher["quality"]["psnr_vs_teacher"] == "inf"  # JSON has no infinity; report.json's convention
    assert teacher["quality"]["l1_vs_teacher"] == 0.0
    assert teacher["quality"]["ssim_vs_teacher"] == pytest.approx(1.0, abs=1e-6)
    for row in rows[1:]:
        run_dir = Path(row["run_dir"])
        assert run_dir == out / row["name"]
        # Quality: the run's own evaluation, finite and below the teacher's against itself.
        assert row["quality"] == json.loads((run_dir / "report.json").read_text())["metrics"]
        assert math.isfinite(row["quality"]["psnr_vs_teacher"]) and row["quality"]["l1_vs_teacher"] > 0
        assert all(math.isfinite(ms) and ms > 0 for ms in row["latency_ms"].values())
        # Measured sparsity: the exact zeros of the exported direction's conv weights, each layer at
        # the target up to the rounding to whole groups (weights, or filters).
        layers = _student_layers(run_dir)
        zeros = sum(int((layer.weight == 0).sum()) for layer in layers) / sum(layer.weight.numel() for layer in layers)
        assert row["measured_sparsity"] == pytest.approx(zeros)
        for layer in layers:
            mask, out_dim = layer.weight_mask, 1 if layer.transposed else 0
            assert torch.all(layer.weight[mask == 0] == 0)
            group = 1 if row["granularity"] == "element" else mask.numel() // mask.shape[out_dim]
            assert 1 - layer.density == pytest.approx(row["target_sparsity"], abs=0.5 * group / mask.numel() + 1e-9)
            if row["granularity"] == "filter":  # a filter is kept or pruned whole
                per_filter = mask.transpose(0, out_dim).flatten(1).mean(1)
                assert set(per_filter.tolist()) <= {0.0, 1.0}


def _student_layers(run_dir: Path) -> list[torch.nn.Module]:
    """The sparse layers of the run's trained generator G, rebuilt from its config.yaml and checkpoint."""
    cfg = load_yaml(run_dir / "config.yaml")
    tensors, state = checkpoint.load(checkpoint.latest(run_dir))
    assert state["global_step"] == cfg["steps"]
    method = get_method("selfsup")(cfg, torch.device("cpu"))
    method.build()
    method.load_state_dict(tensors)
    return [m for m in method.nets["G"].modules() if isinstance(m, SPARSE_LAYERS)]


def test_rerun_keeps_finished_runs_and_the_interrupted_one_resumed(done, teacher, capsys):
    out, interrupted_at = done
    assert 2 <= interrupted_at < 6
    log = (out / "element_50" / "log.txt").read_text()
    assert f"resuming {out / 'element_50'} from step_{interrupted_at:08d}" in log
    _, state = checkpoint.load(checkpoint.latest(out / "element_50"))
    assert [step for step, _ in state["history"]["GC"]] == list(range(1, 7))  # every step logged once

    runs = [out / name for name in NAMES[1:]]
    finished = {run: ((run / "report.json").stat().st_mtime_ns, checkpoint.latest(run)) for run in runs}
    table = (out / "study.md").stat().st_mtime_ns
    # A run of an earlier version of the code lacks the options added since: they ran at their defaults.
    config = out / "element_25" / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(True)
                              if not line.startswith("lambda_dc:")))
    with single_thread():
        assert main(_study(teacher, out)) == 0
    assert {run: ((run / "report.json").stat().st_mtime_ns, checkpoint.latest(run)) for run in runs} == finished
    assert (out / "study.md").stat().st_mtime_ns > table  # measured and written again
    assert _table(out)[1]["run"] == "element_25"
    capsys.readouterr()

    # Other options in the same directory: refused before anything runs.
    assert main(_study(teacher, out, "--steps", "8")) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert "holds a run with other options (steps: 6 there, 8 now)" in error
    assert {run: ((run / "report.json").stat().st_mtime_ns, checkpoint.latest(run)) for run in runs} == finished


@pytest.mark.parametrize("options, message", [
    (["--sparsities", "0.5,1"], "--sparsities must be distinct fractions in [0, 1)"),
    (["--sparsities", "half"], "--sparsities must be distinct fractions in [0, 1)"),
    (["--sparsities", "0.5,0.5"], "--sparsities must be distinct fractions in [0, 1)"),
    (["--granularities", "element,channel"], "--granularities must be distinct names of element, kernel, filter"),
    (["--granularities", "2:4"], "--granularities must be distinct names of element, kernel, filter"),
    (["--sparsity", "0.3"], "option --sparsity is set by the study for each run; use --sparsities"),
    (["--eval", "false"], "option --eval is set by the study"),
    (["--stepz", "3"], "unknown option 'stepz' in the command line; did you mean 'steps'?"),
])
def test_bad_options_are_one_line_errors(teacher, tmp_path, capsys, options, message):
    out = tmp_path / "study"
    assert main(["--teacher", str(teacher), "--preset", "smoke", "--out", str(out), *options]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and message in error
    assert not out.exists()


def test_a_missing_teacher_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["--teacher", str(tmp_path / "nowhere"), "--preset", "smoke", "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: option 'teacher' must be a directory") and "\n" not in error
    assert main(["--preset", "smoke", "--out", str(out)]) == 1  # no --teacher at all
    assert "error: option 'teacher' must be a directory, got ''" in capsys.readouterr().err
    assert not out.exists()  # nothing started


def test_help_documents_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--teacher", "--preset", "--sparsities", "--granularities", "--out", "--steps 40"):
        assert option in text
