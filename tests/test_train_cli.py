"""The command line: --help, --dry-run, option precedence and the messages for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import LOOP_DEFAULTS, ConfigError, parse_value, resolve
from train.methods import METHODS, get_method
from train.run import main

ROOT = Path(__file__).resolve().parents[1]
Dense = get_method("dense")


def dry_run(capsys, *argv: str) -> dict:
    assert main([*argv, "--dry-run"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def error_of(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_help_lists_methods_presets_and_options(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, method in METHODS.items():
        assert name in text
        assert all(preset in text for preset in method.presets)
        assert all(f"--{key}" in text for key in method.defaults)
    assert all(f"--{key}" in text for key in LOOP_DEFAULTS)
    assert "--dry-run" in text and "--resume" in text


def test_the_module_runs_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "train.run", "--method", "dense", "--steps", "3", "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert yaml.safe_load(result.stdout)["steps"] == 3


def test_dry_run_prints_the_resolved_configuration(capsys):
    cfg = dry_run(capsys, "--method", "dense", "--preset", "smoke")
    assert cfg == resolve(Dense, "smoke") | {"out": "runs/dense"}
    assert cfg["method"] == "dense" and cfg["preset"] == "smoke"


def test_precedence_defaults_preset_file_command_line(tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text("steps: 7\nngf: 8\nlr: 0.001\n")
    cfg = dry_run(capsys, "--method", "dense", "--preset", "smoke", "--config", str(config), "--ngf", "12")
    assert cfg["ngf"] == 12                                    # command line over the file
    assert cfg["steps"] == 7 and cfg["lr"] == 0.001            # the file over the preset and the defaults
    assert cfg["crop_size"] == Dense.presets["smoke"]["crop_size"]  # the preset over the defaults
    assert cfg["lambda_A"] == Dense.defaults["lambda_A"]       # method defaults
    assert cfg["beta1"] == LOOP_DEFAULTS["beta1"]              # loop defaults


def test_a_runs_config_reproduces_it(tmp_path, capsys):
    first = dry_run(capsys, "--method", "dense", "--preset", "smoke", "--steps", "11", "--out", str(tmp_path))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(first))
    assert dry_run(capsys, "--config", str(config)) == first  # it names its method and preset


def test_values_are_parsed_to_the_type_of_their_default(capsys):
    cfg = dry_run(capsys, "--method", "dense", "--steps", "1_000", "--lr=3e-4", "--no-flip", "--dropout", "0",
                  "--tensorboard", "false", "--dataroot", "data/h2z")
    assert cfg["steps"] == 1000 and cfg["lr"] == 3e-4
    assert cfg["no_flip"] is True and cfg["dropout"] is False and cfg["tensorboard"] is False
    assert cfg["dataroot"] == "data/h2z"
    assert parse_value("lr", 1, float) == 1.0 and isinstance(parse_value("lr", 1, float), float)


@pytest.mark.parametrize("argv, message", [
    (["--method", "dense", "--stpes", "3"], "unknown option 'stpes' in the command line; did you mean 'steps'?"),
    (["--method", "dense", "--steps", "many"], "option 'steps' expects an int, got 'many'"),
    (["--method", "dense", "--lr", "fast"], "option 'lr' expects a float, got 'fast'"),
    (["--method", "dense", "--no_flip", "maybe"], "option 'no_flip' expects a bool (true/false/1/0), got 'maybe'"),
    (["--method", "dense", "--ema", "1.5"], "option 'ema' must be in [0, 1)"),
    (["--method", "dense", "--lr_policy", "cosine"], "option 'lr_policy' must be one of"),
    (["--method", "dense", "--batch_size", "4", "--accumulation", "3"], "option 'accumulation' must be a divisor"),
    (["--method", "dense", "--steps"], "option --steps needs a value"),
    (["--method", "dense", "stray"], "expected an option --key value, got 'stray'"),
    (["--method", "dnse"], "unknown method 'dnse' (did you mean 'dense'?); the methods are: "),
    (["--method", "dense", "--preset", "smok"], "method 'dense' has no preset 'smok'; its presets are: smoke"),
    (["--preset", "smoke"], "--preset needs --method"),
    (["--steps", "3"], "without --method only --out is accepted"),
    (["--resume", "runs/x", "--config", "x.yaml"], "it cannot take --config too"),
])
def test_bad_options_get_a_clear_message(capsys, argv, message):
    assert message in error_of(capsys, *argv)


def test_bad_config_files(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert f"config file '{missing}' does not exist" in error_of(capsys, "--method", "dense", "--config", str(missing))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in error_of(capsys, "--method", "dense", "--config", str(listing))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("ngff: 3\n")
    assert "unknown option 'ngff' in the config file; did you mean 'ngf'?" in error_of(
        capsys, "--method", "dense", "--config", str(unknown))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("steps: [1, 2]\n")
    assert "option 'steps' expects an int, got [1, 2]" in error_of(capsys, "--method", "dense", "--config", str(wrong))


def test_resolve_rejects_preset_keys_that_no_one_reads():
    class Broken(Dense):
        name = "broken"
        presets = {"smoke": {"not_an_option": 1}}

    with pytest.raises(ConfigError, match="unknown option 'not_an_option' in preset 'smoke'"):
        resolve(Broken, "smoke")


def test_every_registered_preset_resolves():
    for method in METHODS.values():
        for preset in method.presets:
            resolve(method, preset)


def test_the_embedded_default_dry_run(capsys):
    assert main(["--dry-run"]) == 0
    assert "runs/default" in capsys.readouterr().out


def test_the_package_works_installed_as_gansparse_train(capsys):
    """setup.py installs train/ as gansparse.train (the gansparse-train console script): load it
    under that name, as the installed package is, and run its command line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gansparse.train", ROOT / "train" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "train")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["gansparse.train"] = package
    try:
        spec.loader.exec_module(package)
        installed_main = importlib.import_module("gansparse.train.run").main
        assert installed_main is not main
        assert installed_main(["--method", "dense", "--steps", "5", "--dry-run"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["steps"] == 5
    finally:
        for name in [name for name in sys.modules if name == "gansparse.train" or name.startswith("gansparse.train.")]:
            del sys.modules[name]


def test_the_embedded_default_end_to_end_on_a_tiny_teacher(tmp_path, monkeypatch, capsys):
    import train.run

    tiny = dict(Dense.presets["smoke"], netG="resnet_1blocks", ngf=4, ndf=4, steps=2, sample_every=1000,
                eval=False, tensorboard=False, latency_threads=1)
    monkeypatch.setitem(Dense.presets, "smoke", tiny)
    monkeypatch.setattr(train.run, "DEFAULT_COMPRESSION", ["not_registered"])  # skipped, not an error
    assert main(["--out", str(tmp_path)]) == 0
    table = (tmp_path / "comparison.txt").read_text()
    assert table.splitlines()[2].startswith("dense ")
    assert "measured side by side" in table and table.strip() in capsys.readouterr().out
    teacher = yaml.safe_load((tmp_path / "teacher" / "config.yaml").read_text())
    assert teacher["steps"] == 2 and teacher["threads"] == 1 and teacher["overwrite"] is True
    assert (tmp_path / "teacher" / "export" / "generator.safetensors").is_file()
