"""IndexCache F/S patterns: the rules, one pattern-spec syntax for every command, and the presets in ``configs/``.

A pattern is a string with one character per *indexer layer* of the model's DSA family
(:func:`vllm_indexcache.families.family_for`; character ``i`` belongs to decoder layer
``family.indexer_layers(config)[i]``, in DeepSeek-V3.2 and GLM-5 simply layer ``i``): ``F`` (Full: the layer runs its
lightning indexer) or ``S`` (Shared: the layer reuses the top-k of the nearest preceding F layer). Only upper-case
``F``/``S`` are accepted: vLLM 0.32 tests ``pattern[i] == "S"``, so a lower-case ``s`` would silently run as F there.

Pattern specs (:func:`resolve_spec`, accepted by ``vllm-indexcache pattern/bench/distill``, the reliability run and
``scripts/bench_vllm_gpu.py``):

* ``FSFS...`` — an explicit pattern, one character per indexer layer;
* ``all-F`` — every indexer layer F (IndexCache off);
* ``freq:K[:OFFSET]`` — vLLM's uniform rule (``index_topk_freq=K``, ``index_skip_topk_offset=OFFSET``, default 2):
  indexer layer ``i`` is S iff ``max(i - OFFSET + 1, 0) % K != 0`` (:func:`uniform_pattern`); ``uniform:K[:OFFSET]``
  is accepted as an alias;
* ``every:K`` — F at indexer layers 0, K, 2K, … (``freq:K:1``); ``1/K`` is an alias of ``every:K`` (what the bench
  and the GPU benchmark script have always meant by it; it is *not* ``freq:K``: on 12 layers ``every:4`` = F at 0, 4, 8,
  ``freq:4`` = F at 0, 1, 5, 9);
* ``preset:NAME`` — a preset of ``configs/`` (or ``preset:PATH``; a bare preset name or ``.json`` path also works).

Pure functions need neither torch nor vLLM; pydantic is used for :class:`Preset` only. Functions raise plain
``ValueError`` with a one-line ``key=value: reason`` message; :mod:`vllm_indexcache.config` re-raises them as
``IndexCacheError``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PATTERN_KEY = "index_topk_pattern"
#: The spec forms, for help texts and error messages.
SPEC_FORMS = "an F/S string, all-F, freq:K[:OFFSET] (vLLM's rule), every:K (F at 0, K, 2K, ...; 1/K is an alias), " \
             "preset:NAME"


# ------------------------------------------------------------------------------------------------------------- rules
def uniform_pattern(num_layers: int, freq: int, offset: int = 2) -> str:
    """The uniform F/S pattern of vLLM 0.32 (``model_executor/models/deepseek_v2.py``).

    Indexer layer ``i`` (0-based) is S iff ``max(i - offset + 1, 0) % freq != 0``. ``freq=1`` gives all F (IndexCache
    off); offset 2 keeps layers 0 and 1 F (freq 4 on 78 layers: F = 0, 1, 5, 9, ..., 77); GLM-5.2 ships offset 3
    (F = 0, 1, 2, 6, 10, ..., 74); offset 1 gives F = 0, freq, 2·freq, ... (spec ``every:K``). The paper's "uniform"
    baseline (§3) is this rule.

    Args:
        num_layers: number of indexer layers (MTP/NextN layers excluded).
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

    Indexer layer 0 must be F: an S layer reuses the top-k of a *preceding* F layer, and layer 0 has none.

    Raises:
        ValueError: not a str, empty, a character other than ``F``/``S`` (lower case included), or layer 0 is S. A
            pattern spec given where only an F/S string is read (the ``index_topk_pattern`` config key) is named as
            such, with the config keys that say the same (:func:`_config_keys_for_spec`).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{key}={pattern!r}: must be a non-empty string of 'F'/'S'")
    bad = "".join(dict.fromkeys(c for c in pattern if c not in "FS"))   # in order of first appearance
    if bad:
        keys = _config_keys_for_spec(pattern)
        if keys is not None:
            raise ValueError(f"{key}={pattern!r}: a pattern spec, not an F/S string (one per indexer layer); {keys} "
                             f"(or the string `vllm-indexcache pattern MODEL --pattern {pattern}` prints)")
        raise ValueError(f"{key}={pattern!r}: invalid character(s) {bad!r}; only upper-case 'F' and 'S'")
    if pattern[0] != "F":
        raise ValueError(f"{key}={pattern!r}: layer 0 is S, but the first DSA layer must be F "
                         "(an S layer reuses the top-k of a preceding F layer)")
    return pattern


