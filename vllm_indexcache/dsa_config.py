"""The config keys vLLM reads for a DSA model that transformers' classes do not declare: filled, checked or refused.

transformers' ``DeepseekV32Config`` / ``GlmMoeDsaConfig`` do not declare ``scoring_func``, ``topk_method`` or
``indexer_rope_interleave``, so a checkpoint written by ``save_pretrained`` alone lacks them; vLLM 0.32
(``model_executor/models/deepseek_v2.py``) then reads its own defaults and computes another model:

* ``scoring_func`` — vLLM default ``"softmax"``; transformers' router (``DeepseekV32TopkRouter``, shared by GLM-5)
  is ``router_logits.sigmoid()``: ``"sigmoid"``.
* ``topk_method`` — vLLM builds ``e_score_correction_bias`` only for ``"noaux_tc"`` (else the checkpoint's bias is
  never loaded); transformers always adds that bias before the group/top-k choice: ``"noaux_tc"``.
* ``indexer_rope_interleave`` — vLLM rotates the indexer NeoX-style unless it is true; transformers' DeepSeek-V3.2
  indexer rotates NeoX-style (``false``), its GLM-5 indexer interleaved (``true``).

Each is filled with the value transformers' class implies (the family's ``implied``, :mod:`vllm_indexcache.families`),
one log line per filled key; a present value that contradicts it gets one warning line (it is kept: vLLM will compute
something transformers does not).
One more vLLM-only key has no single implied value: vLLM builds MoE MLPs on layers ``i >= first_k_dense_replace``
with ``i % moe_layer_freq == 0`` (default 1), transformers on the layers its ``mlp_layer_types`` names ``"sparse"``;
a list that rule cannot express is refused with one line (:class:`DSAConfigError`). The main MLA's RoPE is
interleaved in both engines for both architectures (vLLM hard-codes it), so it needs no key.
"""
from __future__ import annotations

from typing import Any

from vllm_indexcache.config import IndexCacheError, config_value
from vllm_indexcache.families import FAMILIES, architecture_of


class DSAConfigError(IndexCacheError):
    """A DSA config that vLLM cannot serve as transformers' class computes it (one line naming the key)."""


def _set(cfg: Any, key: str, value: Any) -> None:
    if isinstance(cfg, dict):
        cfg[key] = value
    else:
        setattr(cfg, key, value)


def complete_dsa_config(hf_config: Any) -> list[tuple[str, str]]:
    """Fill/check the vLLM-only keys of a DSA config in place (module docstring); return the log lines.

    Args:
        hf_config: transformers ``PretrainedConfig`` or a ``config.json`` dict. Other architectures are left alone.

    Returns:
        ``("info", line)`` / ``("warning", line)`` pairs, one per filled or contradicting key.

    Raises:
        DSAConfigError: ``mlp_layer_types`` that vLLM's ``first_k_dense_replace`` / ``moe_layer_freq`` rule cannot
            express.
    """
    family = FAMILIES.get(architecture_of(hf_config))   # exact: MTP draft configs are left alone, as before
    if family is None:
        return []
    name = family.name
    out = []
    for key, value in family.implied.items():
        have = config_value(hf_config, key)
        if have is None:
            _set(hf_config, key, value)
            out.append(("info", f"IndexCache: config.json has no {key}; using {value!r} as transformers' {name} "
                                "does"))
        elif have != value:
            out.append(("warning", f"IndexCache: {key}={have!r} contradicts transformers' {name} ({value!r}); vLLM "
                                   "will compute another model than transformers does"))
    if family.model_type != "deepseek_v4":   # V4: every layer MoE, hash-routed first (num_hash_layers), no such rule
        out += _check_moe_layers(hf_config)
    return out


def _check_moe_layers(hf_config: Any) -> list[tuple[str, str]]:
    types = config_value(hf_config, "mlp_layer_types")
    n = config_value(hf_config, "num_hidden_layers")
    if not types or not isinstance(n, int) or config_value(hf_config, "n_routed_experts") is None:
        return []
    k = int(config_value(hf_config, "first_k_dense_replace") or 0)
    freq = int(config_value(hf_config, "moe_layer_freq") or 1)
    want = [t == "sparse" for t in types[:n]]
    if [i >= k and i % freq == 0 for i in range(n)] == want:
        return []
    sparse = [i for i, s in enumerate(want) if s]
    first = sparse[0] if sparse else n
    for f in range(1, n + 1):
        if [i >= first and i % f == 0 for i in range(n)] == want:
            _set(hf_config, "first_k_dense_replace", first)
            _set(hf_config, "moe_layer_freq", f)
            return [("info", f"IndexCache: mlp_layer_types has MoE layers {sparse}; first_k_dense_replace={first}, "
                             f"moe_layer_freq={f} so that vLLM builds the same")]
    raise DSAConfigError(f"mlp_layer_types={list(types)!r}: vLLM builds MoE layers i >= first_k_dense_replace with "
                         "i % moe_layer_freq == 0 only; this list has no such form")
