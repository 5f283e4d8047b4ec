"""Calibration data, model and data identity, and the resumable search state.

Calibration (``--data``), fixed once and reused for every candidate; a corpus directory means its ``train.u16``:

* ``*.u16`` — uint16 token ids (the layout of :mod:`vllm_indexcache.tools.data.corpus`, e.g.
  ``data/tiny-dsa/train.u16``):
  ``num_seqs`` disjoint windows of ``seq_len`` tokens from token ``start`` on.
* ``*.json`` — a list of token-id lists, or of strings (tokenized with the model's tokenizer, no special tokens).
* ``*.jsonl`` — one object per line with ``prompt_token_ids`` (list of ints) or ``text``.
* anything else — UTF-8 text, tokenized with the model's tokenizer and cut into windows like ``*.u16``.

Sequences longer than ``seq_len`` are truncated; at most ``num_seqs`` are used.

Identity: the calibration set is identified by the SHA-256 of its token ids (int64 little-endian, each sequence prefixed
by its length) plus its token and sequence counts; the model by the SHA-256 of ``config.json`` and of its weight files
(full content up to 4 GiB in total, else name + size + first/last 16 MiB of each file); the IndexCache keys of
``config.json`` (:data:`SERVING_KEYS`) are left out, so shipping a pattern in the config keeps the identity. The state
file stores both, with the objective and its options, engine and block count; :func:`load_state` refuses a state whose
identity differs or that cannot be parsed, with a one-line :class:`StateError`, and the CLI never overwrites such a
file.

The state is rewritten atomically (temporary file in the same directory, fsync, ``os.replace``) after every
committed step and after every evaluation: ``pending`` holds the scores of the step under way (``{"base": pattern
of the last committed step, "scores": {pattern: loss}}``), so a killed search loses at most the evaluation that was
running; a resume takes those scores instead of recomputing them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

STATE_VERSION = 1
#: config.json keys that choose how a checkpoint is served (its IndexCache pattern; ``max_seq_len``, the default
#: served context, vLLM's ``--max-model-len``), left out of its identity.
SERVING_KEYS = ("index_topk_pattern", "index_topk_freq", "index_skip_topk_offset", "index_cache_preset", "max_seq_len")
_FULL_HASH_LIMIT = 4 << 30
_EDGE = 16 << 20


class StateError(RuntimeError):
    """A one-line, user-facing problem with the calibration data or the state file."""


# ---------------------------------------------------------------------------------------------------- calibration
def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _windows(ids: np.ndarray, seq_len: int, num_seqs: int, start: int) -> list[list[int]]:
    ids = ids[start:]
    n = min(num_seqs, len(ids) // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len].astype(np.int64).tolist() for i in range(n)]


def calibration_file(data) -> Path:
    """``--data``: a corpus directory (``data/tiny-dsa``, from ``scripts/prepare_tiny_dsa_data.py``) means its
    ``train.u16``; a file is itself.

    Raises:
        StateError: a directory without ``train.u16``.
    """
    path = Path(data)
    if path.is_dir():
        if not (path / "train.u16").exists():
            raise StateError(f"--data={str(data)!r}: a directory must hold train.u16 "
                             "(scripts/prepare_tiny_dsa_data.py writes one)")
        return path / "train.u16"
    return path


def load_calibration(path, model_dir=None, *, seq_len: int = 2048, num_seqs: int = 8,
                     start: int = 0) -> list[list[int]]:
    """Read the calibration sequences of ``path`` (formats in the module docstring; a corpus directory means its
    ``train.u16``, :func:`calibration_file`).

    Raises:
        StateError: unreadable file, a directory without ``train.u16``, or no sequence of at least 2 tokens.
    """
    path = calibration_file(path)
    if seq_len < 2 or num_seqs < 1 or start < 0:
        raise StateError(f"calibration: need --seq-len >= 2, --num-seqs >= 1, --start >= 0 (got {seq_len}, "
                         f"{num_seqs}, {start})")
    try:
        if path.suffix == ".u16":
            seqs = _windows(np.fromfile(path, dtype=np.uint16), seq_len, num_seqs, start)
        elif path.suffix in (".json", ".jsonl"):
            if path.suffix == ".json":
                items = json.loads(path.read_text())
            else:
                items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            seqs = []
            for item in items:
                if isinstance(item, dict):
                    item = item.get("prompt_token_ids", item.get("text"))
                if isinstance(item, str):
                    if model_dir is None:
                        raise StateError(f"--data={str(path)!r}: text entries need the model's tokenizer")
                    item = _tokenizer(model_dir)(item, add_special_tokens=False)["input_ids"]
                if not isinstance(item, list) or not all(isinstance(t, int) for t in item):
                    raise StateError(f"--data={str(path)!r}: entries must be token-id lists, strings, or objects "
                                     "with 'prompt_token_ids' or 'text'")
                if len(item) >= 2:
                    seqs.append(item[:seq_len])
                if len(seqs) == num_seqs:
                    break
        else:
            if model_dir is None:
                raise StateError(f"--data={str(path)!r}: text files need the model's tokenizer")
            ids = _tokenizer(model_dir)(path.read_text(), add_special_tokens=False)["input_ids"]
            seqs = _windows(np.asarray(ids, dtype=np.int64), seq_len, num_seqs, start)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"--data={str(path)!r}: cannot read: {e}") from None
    if not seqs:
        raise StateError(f"--data={str(path)!r}: no calibration sequence of >= 2 tokens "
                         f"(seq_len {seq_len}, start {start})")
    return seqs


def calibration_identity(seqs: list[list[int]], source=None) -> dict:
    """``{"sha256", "tokens", "sequences", "seq_lens", "source"}`` of a calibration set (hash over token ids)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(np.asarray([len(s)], dtype="<i8").tobytes())
        h.update(np.asarray(s, dtype="<i8").tobytes())
    return {"sha256": h.hexdigest(), "tokens": int(sum(len(s) for s in seqs)), "sequences": len(seqs),
            "seq_lens": sorted({len(s) for s in seqs}), "source": None if source is None else str(source)}


