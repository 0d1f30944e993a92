"""Command line: flags generated from `TrainConfig`, config files, and mode dispatch.

Precedence is dataclass default < config file (`--config run.toml|run.yaml`) < flag, so a
config file can hold a whole experiment and a flag can still override one value.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import importlib.util
import logging
import signal
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import DEFAULTS, MODES, TRAINS_CHOICES, ConfigError, TrainConfig, dashed

log = logging.getLogger(__name__)

GROUP_TITLES = {"run": "run", "data": "data and trajectory API", "loss": "loss",
                "optim": "optimisation", "lora": "LoRA (lora_* modes)", "vllm": "vLLM", "eval": "held-out evaluation",
                "output": "checkpoints, benchmark and logging"}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints its whole usage on an error; a single line is easier to read."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_kind(f: dataclasses.Field) -> tuple[type, bool]:
    """(element type, is_list) of a dataclass field, unwrapping Optional."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="example-trainer",
        description="GRPO/GSPO trainer that keeps a vLLM server serving its latest weights. "
                    f"Modes: {', '.join(MODES)}.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="TOML or YAML file whose keys are the option names below "
                             "(flags given on the command line win)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if meta.get("internal"):
            continue
        group = groups.setdefault(meta["group"], parser.add_argument_group(
            GROUP_TITLES.get(meta["group"], meta["group"])))
        kind, is_list = _field_kind(f)
        kwargs: dict[str, Any] = {"help": meta["help"], "default": argparse.SUPPRESS}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if is_list:
                kwargs["nargs"] = "*"
        flag = f"--{dashed(f.name)}"
        if f.name == "mode":
            kwargs["help"] += f" Built-in: {{{','.join(MODES)}}}."
        # Show the real default in --help even though the parsed default is suppressed.
        kwargs["help"] += f" [default: {getattr(DEFAULTS, f.name)!r}]"
        group.add_argument(flag, **kwargs)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML file into option values, rejecting unknown keys by name."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} not found")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text) or {}
    elif file.suffix == ".toml":
        data = tomllib.loads(text)
    else:
        raise ConfigError(f"config file {path!r}: use a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option names")
    names = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {path!r}: unknown option {key!r}{hint}")
        values[name] = value
    return values


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags and config file -> a validated TrainConfig; exits with one line on bad input."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        from_file = load_config_file(args.pop("config")) if args.get("config") else {}
        args.pop("config", None)
        mode = args.get("mode", from_file.get("mode", DEFAULTS.mode))
        # the mode's own tuned settings (lr, sync_every...); a bad --mode fails in validate()
        tuned = declared_defaults(mode) if mode in MODES or ":" in str(mode) else {}
        values = {**tuned, **from_file, **args}
        choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)}
        for name, value in values.items():
            if choices[name] and value not in choices[name]:
                raise ConfigError(f"invalid --{dashed(name)} {value!r}: choose from "
                                  f"{', '.join(choices[name])}")
        config = TrainConfig(**values).validate()
        trains = declared_trains(config.mode)  # the mode file says: full model or adapter
        config.check_trains(trains)
        applied = {k: v for k, v in tuned.items() if k not in from_file and k not in args}
        return dataclasses.replace(config, trains=trains, mode_defaults=applied)
    except (ConfigError, TypeError) as err:
        parser.error(str(err))


def _operational_errors() -> tuple[type[BaseException], ...]:
    # Imported here, not at the top: bad flags must fail in a fraction of a second, before
    # torch is imported.
    from .api import ApiUnavailable
    from .ranks import RankFailed
    from .parity import ParityError
    from .vllm.client import VLLMError
    from .vllm.server import VLLMGone, VLLMStartupError
    from .weight_sync import WeightSyncError
    return (ApiUnavailable, TimeoutError, FileNotFoundError, VLLMStartupError, ParityError,
            ConfigError, VLLMGone, VLLMError, WeightSyncError, RankFailed)


def _mode_source(mode: str) -> Path:
    """The file that defines a mode, found without importing it."""
    if mode in MODES:
        target = f"example_trainer.modes.{mode}"
    else:
        target = mode.rpartition(":")[0]
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise ConfigError(f"--mode {mode!r}: file {target!r} not found")
        return Path(target)
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"--mode {mode!r}: cannot find module {target!r} ({err})") from err
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ConfigError(f"--mode {mode!r}: cannot find module {target!r}")
    return Path(spec.origin)


