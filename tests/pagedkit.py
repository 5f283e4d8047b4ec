"""A mixed paged batch for the per-step indexer drivers (tests/unit/test_ops_indexer.py, test_ops_triton_paged.py):
two decodes, a one-token prefill, a fresh prefill and a chunked prefill continuing a cached context."""
import torch

#: (context already cached, query tokens this step) per request
REQUESTS = [(30, 1), (47, 1), (0, 1), (0, 21), (35, 13)]


def mixed_batch(num_blocks: int, bs: int, D: int, reqs=REQUESTS) -> dict:
    """Block table, every request's keys (context keys already in ``cache``, ``[num_blocks, bs, D]``), and this
    step's query starts, slots, new keys and positions."""
    perm = torch.randperm(num_blocks).tolist()
    block_table = torch.zeros(len(reqs), 4, dtype=torch.int32)
    used = 0
    for r, (ctx, ql) in enumerate(reqs):
        nb = -(-(ctx + ql) // bs)
        block_table[r, :nb] = torch.tensor(perm[used:used + nb])
        used += nb
    cache = torch.zeros(num_blocks, bs, D)
    all_keys = [torch.randn(ctx + ql, D) for ctx, ql in reqs]
    for r, (ctx, _) in enumerate(reqs):       # context keys were written by earlier steps
        for p in range(ctx):
            cache[block_table[r, p // bs], p % bs] = all_keys[r][p]
    qsl, slots, new_k, positions = [0], [], [], []
    for r, (ctx, ql) in enumerate(reqs):
        qsl.append(qsl[-1] + ql)
        for p in range(ctx, ctx + ql):
            slots.append(int(block_table[r, p // bs]) * bs + p % bs)
            new_k.append(all_keys[r][p])
            positions.append(p)
    return {"block_table": block_table, "cache": cache, "all_keys": all_keys, "qsl": qsl, "slots": slots,
            "new_k": torch.stack(new_k), "positions": positions, "seq_lens": [c + q for c, q in reqs], "reqs": reqs}
