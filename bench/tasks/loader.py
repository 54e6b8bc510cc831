"""Data of the harness benchmark's own tasks, built from text that ships with Python or this repository.

- ``load_longdocs``: long English documents for rolling log-likelihood, the longest topics of the Python
  documentation that CPython ships as ``pydoc_data.topics`` (PSF licence); one document per topic.
- ``load_prompts``: the questions of the offline MMLU development set (tasks/offline), as prompts for a
  short ``generate_until`` task.
"""

from __future__ import annotations

import json
from pathlib import Path

OFFLINE = Path(__file__).resolve().parents[2] / "tasks" / "offline"


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def longdocs(min_chars: int = 9000) -> list[dict]:
    from pydoc_data.topics import topics

    names = sorted((name for name, text in topics.items() if len(text) >= min_chars), key=lambda n: -len(topics[n]))
    return [{"topic": name, "text": topics[name]} for name in names]


def load_longdocs(min_chars: int = 9000, **_ignored):
    return _dataset(longdocs(int(min_chars)))


def load_prompts(file: str = "mmlu_dev.jsonl", **_ignored):
    rows = []
    with open(OFFLINE / file, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line) if line.strip() else {}
            if "question" in rec:
                rows.append({"question": rec["question"], "answer": rec["choices"][int(rec["label"])]})
    return _dataset(rows)
