"""Test-session setup.

Without CUDA, Triton's interpreter is switched on here, at import time, before any test module
can import Triton (it must be set before Triton's first import): the Triton kernels then run
in-process on CPU tensors (slow: keep interpreter cases <= 1K tokens, fp32 / fp16; bf16 ``tl.dot``
is wrong in the interpreter). An explicit ``TRITON_INTERPRET`` in the environment wins, and
subprocesses started by tests inherit it.

Only what asks for a Triton kernel runs one on CPU: backend ``"triton"``, the Prism scorer with
``impl="triton"`` (scorer ``prism_fused``). The default backend ``"flex"``, ``"reference"`` and
``impl="auto"`` keep their PyTorch paths on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
