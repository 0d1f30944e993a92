"""Procedural arithmetic with an exact verifier: the default task of this project.

Problems are generated, so there is no data set to download, every answer is exact, and
difficulty is a dial. The prompt was chosen by measuring SmolLM2-135M-Instruct with it
("What is a+b? Answer with just the number.": greedy 90%, sampled at T=1 20% on single-digit
sums), so a short CPU run has a gap between sampled and greedy accuracy to close.

Held-out evaluation problems are disjoint from training problems by construction: a stable
hash of the expression puts each problem on one side, training draws only the training side
and `eval_items` only the held-out side, from its own seed stream.

    python -m environments.arithmetic --api-url http://127.0.0.1:8000 \\
        --vllm-url http://127.0.0.1:9001 --tokenizer DIR --difficulty 1 --group-size 8
    python -m environments.arithmetic --eval-only --eval-n 200 --eval-temperature 0 ...
"""

from __future__ import annotations

import argparse
import ast
import logging
import operator
import random
import re
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from jinja2 import TemplateError

from .api_client import ApiUnavailable
from .base import EnvConfig, Environment, Item, add_common_args, config_from_args, setup_logging
from .sampling import VLLMRequestError, VLLMUnavailable

log = logging.getLogger(__name__)

PROMPT = "What is {expr}? Answer with just the number."
# An empty system turn: without one, SmolLM2's chat template inserts its default system text,
# 16 of the 43 prompt tokens, which every training step runs forward and backward (and which
# the model does not need here: 0.20 at T=1 on 256 held-out problems without it, 0.22 with).
SYSTEM_MESSAGE = {"role": "system", "content": ""}
DIFFICULTIES = (1, 2, 3, 4)
DEFAULT_HELDOUT_FRACTION = 0.2

# ------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------


def _level1(rng: random.Random) -> str:
    return f"{rng.randint(0, 9)}+{rng.randint(0, 9)}"


def _level2(rng: random.Random) -> str:
    return f"{rng.randint(10, 99)}{rng.choice('+-')}{rng.randint(10, 99)}"


def _level3(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    return f"{a}*{b}" if rng.random() < 0.5 else f"{b}*{a}"


_LEVEL4_SHAPES = ("({a}{p}{b})*{c}{q}{d}", "{a}*{b}{p}{c}*{d}", "{a}{p}{b}*{c}{q}{d}",
                  "({a}{p}{b})*({c}{q}{d})")


def _level4(rng: random.Random) -> str:
    shape = rng.choice(_LEVEL4_SHAPES)
    return shape.format(a=rng.randint(1, 20), b=rng.randint(1, 20), c=rng.randint(2, 9),
                        d=rng.randint(1, 20), p=rng.choice("+-"), q=rng.choice("+-"))


_GENERATORS: dict[int, Callable[[random.Random], str]] = {
    1: _level1, 2: _level2, 3: _level3, 4: _level4}


def make_expression(rng: random.Random, difficulty: int) -> str:
    """One expression: 1 single-digit a+b; 2 two-digit a+b / a-b; 3 a*b (one digit by one or
    two); 4 multi-step mixed, e.g. (a+b)*c-d; 0 a random level per problem."""
    if difficulty == 0:
        difficulty = rng.choice(DIFFICULTIES)
    if difficulty not in _GENERATORS:
        raise ValueError(f"difficulty must be 0 (mixed) or one of {DIFFICULTIES}, "
                         f"not {difficulty}")
    return _GENERATORS[difficulty](rng)


_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate_expression(expr: str) -> int:
    """Exact integer value of an expression of integers, + - * and parentheses (no eval)."""
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"unsupported expression {expr!r}")
    return walk(ast.parse(expr, mode="eval").body)


def is_heldout(expr: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Stable (process-independent) split of problems into training and held-out."""
    return zlib.crc32(expr.encode()) % 10_000 < fraction * 10_000


@dataclass
class ArithmeticItem(Item):
    expression: str = ""


def make_item(expr: str) -> ArithmeticItem:
    return ArithmeticItem(messages=[dict(SYSTEM_MESSAGE),
                                    {"role": "user", "content": PROMPT.format(expr=expr)}],
                          answer=evaluate_expression(expr), expression=expr)


def draw_item(rng: random.Random, difficulty: int, *, heldout: bool,
              fraction: float = DEFAULT_HELDOUT_FRACTION) -> ArithmeticItem:
    """Rejection-sample a problem from the training side (or the held-out side)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), not {fraction}")
    while True:
        expr = make_expression(rng, difficulty)
        if is_heldout(expr, fraction) == heldout:
            return make_item(expr)


def eval_items(n: int, seed: int = 0, difficulty: int = 1,
               fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[ArithmeticItem]:
    """`n` held-out problems; the same (n, seed, difficulty) gives the same list.

    Distinct while the held-out side has enough problems (single-digit sums have only about
    20), repeating after that.
    """
    rng = random.Random(f"arithmetic-eval:{difficulty}:{seed}")
    items: list[ArithmeticItem] = []
    seen: set[str] = set()
    for _ in range(n * 50):
        if len(items) == n:
            return items
        item = draw_item(rng, difficulty, heldout=True, fraction=fraction)
        if item.expression not in seen:
            seen.add(item.expression)
            items.append(item)
    while len(items) < n:
        items.append(draw_item(rng, difficulty, heldout=True, fraction=fraction))
    return items


# ------------------------------------------------------------------------------------------
# Verifier
# ------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)"
                     r"|(?<![\w.])[-\u2212]?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")


