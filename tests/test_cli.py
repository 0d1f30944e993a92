"""The command line: help lists every choice, bad input fails in one line, config files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from example_trainer.cli import declared_defaults, parse_config, resolve_mode
from example_trainer.config import MODES, ConfigError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "example_trainer", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_modes_optimizers_and_losses():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("legacy", "shared_vllm", "lora_hotswap", "lora_nccl", "adamw_8bit",
                 "adamw_cpu", "adafactor", "gspo_token", "--benchmark-json", "--resume",
                 "--wandb-project", "--config"):
        assert word in out.stdout, word


@pytest.mark.parametrize("args, expected", [
    (["--mode", "nope"], "legacy, shared_vllm, lora_hotswap, lora_nccl"),
    (["--optimizer", "sgd"], "'adamw', 'adamw_8bit', 'adamw_cpu', 'adafactor'"),
    (["--loss", "ppo"], "'grpo', 'gspo', 'gspo_token'"),
    (["--steps", "-3"], "--steps must be positive"),
    (["--model", "./missing-model-dir"], "does not exist"),
    (["--mode", "shared_vllm", "--lora-rank", "4"], "only applies to modes that train a LoRA"),
    (["--micro-batch-size", "32", "--batch-size", "8"], "exceeds --batch-size"),
])
def test_bad_values_fail_with_one_line(args, expected):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('mode = "lora_nccl"\nlora-rank = 4\nlr = 3e-5\nloss = "gspo"\n')
    cfg = parse_config(["--config", str(toml), "--lr", "1e-4"])
    assert (cfg.mode, cfg.lora_rank, cfg.lr, cfg.level) == ("lora_nccl", 4, 1e-4, "sequence")
    assert cfg.clip_eps == (3e-4, 4e-4)
    yaml = tmp_path / "run.yaml"
    yaml.write_text("optimizer: adafactor\nlora_target_modules: [q_proj, v_proj]\n"
                    "mode: lora_hotswap\n")
    cfg = parse_config(["--config", str(yaml)])
    assert cfg.optimizer == "adafactor" and cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_config_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1.0\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(bad)])
    out = run_cli("--config", str(bad))
    assert "unknown option 'learning_rate'" in out.stderr
    bad.write_text('optimizer = "sgd"\n')
    assert "choose from adamw" in run_cli("--config", str(bad)).stderr


def test_custom_mode_from_file(tmp_path):
    mode = tmp_path / "my_mode.py"
    mode.write_text("TRAINS = 'full'\ndef train(config):\n    return config.steps\n")
    assert resolve_mode(f"{mode}:train")(parse_config(["--steps", "3"])) == 3
    with pytest.raises(ConfigError, match="has no function 'run'"):
        resolve_mode(f"{mode}:run")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_mode("no_such_package.mod:train")


@pytest.mark.parametrize("source", ["TRAINS = 'lora'\n", "TRAINS = 'full'\n", ""])
def test_a_mode_says_what_it_trains(tmp_path, source):
    """LoRA flags are checked against the mode file's TRAINS, not the mode's name; a file
    without TRAINS is refused in one line before anything starts."""
    mode = tmp_path / "copied.py"
    mode.write_text(source + "def train(config):\n    return config\n")
    flags = ["--mode", f"{mode}:train", "--lora-rank", "16"]
    if source == "TRAINS = 'lora'\n":
        config = parse_config(flags)
        assert config.is_lora and config.trains == "lora" and config.lora_rank == 16
        return
    out = run_cli(*flags)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    expected = "must say what it trains" if not source else "only applies to modes that train"
    assert expected in out.stderr, out.stderr


def test_a_mode_brings_its_tuned_defaults(tmp_path):
    """A mode's DEFAULTS sit between the dataclass defaults and a config file or flag: the
    mode alone gets them, a config file or flag wins, and the run records which applied."""
    mode = tmp_path / "tuned.py"
    mode.write_text("TRAINS = 'lora'\nDEFAULTS = {'lr': 5e-4, 'sync_every': 3, "
                    "'lora_rank': 32}\ndef train(config):\n    return config\n")
    target = f"{mode}:train"
    config = parse_config(["--mode", target])
    assert (config.lr, config.sync_every, config.lora_rank) == (5e-4, 3, 32)
    assert config.mode_defaults == {"lr": 5e-4, "sync_every": 3, "lora_rank": 32}

    config = parse_config(["--mode", target, "--lr", "1e-2"])
    assert (config.lr, config.sync_every) == (1e-2, 3)
    assert "lr" not in config.mode_defaults

    run_toml = tmp_path / "run.toml"
    run_toml.write_text(f'mode = "{target}"\nsync_every = 7\n')
    config = parse_config(["--config", str(run_toml)])
    assert (config.lr, config.sync_every) == (5e-4, 7)



@pytest.mark.parametrize("mode", MODES)
def test_built_in_modes_defaults_apply(mode):
    """Each built-in mode's DEFAULTS are valid options and reach its config."""
    tuned = declared_defaults(mode)
    config = parse_config(["--mode", mode])
    assert config.mode_defaults == tuned
    for name, value in tuned.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("declaration, expected", [
    ("DEFAULTS = {'learning_rate': 1e-3}", "unknown option 'learning_rate'"),
    ("DEFAULTS = {'mode': 'legacy'}", "unknown option 'mode'"),
    ("DEFAULTS = dict(lr=1e-3)", "must be a literal dict"),
    ("DEFAULTS = {'lora_rank': 4}", "only applies to modes that train"),
])
def test_bad_mode_defaults_fail_in_one_line(tmp_path, declaration, expected):
    mode = tmp_path / "bad.py"
    mode.write_text(f"TRAINS = 'full'\n{declaration}\ndef train(config):\n    return 0\n")
    out = run_cli("--mode", f"{mode}:train")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert expected in out.stderr, out.stderr
