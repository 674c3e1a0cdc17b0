"""train/report.py: report.json / report.md with plots, the comparison table, sample grids."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.report import comparison_table, save_image_grid, write_report

TEACHER = {"params": 11_378_179, "macs": 56_800_000_000, "cpu_latency_ms": 500.0, "metrics": {"fid": 40.5}}


def _report(**changes):
    report = {
        "method": "dmad",
        "steps": 300,
        "teacher": TEACHER,
        "student": {"params": 2_000_000, "macs": torch.tensor(5_680_000_000), "cpu_latency_ms": 50.0},
        "metrics": {"l1_vs_teacher": 0.125, "psnr_vs_teacher": math.inf, "fid": np.float64(45.25)},
        "config": {"crop_size": 64, "out": Path("runs/x"), "betas": (0.5, 0.999)},
    }
    report.update(changes)
    return report


HISTORY = {"G_gan": [(s, 1.0 + math.sin(s / 7)) for s in range(0, 300, 3)], "D": [(s, 0.5) for s in range(0, 300, 3)]}
SPARSITY = {f"blocks.{i}.mask": [(s, min(1.0, s * (i + 1) / 900)) for s in range(0, 300, 30)] for i in range(3)}


def test_write_report(tmp_path):
    write_report(tmp_path, _report(), HISTORY, SPARSITY)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["method"] == "dmad" and saved["steps"] == 300
    assert saved["teacher"] == TEACHER
    assert saved["student"] == {"params": 2_000_000, "macs": 5_680_000_000, "cpu_latency_ms": 50.0}
    assert saved["metrics"] == {"l1_vs_teacher": 0.125, "psnr_vs_teacher": "inf", "fid": 45.25}
    assert saved["config"] == {"crop_size": 64, "out": "runs/x", "betas": [0.5, 0.999]}

    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# dmad: run report")
    assert "| teacher | 11.38M | 56.80G | 500 |" in markdown
    assert "| student | 2.00M | 5.68G | 50 |" in markdown
    assert "| teacher / student | 5.69x | 10.00x | 10.00x |" in markdown
    assert "| fid | 40.5 | 45.25 |" in markdown and "| l1_vs_teacher | - | 0.125 |" in markdown
    assert "| psnr_vs_teacher | - | inf |" in markdown
    assert '"crop_size": 64' in markdown
    # The last recorded sparsity of each layer: step 270, 270 * (i + 1) / 900.
    assert "| blocks.0.mask | 270 | 30.0% |" in markdown and "| blocks.2.mask | 270 | 90.0% |" in markdown
    for link in ("plots/losses.png", "plots/sparsity.png"):
        assert f"]({link})" in markdown
        with Image.open(tmp_path / link) as image:
            assert image.format == "PNG" and image.width > 300
    assert not list(tmp_path.glob("*.tmp"))


def test_write_report_without_teacher_sparsity_or_losses(tmp_path):
    write_report(tmp_path, _report(method="dense", teacher=None, metrics={}), {}, {"unused": []})
    markdown = (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["teacher"] is None
    assert "| teacher" not in markdown and "| student | 2.00M | 5.68G | 50 |" in markdown
    assert "No quality measure was computed." in markdown
    assert "No losses were logged." in markdown and "the student has no masks" in markdown
    assert list((tmp_path / "plots").iterdir()) == []


def test_write_report_rejects_incomplete_reports(tmp_path):
    with pytest.raises(ValueError, match="report lacks student, steps"):
        write_report(tmp_path, {"method": "dmad"}, {}, {})
    with pytest.raises(ValueError, match=r"report\['teacher'\] must be a dict with params, macs, cpu_latency_ms"):
        write_report(tmp_path, _report(teacher={"params": 1}), {}, {})
    with pytest.raises(TypeError, match="cannot write a function to report.json"):
        write_report(tmp_path, _report(config={"fn": lambda: 0}), {}, {})


def test_comparison_table():
    other = _report(method="gan_compression", student={"params": 1_000_000, "macs": 2_840_000_000,
                                                       "cpu_latency_ms": 20.0}, metrics={"lpips": 0.3})
    table = comparison_table([_report(), other])
    lines = table.splitlines()
    header, rule, teacher, first, second, note = lines
    assert header.split() == ["method", "params", "MACs", "CPU", "latency", "l1_vs_teacher", "psnr_vs_teacher",
                              "lpips", "fid"]
    assert len({len(line) for line in (header, rule, teacher, first, second)}) == 1  # fixed width
    assert teacher.split() == ["teacher", "11.38M", "56.80G", "500.0", "ms", "-", "-", "-", "40.5"]
    assert first.split() == ["dmad", "2.00M", "(5.69x)", "5.68G", "(10.00x)", "50.0", "ms", "(10.00x)", "0.125",
                             "inf", "-", "45.25"]
    assert second.split()[0] == "gan_compression" and "(25.00x)" in second and second.split()[-2:] == ["0.3", "-"]
    assert note == "(x): teacher's value divided by the method's"
    with pytest.raises(ValueError, match="reports is empty"):
        comparison_table([])


def test_comparison_table_of_the_embedded_default():
    """The dense run that trained the teacher is the reference: no separate teacher row."""
    dense = _report(method="dense", teacher=None, student=TEACHER, metrics={"psnr": 21.5})
    lines = comparison_table([dense, _report()]).splitlines()
    assert len(lines) == 5
    assert lines[2].split() == ["dense", "11.38M", "56.80G", "500.0", "ms", "-", "-", "21.5", "-"]
    assert lines[3].split()[:3] == ["dmad", "2.00M", "(5.69x)"]
    assert lines[4] == "(x): dense's value divided by the method's"
    alone = comparison_table([dense]).splitlines()
    assert len(alone) == 3 and "(" not in alone[2]


def test_save_image_grid(tmp_path):
    values = torch.tensor([-1.0, 0.0, 1.0, -0.5, 0.5])
    images = values.view(5, 1, 1, 1).expand(5, 3, 4, 6).clone()
    images[1, 0] = 1.0  # image 1 is red-ish
    path = save_image_grid(images, tmp_path / "samples" / "step.png", nrow=2, padding=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3)  # 3 rows and 2 columns of 4 x 6 images, 1 px apart
    expected = np.round((values.numpy() + 1) * 127.5).astype(np.uint8)
    for index in range(5):
        top, left = 1 + (index // 2) * 5, 1 + (index % 2) * 7
        tile = grid[top:top + 4, left:left + 6]
        colour = [255 if index == 1 else expected[index], expected[index], expected[index]]
        assert (tile == colour).all()
    assert (grid[0] == 255).all() and (grid[-5:, 8:] == 255).all()  # padding and the empty last cell are white
    # grey images, a list of batches and single images
    grey = save_image_grid([torch.zeros(2, 1, 4, 4), torch.ones(1, 4, 4)], tmp_path / "grey.png")
    assert np.asarray(Image.open(grey)).shape == (8, 20, 3)
    with pytest.raises(ValueError, match=r"non-empty \[N, C, H, W\] tensor with C 1 or 3, got \(2, 4, 4, 4\)"):
        save_image_grid(torch.zeros(2, 4, 4, 4), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="nrow must be a positive int"):
        save_image_grid(images, tmp_path / "bad.png", nrow=0)