def _to_int(number: str) -> int | None:
    """'1,234' -> 1234, '-7' -> -7, '12.0' -> 12, '12.5' -> None."""
    number = number.replace(",", "").replace("\u2212", "-")
    whole, _, frac = number.partition(".")
    if frac and frac.strip("0"):
        return None
    return int(whole)


def extract_answer(text: str) -> int | None:
    """The integer a completion answers with, or None when it gives none.

    The last `\\boxed{N}` wins if there is one (its content must be just a number); otherwise
    the last number in the text. Negatives, thousands commas and a trailing period are
    accepted; a non-integer decimal or a malformed box is None (scored 0).
    """
    if not text:
        return None
    boxed = _BOXED.findall(text)
    if boxed:
        content = boxed[-1].strip().strip("$").strip().rstrip(".").strip()
        match = _NUMBER.fullmatch(content)
        return _to_int(match.group(0)) if match else None
    numbers = _NUMBER.findall(text)
    return _to_int(numbers[-1]) if numbers else None


# ------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------

class ArithmeticEnv(Environment):
    """Arithmetic at a fixed difficulty; reward 1.0 for the exact answer, else 0.0.

    `partial_credit` rewards a wrong but well-formed answer (any integer) with that value:
    a shaping reward for models that rarely answer correctly (tests use it on a random model).
    """

    def __init__(self, config: EnvConfig, *, difficulty: int = 1,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                 partial_credit: float = 0.0, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer=tokenizer)
        make_expression(random.Random(0), difficulty)  # validate the level early
        self.difficulty = difficulty
        self.heldout_fraction = heldout_fraction
        self.partial_credit = partial_credit

    def prompt_ids(self, item: Item) -> list[int]:
        """The task's prompt; a chat template that refuses a system turn (Gemma's, for one)
        gets the user turn alone."""
        try:
            return super().prompt_ids(item)
        except TemplateError:
            if item.messages[:1] != [SYSTEM_MESSAGE]:
                raise
            return super().prompt_ids(replace(item, messages=item.messages[1:]))

    def get_prompt(self, rng: random.Random) -> ArithmeticItem:
        return draw_item(rng, self.difficulty, heldout=False, fraction=self.heldout_fraction)

    def score(self, item: Item, completion_text: str) -> float:
        answer = extract_answer(completion_text)
        if answer == item.answer:
            return 1.0
        return self.partial_credit if answer is not None else 0.0

    def eval_score(self, item: Item, completion_text: str) -> float:
        """Exact-answer accuracy, whatever partial credit training gives."""
        return 1.0 if extract_answer(completion_text) == item.answer else 0.0

    def eval_items(self, n: int, seed: int = 0) -> list[ArithmeticItem]:
        return eval_items(n, seed, self.difficulty, self.heldout_fraction)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m environments.arithmetic",
        description="Procedural arithmetic environment: samples from vLLM, scores exactly, "
                    "posts groups to the trajectory API.")
    task = parser.add_argument_group("arithmetic task")
    task.add_argument("--difficulty", type=int, default=1, choices=(0, *DIFFICULTIES),
                      help="1 single-digit a+b, 2 two-digit a+b/a-b, 3 a*b, 4 multi-step "
                           "mixed, 0 mixed levels (default: 1).")
    task.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
                      help="Share of problems reserved for evaluation (default: 0.2).")
    task.add_argument("--partial-credit", type=float, default=0.0,
                      help="Reward for a wrong but well-formed integer answer (default: 0).")
    task.add_argument("--eval-only", action="store_true",
                      help="Only measure accuracy on held-out problems, then exit.")
    task.add_argument("--eval-n", type=int, default=100, help="Held-out problems (default: "
                      "100).")
    task.add_argument("--eval-seed", type=int, default=1234, help="Seed of the held-out set.")
    task.add_argument("--eval-temperature", type=float, default=0.0,
                      help="Sampling temperature for evaluation (0 = greedy).")
    add_common_args(parser)
    parser.set_defaults(desired_name="arithmetic")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    env = ArithmeticEnv(config_from_args(args), difficulty=args.difficulty,
                        heldout_fraction=args.heldout_fraction,
                        partial_credit=args.partial_credit)
    try:
        if args.eval_only:
            items = env.eval_items(args.eval_n, args.eval_seed)
            accuracy = env.evaluate(items, temperature=args.eval_temperature)
            log.info("accuracy %.4f on %d held-out problems (difficulty %d, T=%.2f)",
                     accuracy, len(items), args.difficulty, args.eval_temperature)
            return 0
        env.run()
    except (ApiUnavailable, VLLMUnavailable, VLLMRequestError) as err:
        # Expected failures (a server gone, a model name vLLM does not serve): one line
        # that names the cause and the fix, no traceback.
        log.error("%s: %s", type(err).__name__, err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
