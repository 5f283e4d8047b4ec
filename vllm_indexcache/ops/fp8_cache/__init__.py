"""DeepSeek-V4's UE8M0 block-scaled FP8 paged-cache layouts (``fp8_ds_mla`` for the sliding-window and compressed
KV, the 132-byte layout of the lightning indexer's keys): :mod:`.cpu` (vectorised) and its reference :mod:`.naive`."""
