"""What decides a sweep setting's numbers, recorded in its results file and checked on resume.

The evaluation identity (everything but the routing): the model (path or hub id; for a local folder
a fingerprint of its config and weights, and hashes of its tokenizer files and generation_config.json;
for a hub id the revision of the snapshot it loads, which pins all of those), its other model_args, the
dtype as run ("auto" resolved from the config), the tasks with a hash of each one's definition, limit,
num_fewshot, the chat formatting (--apply_chat_template, the chat template it selects,
--fewshot_as_multiturn, --system_instruction), and the versions of lm-eval-bh, lm-eval and transformers.

A task's hash covers its YAML as lm-eval's task index resolves it (includes merged, the task list of a
group, the tasks of a tag), the Python modules its ``!function`` entries name, and the local files its
values name (data files, relative to the YAML's folder or the current one): an edited prompt, data
file or loader, or another --include_path that defines the task differently, is another evaluation.
A copy of the same files elsewhere is the same evaluation (nothing depends on where they are).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError

# model_args that change where or how fast a model runs, not its numbers (dtype is recorded resolved)
NOT_MODEL_IDENTITY = ("pretrained", "device", "batch_size", "max_batch_size", "compile_router", "router_kernel",
                      "parallelize", "dtype")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_JSON = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")


def sha256_file(path: Path, sample_over: int = 256 << 20, chunks: int = 16, chunk: int = 1 << 20) -> str:
    """sha256 of a file; above `sample_over` bytes, of its size and `chunks` evenly spaced MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= sample_over:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(chunks):
                fh.seek((size - chunk) * i // (chunks - 1))
                h.update(fh.read(chunk))
    return h.hexdigest()


def _files_sha256(folder: Path, files) -> str | None:
    """sha256 over the named files of `folder` (name and content); None if it has none of them."""
    found = sorted(f for f in files if f.is_file())
    if not found:
        return None
    h = hashlib.sha256()
    for f in found:
        h.update(f"{f.relative_to(folder)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _hub_revision(repo: str, revision: str | None) -> str:
    """The commit of the local hub cache snapshot `repo` loads from ("unresolved" if none is cached)."""
    try:
        from transformers.utils import cached_file

        snapshot = Path(cached_file(repo, "config.json", revision=revision)).parent
        if snapshot.parent.name == "snapshots":
            return snapshot.name
    except Exception:  # noqa: BLE001 - the model load reports an unreachable model
        pass
    return revision or "unresolved"


def model_fingerprint(pretrained: str, revision: str | None = None, tokenizer: str | None = None) -> dict:
    """For a local folder: {"fingerprint": sha256 of its config and weights, "tokenizer_sha256",
    "generation_config_sha256"} (the tokenizer's from `tokenizer` when that is another local folder);
    for a hub id: {"revision": commit}, which pins every file of the model."""
    folder = Path(pretrained)
    if not folder.is_dir():
        return {"revision": _hub_revision(pretrained, revision)}
    files = [p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_JSON]
    tok = Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else folder
    out = {"fingerprint": _files_sha256(folder, files),
           "tokenizer_sha256": _files_sha256(tok, [tok / n for n in TOKENIZER_FILES]),
           "generation_config_sha256": _files_sha256(folder, [folder / "generation_config.json"])}
    if tokenizer and not Path(tokenizer).is_dir():
        out["tokenizer_revision"] = _hub_revision(tokenizer, None)
    return out


def resolved_dtype(dtype, config) -> str:
    """The dtype the model runs in, as HFLM reads it: "auto" (the default) is the config's dtype."""
    import torch

    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    return str(dtype).removeprefix("torch.")


def chat_template_sha256(source: str, apply_chat_template, revision: str | None = None) -> str | None:
    """sha256 of the chat template lm-eval applies (None when --apply_chat_template is off): the
    tokenizer's template, or the named one of a tokenizer with several (lm-eval's choice)."""
    if not apply_chat_template:
        return None
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(source, **({"revision": revision} if revision else {})).chat_template
    except Exception as e:  # noqa: BLE001 - one line instead of the tokenizer's traceback
        raise UsageError(f"--apply_chat_template: cannot read the tokenizer of {source}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if isinstance(template, dict):
        name = apply_chat_template if isinstance(apply_chat_template, str) else "default"
        if name not in template:
            raise UsageError(f"--apply_chat_template: the tokenizer of {source} has no template '{name}'; "
                             f"allowed: {', '.join(sorted(template))}")
        template = template[name]
    if not template:
        raise UsageError(f"--apply_chat_template: the tokenizer of {source} has no chat template")
    return hashlib.sha256(template.encode()).hexdigest()


# --------------------------------------------------------------------------- tasks

class TaskNotIndexed(KeyError):
    """A task, group, tag or member that the given index does not define."""


def include_index(include_path) -> dict:
    """lm-eval's task index of --include_path alone (milliseconds; lm-eval's own index takes seconds)."""
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build([Path(include_path)]) if include_path else {}


def closure(names, index: dict) -> set[str]:
    """Every name `names` reach through groups and tags; TaskNotIndexed if one is not in `index`."""
    from lm_eval.tasks._index import Kind

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        entry = index.get(name)
        if entry is None:
            raise TaskNotIndexed(name)
        seen.add(name)
        if entry.kind is Kind.TAG:
            todo += sorted(entry.tags)
        elif entry.kind is Kind.GROUP:
            todo += [m if isinstance(m, str) else m.get("task") or m.get("group") for m in _members(entry)]
    return seen


def _members(entry) -> list:
    members = (_config(entry) or {}).get("task")
    return members if isinstance(members, list) else []


def _config(entry) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.cfg is not None:
        return entry.cfg
    return load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else {}


def task_hashes(names, index: dict) -> dict[str, str]:
    """{name: sha256 of its definition} for each task, group or tag name, resolved through `index`
    (a member it does not define is hashed by name, as lm-eval then builds it inline)."""
    return {name: hashlib.sha256(json.dumps(_definition(name, index, frozenset()), sort_keys=True).encode())
            .hexdigest() for name in names}


def _definition(name: str, index: dict, seen: frozenset):
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if entry is None or name in seen:
        return {"name": name}
    seen = seen | {name}
    if entry.kind is Kind.TAG:
        return {"tag": {t: _definition(t, index, seen) for t in sorted(entry.tags)}}
    base = entry.yaml_path.expanduser().resolve().parent if entry.yaml_path else Path.cwd()
    out = {"config": _canonical(_config(entry), base)}
    if entry.kind is Kind.GROUP:
        out["members"] = [_definition(m, index, seen) if isinstance(m, str)
                          else _definition(m.get("task") or m.get("group"), index, seen) for m in _members(entry)]
    return out


def _canonical(value, base: Path):
    """A task config with every reference to a local file replaced by the file's content hash."""
    if isinstance(value, dict):
        return {str(k): _canonical(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, base) for v in value]
    if isinstance(value, str):
        return _file_reference(value, base) or value
    return value if isinstance(value, (int, float, bool, type(None))) else repr(value)


def _file_reference(text: str, base: Path) -> dict | None:
    """{"function", "module_sha256"} for a `!function module.fn` (lm-eval's index leaves it as the
    path '<yaml folder>/module.fn'); {"file", "sha256"} for a value naming a local file."""
    if not text.strip() or len(text) > 4096 or "\n" in text or "{{" in text:
        return None
    try:
        if os.path.isabs(text) and "." in Path(text).name:
            module, fn = text.rsplit(".", 1)
            if os.path.isfile(module + ".py"):
                return {"function": fn, "module_sha256": sha256_file(Path(module + ".py"))}
        path = Path(text)
        for candidate in ([path] if path.is_absolute() else [base / path, Path.cwd() / path]):
            if candidate.is_file():
                return {"file": path.name if path.is_absolute() else text, "sha256": sha256_file(candidate)}
    except (OSError, ValueError):  # not a path (a NUL byte, a name too long ...)
        return None
    return None


@lru_cache(maxsize=4)
def task_manager(include_path, defaults: bool):
    """lm-eval's TaskManager: with its own tasks (`defaults`, seconds to index) or the include path's
    alone (when that defines every task asked for); one of each per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


# --------------------------------------------------------------------------- identity

def versions() -> dict:
    import lm_eval
    import transformers

    import lm_eval_bh

    return {"lm_eval_bh": lm_eval_bh.__version__, "lm_eval": lm_eval.__version__,
            "transformers": transformers.__version__}


def evaluation_identity(pretrained: str, model_args: dict, tasks: list[str], limit, num_fewshot, *,
                        task_sha256: dict | None = None, dtype: str | None = None, chat: dict | None = None) -> dict:
    """Everything but the routing that decides what a setting's numbers are (see the module docstring).
    `chat`: apply_chat_template, fewshot_as_multiturn, system_instruction and chat_template_sha256."""
    chat = chat or {}
    tokenizer = model_args.get("tokenizer") if isinstance(model_args.get("tokenizer"), str) else None
    return {
        "model": {"pretrained": pretrained, **model_fingerprint(pretrained, model_args.get("revision"), tokenizer),
                  "args": {k: v for k, v in sorted(model_args.items()) if k not in NOT_MODEL_IDENTITY}},
        "dtype": dtype or str(model_args.get("dtype", "auto")),
        "tasks": list(tasks), "task_sha256": dict(task_sha256 or {}), "limit": limit, "num_fewshot": num_fewshot,
        "apply_chat_template": chat.get("apply_chat_template", False),
        "chat_template_sha256": chat.get("chat_template_sha256"),
        "fewshot_as_multiturn": chat.get("fewshot_as_multiturn", False),
        "system_instruction": chat.get("system_instruction"),
        "versions": versions(),
    }


def calibration_identity(value: str) -> dict:
    """What decides a setting's null: a calibration file's content; for ``auto`` (the built-in corpus) and
    a text file, the documents fitted on (`corpus_hash`, as the fit's cache keys on them). The fit's own
    parameters (tokens, routing) are the lm-eval-bh version's and the setting's."""
    from lm_eval_bh.calibration import source_kind

    kind = source_kind(value)
    if kind == "file":
        return {"calibration_sha256": sha256_file(Path(value))}
    from lm_eval_bh.corpus import CORPUS, builtin_texts, corpus_hash, read_texts

    texts = builtin_texts() if kind == "auto" else read_texts(value)
    corpus = CORPUS["name"] if kind == "auto" else Path(value).name
    return {"calibration_corpus": corpus, "calibration_corpus_sha256": corpus_hash(texts)}


def setting_identity(evaluation: dict, routing: dict) -> dict:
    """The identity of one setting's results, as stored (JSON round trip: tuples become lists). A
    calibration is recorded by what it is read or fitted from (`calibration_identity`); a layer budget
    by the results file it is read from."""
    r = dict(routing)
    if r.get("calibration"):
        r.update(calibration_identity(r["calibration"]))
    if r.get("layer_budget"):
        r["layer_budget"] = Path(r["layer_budget"]).name  # a setting of the same folder
    return json.loads(json.dumps({**evaluation, "routing": r}))


def _flat(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _short(value) -> str:
    """A value for a one-line message: hashes to their first 12 digits."""
    text = "(none)" if value is None else str(value)
    return text[:12] + "…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def identity_diff(old, new: dict) -> list[str]:
    """'limit: 20 -> 30' for each field that differs ([] when equal); a field one side does not record
    at all (an older lm-eval-bh wrote it) differs from every value."""
    if not isinstance(old, dict):
        return ["no identity recorded (written by an older lm-eval-bh or another tool)"]
    a, b = _flat(old), _flat(new)
    if a.get("model.fingerprint") and a.get("model.fingerprint") == b.get("model.fingerprint"):
        a.pop("model.pretrained", None)  # the same files, in another folder (or on another machine)
        b.pop("model.pretrained", None)
    missing = object()

    def show(identity, flat, key):
        return "(not recorded)" if key.split(".")[0] not in identity else _short(flat.get(key))

    return [f"{k}: {show(old, a, k)} -> {show(new, b, k)}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def stored_identity(path: Path):
    """The identity recorded in a results file; None if it has none; raises OSError/ValueError if it is
    unreadable, not a regular file (a FIFO would block the read forever) or nested too deeply."""
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply") from None
    return (data.get("sweep") or {}).get("identity") if isinstance(data, dict) else None
