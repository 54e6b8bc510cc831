"""A benchmark's results on disk: `<stem>.json` (every figure) and `<stem>.md` (its tables), side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, res: dict) -> None:
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")


def save(out_dir: Path, stem: str, res: dict, md: str) -> list[Path]:
    """Write `<stem>.json` and `<stem>.md` into `out_dir` (created if needed); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_json(paths[0], res)
    paths[1].write_text(md + "\n")
    return paths


def render(json_path: str | Path, markdown) -> dict:
    """Re-render the tables of a results file written earlier: `markdown(res)` into the .md of the same name
    beside it, and printed. Returns the results."""
    res = json.loads(Path(json_path).read_text())
    md = markdown(res)
    Path(json_path).with_suffix(".md").write_text(md + "\n")
    print(md)
    return res
