"""`python -m example_trainer.bench`: every mode on the same work, one table and one chart.

    python -m example_trainer.bench                          # every mode, 3 steps each
    python -m example_trainer.bench --modes legacy lora_nccl --steps 5 -- --lr 1e-4
    python -m example_trainer.bench --modes none --optimizers   # optimizers only
    python -m example_trainer.bench --learning                 # accuracy against seconds

Flags after `--` go to every trainer unchanged. Writes bench.json and bench.png into --out
(default runs/bench-<time>/); with --learning also learning.png (held-out accuracy and
reward against wall-clock seconds per mode) and a table of the time to 0.5 and 0.7 accuracy.
The logic lives in example_trainer/bench/compare.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import DEFAULT_MODEL, MODES, OPTIMIZER_NAMES
from .compare import LEARNING_DEFAULTS, BenchSettings, run


def parse_args(argv: list[str]) -> BenchSettings:
    own, trainer_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    d = BenchSettings()
    p = argparse.ArgumentParser(prog="python -m example_trainer.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help=f"model directory (default: the "
                   f"embedded {DEFAULT_MODEL})")
    p.add_argument("--modes", nargs="+", default=d.modes, choices=[*MODES, "none"],
                   help="modes to run, in this order ('none': only --optimizers)")
    learn = LEARNING_DEFAULTS
    p.add_argument("--steps", type=int, help=f"training steps per mode (default {d.steps}; "
                   f"--learning: {learn['steps']})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}; --learning: "
                   f"{learn['batch_size']}")
    p.add_argument("--micro-batch-size", type=int, help=f"default {d.micro_batch_size}; "
                   f"--learning: {learn['micro_batch_size']}")
    p.add_argument("--group-size", type=int, help="environment: completions per prompt "
                   f"(default {d.group_size}; --learning: {learn['group_size']})")
    p.add_argument("--max-tokens", type=int, help="environment: tokens per completion "
                   f"(default {d.max_tokens}; --learning: {learn['max_tokens']})")
    p.add_argument("--partial-credit", type=float, default=d.partial_credit,
                   help="environment: reward for a wrong but well-formed answer (a random "
                   "model needs > 0 for rewards to vary)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank,
                   help="LoRA rank of every LoRA mode (not with --learning: each mode's own; "
                   "also the adapter the reference limits measure)")
    p.add_argument("--learning", action="store_true",
                   help="the learning view: every mode runs like ./run.sh's default run (its "
                   "own learning rate, sync interval and LoRA shape) and evaluates every "
                   "--eval-every steps; adds learning.png and bench.json's 'learning'")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="--learning: held-out evaluation every N steps, right after a sync")
    p.add_argument("--eval-size", type=int, default=d.eval_size,
                   help="--learning: held-out problems per evaluation")
    p.add_argument("--out", default="", help="output directory (default runs/bench-<time>)")
    p.add_argument("--mode-timeout", type=float, default=d.mode_timeout,
                   help="seconds one mode may run before it counts as failed")
    p.add_argument("--reference-rounds", type=int, default=d.reference_rounds,
                   help="timed rounds of each bare memcpy / broadcast")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the bare memcpy / broadcast limits (one vLLM start less)")
    p.add_argument("--optimizers", nargs="*", choices=OPTIMIZER_NAMES, default=None,
                   help="also compare these optimizers (no names: all) on the same model")
    p.add_argument("--optimizer-steps", type=int, default=d.optimizer_steps)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(own)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    optimizers = [] if args.optimizers is None else (args.optimizers or list(OPTIMIZER_NAMES))
    if optimizers and "adamw" not in optimizers:
        optimizers.insert(0, "adamw")  # the ratios' reference
    work = {name: getattr(args, name) for name in LEARNING_DEFAULTS}  # None: not given
    defaults = LEARNING_DEFAULTS if args.learning else {n: getattr(d, n) for n in work}
    work = {n: defaults[n] if v is None else v for n, v in work.items()}
    return BenchSettings(
        model=args.model, modes=[m for m in args.modes if m != "none"], **work,
        seed=args.seed, learning=args.learning, eval_every=args.eval_every,
        eval_size=args.eval_size,
        partial_credit=args.partial_credit, lora_rank=args.lora_rank, out_dir=args.out,
        mode_timeout=args.mode_timeout, reference=not args.no_reference,
        reference_rounds=args.reference_rounds, optimizers=optimizers,
        optimizer_steps=args.optimizer_steps, trainer_args=trainer_args)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    payload = run(settings)
    failed = [m for m, r in payload["modes"].items() if r["status"] != "ok"]
    return 1 if failed and len(failed) == len(payload["modes"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
