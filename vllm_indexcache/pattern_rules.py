"""The IndexCache F/S pattern rules, pure (no pydantic, no torch): the uniform rule, parsing, F layers.

A pattern is a string with one character per backbone DSA layer: ``F`` (Full: the layer runs its lightning indexer)
or ``S`` (Shared: the layer reuses the top-k of the nearest preceding F layer). Only upper-case ``F``/``S`` are
accepted: vLLM 0.32 tests ``pattern[i] == "S"``, so a lower-case ``s`` would silently run as F there.

Functions raise plain ``ValueError`` with a one-line ``key=value: reason`` message; :mod:`vllm_indexcache.config`
re-raises them as ``IndexCacheError``. Presets live in :mod:`vllm_indexcache.patterns`.
"""
from __future__ import annotations

PATTERN_KEY = "index_topk_pattern"


def uniform_pattern(num_layers: int, freq: int, offset: int = 2) -> str:
    """The uniform F/S pattern of vLLM 0.32 (``model_executor/models/deepseek_v2.py``).

    Layer ``i`` (0-based) is S iff ``max(i - offset + 1, 0) % freq != 0``. ``freq=1`` gives all F (IndexCache off);
    offset 2 keeps layers 0 and 1 F (freq 4 on 78 layers: F = 0, 1, 5, 9, ..., 77); GLM-5.2 ships offset 3
    (F = 0, 1, 2, 6, 10, ..., 74). The paper's "uniform" baseline (§3) is this rule.

    Args:
        num_layers: number of backbone DSA layers (MTP/NextN layers excluded).
        freq: ``index_topk_freq``, >= 1.
        offset: ``index_skip_topk_offset``, >= 1.

    Raises:
        ValueError: ``num_layers`` < 1, or ``freq``/``offset`` not an int >= 1.
    """
    for key, value in (("num_layers", num_layers), ("index_topk_freq", freq), ("index_skip_topk_offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: must be an integer >= 1")
    return "".join("S" if max(i - offset + 1, 0) % freq != 0 else "F" for i in range(num_layers))


def check_chars(pattern: str, key: str = PATTERN_KEY) -> str:
    """Check that ``pattern`` is a non-empty str of ``F``/``S`` whose first layer is F; return it unchanged.

    Layer 0 must be F: an S layer reuses the top-k of a *preceding* F layer, and layer 0 has none.

    Raises:
        ValueError: not a str, empty, a character other than ``F``/``S`` (lower case included), or layer 0 is S.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{key}={pattern!r}: must be a non-empty string of 'F'/'S'")
    bad = sorted(set(pattern) - {"F", "S"})
    if bad:
        raise ValueError(f"{key}={pattern!r}: invalid character(s) {''.join(bad)!r}; only upper-case 'F' and 'S'")
    if pattern[0] != "F":
        raise ValueError(f"{key}={pattern!r}: layer 0 is S, but the first DSA layer must be F "
                         "(an S layer reuses the top-k of a preceding F layer)")
    return pattern


def parse_pattern(pattern: str, num_layers: int | None = None, key: str = PATTERN_KEY,
                  model: str = "the model") -> str:
    """Validate ``pattern`` (see :func:`check_chars`) and, when given, its length against ``num_layers``.

    Args:
        pattern: the F/S string.
        num_layers: number of backbone DSA layers, or None to skip the length check.
        key: config key named in error messages.
        model: model name used in the length error (e.g. the HF architecture).

    Raises:
        ValueError: see :func:`check_chars`; length != ``num_layers``.
    """
    check_chars(pattern, key)
    if num_layers is not None and len(pattern) != num_layers:
        raise ValueError(f"{key}={pattern!r}: length {len(pattern)} != {num_layers} DSA layers of {model}")
    return pattern


def f_layers(pattern: str) -> list[int]:
    """0-based ids of the F layers of ``pattern``."""
    return [i for i, c in enumerate(pattern) if c == "F"]
