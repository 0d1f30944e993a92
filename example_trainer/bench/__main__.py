"""`python -m example_trainer.bench`: every mode on the same work, one table and one chart.

    python -m example_trainer.bench                          # all four modes, 3 steps each
    python -m example_trainer.bench --modes legacy lora_nccl --steps 5 -- --lr 1e-4
    python -m example_trainer.bench --modes none --optimizers   # optimizers only

Flags after `--` go to every trainer unchanged. Writes bench.json and bench.png into --out
(default runs/bench-<time>/). The logic lives in example_trainer/bench/compare.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import DEFAULT_MODEL, MODES, OPTIMIZER_NAMES
from .compare import BenchSettings, run


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
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per mode")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help="environment: completions per prompt")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="environment: tokens per completion")
    p.add_argument("--partial-credit", type=float, default=d.partial_credit,
                   help="environment: reward for a wrong but well-formed answer (a random "
                   "model needs > 0 for rewards to vary)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
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
    return BenchSettings(
        model=args.model, modes=[m for m in args.modes if m != "none"], steps=args.steps,
        seed=args.seed, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        group_size=args.group_size, max_tokens=args.max_tokens,
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
