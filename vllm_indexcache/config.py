"""IndexCache configuration: model config keys -> one F/S character per backbone DSA layer.

Keys (as vLLM 0.32 ``model_executor/models/deepseek_v2.py`` reads them, plus this plugin's preset key):

* ``index_topk_freq`` (int >= 1, default 1 = IndexCache off) and ``index_skip_topk_offset`` (int >= 1, default 2):
  the uniform rule of :func:`vllm_indexcache.pattern.uniform_pattern`;
* ``index_topk_pattern``: explicit ``F``/``S`` string, one char per indexer layer; overrides freq/offset;
* ``index_cache_preset``: name or path of a preset (``configs/*.json``); overrides both, but must not contradict
  them.

The pattern has one character per *indexer layer* of the model's DSA family
(:func:`vllm_indexcache.families.family_for`, keyed by ``architectures[0]``); in DeepSeek-V3.2 and GLM-5 these are the
``num_hidden_layers`` backbone layers. MTP/NextN layers (``num_nextn_predict_layers``) are not part of the pattern:
they always run their own indexer. A DSA config (``index_topk``) of an architecture no family describes is left to
vLLM untouched by :func:`apply_to_hf_config` (vLLM reads its own keys, if any), except that the plugin-only
``index_cache_preset`` is refused there; :func:`resolve_hf_config` refuses such a config with one line.
Transformers' ``GlmMoeDsaConfig.indexer_types`` is treated as derived state: it is never read, and
:func:`apply_to_hf_config` overwrites it so that transformers follows the same pattern as vLLM.
Every invalid value raises :class:`IndexCacheError` with a one-line ``key=value: reason`` message.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from vllm_indexcache.families import FamilyError, architecture_of, family_for, find_family
from vllm_indexcache.families.base import config_value
from vllm_indexcache.pattern import (
    check_chars,
    check_preset_fits,
    load_preset,
    one_line,
    parse_pattern,
    uniform_pattern,
)

KEYS = ("index_topk_freq", "index_skip_topk_offset", "index_topk_pattern", "index_cache_preset")


class IndexCacheError(ValueError):
    """An invalid IndexCache setting. The message is one line naming the key and the value."""


class IndexCacheConfig(BaseModel):
    """The IndexCache keys of one model, validated (resolution to a per-layer pattern needs the layer count).

    Args:
        index_topk_freq: every ``freq``-th layer is F (vLLM 0.32 rule); 1 = all F (off).
        index_skip_topk_offset: shifts the uniform rule; 2 keeps layers 0 and 1 F, GLM-5.2 uses 3.
        index_topk_pattern: explicit F/S string (upper case only; lower case is refused, see ``pattern``).
        index_cache_preset: preset name in ``configs/`` (with or without ``.json``) or path to a preset file.

    Raises:
        IndexCacheError: freq/offset not an int >= 1; bad pattern characters or layer 0 S; unknown preset.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    index_topk_freq: StrictInt = Field(default=1, ge=1)
    index_skip_topk_offset: StrictInt = Field(default=2, ge=1)
    index_topk_pattern: str | None = None
    index_cache_preset: str | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise IndexCacheError(one_line(e)) from None

    @field_validator("index_topk_pattern")
    @classmethod
    def _check_pattern(cls, v: str | None) -> str | None:
        return None if v is None else check_chars(v)

    @field_validator("index_cache_preset")
    @classmethod
    def _check_preset(cls, v: str | None) -> str | None:
        if v is not None:
            load_preset(v)
        return v

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> IndexCacheConfig:
        """Read the IndexCache keys from a transformers ``PretrainedConfig`` (attributes) or a ``config.json`` dict.

        Missing or ``None`` keys take their defaults. A list pattern (transformers also accepts one) of ``F``/``S``
        or ``full``/``shared`` entries is joined into a string.

        Raises:
            IndexCacheError: any invalid value (see the class).
        """
        values = {k: v for k in KEYS if (v := config_value(hf_config, k)) is not None}
        pattern = values.get("index_topk_pattern")
        if isinstance(pattern, (list, tuple)):
            values["index_topk_pattern"] = "".join({"full": "F", "shared": "S"}.get(x, str(x)) for x in pattern)
        return cls(**values)

    def resolve(self, num_layers: int, architecture: str | None = None, layers: list[int] | None = None) -> str:
        """The F/S pattern for a model with ``num_layers`` indexer layers (its family's ``num_indexer_layers``).

        Precedence: preset > pattern > freq/offset (vLLM 0.32 ``deepseek_v2.py``: a pattern overrides freq). A preset
        given together with a pattern, or with ``index_topk_freq`` != 1, must yield the same pattern.

        Args:
            num_layers: the family's indexer-layer count (MTP/NextN layers excluded).
            architecture: HF architecture (``architectures[0]``); None skips the preset's architecture check.
            layers: the family's indexer layers (decoder layer ids); a preset recording other ones is refused
                (:func:`vllm_indexcache.pattern.check_preset_fits`); None skips that check.

        Raises:
            IndexCacheError: pattern length != ``num_layers``; preset made for another architecture, layer count or
            layer layout; preset contradicting the pattern or freq/offset.
        """
        model = architecture or "the model"
        try:
            if self.index_cache_preset is not None:
                return self._resolve_preset(num_layers, architecture, layers)
            if self.index_topk_pattern is not None:
                return parse_pattern(self.index_topk_pattern, num_layers, model=model)
            return uniform_pattern(num_layers, self.index_topk_freq, self.index_skip_topk_offset)
        except ValueError as e:
            raise IndexCacheError(str(e)) from None

    def _resolve_preset(self, num_layers: int, architecture: str | None, layers: list[int] | None) -> str:
        name = self.index_cache_preset
        assert name is not None, "resolve() calls _resolve_preset only with a preset"
        p = load_preset(name)
        if architecture is None or p.architecture == architecture:
            check_preset_fits(p, layers, name=name)
        if (architecture is not None and p.architecture != architecture) or p.num_layers != num_layers:
            raise ValueError(f"index_cache_preset={name!r}: made for {p.architecture} with {p.num_layers} layers, "
                             f"the model is {architecture or 'a model'} with {num_layers} DSA layers")
        if self.index_topk_pattern is not None and self.index_topk_pattern != p.pattern:
            raise ValueError(f"index_cache_preset={name!r}: conflicts with "
                             f"index_topk_pattern={self.index_topk_pattern!r}; set only one of them")
        if self.index_topk_freq != 1:
            uniform = uniform_pattern(num_layers, self.index_topk_freq, self.index_skip_topk_offset)
            if uniform != p.pattern:
                raise ValueError(f"index_cache_preset={name!r}: conflicts with index_topk_freq="
                                 f"{self.index_topk_freq}, index_skip_topk_offset={self.index_skip_topk_offset} "
                                 "(a different pattern); set index_topk_freq=1 or drop the preset")
        return p.pattern