def _config_keys_for_spec(spec: str) -> str | None:
    """The IndexCache config keys that say what a command-line pattern spec says (``every:4`` ->
    ``index_topk_freq=4, index_skip_topk_offset=1``), or None when ``spec`` is not a spec of a uniform rule,
    all-F or a preset with valid numbers (explicit F/S strings and malformed specs included)."""
    if spec.lower() in _ALL_F:
        return "all F is the default: give no IndexCache key"
    try:
        rule = _rule_args(spec)
    except ValueError:
        return None
    if rule is not None:
        return f"as config keys: index_topk_freq={rule[0]}, index_skip_topk_offset={rule[1]}"
    if spec.startswith("preset:"):
        return f"as a config key: index_cache_preset={spec.removeprefix('preset:')!r}"
    return None


def parse_pattern(pattern: str, num_layers: int | None = None, key: str = PATTERN_KEY,
                  model: str = "the model") -> str:
    """Validate ``pattern`` (see :func:`check_chars`) and, when given, its length against ``num_layers``.

    Args:
        pattern: the F/S string.
        num_layers: number of indexer layers of the model, or None to skip the length check.
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
    """0-based indexer-layer ordinals of the F layers of ``pattern``."""
    return [i for i, c in enumerate(pattern) if c == "F"]


# ------------------------------------------------------------------------------------------------------------- specs
_ALL_F = ("all-f", "allf")   # the all-F spec, compared lower-cased
_UNIFORM = re.compile(r"^(freq|uniform):(\d+)(?::(\d+))?$")
_EVERY = re.compile(r"^(?:every:|1/)(\d+)$")


def _rule_args(spec: str) -> tuple[int, int] | None:
    """``(index_topk_freq, index_skip_topk_offset)`` of a uniform-rule spec (``freq:K[:OFFSET]`` / ``uniform:``,
    offset 2 by default; ``every:K`` / ``1/K``, offset 1), or None for any other string.

    Raises:
        ValueError: K or OFFSET below 1, naming the spec's K (and OFFSET).
    """
    if m := _UNIFORM.match(spec):
        freq, offset = int(m.group(2)), int(m.group(3) or 2)
        if freq < 1 or offset < 1:
            raise ValueError(f"K and OFFSET of {m.group(1)}:K[:OFFSET] must be integers >= 1")
        return freq, offset
    if m := _EVERY.match(spec):
        if int(m.group(1)) < 1:
            raise ValueError("K of every:K (1/K) must be an integer >= 1: every K-th indexer layer is F")
        return int(m.group(1)), 1
    return None


def resolve_spec(spec: str, num_layers: int, key: str = "pattern", architecture: str | None = None,
                 layers: list[int] | None = None) -> str:
    """The F/S pattern a spec (module docstring) names for a model with ``num_layers`` indexer layers.

    Args:
        spec: ``FSFS...``, ``all-F``, ``freq:K[:OFFSET]`` (alias ``uniform:``), ``every:K`` (alias ``1/K``),
            ``preset:NAME`` (or a ``.json`` path).
        num_layers: the family's indexer-layer count (``family_for(config).num_indexer_layers(config)``).
        key: option or key named in error messages.
        architecture: the model's HF architecture; when given, a preset made for another one is refused.
        layers: the model's indexer layers (decoder layer ids); when given, a preset recording other ones is refused
            (:func:`check_preset_fits`).

    Raises:
        ValueError: one line naming ``key`` and ``spec``: not a spec, a bad number, a pattern (or preset) of another
            length or architecture.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{key}={spec!r}: empty pattern spec; expected {SPEC_FORMS}")
    spec = spec.strip()
    try:
        if set(spec) <= set("FSfs"):
            return parse_pattern(spec, num_layers, key, architecture or "the model")
        if spec.lower() in _ALL_F:
            return uniform_pattern(num_layers, 1)
        if (rule := _rule_args(spec)) is not None:
            return uniform_pattern(num_layers, *rule)
        if spec.startswith("preset:") or spec.endswith(".json") or spec in list_presets():
            p = load_preset(spec.removeprefix("preset:"), key="preset")
            if architecture is not None and p.architecture != architecture:
                raise ValueError(f"preset {p.name} is made for {p.architecture}, the model is {architecture}")
            check_preset_fits(p, layers, key="preset")
            return parse_pattern(p.pattern, num_layers, "preset", p.architecture)
    except ValueError as e:
        if str(e).startswith(f"{key}={spec!r}"):
            raise
        raise ValueError(f"{key}={spec!r}: {e}") from None
    hint = "; 1/K means every:K, write freq:K for vLLM's rule" if "/" in spec else ""
    raise ValueError(f"{key}={spec!r}: not a pattern spec; expected {SPEC_FORMS}{hint}")