# ---------------------------------------------------------------------------------------------------- model
def model_identity(model_dir) -> dict:
    """``{"sha256", "num_layers", "architecture", "path", "weights_hashed"}`` of a local model directory.

    Raises:
        StateError: no ``config.json``.
    """
    d = Path(model_dir)
    try:
        config_bytes = (d / "config.json").read_bytes()
        config = json.loads(config_bytes)
    except (OSError, json.JSONDecodeError) as e:
        raise StateError(f"MODEL={str(model_dir)!r}: cannot read config.json: {e}") from None
    if any(k in config for k in SERVING_KEYS):
        # the IndexCache keys choose how the model is served, not which model it is: a checkpoint that ships its
        # pattern (or has it changed) keeps the identity of the same checkpoint without one
        config_bytes = (json.dumps({k: v for k, v in config.items() if k not in SERVING_KEYS}, indent=2,
                                   sort_keys=True) + "\n").encode()
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    full = sum(p.stat().st_size for p in files) <= _FULL_HASH_LIMIT
    h = hashlib.sha256(config_bytes)
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            if full:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            else:
                h.update(f.read(_EDGE))
                f.seek(max(0, size - _EDGE))
                h.update(f.read(_EDGE))
    archs = config.get("architectures") or [None]
    return {"sha256": h.hexdigest(), "num_layers": _indexer_layers(config), "architecture": archs[0],
            "path": str(d), "weights_hashed": "full" if full else "edges"}


def _indexer_layers(config: dict) -> int:
    """The pattern length of a model: its family's indexer-layer count (:mod:`vllm_indexcache.families`).

    Raises:
        StateError: no DSA family for the architecture, or a bad layer count.
    """
    from vllm_indexcache.families import family_for

    try:
        return family_for(config).num_indexer_layers(config)
    except ValueError as e:
        raise StateError(f"MODEL: {e}") from None


# ---------------------------------------------------------------------------------------------------- state
def identity_key(state: dict) -> dict:
    """The fields of a state that must match for a resume."""
    return {"model_sha256": state["model"]["sha256"], "calibration_sha256": state["calibration"]["sha256"],
            "calibration_tokens": state["calibration"]["tokens"], "objective": state["objective"],
            "objective_options": state.get("objective_options", {}),
            "engine": state["engine"], "pp_blocks": state["pp_blocks"], "num_layers": state["num_layers"]}


def load_state(path, expected: dict) -> dict:
    """Read a state file and check it against ``expected`` (a fresh state's header: same keys as the file).

    Raises:
        StateError: (one line) unreadable or corrupt file (including its ``pending`` scores), unknown version, or a
            different model, calibration set, objective, engine, block count or layer count.
    """
    path = Path(path)
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a version-{STATE_VERSION} search state")
        have = identity_key(state)
        _ = [(s["pattern"], s["loss"], s["flipped"], s["candidates"]) for s in state["steps"]]
        float(state["baseline_loss"])
        pending = state.get("pending") or {"base": "", "scores": {}}
        _ = (str(pending["base"]), {str(k): float(v) for k, v in pending["scores"].items()})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise StateError(f"state {path}: corrupt or unreadable ({type(e).__name__}: {e}); left unchanged — delete it "
                         "to start over") from None
    want = identity_key(expected)
    diff = [k for k in want if have[k] != want[k]]
    if diff:
        detail = ", ".join(f"{k} {have[k]!r} != {want[k]!r}" for k in diff)
        raise StateError(f"state {path}: belongs to another search ({detail}); left unchanged — use another --out "
                         "or delete it")
    return state


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, data: dict) -> None:
    """Write JSON to ``path`` atomically: a reader sees the old file or the new one, never a partial file. The file
    gets the permissions the user's umask gives a new file (``mkstemp`` alone would make it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
