"""Saving a quality run as it goes: one JSON-lines file per shard, resumable, merged into one summary.

A run of ``kvkernels eval`` can take hours on a CPU. Each finished context (all its settings and questions)
is appended to ``OUT/NAME.shard-I-of-N.jsonl`` at once, so an interrupted run loses at most the context in
progress, a rerun skips what any shard file of the run holds, and N processes (``--shard I/N``) can share one
run (the rest of a run can be resharded: ``--shard 0/4`` after ``0/2`` skips what ``0/2`` saved). The first line of a file is the run's identity (the settings that decide which questions are asked and
how); rows are only ever merged with rows of the same identity.

File lines: ``{"identity": {...}}`` first, then ``{"command": "..."}`` once per process that wrote to it,
then ``{"context": [length, task, index], "seconds": s, "rows": [...]}`` per finished context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

# The arguments that decide the questions and the settings (not threads, device or where files go).
IDENTITY_KEYS = ("tasks", "methods", "ratios", "contexts", "context_tokens", "questions", "seed")


class OtherRunError(ValueError):
    """A shard file of this --out/--name was written with other settings."""


def run_identity(args) -> Dict:
    return {k: getattr(args, k) for k in IDENTITY_KEYS}


def shard_path(out: Path, name: str, shard: Tuple[int, int]) -> Path:
    index, count = shard
    return out / f"{name}.shard-{index}-of-{count}.jsonl"


def _read_lines(path: Path) -> List[Dict]:
    texts = path.read_text().splitlines()
    lines = []
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            # A process killed mid-write leaves a partial last line: that context is simply not saved.
            if number == len(texts):
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
    return lines


def _check_identity(path: Path, lines: List[Dict], identity: Dict) -> None:
    found = lines[0].get("identity") if lines else None
    if found != json.loads(json.dumps(identity)):
        raise OtherRunError(f"{path} holds a run with other settings ({found}); this command's are {identity}. "
                         "Use another --out or --name, or the command that wrote it.")


class ShardWriter:
    """Appends finished contexts to one shard's file (which contexts are saved: :func:`read_shards`)."""

    def __init__(self, path: Path, identity: Dict, command: str):
        self.path = path
        if path.exists():
            lines = _read_lines(path)
            _check_identity(path, lines, identity)
            # Rewrite without a torn last line, if the previous process left one.
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        else:
            path.write_text(json.dumps({"identity": identity}) + "\n")
        self._write({"command": command})

    def append(self, rows: List[Dict], seconds: float) -> None:
        first = rows[0]
        key = (first["length"], first["task"], first["context"])
        self._write({"context": list(key), "seconds": round(seconds, 1), "rows": rows})

    def _write(self, line: Dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()


@dataclass
class Shards:
    rows: List[Dict] = field(default_factory=list)
    commands: List[str] = field(default_factory=list)
    compute_seconds: float = 0.0
    contexts: set = field(default_factory=set)  # (length, task, index) of every saved context


def read_shards(out: Path, name: str, identity: Dict) -> Shards:
    """Every saved context of every shard file of this run (all must have this identity).

    A context saved by two files (the run was resharded) counts once. ``contexts`` lets a process started
    with another shard count (to spread the rest of a run over more processes) skip what any file holds.
    """
    shards = Shards()
    for path in sorted(out.glob(f"{name}.shard-*-of-*.jsonl")):
        lines = _read_lines(path)
        _check_identity(path, lines, identity)
        for line in lines:
            if "command" in line and line["command"] not in shards.commands:
                shards.commands.append(line["command"])
            if "context" in line and tuple(line["context"]) not in shards.contexts:
                shards.contexts.add(tuple(line["context"]))
                shards.rows.extend(line["rows"])
                shards.compute_seconds += line["seconds"]
    return shards
