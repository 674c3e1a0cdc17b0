"""Options of a run: the loop's defaults, and their resolution and parsing.

A run's configuration is one flat dict. It is resolved in this order, each level overriding the
previous ones:
    LOOP_DEFAULTS < method.defaults < method.presets[preset] < --config file.yaml < --key value
Every key must exist in LOOP_DEFAULTS or the method's defaults; a value is converted to the type
of its default (an option whose default is None takes a string).
"""
from __future__ import annotations

import difflib
from pathlib import Path

import yaml

__all__ = ["LOOP_DEFAULTS", "OPTION_HELP", "ConfigError", "check", "load_yaml", "option_types", "parse_value",
           "resolve"]


class ConfigError(ValueError):
    """A bad option name or value; the message says which and what was expected."""


#: the shared loop's options, with their defaults (the methods add theirs in Method.defaults)
LOOP_DEFAULTS: dict = {
    # run
    "out": "",  # '' -> runs/<method>
    "overwrite": False,
    "device": "auto",
    "threads": 0,
    "seed": 0,
    "deterministic": False,
    # optimisation
    "steps": 1000,
    "batch_size": 1,
    "accumulation": 1,
    "lr": 0.0002,
    "beta1": 0.5,
    "beta2": 0.999,
    "lr_policy": "linear",
    "decay_start": 0.5,
    "lr_step_size": 0,
    "lr_gamma": 0.1,
    "ema": 0.0,
    # data
    "dataroot": "",
    "direction": "AtoB",
    "preprocess": "resize_and_crop",
    "load_size": 286,
    "crop_size": 256,
    "no_flip": False,
    "synthetic_size": 1000,
    "serial_batches": False,
    "num_classes": 4,
    "num_workers": 0,
    # logging and checkpoints
    "log_every": 10,
    "sample_every": 100,
    "num_samples": 8,
    "checkpoint_every": 500,
    "keep_checkpoints": 3,
    "tensorboard": True,
    # evaluation and export at the end
    "eval": True,
    "eval_size": 64,
    "eval_fidelity": True,
    "eval_lpips": True,
    "latency_threads": 2,
    "export": True,
}

#: one line of help per loop option (--help)
OPTION_HELP: dict[str, str] = {
    "out": "run directory; '' means runs/<method>",
    "overwrite": "start afresh in an --out that holds an earlier run, deleting that directory",
    "device": "'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:<n>'",
    "threads": "CPU threads of training (torch.set_num_threads); 0 keeps torch's default",
    "seed": "seed of torch, numpy, random and the data order",
    "deterministic": "torch.use_deterministic_algorithms(True) and no cuDNN autotuning",
    "steps": "optimizer steps (a method's stages may split or replace this)",
    "batch_size": "global batch size (shared by the processes of a torchrun job)",
    "accumulation": "micro-batches per step (gradient accumulation); must divide the per-process batch",
    "lr": "learning rate",
    "beta1": "Adam beta1",
    "beta2": "Adam beta2",
    "lr_policy": "'linear' (constant, then linear decay to 0 from decay_start), 'step' or 'constant'",
    "decay_start": "fraction of a stage after which the 'linear' policy starts decaying",
    "lr_step_size": "steps between decays of the 'step' policy (0: a third of the stage)",
    "lr_gamma": "decay factor of the 'step' policy",
    "ema": "decay of the exponential moving average of the student (0: off)",
    "dataroot": "dataset folder; '' uses the built-in synthetic data of the method's kind",
    "direction": "'AtoB' or 'BtoA' (paired and unpaired data)",
    "preprocess": "'resize_and_crop', 'crop', 'scale_width', 'scale_width_and_crop' or 'none'",
    "load_size": "images are resized to this, then cropped",
    "crop_size": "training resolution",
    "no_flip": "no random horizontal flips",
    "synthetic_size": "items of the synthetic data set",
    "serial_batches": "unpaired folders: pair A[i] with B[i] instead of a random B",
    "num_classes": "classes of conditional data",
    "num_workers": "data-loading worker processes",
    "log_every": "steps between log lines, TensorBoard scalars and history points",
    "sample_every": "steps between sample grids (samples/*.png, TensorBoard)",
    "num_samples": "images in a sample grid",
    "checkpoint_every": "steps between checkpoints (one is also written at each stage end)",
    "keep_checkpoints": "checkpoints kept (the newest)",
    "tensorboard": "write TensorBoard event files",
    "eval": "measure the quality of the student (and teacher) on the test split at the end",
    "eval_size": "test images used by the quality metrics",
    "eval_fidelity": "FID, IS and KID (torch-fidelity; needs the Inception weights)",
    "eval_lpips": "LPIPS against the teacher (needs the torchvision backbone weights)",
    "latency_threads": "CPU threads of the latency measurement",
    "export": "export the final model with gansparse.export.save into export/",
}

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def option_types(defaults: dict) -> dict[str, type]:
    """Option name -> the type its values are converted to (str for a default of None)."""
    return {key: str if value is None else type(value) for key, value in defaults.items()}