def resolve_hf_config(hf_config: Any) -> str | None:
    """Resolve a model config (transformers ``PretrainedConfig`` or ``config.json`` dict) to its F/S pattern.

    A model has a lightning indexer iff it has ``index_topk``; the pattern has one character per indexer layer of its
    family (:func:`vllm_indexcache.families.family_for`; MTP/NextN layers are excluded: they are always F).

    Returns:
        None for a model without indexer and without IndexCache keys; the all-F pattern for a DSA model without
        keys; else the resolved pattern (see :meth:`IndexCacheConfig.resolve`).

    Raises:
        IndexCacheError: IndexCache keys on a model without an indexer, a DSA architecture no family describes, a
            bad layer count, or any invalid value.
    """
    architecture = _architecture(hf_config)
    if config_value(hf_config, "index_topk") is None:
        for key in KEYS:
            if (value := config_value(hf_config, key)) is not None:
                raise IndexCacheError(f"{key}={value!r}: IndexCache keys need a DSA model, but "
                                      f"{architecture or 'this model'} has no lightning indexer (no index_topk)")
        return None
    try:
        layers = family_for(hf_config).indexer_layers(hf_config)
    except FamilyError as e:
        raise IndexCacheError(str(e)) from None
    return IndexCacheConfig.from_hf_config(hf_config).resolve(len(layers), architecture, layers)


#: Attribute/key where :func:`apply_to_hf_config` records where the pattern came from (for the start-up log).
SOURCE_KEY = "index_cache_source"


