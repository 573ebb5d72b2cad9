"""One lock per output directory: two runs never write into the same output at once.

Every stage that writes takes the lock of each directory (or file) it writes, for the whole run,
through :func:`hold` (``engine.stages.invoke`` does it for every stage; ``stc pipeline`` locks its own
``<run>/pipeline``). A second run into the same output is refused at once, naming the first one's
command, pid and host, instead of both writing (two trainers resuming each other's checkpoints, two
cache builds computing everything twice).

**Where.** The lock of ``<parent>/<name>`` is the file ``<parent>/.<name>.stc-lock``: beside the
output, not in it, so stages that replace their output directory atomically (``prune``, ``export``,
the trainer's ``final``) keep their lock, and a lock never shows up among the outputs.

**How.** ``flock(2)`` on that file, held by the process for the run: the kernel releases it when the
process exits, however it exits (SIGKILL, OOM, node reboot for local disks), so a killed run never
leaves a lock that blocks the next one. The file also holds the holder's description (JSON: command,
pid, host, start time) for the refusal message; a description left by a killed run is replaced
("taken over") by the next run, which says so. On filesystems without ``flock`` (some parallel
filesystems refuse it) the file itself is the lock: it is created exclusively and a run finds it
stale when its host is this one and its pid no longer exists; on another host it is reported with
the command to remove it by hand.

**Ranks.** Only rank 0 takes the lock; the ranks then agree (:func:`engine.dist.agree`), so a refused
run stops on every rank before any work.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import dist
from .errors import StcError

SUFFIX = ".stc-lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockedError(StcError):
    """The output is being written by another run."""


def lock_path(target: str | os.PathLike) -> Path:
    p = Path(target).absolute()
    return p.parent / f".{p.name}{SUFFIX}"


def _describe(what: str) -> dict[str, Any]:
    return {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": list(sys.argv)}


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw.decode("utf-8", errors="replace"))
        return doc if isinstance(doc, dict) else {"what": "?"}
    except json.JSONDecodeError:
        return {"what": "?"}


def _write(fd: int, doc: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(doc) + "\n").encode("utf-8"))
    os.fsync(fd)


def _holder_text(h: dict[str, Any] | None) -> str:
    if not h:
        return "another run"
    return f"`{h.get('what', '?')}` (pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('started', '?')})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Held:
    def __init__(self, target: Path, path: Path, fd: int, flocked: bool):
        self.target, self.path, self.fd, self.flocked = target, path, fd, flocked

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self.flocked:
                os.ftruncate(self.fd, 0)     # empty = free; the file stays (unlinking races with flock)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            else:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def acquire(target: str | os.PathLike, what: str) -> tuple[_Held, str | None]:
    """Take the lock of ``target``; returns (handle, note) where note says a stale lock was taken over.
    Raises :class:`LockedError` naming the holder when another live run has it."""
    target = Path(target)
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise LockedError(f"{target} is being written by {_holder_text(holder)}; wait for it to finish (or stop "
                          f"it), or write elsewhere (another out directory / run.out_dir)") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_FLOCK:
            raise
        return _acquire_without_flock(target, path, what)
    note = None
    prev = _read(fd)
    if prev is not None:   # described but not flocked: its process is gone
        note = f"took over the lock of {target} left by {_holder_text(prev)}, which is no longer running"
    _write(fd, _describe(what))
    return _Held(target, path, fd, True), note


def _acquire_without_flock(target: Path, path: Path, what: str) -> tuple[_Held, str | None]:
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                holder = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                holder = {}
            if holder and holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
                note = f"took over the lock of {target} left by {_holder_text(holder)}, which is no longer running"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            raise LockedError(f"{target} is being written by {_holder_text(holder)} (this filesystem has no flock, "
                              f"so a lock from another host cannot be checked: if that run is gone, remove "
                              f"{path})") from None
        _write(fd, _describe(what))
        return _Held(target, path, fd, False), note
    raise LockedError(f"{target}: could not take the lock {path}")


@contextlib.contextmanager
def hold(targets: Sequence[str | os.PathLike], what: str, *, say: Any = None) -> Iterator[None]:
    """Hold the locks of ``targets`` (in sorted order, so two runs never deadlock) for the block.

    With several ranks only rank 0 takes them and every rank raises the same :class:`LockedError` when
    it could not. ``say(msg)`` reports a taken-over stale lock (default: stderr)."""
    env = dist.env()
    held: list[_Held] = []
    err: str | None = None
    if env.rank == 0:
        try:
            for t in sorted({Path(t).absolute() for t in targets}):
                h, note = acquire(t, what)
                held.append(h)
                if note:
                    (say or (lambda m: print(f"stc: {m}", file=sys.stderr)))(note)
        except LockedError as e:
            err = str(e)
            for h in held:
                h.release()
            held = []
    if env.distributed and dist.is_initialized():
        dist.agree(err, LockedError)
    elif err:
        raise LockedError(err)
    try:
        yield
    finally:
        for h in reversed(held):
            h.release()
