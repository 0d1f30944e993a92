"""Options and counters of an environment runner, and its command line.

Every option is one `EnvConfig` field with its default and help text; `add_common_args`
turns each into a --flag, so a task's CLI only adds its own task options.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EnvStats:
    """Counters a run reports; `retried` and `dropped_equal` show where rollouts went."""
    groups_sampled: int = 0
    posted: int = 0
    dropped_equal: int = 0
    retried: int = 0
    post_waits: int = 0
    rejected: int = 0
    skipped_long: int = 0
    samples: int = 0
    completion_tokens: int = 0
    reward_sum: float = 0.0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.samples if self.samples else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "mean_reward": self.mean_reward}


def opt(default: Any, help: str) -> Any:
    """A dataclass field carrying its CLI help text (flags are generated from the fields)."""
    return field(default=default, metadata={"help": help})


@dataclass
class EnvConfig:
    """Every runner option; `add_common_args` turns each field into a --flag."""

    api_url: str = opt("http://127.0.0.1:8000", "Trajectory API (Atropos run-api protocol).")
    # repr=False: the secret must not appear where a config is printed or logged.
    api_token: str | None = field(default=None, repr=False, metadata={"help": (
        "Shared secret sent as 'Authorization: Bearer' to the API and to vLLM; default: "
        "$EXAMPLE_TRAINER_API_TOKEN, which is preferred (a flag is visible in ps). Needed "
        "when they run with one (any non-loopback address).")})
    vllm_url: str = opt("http://127.0.0.1:9001", "vLLM OpenAI-compatible server.")
    model_name: str | None = opt(None, "Model (or LoRA adapter) name to sample with; default: "
                                 "the first model vLLM lists at /v1/models.")
    tokenizer: str | None = opt(None, "Tokenizer directory or id for the chat template; "
                                "default: --model-name.")
    group_size: int = opt(8, "Completions sampled per prompt (one GRPO group).")
    temperature: float = opt(1.0, "Sampling temperature (sent to the trainer in "
                             "generation_params).")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    max_tokens: int = opt(64, "Most tokens generated per completion.")
    max_token_length: int = opt(512, "Most tokens per sequence (prompt + completion); "
                                "max_tokens is clipped to fit.")
    desired_name: str = opt("env", "Name this environment registers under.")
    weight: float = opt(1.0, "Sampling weight of this environment in mixed batches.")
    max_queued_groups: int = opt(4, "Pause sampling while this many of this environment's "
                                 "groups wait in the API (back-pressure).")
    max_groups: int | None = opt(None, "Stop after posting this many groups (default: run "
                                 "until the trainer signals training_finished).")
    concurrency: int = opt(1, "Groups sampled at once (vLLM batches them); posts may overshoot "
                           "max_groups by up to concurrency-1.")
    seed: int = opt(0, "Seed of the prompt generator.")
    drop_equal_groups: bool = opt(True, "Drop groups whose scores are all equal (no GRPO "
                                  "signal).")
    include_messages: bool = opt(True, "Send the chat messages with each group (for "
                                 "inspection; the trainer uses tokens).")
    api_timeout: float = opt(600.0, "Seconds to keep retrying an unreachable API (keep it "
                             "under an hour: the API remembers a post's Idempotency-Key, "
                             "which keeps a retried post from being queued twice, that long).")
    model_name_grace: float = opt(60.0, "Seconds vLLM may answer /v1/models without "
                                  "--model-name before the environment gives up (a LoRA "
                                  "adapter is registered a little after vLLM starts; time "
                                  "while vLLM is unreachable does not count).")
    vllm_retry_timeout: float = opt(900.0, "Seconds to keep retrying a failing or aborted "
                                    "vLLM request before giving up.")
    request_timeout: float = opt(600.0, "Seconds one HTTP request may take (a CPU generation "
                                 "can take minutes).")
    poll_interval: float = opt(0.5, "Seconds between back-pressure checks while the queue is "
                               "full.")
    eval_batch_size: int = opt(64, "Prompts per /v1/completions call in evaluate().")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per EnvConfig field (defaults and help come from the dataclass)."""
    group = parser.add_argument_group("environment runner")
    for f in dataclasses.fields(EnvConfig):
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                               default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        group.add_argument(_flag(f.name), type=kind, default=f.default,
                           help=f"{help_text} (default: %(default)s)")
    group.add_argument("--log-level", default="INFO", help="Python logging level.")
    return parser


def config_from_args(args: argparse.Namespace) -> EnvConfig:
    """The EnvConfig that the flags of `add_common_args` describe."""
    return EnvConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EnvConfig)})


def setup_logging(level: str = "INFO") -> None:
    """Log lines as the other processes of a run write them (time, level, logger)."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
