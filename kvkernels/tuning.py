"""Tuned launch configurations: looked up at run time, never searched on the hot path.

The autotuner (``python -m autotune`` / ``kvkernels-autotune``) times candidate configs per op and
shape bucket and writes the winners to a JSON file keyed by GPU name, Triton version and a hash of the
kernel module's source. At run time a kernel asks :func:`lookup` for its op and bucket key; a missing
entry (another GPU, another Triton, an edited kernel, an untuned shape) returns ``None`` and the kernel
uses its documented heuristic. Files are searched in ``$KVKERNELS_TUNING_FILE`` (if set) and then in the
``configs/`` folder shipped inside the package.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
FORMAT_VERSION = 1


def length_bucket(n: int) -> int:
    """Round a length up to a power of two (at least 16), so configs are keyed by buckets, not raw lengths."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def device_name(device: Optional[torch.device] = None) -> str:
    if (device is not None and device.type == "cpu") or not torch.cuda.is_available():
        return "cpu"
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _cuda_name(index)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


@functools.lru_cache(maxsize=None)
def source_hash(module_name: str) -> str:
    """Short hash of a kernel module's source: an edited kernel invalidates its tuned entries."""
    import importlib

    src = inspect.getsource(importlib.import_module(module_name))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def table_key(module_name: str, device: Optional[torch.device] = None) -> str:
    return f"{device_name(device)}|triton-{triton_version()}|{module_name}@{source_hash(module_name)}"


def _candidate_files() -> list[Path]:
    files = []
    if os.environ.get("KVKERNELS_TUNING_FILE"):
        files.append(Path(os.environ["KVKERNELS_TUNING_FILE"]))
    if CONFIG_DIR.is_dir():
        files.extend(sorted(CONFIG_DIR.glob("*.json")))
    return files


@functools.lru_cache(maxsize=None)
def _load_tables(files: tuple[Path, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("format") != FORMAT_VERSION:
            continue
        for key, entries in data.get("tables", {}).items():
            tables.setdefault(key, {}).update(entries)
    return tables


def lookup(module_name: str, op: str, shape_key: str, device: Optional[torch.device] = None) -> Optional[dict]:
    """The tuned config of ``op`` for ``shape_key`` (a string built from bucketed sizes), or None.

    Answers are memoised, so on the decode path a lookup is one dict access after the first call.
    """
    memo_key = (module_name, op, shape_key, device_name(device))
    if memo_key not in _memo:
        tables = _load_tables(tuple(_candidate_files()))
        _memo[memo_key] = tables.get(table_key(module_name, device), {}).get(f"{op}|{shape_key}")
    return _memo[memo_key]


_memo: dict[tuple, Optional[dict]] = {}


def reload() -> None:
    """Forget loaded tables and memoised answers (after the autotuner wrote a new file, or in tests)."""
    _load_tables.cache_clear()
    _memo.clear()
