#!/usr/bin/env python
"""Convert real data carried by registry packages (and Python itself) into the offline
lm-eval tasks under ``tasks/offline/``.

Sources
-------
* ``lm-eval`` (MIT): ``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`` -- the
  MMLU development questions of 57 subjects, embedded in chain-of-thought prompts.
  Parsed back into question, four options and the answer letter.
* Python's own standard library (PSF licence): ``pydoc_data/topics.py``, the help-topic prose.
  Documents of whole paragraphs from the topics in the second half of the sorted topic list, for
  the perplexity task ``pydoc_perplexity_offline``.  The embedded ``real`` model is fitted on the
  first 8,192 tokens of the same text (``lm_eval_bh.real``: topics "assert" to "augassign" under
  Python 3.11), so none of these documents was seen by its fit.
* ``bigbench==1.0.0`` (Apache-2.0), *source distribution* (never installed):
  ``bigbench/benchmark_tasks/<task>/task.json`` for a few multiple-choice tasks
  (``target_scores`` examples).  Each converted BIG-bench file starts with a header
  record that keeps the task's canary string (the loader skips it).

Every output file is recorded (source package and version, path inside it, licence,
example count, sha256) in ``tasks/offline/SOURCES.md`` and ``tasks/offline/sources.json``.

The script is deterministic and re-runnable::

    python scripts/convert_tasks.py                       # downloads the bigbench sdist with pip
    python scripts/convert_tasks.py --bigbench-sdist /tmp/bb/bigbench-1.0.0.tar.gz
    python scripts/convert_tasks.py --skip-bigbench       # only MMLU
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tasks" / "offline"

BIGBENCH_VERSION = "1.0.0"
# task name in BIG-bench -> (output stem, cap on the number of examples)
BIGBENCH_TASKS = {
    "strategyqa": ("bigbench_strategyqa", 300),
    "social_iqa": ("bigbench_social_iqa", 300),
    "physical_intuition": ("bigbench_physical_intuition", 300),  # 81 in total
}
SAMPLE_SEED = 1234
PYDOC_DOCS = 100      # documents in pydoc_heldout.jsonl
PYDOC_MIN_CHARS = 200  # a document is whole paragraphs, at least this long (about 50 tokens)
MMLU_SRC = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"

_OPTS = re.compile(r"^\(A\)\s*(.*?)\s*\(B\)\s*(.*?)\s*\(C\)\s*(.*?)\s*\(D\)\s*(.*?)\s*$", re.S)
_ANSWER = re.compile(r"answer is \(?([ABCD])\)?")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- MMLU
def parse_mmlu_block(block: str) -> dict | None:
    """One ``Q: ...\\n(A) .. (D) ..\\nA: ... The answer is (X).`` block -> record."""
    if "\nA:" not in block:
        return None
    q_part, a_part = block.split("\nA:", 1)
    # the options follow the question: "(A) x (B) y (C) z (D) w", on one line or one per line
    start = q_part.rfind("\n(A)")
    if start < 0:
        return None
    m = _OPTS.match(q_part[start + 1:].strip())
    if not m or "(E)" in q_part[start:]:
        return None
    question = q_part[:start].strip()
    choices = [c.strip() for c in m.groups()]
    ans = _ANSWER.findall(a_part)
    if not question or not ans or any(not c for c in choices):
        return None
    return {"question": question, "choices": choices, "label": "ABCD".index(ans[-1])}


def convert_mmlu() -> tuple[list[dict], dict]:
    import lm_eval

    src = Path(lm_eval.__file__).resolve().parent / MMLU_SRC.split("lm_eval/", 1)[1]
    data = json.loads(src.read_text(encoding="utf-8"))
    records = []
    for subject in sorted(data):
        text = data[subject]
        for block in re.split(r"\n\s*\nQ: ", "\n\n" + text)[1:]:
            rec = parse_mmlu_block(block)
            if rec is not None:
                rec["subject"] = subject
                records.append(rec)
    meta = {
        "source_package": "lm-eval",
        "source_version": importlib.metadata.version("lm-eval"),
        "source_path": MMLU_SRC,
        "source_sha256": sha256_file(src),
        "license": "MIT",
        "selection": "all blocks that parse into question, four options and an answer letter",
    }
    return records, meta


# --------------------------------------------------------------------------- pydoc prose
def pydoc_documents(topics: dict, min_chars: int = PYDOC_MIN_CHARS) -> list[dict]:
    """The topics of the second half of the sorted list, each cut into documents of whole paragraphs
    (blank-line separated) of at least ``min_chars`` characters (a topic's short tail joins its last
    one). Documents with a paragraph that also occurs in the first half (some topics repeat others'
    text) are left out: the real model is fitted on the start of the first half."""
    names = sorted(topics)
    first_half = "\n\n".join(topics[k] for k in names[: len(names) // 2])
    docs = []
    for name in names[len(names) // 2:]:
        paras = [p.rstrip() for p in re.split(r"\n\s*\n", topics[name].strip()) if p.strip()]
        cur: list[str] = []
        for p in paras:
            cur.append(p)
            if len("\n\n".join(cur)) >= min_chars:
                docs.append({"topic": name, "text": "\n\n".join(cur)})
                cur = []
        if cur:
            if docs and docs[-1]["topic"] == name:
                docs[-1]["text"] += "\n\n" + "\n\n".join(cur)
            else:
                docs.append({"topic": name, "text": "\n\n".join(cur)})
    return [d for d in docs if not any(p.strip() in first_half for p in re.split(r"\n\s*\n", d["text"]) if p.strip())]


def convert_pydoc() -> tuple[list[dict], dict]:
    import pydoc_data.topics as mod

    docs = pydoc_documents(mod.topics)
    n_total = len(docs)
    records = random.Random(SAMPLE_SEED).sample(docs, min(PYDOC_DOCS, n_total))  # random order: --limit N is a sample
    names = sorted(mod.topics)
    meta = {
        "source_package": "python",
        "source_version": ".".join(map(str, sys.version_info[:3])),
        "source_path": "pydoc_data/topics.py",
        "source_sha256": sha256_file(Path(mod.__file__)),
        "license": "PSF-2.0",
        "selection": (f"{len(records)} of the {n_total} documents (whole paragraphs, >= {PYDOC_MIN_CHARS} characters) "
                      f"of the topics '{names[len(names) // 2]}' to '{names[-1]}' (the second half of the sorted "
                      f"topic list; none with a paragraph that the first half repeats), random.Random({SAMPLE_SEED}).sample order; the real model is fitted on the first "
                      f"8,192 tokens of the sorted topics, which end before topic '{_calibration_end(mod.topics)}' "
                      "even at 16 characters a token"),
    }
    return records, meta


def _calibration_end(topics: dict) -> str:
    """A topic the real model's calibration text (8,192 tokens) ends before, even at 16 characters
    a token (a bound: SmolLM2's tokenizer averages about 4 on this text)."""
    names, pos = sorted(topics), 0
    for name in names:
        pos += len(topics[name]) + 2
        if pos >= 8192 * 16:
            return name
    return names[-1]


# ---------------------------------------------------------------------- BIG-bench
def get_bigbench_sdist(path: str | None) -> Path:
    if path:
        return Path(path)
    d = Path(tempfile.mkdtemp(prefix="bigbench_sdist_"))
    cmd = [sys.executable, "-m", "pip", "download", f"bigbench=={BIGBENCH_VERSION}", "--no-deps",
           "--no-binary", ":all:", "--no-build-isolation", "-d", str(d)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return next(d.glob("bigbench-*.tar.gz"))


def convert_bigbench_task(tar: tarfile.TarFile, name: str, cap: int) -> tuple[list[dict], dict]:
    inner = f"bigbench/benchmark_tasks/{name}/task.json"
    raw = tar.extractfile(f"bigbench-{BIGBENCH_VERSION}/{inner}").read()
    task = json.loads(raw)
    examples = []
    for ex in task["examples"]:
        ts = ex["target_scores"]
        choices = [str(c).strip() for c in ts]
        scores = list(ts.values())
        if scores.count(max(scores)) != 1 or max(scores) != 1 or any(not c for c in choices):
            continue
        examples.append({"question": ex["input"].strip(), "choices": choices,
                         "label": scores.index(max(scores))})
    n_total = len(examples)
    if n_total > cap:
        idx = sorted(random.Random(SAMPLE_SEED).sample(range(n_total), cap))
        examples = [examples[i] for i in idx]
        selection = f"{cap} of {n_total} single-answer examples, random.Random({SAMPLE_SEED}).sample, source order"
    else:
        selection = f"all {n_total} single-answer examples"
    header = {"_meta": {"canary": task["canary"], "source": f"bigbench=={BIGBENCH_VERSION}:{inner}",
                        "license": "Apache-2.0"}}
    meta = {
        "source_package": "bigbench",
        "source_version": BIGBENCH_VERSION,
        "source_path": inner,
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "license": "Apache-2.0",
        "canary": task["canary"],
        "selection": selection,
    }
    return [header] + examples, meta


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bigbench-sdist", help="path to bigbench-1.0.0.tar.gz (default: pip download it)")
    ap.add_argument("--skip-bigbench", action="store_true", help="only (re)convert MMLU; keep BIG-bench entries")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sources_path = out / "sources.json"
    sources = json.loads(sources_path.read_text()) if sources_path.exists() else {}

    outputs: list[tuple[str, list[dict], dict]] = []
    recs, meta = convert_mmlu()
    outputs.append(("mmlu_dev.jsonl", recs, meta))
    recs, meta = convert_pydoc()
    outputs.append(("pydoc_heldout.jsonl", recs, meta))
    if not args.skip_bigbench:
        sdist = get_bigbench_sdist(args.bigbench_sdist)
        with tarfile.open(sdist) as tar:
            for name, (stem, cap) in BIGBENCH_TASKS.items():
                recs, meta = convert_bigbench_task(tar, name, cap)
                meta["sdist_sha256"] = sha256_file(sdist)
                outputs.append((f"{stem}.jsonl", recs, meta))

    for fname, recs, meta in outputs:
        path = out / fname
        write_jsonl(path, recs)
        n = sum(1 for r in recs if "_meta" not in r)
        sources[fname] = {**meta, "examples": n, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        print(f"{fname}: {n} examples, {path.stat().st_size} bytes")

    sources_path.write_text(json.dumps(sources, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Offline task data: sources",
        "",
        "Generated by `scripts/convert_tasks.py` (re-runnable; do not edit by hand).",
        "BIG-bench files begin with a `_meta` header record that keeps the task's canary string;",
        "BIG-bench asks that its data never appear in training corpora.",
        "",
        "| file | examples | source package | path inside the package | licence | sha256 |",
        "|---|---:|---|---|---|---|",
    ]
    for fname in sorted(sources):
        s = sources[fname]
        lines.append(f"| `{fname}` | {s['examples']} | {s['source_package']}=={s['source_version']} "
                     f"| `{s['source_path']}` | {s['license']} | `{s['sha256']}` |")
    lines += ["", "Selection:", ""]
    for fname in sorted(sources):
        lines.append(f"- `{fname}`: {sources[fname]['selection']}")
    lines.append("")
    (out / "SOURCES.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
