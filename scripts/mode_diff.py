"""How far each built-in mode is from legacy.py: changed lines outside docstrings.

    python scripts/mode_diff.py

A mode is meant to be a delta of another (the vLLM set-up and the sync block); this counts
the lines `diff` reports after dropping docstrings, comments-only lines and blank lines.
"""

from __future__ import annotations

import ast
import difflib
from pathlib import Path

MODES = Path(__file__).resolve().parents[1] / "example_trainer" / "modes"


def code_lines(path: Path) -> list[str]:
    """Source lines with every docstring, blank line and whole-line comment removed."""
    source = path.read_text()
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [line.rstrip() for i, line in enumerate(source.splitlines(), 1)
            if i not in docstring_lines and line.strip() and not line.strip().startswith("#")]


def changed_lines(a: Path, b: Path) -> int:
    diff = difflib.unified_diff(code_lines(a), code_lines(b), lineterm="", n=0)
    return sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


def main() -> None:
    legacy = MODES / "legacy.py"
    for path in sorted(MODES.glob("*.py")):
        if path.name not in ("__init__.py", "legacy.py"):
            print(f"legacy.py -> {path.name}: {changed_lines(legacy, path)} changed lines "
                  "(code only)")


if __name__ == "__main__":
    main()
