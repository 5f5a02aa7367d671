"""Argument checks shared by the Python API (:mod:`kvkernels.hf.pipeline`) and the command line.

Each ``check_*`` returns the (normalised) value or raises ``ValueError``/``TypeError`` naming the argument,
what it got and what is accepted; :func:`cli_type` turns one into an argparse ``type=`` so that a bad
command-line value fails at parse time, in one line with exit status 2, before anything is loaded.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Optional

KIVI_BITS = (2, 4)
KIVI_GROUP_SIZES = (32, 64, 128)  # kvkernels._validate.KIVI_GROUPS (not imported: it would import torch)


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None, what: str = "") -> int:
    """An int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be an int {bounds}{' ' + what if what else ''}, got {value}")
    return value


def check_fraction(name: str, value, what: str = "") -> float:
    """A real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1]{' ' + what if what else ''}, got {_describe(value)}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1]{' ' + what if what else ''}, got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_text(name: str, value, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be a non-empty str")
    return value


def check_kivi(bits, group_size: int, residual: int, head_dim: Optional[int] = None) -> None:
    """KIVI settings: bits 2/4, a supported group size dividing the head dim, a window of whole groups."""
    check_choice("kivi_bits", bits, KIVI_BITS)
    check_choice("kivi_group_size", group_size, KIVI_GROUP_SIZES)
    check_int("kivi_residual", residual, group_size, None, f"and a multiple of kivi_group_size = {group_size}")
    if residual % group_size:
        raise ValueError(f"kivi_residual must be a multiple of kivi_group_size = {group_size}, got {residual}")
    if head_dim is not None and head_dim % group_size:
        raise ValueError(f"kivi_group_size = {group_size} must divide the model's head dim {head_dim} (values "
                         f"are quantized in groups of channels); accepted here: "
                         f"{[g for g in KIVI_GROUP_SIZES if head_dim % g == 0] or 'none'}")


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(name: str, value: Optional[str]) -> Optional[str]:
    """None, "cpu", "cuda" or "cuda:N"; a CUDA device must exist (this one imports torch)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(f"{name} must be cpu, cuda or cuda:N, got {value!r}")
    if value.startswith("cuda"):
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= count:
            raise ValueError(f"{name} {value}: this machine has {count} CUDA device(s)"
                             f"{'' if count else '; use cpu'}")
    return value


# ---------------------------------------------------------------------------------------------------
# argparse types

def cli_type(convert: Callable[[str], object], check: Callable[[object], object], metavar: str) -> Callable:
    """An argparse ``type=``: ``convert`` the string, then ``check`` it; any error becomes a parse error."""

    def parse(text: str):
        try:
            return check(convert(text))
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(_strip_name(str(exc))) from None

    parse.__name__ = metavar  # argparse names the type in "invalid <name> value" messages
    return parse


def _strip_name(message: str) -> str:
    # "keep must be ..." -> "must be ...", "value cuda: ..." -> "cuda: ...": argparse names the flag itself
    # ("argument --keep: ...").
    message = re.sub(r"^\w+ (?=must )", "", message)
    return message[len("value "):] if message.startswith("value ") else message


def int_at_least(lo: int, hi: Optional[int] = None, what: str = "") -> Callable:
    return cli_type(_to_int, lambda v: check_int("value", v, lo, hi, what), "int")


def fraction(what: str = "") -> Callable:
    return cli_type(_to_float, lambda v: check_fraction("value", v, what), "fraction")


def device() -> Callable:
    return cli_type(str, lambda v: check_device("value", v), "device")


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"value must be an int, got {text!r}") from None


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"value must be a number, got {text!r}") from None