def pattern_source(hf_config: Any, overrides: Any = None) -> str:
    """Where the IndexCache configuration of ``hf_config`` comes from, in words: ``"--hf-overrides"`` when
    ``overrides`` (vLLM's ``hf_overrides`` dict) holds an IndexCache key, else ``"model config"`` when the config
    has one, else ``"default (no IndexCache keys: all F)"``; a preset adds ``preset NAME``."""
    given = isinstance(overrides, dict) and any(k in overrides for k in KEYS)
    keys = overrides if given else hf_config
    if not given and not any(config_value(hf_config, k) is not None for k in KEYS):
        return "default (no IndexCache keys: all F)"
    source = "--hf-overrides" if given else "model config"
    preset = config_value(keys, "index_cache_preset")
    return f"{source}, preset {preset}" if preset else source


def apply_to_hf_config(hf_config: Any, overrides: Any = None) -> str | None:
    """Resolve ``hf_config`` and write the result back, so every engine reads one explicit pattern.

    When ``overrides`` (the ``--hf-overrides`` dict vLLM already applied to ``hf_config``) holds any IndexCache
    key, the IndexCache keys it does not hold are dropped first: an override replaces the model's own configuration
    as a whole (a model that ships ``index_topk_pattern`` is served with ``--hf-overrides '{"index_topk_freq": 2}'``
    as freq 2, not as its pattern). The source (:func:`pattern_source`) is stored under :data:`SOURCE_KEY`.

    Sets ``index_topk_pattern`` (read by vLLM 0.32's per-layer rule), sets ``indexer_types`` (``"full"``/``"shared"``
    per layer, read by transformers' ``GlmMoeDsaForCausalLM``) when the config has that attribute/key, and removes
    ``index_cache_preset``. Idempotent. Works on a ``PretrainedConfig`` or a dict; leaves a model without indexer
    and without keys untouched.

    A DSA config whose architecture no family describes is left untouched (None), unless it sets the plugin-only
    ``index_cache_preset`` (refused: nothing else would read it).

    Returns:
        The pattern, or None for a model without indexer (see :func:`resolve_hf_config`) or of no known family.

    Raises:
        IndexCacheError: as :func:`resolve_hf_config`.
    """
    if config_value(hf_config, "index_topk") is not None and find_family(hf_config) is None:
        preset = config_value(hf_config, "index_cache_preset")
        if preset is not None:
            raise IndexCacheError(f"index_cache_preset={preset!r}: {_no_family(hf_config)}")
        return None
    source = pattern_source(hf_config, overrides)
    if source.startswith("--hf-overrides"):
        for key in KEYS:
            if key not in overrides and config_value(hf_config, key) is not None:
                if isinstance(hf_config, dict):
                    hf_config.pop(key)
                else:
                    setattr(hf_config, key, None)
    pattern = resolve_hf_config(hf_config)
    if pattern is None:
        return None
    if isinstance(hf_config, dict):
        hf_config.setdefault(SOURCE_KEY, source)
    elif getattr(hf_config, SOURCE_KEY, None) is None:
        setattr(hf_config, SOURCE_KEY, source)
    types = ["full" if c == "F" else "shared" for c in pattern]
    if isinstance(hf_config, dict):
        hf_config["index_topk_pattern"] = pattern
        if "indexer_types" in hf_config:
            hf_config["indexer_types"] = types
        hf_config.pop("index_cache_preset", None)
    else:
        hf_config.index_topk_pattern = pattern
        if hasattr(hf_config, "indexer_types"):
            hf_config.indexer_types = types
        if hasattr(hf_config, "index_cache_preset"):
            delattr(hf_config, "index_cache_preset")
    return pattern


def summary(pattern: str, source: str | None = None) -> str:
    """One line, e.g. ``IndexCache: 16 DSA layers, 5 F / 11 S: FFSSSFSSSFSSSFSS (from model config)``."""
    n_f = pattern.count("F")
    tail = f" (from {source})" if source else ""
    return f"IndexCache: {len(pattern)} DSA layers, {n_f} F / {len(pattern) - n_f} S: {pattern}{tail}"


def _architecture(hf_config: Any) -> str | None:
    return architecture_of(hf_config)


def _no_family(hf_config: Any) -> str:
    try:
        family_for(hf_config)
    except FamilyError as e:
        return str(e)
    return ""