def _module_constant(path: Path, name: str) -> ast.expr | None:
    """The value of a module-level `NAME = ...` in `path`, as an AST node (nothing runs)."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name):
            return node.value
    return None


def declared_defaults(mode: str) -> dict[str, Any]:
    """The mode's `DEFAULTS = {"lr": ..., ...}`: settings tuned for it (a LoRA adapter wants
    a far larger learning rate than full fine-tuning; an in-memory sync can run every step,
    a restart cannot). They sit between the dataclass defaults and a config file or flag,
    so `--mode` alone gives each mode its best settings and any flag still wins."""
    path = _mode_source(mode)
    node = _module_constant(path, "DEFAULTS")
    if node is None:
        return {}
    try:
        tuned = ast.literal_eval(node)
    except ValueError as err:
        raise ConfigError(f"--mode {mode!r}: DEFAULTS in {path} must be a literal dict of "
                          f"option names ({err})") from err
    names = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}
    if not isinstance(tuned, dict) or not all(isinstance(k, str) for k in tuned):
        raise ConfigError(f"--mode {mode!r}: DEFAULTS in {path} must be a dict of option "
                          "names, e.g. {'lr': 1e-4}")
    for key in tuned:
        if key not in names or key == "mode":
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--mode {mode!r}: DEFAULTS in {path} names unknown option "
                              f"{key!r}{hint}")
    return tuned


def declared_trains(mode: str) -> str:
    """The mode's `TRAINS = "full" | "lora"`, read from its source without running it, so
    flags are checked against what the mode trains before anything heavy starts."""
    path = _mode_source(mode)
    node = _module_constant(path, "TRAINS")
    if isinstance(node, ast.Constant) and node.value in TRAINS_CHOICES:
        return node.value
    raise ConfigError(f"--mode {mode!r}: {path} must say what it trains with a module-level "
                      "TRAINS = 'full' or TRAINS = 'lora' (and pass TRAINS to "
                      "TrainingRun.setup)")


def resolve_mode(mode: str) -> Callable[[TrainConfig], Any]:
    """Find a mode's `train(config)`: a built-in name, 'pkg.module:fn' or 'file.py:fn'."""
    if mode in MODES:
        return importlib.import_module(f"example_trainer.modes.{mode}").train
    target, _, func = mode.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"--mode {mode!r}: file {target!r} not found")
        spec = importlib.util.spec_from_file_location(f"user_mode_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ConfigError(f"--mode {mode!r}: cannot import {target!r} ({err})") from err
    if not callable(getattr(module, func, None)):
        raise ConfigError(f"--mode {mode!r}: {target} has no function {func!r}")
    return getattr(module, func)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # One compact line per step is the progress output; per-file bars only add noise.
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    # bitsandbytes warns on import (via peft) that an optional CPU 4-bit kernel is missing;
    # nothing here uses 4-bit, so it is noise on every run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if config.mode_defaults:
        log.info("--mode %s uses its tuned defaults %s (a flag or --config value wins)",
                 config.mode, ", ".join(f"--{dashed(k)} {v}" for k, v in
                                        config.mode_defaults.items()))
    try:
        train = resolve_mode(config.mode)
        # Under torchrun: refuse, in one line, a mode or optimizer that cannot run sharded.
        from .distributed import check_distributed_support, world_size_from_env
        check_distributed_support(config, world_size_from_env())
    except ConfigError as err:
        build_parser().error(str(err))
    # SIGINT and SIGTERM raise `Interrupted` at the next safe point (never inside an
    # optimizer update or a batch in transit); unwinding the mode's `with` block writes the
    # final checkpoint, stops vLLM's process group and tells the API that training stopped.
    OPERATIONAL_ERRORS = _operational_errors()
    from .checkpoint import SAFE_POINTS
    try:
        with SAFE_POINTS.installed():
            train(config)
    except KeyboardInterrupt as err:  # Interrupted is one: SIGINT -> 130, SIGTERM -> 143
        signum = getattr(err, "signum", signal.SIGINT)
        log.error("%s", getattr(err, "summary", "") or
                  f"interrupted by {signal.Signals(signum).name}; child processes were stopped")
        return 128 + signum
    except OPERATIONAL_ERRORS as err:  # expected failures: one clear line, no traceback
        log.error("%s: %s", type(err).__name__, err)
        log.debug("traceback", exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
