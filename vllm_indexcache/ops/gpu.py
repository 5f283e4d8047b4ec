"""Launch facts shared by the Triton kernels of ``ops/*/triton.py``: the GPU's SM count and whether Triton's
interpreter runs them (CPU tests, ``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["interpreting", "num_sms"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``); launch options such as
    ``num_warps`` do not apply there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 off CUDA, i.e. under the interpreter, so that shape rules that
    split work over SMs still get exercised by the CPU tests)."""
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