def resolve_for_model(spec: str, config: Any, key: str = "pattern") -> str:
    """:func:`resolve_spec` for the model of ``config`` (``config.json`` dict or ``PretrainedConfig``): the pattern
    length is its family's indexer-layer count and a preset must be made for its architecture (and, when it records
    them, its indexer layers).

    Raises:
        ValueError: one line: see :func:`resolve_spec`; a config of no known DSA family
            (:class:`~vllm_indexcache.families.FamilyError`).
    """
    from vllm_indexcache.families import architecture_of, family_for

    layers = family_for(config).indexer_layers(config)
    return resolve_spec(spec, len(layers), key=key, architecture=architecture_of(config), layers=layers)


def describe_spec(spec: str, pattern: str) -> str:
    """One line naming what a spec resolved to, e.g. ``spec 'freq:4' -> FFSSSFSSSFSS (4 F / 12 indexer layers)``."""
    return f"spec {spec!r} -> {pattern} ({pattern.count('F')} F / {len(pattern)} indexer layers)"


# ----------------------------------------------------------------------------------------------------------- presets
class Preset(BaseModel):
    """A named IndexCache pattern for one model, stored as JSON in ``configs/``.

    Fields: ``name``; ``architecture`` (HF architecture string, e.g. ``GlmMoeDsaForCausalLM``); ``num_layers``
    (the number of *indexer layers* of that model, i.e. the pattern length: for DeepSeek-V3.2 and GLM-5 every
    backbone DSA layer, MTP excluded); ``pattern`` (explicit F/S string); ``retention`` (nominal fraction of F layers,
    e.g. ``"1/4"``); ``source`` (where the pattern comes from: paper App. B, a model config, a search command...);
    for uniform presets, ``index_topk_freq`` and ``index_skip_topk_offset`` (the pattern must equal
    :func:`uniform_pattern` of them); ``description`` (optional, one line saying what the pattern is);
    ``indexer_layers`` (optional: the decoder layer ids of the indexer layers the pattern is made for, ascending, one
    per character; DeepSeek-V4 presets list the CSA layers of their model's ``compress_ratios``, and a model whose
    indexer layers differ is refused even with the same count, :func:`check_preset_fits`).

    Raises:
        pydantic.ValidationError: on construction, for an invalid pattern, a length != ``num_layers``, a malformed
        ``retention``, or a pattern that does not match the given freq/offset.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    architecture: str
    num_layers: int = Field(ge=1, strict=True)
    pattern: str
    retention: str = Field(pattern=r"^\d+/\d+$")
    source: str
    index_topk_freq: int | None = Field(default=None, ge=1, strict=True)
    index_skip_topk_offset: int | None = Field(default=None, ge=1, strict=True)
    description: str | None = None
    indexer_layers: list[int] | None = Field(default=None, strict=True)

    @model_validator(mode="after")
    def _check(self) -> Preset:
        parse_pattern(self.pattern, self.num_layers, "pattern", self.architecture)
        if self.indexer_layers is not None:
            ids = self.indexer_layers
            if len(ids) != self.num_layers:
                raise ValueError(f"indexer_layers has {len(ids)} entries, num_layers={self.num_layers}")
            if any(i < 0 for i in ids) or any(b <= a for a, b in zip(ids, ids[1:])):
                raise ValueError(f"indexer_layers={ids}: must be ascending decoder layer ids >= 0")
        if self.index_topk_freq is None and self.index_skip_topk_offset is not None:
            raise ValueError("index_skip_topk_offset is set without index_topk_freq")
        if self.index_topk_freq is not None:
            offset = 2 if self.index_skip_topk_offset is None else self.index_skip_topk_offset
            if uniform_pattern(self.num_layers, self.index_topk_freq, offset) != self.pattern:
                raise ValueError(f"pattern does not match index_topk_freq={self.index_topk_freq}, "
                                 f"index_skip_topk_offset={offset}")
        return self

    @property
    def f_layers(self) -> list[int]:
        """0-based indexer-layer ordinals of the F layers."""
        return f_layers(self.pattern)


def check_preset_fits(preset: Preset, layers: list[int] | None, key: str = "index_cache_preset",
                      name: str | None = None) -> None:
    """Refuse a preset whose recorded indexer layers (:attr:`Preset.indexer_layers`) are not the model's.

    Args:
        preset: the loaded preset.
        layers: the model's indexer layers (``family.indexer_layers(config)``: decoder layer ids, for DeepSeek-V4 its
            CSA layers), or None when unknown (then only the count is checked, by the caller).
        key, name: option/key and preset name for the message.

    Raises:
        ValueError: one line naming both layouts, e.g. a V4-Flash preset (CSA layers 2, 4, ..., 42) on a model whose
            CSA layers are 2, 4, ..., 60.
    """
    if preset.indexer_layers is None or layers is None or list(layers) == preset.indexer_layers:
        return
    raise ValueError(f"{key}={name or preset.name!r}: made for {preset.architecture} with indexer layers "
                     f"{_ids(preset.indexer_layers)} ({len(preset.indexer_layers)}); the model's indexer layers are "
                     f"{_ids(layers)} ({len(layers)}): its layer layout does not fit")


def _ids(layers: list[int]) -> str:
    return ",".join(map(str, layers)) or "none"


def presets_dir() -> Path:
    """Directory holding the preset JSON files: the package data ``vllm_indexcache/configs`` (read with
    ``importlib.resources``; in a checkout it is a link to the repository's ``configs/``, the source of truth, and a
    wheel carries copies of those files)."""
    from importlib.resources import files

    return Path(str(files("vllm_indexcache") / "configs"))


def list_presets() -> list[str]:
    """Sorted names (file stems) of the presets in :func:`presets_dir`."""
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def load_preset(name_or_path: str | Path, key: str = "index_cache_preset") -> Preset:
    """Load a preset by name (a file in :func:`presets_dir`, with or without ``.json``) or by path to a JSON file.

    A value containing a path separator is taken as a path; anything else as a preset name.

    Raises:
        ValueError (one line, naming ``key`` and the value): unknown preset (the available ones are listed), missing
        or unreadable file, invalid JSON, or content that is not a valid :class:`Preset`.
    """
    text = str(name_or_path)
    if "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"{key}={text!r}: no such file")
    else:
        path = presets_dir() / (text if text.endswith(".json") else text + ".json")
        if not path.is_file():
            raise ValueError(f"{key}={text!r}: unknown preset; available: {', '.join(list_presets()) or 'none'} "
                             "(or give a path to a preset .json file)")
    try:
        return Preset.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}={text!r}: cannot read {path}: {e}") from None
    except ValidationError as e:
        raise ValueError(f"{key}={text!r}: invalid preset file {path}: {one_line(e)}") from None


def one_line(error: ValidationError) -> str:
    """Pydantic's multi-line error as one line: ``field=value: message`` per error, joined by ``; ``."""
    parts = []
    for err in error.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "value_error":  # raised by our validators: the message already names key and value
            parts.append(re.sub(r"^Value error, ", "", err["msg"]))
        else:
            parts.append(f"{loc}={err['input']!r}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts).replace("\n", " ")
