"""Shared test setup: Triton kernels run under the interpreter on CPU tensors unless a GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before Triton is first imported: it makes @triton.jit kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
