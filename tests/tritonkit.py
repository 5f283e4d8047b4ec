"""Set-up shared by the Triton kernel tests (tests/unit/test_ops_triton*.py, test_ops_topk.py): import this before
anything that imports Triton.

Without a CUDA GPU the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` is set here, before Triton is
imported (its own ``@jit`` helpers such as ``tl.zeros`` read it at import). ``DEV`` is where the test tensors live.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
