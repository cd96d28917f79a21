"""Test configuration shared by every test module.

Without a GPU the Triton kernels run through the interpreter, which must be switched on before
triton is first imported; doing it here, before any test module loads, keeps one pytest process.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
