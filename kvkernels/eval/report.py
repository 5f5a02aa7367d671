"""Writing the results: per-question JSON, a summary CSV, and the accuracy-vs-keep plot."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Dict, List, Optional

SUMMARY_FIELDS = ["length", "task", "method", "keep", "questions", "correct", "accuracy", "wilson_low", "wilson_high",
                  "accuracy_first_q", "accuracy_later_q", "later_questions", "kv_fraction", "from_full",
                  "ratio_to_full", "ratio_low", "ratio_high", "vs_full_diff", "vs_full_p",
                  "kvzip_only", "method_only", "kvzip_minus_method", "kvzip_vs_method_p"]


def versions() -> Dict[str, str]:
    import torch
    import transformers

    import kvkernels
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvkernels": getattr(kvkernels, "__version__", "0.1.0"),
            "platform": platform.platform(), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def write_csv(path: Path, summary: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in summary:
            writer.writerow({k: row.get(k, "") for k in SUMMARY_FIELDS})


def write_json(path: Path, commands: List[str], settings: Dict, summary: List[Dict], rows: List[Dict],
               compute_s: float, complete: bool = True) -> None:
    """``commands``: every command line that contributed rows (one per shard process); ``compute_s``: the
    summed wall time of the saved contexts (over all shards, model loading excluded)."""
    data = {"commands": commands, "versions": versions(), "settings": settings, "complete": complete,
            "compute_seconds": round(compute_s, 1), "summary": summary, "answers": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")


_STYLE = {"kvzip": ("C0", "o"), "kvzip-uniform": ("C1", "s"), "kvzip-head": ("C2", "^"), "snapkv": ("C3", "v"),
          "h2o": ("C4", "D"), "streaming": ("C8", "<"), "random": ("C9", ">"), "kvzip+kivi2": ("C5", "P"),
          "kivi2": ("C6", "*"), "kivi4": ("C7", "X")}


def plot(path: Path, summary: List[Dict], title: Optional[str] = None) -> None:
    """Accuracy vs keep ratio with 95 % Wilson intervals as error bars: one row of panels per context
    length, one panel for all tasks and one per task, one line per eviction method.

    The full cache is a dashed line (its interval shaded); plain KIVI (no eviction) is a marker at its byte fraction.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({s.get("length") or 0 for s in summary})
    tasks = ["all"] + sorted({s["task"] for s in summary if s["task"] != "all"})
    fig, axes = plt.subplots(len(lengths), len(tasks), figsize=(4.2 * len(tasks), 3.8 * len(lengths)),
                             squeeze=False, sharey=True)
    for row, length in zip(axes, lengths):
        for ax, task in zip(row, tasks):
            _panel(ax, [s for s in summary if s["task"] == task and (s.get("length") or 0) == length], task, length)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax, rows: List[Dict], task: str, length) -> None:
    full = [s for s in rows if s["method"] == "full"]
    if full:
        ax.axhline(full[0]["accuracy"], color="k", ls="--", lw=1, label="full cache")
        if "wilson_low" in full[0]:
            ax.axhspan(full[0]["wilson_low"], full[0]["wilson_high"], color="k", alpha=0.07)
    for method, (color, marker) in _STYLE.items():
        pts = sorted((s["kv_fraction"] if method.startswith("kivi") else s["keep"], s["accuracy"],
                      s.get("wilson_low", s["accuracy"]), s.get("wilson_high", s["accuracy"]))
                     for s in rows if s["method"] == method)
        if pts:
            xs, ys, lo, hi = zip(*pts)
            err = [[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]]
            ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, ls="-" if len(pts) > 1 else "none",
                        capsize=2, lw=1, label=method)
    n = rows[0]["questions"] if rows else 0
    ax.set_title(f"{task}, {length} tokens ({n} questions per point)" if length else f"{task} ({n} per point)",
                 fontsize=9)
    ax.set_xlabel("keep ratio (KIVI: fraction of fp16 bytes)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_ylabel("accuracy")
