"""Lightning indexer of DSA on CPU, fused and blockwise: a block of queries against a block of keys, running top-k.

Same maths, ordering and padding as :mod:`vllm_indexcache.ops.indexer.naive` (the readable reference; sources there:
DeepSeek-V3.2 report §2.1, vLLM 0.32 ``model_executor/layers/sparse_attn_indexer.py``)::

    I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s])   (s ≤ pos[t]);   best min(topk, pos[t]+1) keys, ties → lower s

Per (query block, key block): one float32 GEMM ``[C·H, D] × [D, n]`` (the block's intermediates stay in cache), ReLU
in place, one ``bmm`` with the head weights → ``[C, n]`` scores; key blocks entirely past the query block's last
position are skipped. Selection is a running top-k per query: a block's scores pass a per-row threshold ``τ`` (the
current k-th best score; strict ``>`` is exact because keys arrive in ascending position, so an equal score loses the
tie), survivors become int64 keys ``(order-preserving bits of the score) · 2^32 + (2^32 − 1 − s)`` — unique per
key, so ``torch.topk`` on them is exact and the tie rule is built in — and are merged with the running set once a
``topk`` worth of them is pending. While a row's running set is not yet full, a block of ≥ 4·topk keys is first cut
at a lower bound on its own k-th best (the k-th largest of ~2·topk strided group maxima). A ``[T, S]`` score matrix
is never built; at most ``[C, n]``.

vLLM 0.32's own CPU indexer kernels (``fp8_paged_mqa_logits_cpu`` / ``topk_transform_512_cpu``, DeepSeek-V4) are not
used: they take FP8 keys and queries (not exact against the model-dtype reference), ``topk_transform_512_cpu``
handles only ``index_topk == 512`` (the toy has 128, DeepSeek-V3.2 2048), and they exist only in the AVX-512 build
``vllm/_C.abi3.so`` (absent from ``_C_AVX2``, which an AVX2-only CPU loads).

Float32 throughout: torch 2.13's bf16 matmul has no fast path on AVX2-only CPUs (0.3–0.7 GFLOP/s measured on a
shared AVX2 EPYC, against 35–55 GFLOP/s fp32 on one thread; ``scripts/bench_cpu_indexer.py`` prints both on the
machine at hand, docs/log/benchmarks-2026-11-to-12.md §6).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .naive import check_indexer_inputs

__all__ = ["block_shape", "indexer_topk_blockwise", "indexer_topk_segments", "paged_key_segments"]

_LOW = (1 << 32) - 1
_SCALE = 1 << 32
# Budget of float32 elements of one [C·H, n] logits block (16 MiB, within a 32 MiB L3): sets the key block for a
# given query block. Tried 2^18..2^22 × 256..2048 GEMM rows on a shared AVX2 EPYC: 2^22 × 1024 was among the best.
_BLOCK_ELEMS = 1 << 22
# Longest key block (its float32 copy is ≤ 8 MiB at D = 128): bounds decode's blocks, where C·H is small.
_MAX_KEYS = 1 << 14
_NEG_INF_KEY: int | None = None   # filled lazily: the int64 key of (-inf, lowest rank) = the empty slot


def _order_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 → int32 whose signed order is the float order (an involution on the bit patterns; −0.0 < +0.0)."""
    b = x.view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def _from_order_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_order_bits` (int32 → float32)."""
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _keys(vals: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """int64 selection keys of float32 ``vals`` at int64 positions ``pos`` (same shape): larger = better."""
    vals = vals + 0.0                       # −0.0 → +0.0: equal scores must tie, then the lower position wins
    return _order_bits(vals).to(torch.int64) * _SCALE + (_LOW - pos)


def _empty_key() -> int:
    global _NEG_INF_KEY
    if _NEG_INF_KEY is None:
        _NEG_INF_KEY = int(_order_bits(torch.tensor([float("-inf")]))[0]) * _SCALE
    return _NEG_INF_KEY


def _threshold(run: torch.Tensor) -> torch.Tensor:
    """``[C, k]`` running keys → ``[C, 1]`` float32 k-th best score (``-inf`` while a row has fewer than k)."""
    return _from_order_bits(torch.div(run.amin(dim=1, keepdim=True), _SCALE, rounding_mode="floor").to(torch.int32))


def _scatter_rows(r: torch.Tensor, keys: torch.Tensor, rows: int, empty: int) -> torch.Tensor:
    """Pack ``keys [m, g]`` of rows ``r [m]`` (non-decreasing) into a ``[rows, width·g]`` int64 matrix (rest empty)."""
    counts = torch.bincount(r, minlength=rows)
    width = int(counts.max())
    rank = torch.arange(r.shape[0]) - (torch.cumsum(counts, 0) - counts)[r]
    g = keys.shape[1]
    cand = torch.full((rows, width, g), empty, dtype=torch.int64)
    cand[r, rank] = keys
    return cand.view(rows, width * g)


def _sparse_candidates(mask: torch.Tensor, sc: torch.Tensor, s0: int, rows: int, empty: int):
    """Selection keys of the elements of ``sc [rows, n]`` where ``mask``; ``None`` if there are none."""
    nz = mask.nonzero()
    if not nz.shape[0]:
        return None
    r, c = nz[:, 0], nz[:, 1]
    return _scatter_rows(r, _keys(sc[r, c], c + s0)[:, None], rows, empty)


_GROUP = 8   # elements per group of the cheap pre-filter (strided: group j = columns j, j+G, j+2G, ...)


def _group_candidates(sc: torch.Tensor, tau: torch.Tensor, s0: int, rows: int, empty: int, g: int = _GROUP,
                      lb: torch.Tensor | None = None):
    """Selection keys of the elements of ``sc [rows, n]`` that may still enter the top-k; ``None`` if none.

    An element qualifies if it is ``> tau [rows, 1]`` (strictly) and, when given, ``>= lb [rows, 1]``. A strided
    group maximum (one vectorised pass; group j = columns j, j+G, j+2G, …) discards most groups; only the surviving
    groups' ``g`` elements are gathered and compared; a tail of ``n mod g`` columns is compared directly."""
    n = sc.shape[1]
    G = n // g
    parts = []
    if G:
        body = sc[:, :G * g].view(rows, g, G)
        gmax = body.amax(dim=1)
        gmask = gmax > tau if lb is None else (gmax > tau) & (gmax >= lb)
        nz = gmask.nonzero()
        if nz.shape[0]:
            r, j = nz[:, 0], nz[:, 1]
            vals = body[r, :, j]                                            # [m, g]
            pos = (j + s0)[:, None] + G * torch.arange(g)[None, :]
            keep = vals > tau[r] if lb is None else (vals > tau[r]) & (vals >= lb[r])
            i, e = keep.nonzero().unbind(1)                                 # row-major: r[i] stays sorted
            if i.shape[0]:
                parts.append(_scatter_rows(r[i], _keys(vals[i, e], pos[i, e])[:, None], rows, empty))
    if G * g < n:
        tail = sc[:, G * g:]
        mask = tail > tau if lb is None else (tail > tau) & (tail >= lb)
        part = _sparse_candidates(mask, tail, s0 + G * g, rows, empty)
        if part is not None:
            parts.append(part)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _block_lower_bound(sc: torch.Tensor, topk: int) -> torch.Tensor:
    """``[rows, 1]`` lower bound on each row's ``topk``-th largest score of ``sc [rows, n]`` (``n >= 4·topk``): the
    ``topk``-th largest of ``G ≈ 2·topk`` strided group maxima (``topk`` distinct elements are at least that large;
    with ``G = 2·topk`` only a few per cent of random scores reach it, against 50 % for ``G = topk``)."""
    g = max(2, min(16, sc.shape[1] // (2 * topk)))
    G = sc.shape[1] // g
    gmax = sc[:, :G * g].view(sc.shape[0], g, G).amax(dim=1)
    return torch.topk(gmax, topk, dim=1, sorted=False).values.amin(dim=1, keepdim=True)


def paged_key_segments(cache: torch.Tensor, block_ids: list[int], num_keys: int, block_size: int,
                       max_keys: int, min_run_keys: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """Key segments of one request read from a paged K-cache, in ascending position.

    Runs of consecutive block ids are zero-copy views of the cache, cut into pieces of at most ``max_keys``; blocks in
    runs shorter than ``min_run_keys`` keys are gathered in bounded groups (≤ ``max_keys`` keys), so a fragmented
    block table costs a small, cache-resident copy instead of many tiny GEMMs. Nothing the size of the request is
    copied (a bf16 cache is converted to float32 one segment at a time).

    Args:
        cache: ``[num_slots, D]`` the paged K-cache viewed flat (slot = block · block_size + offset), any float dtype.
        block_ids: the request's block ids (host ints), at least ``ceil(num_keys / block_size)`` of them.
        num_keys: keys of the request (positions ``0..num_keys-1``).
        block_size: tokens per cache block.
        max_keys: largest segment, in keys (≥ 1).
        min_run_keys: shortest run of consecutive blocks read in place.

    Yields:
        ``(s0, keys)``: first position and a ``[n, D]`` tensor of the keys at positions ``s0..s0+n-1``.
    """
    D = cache.shape[-1]
    blocks = cache.view(-1, block_size, D)
    nblk = -(-num_keys // block_size)
    ids = block_ids[:nblk]
    pending: list[int] = []            # block indices (into ids) waiting to be gathered
    step = max(1, max_keys // block_size)

    def flush() -> Iterator[tuple[int, torch.Tensor]]:
        for a in range(0, len(pending), step):
            chunk = pending[a:a + step]
            idx = torch.tensor([ids[j] for j in chunk], dtype=torch.long)
            keys = blocks.index_select(0, idx).view(-1, D)
            s0 = chunk[0] * block_size
            yield s0, keys[:min(keys.shape[0], num_keys - s0)]
        pending.clear()

    j = 0
    while j < nblk:
        e = j + 1
        while e < nblk and ids[e] == ids[e - 1] + 1:
            e += 1
        if (e - j) * block_size < min_run_keys:
            pending.extend(range(j, e))            # consecutive in position, so the group stays ascending
            if len(pending) >= step:
                yield from flush()
        else:
            yield from flush()
            flat = blocks[ids[j]:ids[j] + (e - j)].view(-1, D)
            s_end = min(e * block_size, num_keys)
            for s0 in range(j * block_size, s_end, max_keys):
                off = s0 - j * block_size
                yield s0, flat[off:off + min(max_keys, s_end - s0)]
        j = e
    yield from flush()


def block_shape(num_queries: int, num_heads: int, q_block_rows: int | None = None) -> tuple[int, int]:
    """``(query rows per block, longest key block)`` of :func:`indexer_topk_segments` for ``num_queries`` query rows
    of ``num_heads`` heads: by default ~1024 GEMM rows per query block, and key blocks whose ``[C·H, n]`` float32
    logits stay within ``_BLOCK_ELEMS`` (between 64 and ``_MAX_KEYS`` keys)."""
    C = q_block_rows or max(1, 1024 // num_heads)
    return C, max(64, min(_MAX_KEYS, _BLOCK_ELEMS // (min(C, max(1, num_queries)) * num_heads)))


def indexer_topk_segments(q: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor, topk: int,
                          segments, q_block_rows: int | None = None) -> torch.Tensor:
    """Fused blockwise top-k over keys given as ascending segments (the core of the CPU indexer).

    Args:
        q: ``[T, H, D]`` indexer queries (any float dtype, computed in float32), RoPE applied.
        weights: ``[T, H]`` per-head weights including ``H^-0.5 · D^-0.5``.
        q_positions: ``[T]`` integer query positions; key ``s`` visible iff ``s ≤ q_positions[t]``. Every visible
            key must be covered by the segments.
        topk: keys kept per query, ≥ 1.
        segments: a callable ``max_keys -> iterable of (s0, keys [n, D])`` with strictly ascending, non-overlapping
            position ranges (e.g. slices of a ``[S, D]`` tensor, or :func:`paged_key_segments`); called once per
            query block; segments wholly past the block's last position are skipped.
        q_block_rows: query rows per block (default: ``max(1, 1024 // H)``, i.e. ~1024 GEMM rows; see
            :func:`block_shape`).

    Returns:
        ``[T, topk]`` int32 request-local key positions, best first (descending score, ties → lower position),
        ``-1`` beyond ``min(topk, q_positions[t] + 1)``.

    Raises:
        ValueError: ``topk < 1``.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    T, H, D = q.shape
    out = torch.empty((T, topk), dtype=torch.int32, device=q.device)
    if T == 0:
        return out
    C, max_keys = block_shape(T, H, q_block_rows)
    empty = _empty_key()
    pos_all = q_positions.long()
    for a in range(0, T, C):
        b = min(T, a + C)
        rows = b - a
        qf = q[a:b].float().reshape(rows * H, D)
        w = weights[a:b].float().reshape(rows, 1, H)
        pos = pos_all[a:b]
        pmin, pmax = int(pos.min()), int(pos.max())
        run = torch.full((rows, topk), empty, dtype=torch.int64)
        tau = torch.full((rows, 1), float("-inf"))
        pending: list[torch.Tensor] = []
        pend_w = 0
        full = False
        for s0, keys in segments(max_keys):
            if s0 > pmax:
                break
            n = min(keys.shape[0], pmax + 1 - s0)
            kf = keys[:n].float()
            logits = torch.mm(qf, kf.T)                                  # [rows·H, n]
            logits.relu_()
            sc = torch.bmm(w, logits.view(rows, H, n)).view(rows, n)    # [rows, n]  Σ_h w · ReLU(q·k)
            if s0 + n - 1 > pmin:                                        # block crosses the causal diagonal
                kpos = torch.arange(s0, s0 + n)
                sc.masked_fill_(kpos[None, :] > pos[:, None], float("-inf"))
            if not full and n >= 4 * topk:
                # running set not yet full: a key below a lower bound on the block's own k-th best cannot enter
                cand = _group_candidates(sc, tau, s0, rows, empty, lb=_block_lower_bound(sc, topk))
            else:
                cand = _group_candidates(sc, tau, s0, rows, empty)
            if cand is not None:
                pending.append(cand)
                pend_w += cand.shape[1]
                if pend_w >= topk:
                    run = torch.topk(torch.cat([run, *pending], 1), topk, dim=1, sorted=False).values
                    pending, pend_w = [], 0
                    tau = _threshold(run)
                    full = bool((run != empty).all())
        if pending:
            run = torch.topk(torch.cat([run, *pending], 1), topk, dim=1, sorted=False).values
        run = torch.sort(run, dim=1, descending=True).values
        sel = _LOW - (run - torch.div(run, _SCALE, rounding_mode="floor") * _SCALE)
        out[a:b] = torch.where(run == empty, -1, sel).to(torch.int32)
    return out


def _tensor_segments(k: torch.Tensor):
    def gen(max_keys: int) -> Iterable[tuple[int, torch.Tensor]]:
        for s0 in range(0, k.shape[0], max_keys):
            yield s0, k[s0:s0 + max_keys]
    return gen


def indexer_topk_blockwise(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, q_positions: torch.Tensor,
                           topk: int, q_block_rows: int | None = None) -> torch.Tensor:
    """Top-k key selection of the lightning indexer, fused and blockwise (no ``[T, S]`` score matrix).

    Selections identical to :func:`~vllm_indexcache.ops.indexer.naive.indexer_topk_naive` (float32 scores, equal up
    to the summation order of the GEMMs; the same ordering and tie rule, exactly).

    Args:
        q: ``[T, H, D]`` indexer queries (bf16/fp16/fp32; computed in float32), RoPE applied.
        k: ``[S, D]`` the request's indexer keys at positions ``0..S-1``.
        weights: ``[T, H]`` per-head weights including ``H^-0.5 · D^-0.5``.
        q_positions: ``[T]`` integer query positions; key ``s`` visible iff ``s ≤ q_positions[t]``.
        topk: keys kept per query (``index_topk``), ≥ 1.
        q_block_rows: query rows per block (see :func:`indexer_topk_segments`).

    Returns:
        ``[T, topk]`` int32 request-local key positions: the ``min(topk, q_positions[t] + 1)`` best keys by
        descending score, ties towards the lower position, then ``-1`` padding.

    Raises:
        ValueError: ``topk < 1`` or invalid inputs (see
            :func:`~vllm_indexcache.ops.indexer.naive.check_indexer_inputs`).
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    check_indexer_inputs(q, k, weights, q_positions)
    return indexer_topk_segments(q, weights, q_positions, topk, _tensor_segments(k), q_block_rows)
