"""Draw the papers' figures from the metrics.jsonl of one or more runs, as PNG, offline.

    python plot.py runs/grpo__1__1795308138 runs/agpo_adaptive__1__1795309999 --out figures
    python plot.py runs/* --labels GRPO AGPO --metrics reward completions/mean_length

For each x axis (the training step, and the cumulative generated tokens, the axis of an equal-budget
comparison) one PNG with a panel per metric: one line per run, smoothed, with the raw values faint
behind. Every metric that no run logged is left out, so the same command draws GRPO's panels and each
variant's controller state (τ, ε, β, the masked fraction).
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import tyro

DEFAULT_METRICS = [
    "reward", "completions/mean_length", "entropy", "kl",
    "agpo/tau_mean", "agpo/eps_mean", "agpo/masked_group_frac", "agrpo/beta", "agrpo/eps",
]
X_AXES = {"step": "step", "tokens": "tokens/generated_total"}


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]]
    """run directories (each holding metrics.jsonl), or metrics.jsonl files"""
    labels: Optional[list[str]] = None
    """legend name of each run (default: the run directory's name)"""
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    """metrics to draw, one panel each (those no run logged are left out)"""
    smoothing: float = 0.6
    """weight of the past in the exponential moving average of the solid line (0: raw values)"""
    out: str = "figures"
    """directory for by_step.png and by_tokens.png"""
    title: Optional[str] = None
    """title above the panels"""


def read_metrics(path: str) -> list[dict]:
    """The rows of a run's metrics.jsonl, with a clear error for a path that has none."""
    file = path if path.endswith(".jsonl") else os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(file):
        raise SystemExit(f"{path}: no metrics.jsonl (give a run directory written by a training script)")
    rows = []
    with open(file) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SystemExit(f"{file}:{n}: not a JSON line") from None
    if not rows:
        raise SystemExit(f"{file}: empty")
    return rows


def smooth(values: list, weight: float) -> list:
    """Exponential moving average, debiased like TensorBoard's (the first points are not pulled to 0)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm if norm > 0 else v)
    return out


def main() -> None:
    args = tyro.cli(Args)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    labels = args.labels or [os.path.basename(os.path.normpath(r.removesuffix("metrics.jsonl"))) for r in args.runs]
    runs = [read_metrics(r) for r in args.runs]
    present = [m for m in args.metrics if any(m in row for rows in runs for row in rows)]
    if not present:
        raise SystemExit(f"none of the metrics {args.metrics} is in these runs")
    os.makedirs(args.out, exist_ok=True)
    cols = min(3, len(present))
    rows_n = math.ceil(len(present) / cols)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis_name, x_key in X_AXES.items():
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
        for panel, metric in zip(axes.flat, present):
            for i, (label, rows) in enumerate(zip(labels, runs)):
                points = [(r[x_key], r[metric]) for r in rows if metric in r and x_key in r and r[metric] is not None
                          and math.isfinite(r[metric])]
                if not points:
                    continue
                x, y = zip(*points)
                color = colors[i % len(colors)]
                panel.plot(x, y, color=color, alpha=0.25, linewidth=1)
                panel.plot(x, smooth(list(y), args.smoothing), color=color, linewidth=2, label=label)
            panel.set_title(metric)
            panel.set_xlabel("step" if axis_name == "step" else "generated tokens")
            panel.grid(alpha=0.3)
        for panel in list(axes.flat)[len(present):]:
            panel.axis("off")
        handles, names = axes.flat[0].get_legend_handles_labels()
        height = fig.get_figheight()  # inches: the title and the legend rows above the panels, in figure units
        title_h = 0.45 / height if args.title else 0.0
        legend_h = 0.3 * math.ceil(len(names) / 4) / height
        if args.title:
            fig.suptitle(args.title, y=1 - 0.1 / height, va="top")
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 1 - title_h), ncol=min(len(names), 4),
                   frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - title_h - legend_h - 0.1 / height))
        path = os.path.join(args.out, f"by_{axis_name}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
