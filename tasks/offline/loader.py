"""Loader for the offline tasks: reads the jsonl files next to this file.

Used from the task YAMLs as ``custom_dataset: !function loader.load_offline`` (multiple choice) or
``loader.load_text`` (documents, for perplexity) with
``dataset_kwargs: {file: <name>.jsonl}``; lm-eval resolves ``!function`` relative to the
YAML's folder, so the data load regardless of the current directory.  Header records
(``{"_meta": ...}``, which keep BIG-bench's canary string) are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jsonl(file: str) -> list[dict]:
    path = Path(file)
    if not path.is_absolute():
        path = HERE / path
    with open(path, encoding="utf-8") as f:
        return [rec for rec in map(json.loads, filter(str.strip, f)) if "_meta" not in rec]


def read_records(file: str) -> list[dict]:
    return [{"question": rec["question"], "choices": list(rec["choices"]), "label": int(rec["label"]),
             "subject": rec.get("subject", "")} for rec in _jsonl(file)]


def load_offline(file: str, split: str = "test", **_ignored):
    """Return a ``datasets.DatasetDict`` with one split (``test``) holding the records of ``file``.

    Extra keyword arguments (task metadata, model_args that lm-eval passes along) are ignored.
    """
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_records(file))})


def load_text(file: str, split: str = "test", **_ignored):
    """Like `load_offline`, for documents: records ``{"text", "topic"}``."""
    import datasets

    records = [{"text": rec["text"], "topic": rec.get("topic", "")} for rec in _jsonl(file)]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})
