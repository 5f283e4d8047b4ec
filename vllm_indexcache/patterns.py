"""IndexCache presets shipped in ``configs/``, over the pure pattern rules of :mod:`vllm_indexcache.pattern_rules`
(re-exported here: the uniform rule, parsing, F layers).

Functions raise plain ``ValueError`` with a one-line ``key=value: reason`` message; :mod:`vllm_indexcache.config`
re-raises them as ``IndexCacheError``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_indexcache.pattern_rules import PATTERN_KEY, check_chars, f_layers, parse_pattern, uniform_pattern  # noqa: F401  (re-exported: one rule module, used by every caller)


class Preset(BaseModel):
    """A named IndexCache pattern for one model, stored as JSON in ``configs/``.

    Fields: ``name``; ``architecture`` (HF architecture string, e.g. ``GlmMoeDsaForCausalLM``); ``num_layers``
    (backbone DSA layers); ``pattern`` (explicit F/S string); ``retention`` (nominal fraction of F layers, e.g.
    ``"1/4"``); ``source`` (where the pattern comes from: paper App. B, a model config, a search command...);
    for uniform presets, ``index_topk_freq`` and ``index_skip_topk_offset`` (the pattern must equal
    :func:`uniform_pattern` of them).

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

    @model_validator(mode="after")
    def _check(self) -> Preset:
        parse_pattern(self.pattern, self.num_layers, "pattern", self.architecture)
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
        """0-based ids of the F layers."""
        return f_layers(self.pattern)


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