def parse_value(key: str, value, expected: type):
    """`value` (a command-line string or a YAML value) as `expected`; ConfigError otherwise."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"option {key!r} expects {what}, got {value!r}")

    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise bad("a bool (true/false/1/0)")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            if isinstance(value, str):
                return int(value.replace("_", ""))
        except ValueError:
            pass
        raise bad("an int")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            if isinstance(value, str):
                return float(value)
        except ValueError:
            pass
        raise bad("a float")
    if expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a YAML `teacher: 123` names a folder
        raise bad("a string")
    if expected in (list, tuple):
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        if isinstance(value, (list, tuple)):
            return expected(value)
        raise bad("a list (comma-separated on the command line)")
    raise bad(expected.__name__)


def _unknown(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see --help for the options"
    return ConfigError(f"unknown option {key!r} in {where}{hint}")


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; ConfigError when it is missing or not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def resolve(method_cls, preset: str | None = None, file_options: dict | None = None,
            overrides: dict | None = None) -> dict:
    """The configuration of a run of `method_cls` (see the module docstring). The result also holds
    'method' and 'preset'."""
    defaults = {**LOOP_DEFAULTS, **method_cls.defaults}
    types = option_types(defaults)
    if preset is not None and preset not in method_cls.presets:
        raise ConfigError(f"method {method_cls.name!r} has no preset {preset!r}; its presets are: "
                          f"{', '.join(method_cls.presets)}")
    cfg = dict(defaults)
    levels = [(f"preset {preset!r}", method_cls.presets.get(preset, {})), ("the config file", file_options or {}),
              ("the command line", overrides or {})]
    for where, options in levels:
        for key, value in options.items():
            if key not in types:
                raise _unknown(key, types, where)
            cfg[key] = parse_value(key, value, types[key])
    check(cfg)
    return {"method": method_cls.name, "preset": preset, **cfg}


LR_POLICIES = ("linear", "step", "constant")


def check(cfg: dict) -> None:
    """ConfigError for loop options whose values are out of range."""
    def require(condition: bool, key: str, expected: str) -> None:
        if not condition:
            raise ConfigError(f"option {key!r} must be {expected}, got {cfg[key]!r}")

    for key in ("steps", "log_every", "sample_every", "checkpoint_every"):
        require(cfg[key] >= (0 if key == "steps" else 1), key, ">= 0" if key == "steps" else ">= 1")
    for key in ("batch_size", "accumulation", "keep_checkpoints", "num_samples", "eval_size", "latency_threads"):
        require(cfg[key] >= 1, key, ">= 1")
    require(cfg["batch_size"] % cfg["accumulation"] == 0, "accumulation",
            f"a divisor of batch_size {cfg['batch_size']}")
    require(cfg["num_workers"] >= 0, "num_workers", ">= 0")
    require(cfg["threads"] >= 0, "threads", ">= 0 (0: torch's default)")
    require(cfg["lr"] > 0, "lr", "> 0")
    require(cfg["lr_policy"] in LR_POLICIES, "lr_policy", f"one of {LR_POLICIES}")
    require(0.0 <= cfg["decay_start"] <= 1.0, "decay_start", "in [0, 1]")
    require(cfg["lr_step_size"] >= 0, "lr_step_size", ">= 0")
    require(0.0 <= cfg["ema"] < 1.0, "ema", "in [0, 1) (0 turns the EMA off)")
    require(cfg["direction"] in ("AtoB", "BtoA"), "direction", "'AtoB' or 'BtoA'")
