"""Refuse misspelled IndexCache keys (``index_topk_patern``) instead of silently ignoring them.

A key is *IndexCache-looking* when it is not a key anyone reads and either (a) it is an IndexCache key
(:data:`vllm_indexcache.config.KEYS`) spelled with other case, hyphens or without the ``index_`` prefix, or (b) among
all the keys of this vocabulary — the IndexCache keys plus the DSA keys vLLM 0.32 and transformers 5.19 read
(:data:`DSA_KEYS`) — its nearest by ``difflib`` similarity (cutoff :data:`CUTOFF`) is an IndexCache key. So
``index_topk_fre`` is refused (nearest ``index_topk_freq``) while ``index_topk``, ``index_head_dim``,
``index_n_heads`` or ``indexer_rope_interleave`` are real keys and ``index_topks`` is nearest to the DSA key
``index_topk``, which is not this plugin's to judge. (c) It names an indexer (``index``/``topk``) together with a
word only IndexCache keys use here (:data:`INDEXCACHE_WORDS`: ``index_pattern``, ``index_cache_pattern``,
``index_freq``); such a key is refused with its nearest IndexCache key. Keys of other models that merely contain one
of those words (``sliding_window_pattern``) are left alone.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from vllm_indexcache.config import KEYS, SOURCE_KEY, IndexCacheError

#: Lightning-indexer keys that are not IndexCache keys, read by vLLM 0.32 (``deepseek_v2.py``, ``deepseek_v4.py``,
#: ``transformers_utils/configs``) or transformers 5.19 (``DeepseekV32Config``, ``GlmMoeDsaConfig``).
DSA_KEYS = ("index_topk", "index_head_dim", "index_n_heads", "indexer_n_heads", "indexer_rope_interleave",
            "indexer_types")
#: difflib ratio from which a key counts as a misspelling (``index_topk_patern`` vs ``index_topk_pattern``: 0.97).
CUTOFF = 0.85
_KNOWN = frozenset((*KEYS, *DSA_KEYS, SOURCE_KEY))
#: Words of the IndexCache keys that no DSA key of :data:`DSA_KEYS` (nor V4.1's ``index_source_layer_ids``) has.
INDEXCACHE_WORDS = ("pattern", "preset", "freq", "offset", "skip")


def nearest_indexcache_key(key: str) -> str | None:
    """The IndexCache key ``key`` looks like a misspelling of, or None (a valid key, a DSA key, or unrelated)."""
    if not isinstance(key, str) or key in _KNOWN:
        return None
    norm = key.strip().lower().replace("-", "_")
    for candidate in (norm, "index_" + norm):
        if candidate in KEYS:
            return candidate
    match = difflib.get_close_matches(norm, sorted(_KNOWN), n=1, cutoff=CUTOFF)
    if match:
        return match[0] if match[0] in KEYS else None
    if ("index" in norm or "topk" in norm) and any(w in norm for w in INDEXCACHE_WORDS):
        return difflib.get_close_matches(norm, KEYS, n=1, cutoff=0.0)[0]
    return None


def check_keys(keys: Iterable[str], where: str) -> None:
    """Refuse the first IndexCache-looking key of ``keys`` (``where`` names their source in the message).

    Raises:
        IndexCacheError: one line, e.g. ``--hf-overrides key 'index_topk_patern' is not an IndexCache key; did you
        mean 'index_topk_pattern'? (valid: index_topk_freq, ...)``.
    """
    for key in keys:
        if (nearest := nearest_indexcache_key(key)) is not None:
            raise IndexCacheError(f"{where} key {key!r} is not an IndexCache key; did you mean {nearest!r}? "
                                  f"(valid: {', '.join(KEYS)})")


def check_model_keys(hf_config, overrides=None) -> None:
    """:func:`check_keys` for ``--hf-overrides`` (vLLM's ``hf_overrides`` dict) and then the model's config (a
    transformers ``PretrainedConfig`` or a ``config.json`` dict; keys that came from ``overrides`` are reported as
    such).

    Raises:
        IndexCacheError: see :func:`check_keys`.
    """
    given = overrides if isinstance(overrides, dict) else {}
    check_keys(given, "--hf-overrides")
    config = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    check_keys((k for k in config if k not in given), "config.json")
