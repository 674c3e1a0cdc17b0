"""The command line: python -m train.run (or gansparse-train).

    python -m train.run --method <name> [--preset <name>] [--config file.yaml] [--key value ...]
                        [--out DIR] [--resume DIR] [--dry-run]
    python -m train.run [--out DIR]        # the embedded default (runs/default)

The embedded default trains a small teacher with `dense` (its smoke preset, on the built-in
synthetic data), compresses it with every method of DEFAULT_COMPRESSION that is registered (each
with its smoke preset), exports each result and prints a comparison table; the reports are in
runs/default/<name>/ and the table in runs/default/comparison.txt.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml

from .config import LOOP_DEFAULTS, OPTION_HELP, ConfigError, load_yaml, option_types, resolve
from .methods import METHODS, get_method

__all__ = ["DEFAULT_COMPRESSION", "embedded_default", "main"]

#: the compression methods the embedded default runs on its teacher, when they are registered
DEFAULT_COMPRESSION: list[str] = ["dmad"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.run", add_help=False, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train or compress a GAN with a registered method. Without --method: the embedded default "
                    "(a small teacher, then each compression method, on synthetic data).")
    parser.add_argument("--method", help="the method to run (see below)")
    parser.add_argument("--preset", help="a preset of the method (see below)")
    parser.add_argument("--config", help="a YAML file of option: value (e.g. a run's config.yaml)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("-h", "--help", action="store_true", help="show this help (with --method: its options)")
    return parser


def _help(parser: argparse.ArgumentParser, method: str | None) -> str:
    lines = [parser.format_help(), "methods (presets):"]
    lines += [f"  {name:<12} {', '.join(cls.presets)}" for name, cls in sorted(METHODS.items())]
    lines += ["", "options (--key value or --key=value; a bare --key sets a bool option to true):"]
    lines += [f"  --{key:<18} {_type_name(value):<6} {value!r:<18} {OPTION_HELP[key]}"
              for key, value in LOOP_DEFAULTS.items()]
    shown = [method] if method in METHODS else sorted(METHODS)
    for name in shown:
        lines += ["", f"options of {name}:"]
        lines += [f"  --{key:<18} {_type_name(value):<6} {value!r}" for key, value in METHODS[name].defaults.items()]
    return "\n".join(lines)


def _type_name(value) -> str:
    return "str" if value is None else type(value).__name__


def _overrides(tokens: list[str], types: dict[str, type]) -> dict[str, str]:
    """--key value / --key=value pairs (keys may use - for _); a bool option alone means true."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"expected an option --key value, got {token!r}")
        name, has_value, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if has_value:
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        elif types.get(key) is bool:
            value = "true"
            i += 1
        else:
            raise ConfigError(f"option --{key} needs a value")
        overrides[key] = value
    return overrides


def embedded_default(out: str | Path = "runs/default") -> list[dict]:
    """Train the smoke teacher, then compress it with each registered method of
    DEFAULT_COMPRESSION; print and save the comparison table. Returns the reports."""
    from .loop import run
    from .report import comparison_table

    out = Path(out)
    dense = get_method("dense")
    teacher_dir = out / "teacher"
    # Running the default again replaces its previous results. Its networks are so small that one
    # CPU thread trains them faster than two (the teacher: 158 against 197 ms a step with idle
    # OpenMP threads sleeping), and with OpenMP's default spin-waiting two threads slow down many
    # times over whenever another process is busy.
    common = {"overwrite": True, "threads": 1}
    reports = [run(dense, resolve(dense, "smoke", overrides={"out": str(teacher_dir), **common}))]
    for name in DEFAULT_COMPRESSION:
        if name in METHODS:
            method = METHODS[name]
            cfg = resolve(method, "smoke", overrides={"out": str(out / name), "teacher": str(teacher_dir), **common})
            reports.append(run(method, cfg))
    threads = load_yaml(teacher_dir / "config.yaml")["latency_threads"]
    table = comparison_table(_latency_side_by_side(reports, threads)) + (
        f"\nCPU latency: the exported generators, measured side by side in one process (batch 1, {threads} "
        f"thread{'s' * (threads > 1)})")
    (out / "comparison.txt").write_text(table + "\n")
    print(table)
    return reports


def _latency_side_by_side(reports: list[dict], threads: int, rounds: int = 5) -> list[dict]:
    """Copies of `reports` whose student latency is re-measured here, on each run's exported
    generator, in alternating rounds (median of the rounds): times taken minutes apart by separate
    runs on a shared machine do not compare."""
    import torch

    from gansparse import export, metrics

    models = [export.load(Path(report["run_dir"]) / "export" / "generator.safetensors") for report in reports]
    inputs = [[torch.randn(shape) for shape in report["input_shapes"]] for report in reports]
    times = [[] for _ in reports]
    for _ in range(rounds):
        for model, x, measured in zip(models, inputs, times):
            measured.append(metrics.cpu_latency_ms(model, *x, threads=threads, warmup=1, repeats=5))
    return [{**report, "student": {**report["student"], "cpu_latency_ms": statistics.median(measured)}}
            for report, measured in zip(reports, times)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        print(_help(parser, args.method))
        return 0
    try:
        if args.method is None and args.resume is None and args.config is None:
            if args.preset:
                raise ConfigError("--preset needs --method")
            options = _overrides(rest, option_types(LOOP_DEFAULTS))
            if set(options) - {"out"}:
                raise ConfigError(f"without --method only --out is accepted (the embedded default), got "
                                  f"{', '.join('--' + key for key in options)}")
            if args.dry_run:
                print(f"the embedded default: dense smoke teacher, then {DEFAULT_COMPRESSION or 'no compression'}, "
                      f"in {options.get('out', 'runs/default')}")
                return 0
            embedded_default(options.get("out", "runs/default"))
            return 0
        cfg, method = _configuration(args, rest)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    from .checkpoint import CheckpointError
    from .loop import run

    try:
        run(method, cfg, resume=args.resume is not None)
    except ConfigError as error:  # an option value the method or the base GAN rejects
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, FileExistsError, FileNotFoundError) as error:  # e.g. a missing teacher or dataset
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _configuration(args: argparse.Namespace, rest: list[str]) -> tuple[dict, type]:
    """(resolved options, method class) of a --method / --config / --resume command line."""
    file_options = {}
    if args.resume is not None and args.config is not None:
        raise ConfigError("--resume continues a run with its own config.yaml: it cannot take --config too")
    if args.resume is not None:
        config_file = Path(args.resume) / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
        file_options = load_yaml(config_file)
    elif args.config is not None:
        file_options = load_yaml(args.config)
    # A run's config.yaml names its method and preset; the command line wins.
    name = args.method or file_options.get("method")
    preset = args.preset or file_options.get("preset")
    file_options = {k: v for k, v in file_options.items() if k not in ("method", "preset")}
    if name is None:
        raise ConfigError("--method is required with --config, unless the file names a method")
    try:
        method = get_method(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    overrides = _overrides(rest, option_types({**LOOP_DEFAULTS, **method.defaults}))
    if args.resume is not None:
        overrides["out"] = args.resume
    cfg = resolve(method, preset, file_options, overrides)
    if not cfg["out"]:
        cfg["out"] = str(Path("runs") / name)
    return cfg, method


if __name__ == "__main__":
    sys.exit(main())
