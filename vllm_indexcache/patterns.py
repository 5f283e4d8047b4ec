"""IndexCache layer patterns: the uniform rule, parsing, and the presets shipped in ``configs/``.

A pattern is a string with one character per backbone DSA layer: ``F`` (Full: the layer runs its lightning indexer)
or ``S`` (Shared: the layer reuses the top-k of the nearest preceding F layer). Only upper-case ``F``/``S`` are
accepted: vLLM 0.32 tests ``pattern[i] == "S"``, so a lower-case ``s`` would silently run as F there.

Functions here are pure and raise plain ``ValueError`` with a one-line ``key=value: reason`` message;
:mod:`vllm_indexcache.config` re-raises them as ``IndexCacheError``.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    def _check(self) -> "Preset":
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
    """Directory holding the preset JSON files.

    The repository's ``configs/`` when the package runs from a checkout (``setup.py`` next to the package), else
    ``<sys.prefix>/share/vllm-indexcache/configs`` (where ``setup.py``'s ``data_files`` installs them).
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "configs").is_dir():
        return root / "configs"
    return Path(sys.prefix) / "share" / "vllm-indexcache" / "configs"


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
