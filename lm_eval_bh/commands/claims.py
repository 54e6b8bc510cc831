"""A sweep folder shared by several processes: atomic writes, per-setting claims, the evaluation lock.

Claims are ``flock`` locks on hidden files of the folder. The kernel drops the lock of a process that
dies, so a killed sweep never leaves a live claim; the lock file it may leave behind is removed by the
next sweep (`remove_stale_claims`). Every lock file is removed by its last holder, and a process that
locked a file another one removed meanwhile (checked by inode) starts over on the live one.

On shared filesystems where ``flock`` is unreliable (NFS, Lustre, GPFS), give each process its own
folder with ``sweep --shard I/N`` instead of sharing one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..errors import UsageError
from .identity import identity_diff

FOLDER_LOCK = ".sweep.lock"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file moved into place: `path` is never partial.
    An OSError (full disk, no permission) is a UsageError naming the path; nothing is left behind."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like a plain write (mkstemp creates 0600)
        os.replace(tmp, path)
    except OSError as e:
        unlink(tmp)
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        unlink(tmp)
        raise


def unlink(path) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def locked(path: Path, wait: bool, shared: bool = False, remove: bool = True):
    """Yields the descriptor of `path` locked (None if another process holds it and not `wait`); on
    exit, `remove` unlinks the file unless another process still holds it. A folder we cannot write
    in is a one-line UsageError."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"--output_path: cannot write in {path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield None
            return
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # still the live lock file (its last holder did not remove it meanwhile)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield fd
    finally:
        if remove:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder
                unlink(path)
        os.close(fd)


@contextlib.contextmanager
def claim(out: Path, sid: str, wait: bool):
    """Exclusive claim of a setting: yields True while held (False if another sweep holds it and not
    `wait`). Temporary files a killed sweep left for the setting are removed once it is held."""
    with locked(out / f".{sid}.lock", wait) as fd:
        if fd is not None:
            for tmp in out.glob(f".{sid}.*.tmp"):
                unlink(tmp)
        yield fd is not None


def remove_stale_claims(out: Path, sids: list[str]) -> None:
    """Remove the lock files of finished settings that no live sweep holds (claimed and released at once)."""
    for sid in sids:
        if (out / f".{sid}.lock").exists():
            with claim(out, sid, wait=False):
                pass


@contextlib.contextmanager
def evaluation_lock(out: Path, evaluation: dict):
    """Held (shared) for a whole sweep: sweeps of one evaluation share the folder, one of another
    evaluation (other model, tasks, limit, ...) is refused in one line while another runs there. Each
    running evaluation has a lock file holding its identity; the folder lock makes checking the others
    and registering this one a single step."""
    text = json.dumps(evaluation, sort_keys=True)
    mine = out / f".evaluation-{hashlib.sha256(text.encode()).hexdigest()[:16]}.lock"
    with contextlib.ExitStack() as held:
        with locked(out / FOLDER_LOCK, wait=True):
            for other in sorted(out.glob(".evaluation-*.lock")):
                if other == mine:
                    continue
                with locked(other, wait=False) as free:
                    if free is None:  # live: another evaluation is running here
                        diff = identity_diff(_read_json(other), evaluation)
                        if diff:
                            raise UsageError(
                                f"--output_path: another sweep of a different evaluation is running on {out} "
                                f"({'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}); wait for it to finish, "
                                "or choose another --output_path")
            fd = held.enter_context(locked(mine, wait=True, shared=True))
            if os.fstat(fd).st_size == 0:
                os.write(fd, text.encode())
        yield
        with locked(out / FOLDER_LOCK, wait=True):
            held.close()  # removes this evaluation's lock file if no other sweep of it still runs


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
