"""The built-in calibration corpus: unlabeled, licence-clean text that needs no download and no file.

`calibration=auto` and `target_k` fit on it at model load, so the routing that needs a null or a
budget runs from one command. `CORPUS` names it in results files; `corpus_hash` keys caches on it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

from .errors import UsageError

__all__ = ["CORPUS", "PATH", "builtin_texts", "corpus_hash", "read_texts", "token_batches"]

PATH = Path(__file__).with_name("assets") / "calibration_corpus.jsonl"
CORPUS = {
    "name": "pydoc-topics-3.11.7-debugger-to-global",
    "source": "pydoc_data/topics.py of Python 3.11.7: the help topics 'debugger' to 'global' in sorted "
              "order (after the embedded real model's fitting text, before the held-out perplexity task's "
              "topics), lm_eval_bh/assets/calibration_corpus.jsonl, made by scripts/make_corpus.py",
    "licence": "PSF-2.0",
}


def builtin_texts() -> list[str]:
    """The corpus's documents: one per help topic. Shipped as a file (not read from the running Python),
    so every machine calibrates on the same text."""
    with open(PATH, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def read_texts(path: str) -> list[str]:
    """Documents of a text file: JSON lines with a "text" field, or paragraphs of plain text."""
    import os

    if not os.path.isfile(path):
        raise UsageError(f"text file not found: {path}")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    first = next((line for line in content.splitlines() if line.strip()), "")
    if path.endswith(".jsonl") or first.lstrip().startswith("{"):
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: line {n} is not JSON ({e.msg})") from None
            except RecursionError:
                raise UsageError(f"{path}: line {n} is JSON nested too deeply") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise UsageError(f"{path}: line {n} has no string field 'text'")
            texts.append(doc["text"])
        return [t for t in texts if t.strip()]
    return [p.strip() for p in content.replace("\r\n", "\n").split("\n\n") if p.strip()]


def corpus_hash(texts: Iterable[str]) -> str:
    """sha256 of the documents, each length-prefixed (so the split into documents counts)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def token_ids_hash(batches) -> str:
    """sha256 of the real tokens (attention mask 1) of (input_ids, attention_mask) batches, as int64 little-endian:
    the same tokens in the same order, the same hash, whatever the padding."""
    h = hashlib.sha256()
    for ids, mask in batches:
        h.update(ids[mask.bool()].cpu().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def token_batches(tokenizer, texts: Iterable[str], max_length: int, batch_size: int):
    """(input_ids, attention_mask) batches, right-padded, documents cut into windows of max_length tokens
    (longest first, so batches waste little padding)."""
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]  # windows follow
        windows += [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if w]
    windows.sort(key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, w in enumerate(chunk):
            ids[j, : len(w)] = torch.tensor(w)
            mask[j, : len(w)] = 1
        yield ids, mask
