"""The mode comparison's learning view: held-out accuracy and reward against wall-clock
seconds, one curve per mode, and how soon each mode reaches an accuracy (issue #16).

Nothing is measured here. Each trainer evaluates with `--eval-every` right after a sync and
writes its `eval_curve` (step, training seconds so far, accuracy, evaluation seconds kept
apart) and its per-step records to its benchmark JSON; this module puts them on one clock:

    seconds since the benchmark started the trainer's process, held-out evaluations excluded

so a mode's imports, model load and vLLM start-up count against it wherever they happen
(shared_vllm starts vLLM before its recorder's clock starts, the others after), and so do its
steps, syncs and checkpoints; the evaluations, whose size is the benchmark's choice, do not.
A trainer's training seconds start when its recorder is made (`started_unix` in its JSON);
the set-up before that is added to every point of its curves.

Pure functions of the trainers' JSON (unit-tested with hand-computed values), plus
`draw_learning_chart` (matplotlib, imported only when a chart is drawn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

THRESHOLDS = (0.5, 0.7)
CLOCK = ("seconds since the benchmark started the trainer's process (imports, model load, "
         "vLLM start-up, steps, syncs, checkpoints), held-out evaluations excluded")


# --------------------------------------------------------------------------------------
# Curves and the table (unit-tested with hand-computed values)
# --------------------------------------------------------------------------------------

def setup_seconds(report: dict[str, Any], spawned_unix: float | None) -> float:
    """Seconds from the trainer's process start (`spawned_unix`, the benchmark's clock) to
    the start of its training seconds (`started_unix` in its JSON); 0 where either is
    unknown (the curves then start at the trainer's recorder)."""
    started = report.get("started_unix")
    if started is None or spawned_unix is None:
        return 0.0
    return max(float(started) - float(spawned_unix), 0.0)


def accuracy_curve(report: dict[str, Any], setup_s: float = 0.0) -> list[dict[str, Any]]:
    """The trainer's `eval_curve` (in time order) on the benchmark's clock: each point keeps
    step, accuracy, the trainer's own `train_s` and `eval_s`, and gets `s` = set-up +
    `train_s`. The evaluation before training (step 0) is a point like the others, at the
    time it started (vLLM's start-up behind it, nothing trained yet)."""
    return [{"step": int(p["step"]), "s": round(setup_s + float(p["train_s"]), 2),
             "train_s": float(p["train_s"]), "accuracy": float(p["accuracy"]),
             "eval_s": float(p.get("eval_s", 0.0))}
            for p in report.get("eval_curve", [])]


def reward_curve(records: list[dict[str, Any]], setup_s: float = 0.0
                 ) -> list[dict[str, Any]]:
    """Mean training reward of each step at the time the step ended: set-up plus the sum of
    `step_s` so far (the recorder's step times add up to its training seconds, evaluations
    kept apart). Steps without a reward keep their time but are not points."""
    points, clock = [], setup_s
    for record in records:
        clock += float(record.get("step_s", 0.0))
        reward = record.get("train/reward_mean")
        if reward is not None:
            points.append({"step": int(record["step"]), "s": round(clock, 2),
                           "reward": float(reward)})
    return points


def time_to(curve: list[dict[str, Any]], threshold: float) -> float | None:
    """Seconds (`s`) of the first evaluation whose accuracy is at or above `threshold`, in
    time order; None if none is. No interpolation: the mode is known to be there only when
    an evaluation says so."""
    for point in curve:
        if point["accuracy"] >= threshold:
            return point["s"]
    return None


def threshold_key(threshold: float) -> str:
    """The table's key for a threshold: 0.5 -> "time_to_0.5_s"."""
    return f"time_to_{threshold:g}_s"


def learning_row(mode: str, curve: list[dict[str, Any]], steps: int, setup_s: float = 0.0,
                 thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    """One row of the learning table: steps trained, accuracy before and at the end, the
    time of the first and the last evaluation, time to each threshold (None if never
    reached), the set-up before the trainer's own clock and the evaluation seconds kept
    off the clock."""
    first, last = (curve[0], curve[-1]) if curve else (None, None)
    row: dict[str, Any] = {
        "mode": mode, "status": "ok", "reason": "", "steps": steps,
        "evaluations": len(curve),
        "accuracy_before": first["accuracy"] if first and first["step"] == 0 else None,
        "first_eval_s": first["s"] if first else None,
        "final_accuracy": last["accuracy"] if last else None,
        "final_eval_s": last["s"] if last else None, "setup_s": round(setup_s, 2),
        "eval_s": round(sum(p["eval_s"] for p in curve), 2)}
    for threshold in thresholds:
        row[threshold_key(threshold)] = time_to(curve, threshold)
    return row


def learning_section(results: dict[str, dict[str, Any]],
                     thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    """bench.json's `learning`: per mode its set-up seconds and both curves, and the table
    (failed modes are rows with their reason)."""
    modes: dict[str, Any] = {}
    table = []
    for mode, result in results.items():
        if result.get("status") != "ok":
            table.append({"mode": mode, "status": result.get("status", "failed"),
                          "reason": result.get("reason", "")})
            continue
        setup = setup_seconds(result, result.get("trainer_spawned_unix"))
        curve = accuracy_curve(result, setup)
        modes[mode] = {"setup_s": round(setup, 2), "accuracy": curve,
                       "reward": reward_curve(result.get("steps", []), setup)}
        table.append(learning_row(mode, curve, len(result.get("steps", [])), setup,
                                  thresholds))
    return {"clock": CLOCK, "thresholds": list(thresholds), "modes": modes, "table": table}


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_learning_table(section: dict[str, Any]) -> str:
    """A markdown table, one row per mode; a threshold never reached shows as "-"."""
    thresholds = section["thresholds"]
    columns = ["mode", "steps", "acc. before", *[f"s to {t:g}" for t in thresholds],
               "final acc.", "s at final eval", "first eval s", "set-up s", "eval s (apart)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in section["table"]:
        if row["status"] != "ok":
            cells = [row["mode"], f"{row['status']}: {row['reason']}"] + \
                ["-"] * (len(columns) - 2)
        else:
            cells = [row["mode"], str(row["steps"]), _cell(row["accuracy_before"], ".3f"),
                     *[_cell(row[threshold_key(t)], ".0f") for t in thresholds],
                     _cell(row["final_accuracy"], ".3f"), _cell(row["final_eval_s"], ".0f"),
                     _cell(row["first_eval_s"], ".0f"), _cell(row["setup_s"], ".0f"),
                     _cell(row["eval_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------

def draw_learning_chart(section: dict[str, Any], path: Path, title: str = "") -> Path:
    """Top: held-out accuracy against seconds, one line per mode (points labelled with
    their step, the thresholds dashed); bottom: each step's mean reward on the same
    clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation import draw_accuracy

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")]
    for i, (mode, curves) in enumerate(section["modes"].items()):
        marker, line = styles[i % len(styles)]
        color = f"C{i}"
        if curves["accuracy"]:
            draw_accuracy(top, curves["accuracy"], x="s", label=mode, marker=marker,
                          linestyle=line, color=color, alpha=0.85)
        if curves["reward"]:
            bottom.plot([p["s"] for p in curves["reward"]],
                        [p["reward"] for p in curves["reward"]], marker=marker,
                        linestyle=line, color=color, alpha=0.85, markersize=4, label=mode)
    for threshold in section["thresholds"]:
        top.axhline(threshold, color="#888888", linestyle=":", linewidth=1)
    top.set_ylim(0, 1)
    top.set_ylabel("held-out accuracy (labels: step)")
    top.set_title("held-out accuracy against wall-clock seconds", fontsize=10)
    bottom.set_ylabel("train/reward_mean (per step)")
    bottom.set_title("training reward against wall-clock seconds", fontsize=10)
    bottom.set_xlabel("seconds since the trainer started (set-up and vLLM start-up "
                      "included, held-out evaluations excluded)")
    bottom.set_xlim(left=0)  # set-up and vLLM start-up show as the gap before the curves
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if section["modes"]:
            ax.legend(fontsize=8)
    return save_chart(fig, path, title, section["table"])


def save_chart(fig: Any, path: Path, title: str, rows: list[dict[str, Any]]) -> Path:
    """Title (naming the modes that did not run), lay out, write and close a bench chart."""
    import matplotlib.pyplot as plt
    failed = [f"{r['mode']} ({r['status']})" for r in rows if r["status"] != "ok"]
    fig.suptitle(title + (f"  not run: {', '.join(failed)}" if failed else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
