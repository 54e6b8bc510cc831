"""Rebuild lm_eval_bh/assets/calibration_corpus.jsonl, the built-in calibration corpus (calibration=auto).

Source: pydoc_data/topics.py of Python 3.11.7 (PSF-2.0), the help topics from 'debugger' up to (not
including) 'id-classes' in sorted order: after the text the embedded real model was fitted on (the first
8,192 tokens of the sorted topics end before 'debugger') and before the held-out perplexity task's
topics ('id-classes' to 'yield', tasks/offline/pydoc_heldout.jsonl). A paragraph that also occurs in any
offline task file is dropped. Run with Python 3.11.7: `python scripts/make_corpus.py`.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST, END = "debugger", "id-classes"


def task_paragraphs() -> set[str]:
    """Every paragraph of every string in the offline task files."""
    out: set[str] = set()

    def walk(v):
        if isinstance(v, str):
            out.update(p.strip() for p in v.split("\n\n") if p.strip())
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for path in sorted((ROOT / "tasks" / "offline").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    return out


def main() -> None:
    if sys.version_info[:3] != (3, 11, 7):
        sys.exit(f"run with Python 3.11.7 (its pydoc topics are the corpus); this is {sys.version.split()[0]}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    taken = task_paragraphs()
    out = ROOT / "lm_eval_bh" / "assets" / "calibration_corpus.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for name in names[names.index(FIRST): names.index(END)]:
            paragraphs = [p for p in topics[name].split("\n\n") if p.strip() and p.strip() not in taken]
            if paragraphs:
                f.write(json.dumps({"topic": name, "text": "\n\n".join(paragraphs)}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
