"""Writing the results: per-question JSON, a summary CSV, and the accuracy-vs-keep plot."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Dict, List, Optional

SUMMARY_FIELDS = ["task", "method", "keep", "questions", "correct", "accuracy", "accuracy_first_q",
                  "accuracy_later_q", "kv_fraction", "from_full"]


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
            writer.writerow({k: row[k] for k in SUMMARY_FIELDS})


def write_json(path: Path, command: str, settings: Dict, summary: List[Dict], rows: List[Dict],
               elapsed_s: float) -> None:
    data = {"command": command, "versions": versions(), "settings": settings, "elapsed_seconds": round(elapsed_s, 1),
            "summary": summary, "answers": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")


_STYLE = {"kvzip": ("C0", "o"), "kvzip-uniform": ("C1", "s"), "kvzip-head": ("C2", "^"), "snapkv": ("C3", "v"),
          "h2o": ("C4", "D"), "kvzip+kivi2": ("C5", "P"), "kivi2": ("C6", "*"), "kivi4": ("C7", "X")}


def plot(path: Path, summary: List[Dict], title: Optional[str] = None) -> None:
    """Accuracy vs keep ratio, one line per eviction method, one panel for all tasks and one per task.

    The full cache is a dashed line; plain KIVI (no eviction) is a marker at its byte fraction.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ["all"] + sorted({s["task"] for s in summary if s["task"] != "all"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        rows = [s for s in summary if s["task"] == task]
        full = [s for s in rows if s["method"] == "full"]
        if full:
            ax.axhline(full[0]["accuracy"], color="k", ls="--", lw=1, label="full cache")
        for method, (color, marker) in _STYLE.items():
            pts = sorted((s["kv_fraction"] if method.startswith("kivi") else s["keep"], s["accuracy"])
                         for s in rows if s["method"] == method)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=color, marker=marker, ls="-" if len(pts) > 1 else "none", label=method)
        n = rows[0]["questions"] if rows else 0
        ax.set_title(f"{task} ({n} questions per point)")
        ax.set_xlabel("keep ratio (KIVI: fraction of fp16 bytes)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
