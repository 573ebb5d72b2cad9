"""Console, log files and progress, the same on a laptop terminal and in a SLURM batch log.

* **Rank 0** talks to the terminal (rich, stderr) and, once a stage knows its output directory, also
  writes ``<out>/logs/rank0.log``; **every other rank** writes only ``<out>/logs/rank<N>.log``. Ranks
  other than 0 have their stdout/stderr file descriptors pointed at that file as well, so what
  libraries print (transformers' "Loading weights" bars, DeepSpeed's start-up warnings, Python
  warnings) appears once in the job's log, from rank 0, not once per rank. Their own copies stay in
  their rank file; a rank that fails says so on the job's stderr in one line (:func:`fatal`).
* **Progress** (:func:`progress`): a rich bar on rank 0 when stderr is a terminal; otherwise (a batch
  job, a pipe, ``stc pipeline``'s step logs) one plain line every ``run.progress_s`` seconds
  (default 30): ``what: 120/500 steps (24%) | loss 2.3100 | 1,234 tok/s | elapsed 1m02s | ETA 3m12s``.
  The same line goes to ``rank0.log`` on a terminal too, so the file has the history.
* **Third-party noise**: progress bars of transformers/huggingface_hub are off on ranks other than 0
  and whenever stderr is not a terminal; known messages that are spurious on CPU runs (DeepSpeed's
  "Setting accelerator to CPU", transformers' hub-kernel notices) are dropped.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from . import dist

console = Console(stderr=True, highlight=False)
if not console.is_terminal and not os.environ.get("COLUMNS"):
    # A batch log or a pipe: rich would assume 80 columns and squeeze tables; a log file has no width.
    console.width = 200
_STATE: dict[str, Any] = {"key": None, "progress_s": 30.0, "orig_stderr": None, "file": None}
DEFAULT_PROGRESS_S = 30.0
# Messages that are noise on the machines we run on (they say nothing actionable).
SPURIOUS = ("Setting accelerator to CPU", "kernels-community", "kernels` is not installed",
            "hub kernels", "Triton is not installed")


# Messages a library repeats at every call: shown the first time only. bitsandbytes' LLM.int8 matmul says it
# at every layer of every decoding step (23,114 lines in one evaluation log of a 0.5B model).
ONCE = ("MatMul8bitLt: inputs will be cast",)


class _Spurious(logging.Filter):
    """Drops :data:`SPURIOUS` messages and repeats of :data:`ONCE` ones. One instance sits on loggers and on
    handlers, so a record it let through is marked and let through again at the handler."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(s in msg for s in SPURIOUS):
            return False
        for s in ONCE:
            if s in msg:
                if getattr(record, "_stc_once", None) == s:
                    return True
                if s in self.seen:
                    return False
                self.seen.add(s)
                record._stc_once = s
        return True


_SPURIOUS = _Spurious()     # one per process: what ONCE has shown is remembered across calls


def interactive() -> bool:
    """True when rank 0's stderr is a terminal (bars); False in batch jobs, pipes and step logs."""
    return console.is_terminal


def quiet_third_party() -> None:
    """Library progress bars and warnings once, not once per rank; drop known spurious messages.

    Called by ``stc`` before any stage imports transformers or DeepSpeed (environment variables are
    read at their import) and again by :func:`setup` (for what was already imported)."""
    r = dist.env().rank
    if r != 0 or not interactive():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if r != 0:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore")
    spurious = _SPURIOUS
    for name in ("DeepSpeed", "deepspeed", "transformers", "accelerate", "torch.distributed.elastic",
                 "bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _Spurious) for f in lg.filters):
            lg.addFilter(spurious)
    # records of loggers without handlers end in logging's last-resort handler: filter there too
    for h in [logging.lastResort, *logging.getLogger().handlers]:
        if h is not None and not any(isinstance(f, _Spurious) for f in h.filters):
            h.addFilter(spurious)
    for s in SPURIOUS:
        warnings.filterwarnings("ignore", message=f".*{s}.*")
    # deprecation notices about library internals (transformers, DeepSpeed calling torch): nothing to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
    if "transformers" in sys.modules and (r != 0 or not interactive()):
        with contextlib.suppress(Exception):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            if r != 0:
                hf_logging.set_verbosity_error()


def _redirect_fds(path: Path) -> None:
    """Point this process's stdout/stderr file descriptors at ``path`` (ranks other than 0)."""
    if _STATE["file"] == str(path):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if _STATE["orig_stderr"] is None:
        _STATE["orig_stderr"] = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _STATE["file"] = str(path)


def fatal(message: str) -> None:
    """A one-line failure notice on the job's real stderr (also from a rank whose output goes to a file)."""
    fd = _STATE["orig_stderr"]
    line = (message.rstrip() + "\n").encode("utf-8", errors="replace")
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, line)
    with contextlib.suppress(Exception):
        sys.stderr.write(message.rstrip() + "\n")
        sys.stderr.flush()


def setup(level: str = "info", out_dir: str | os.PathLike | None = None, *,
          progress_s: float | None = None) -> logging.Logger:
    """The ``stc`` logger for this rank (see the module docstring); idempotent for the same arguments."""
    log = logging.getLogger("stc")
    if progress_s is not None:
        _STATE["progress_s"] = float(progress_s)
    key = (level, str(out_dir) if out_dir is not None else None)
    if _STATE["key"] == key and log.handlers:
        return log
    quiet_third_party()
    for h in list(log.handlers):
        log.removeHandler(h)
        with contextlib.suppress(Exception):
            h.close()
    log.setLevel(level.upper())
    log.propagate = False
    r = dist.env().rank
    fmt = logging.Formatter(f"%(asctime)s rank{r} %(levelname)s %(message)s")
    path = None
    if out_dir is not None:
        path = Path(out_dir) / "logs" / f"rank{r}.log"
        fh = _LazyFileHandler(path)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    if r == 0 and interactive():
        rh = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        rh.addFilter(_NotProgressOnTerminal())
        log.addHandler(rh)
    elif r == 0:   # a batch log: plain timestamped lines, no wrapping
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(sh)
    elif path is None:
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(logging.WARNING)
        h.setFormatter(fmt)
        log.addHandler(h)
    if r != 0 and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _redirect_fds(path)
    _STATE["key"] = key
    return log


class _LazyFileHandler(logging.FileHandler):
    """A log file created with its folder at the first record: a stage that refuses before it logs
    anything leaves no trace in its output directory."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):  # type: ignore[override]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class _NotProgressOnTerminal(logging.Filter):
    """On a terminal the bar shows progress; its periodic lines go to the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(record, "progress", False) and interactive())


def get() -> logging.Logger:
    log = logging.getLogger("stc")
    if not log.handlers:
        setup()
    return log


# ================================================================================================ progress

def _clock(s: float) -> str:
    s = int(max(0, s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _field(name: str, v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v} {name}" if name.endswith("/s") or name in ("h audio",) else f"{name} {v}"


class Task:
    """One counted piece of work: ``advance(n, **fields)``; shown as a bar or as periodic plain lines.

    ``fields`` are shown after the count (``loss=2.31`` -> ``loss 2.31``; names ending in ``/s`` put the
    value first: ``**{"tok/s": 1234}`` -> ``1,234 tok/s``)."""

    def __init__(self, what: str, total: int | None, unit: str, completed: int, every_s: float,
                 show: bool, bar: Any):
        self.what, self.total, self.unit, self.completed = what, total, unit, int(completed)
        self.every_s, self.show, self.bar = every_s, show, bar
        self.t0 = time.monotonic()
        self.start_completed = self.completed
        self.fields: dict[str, Any] = {}
        self.last_line = -1e18
        self.last_shown = -1            # the count the last plain line showed
        self._id = bar.add_task(what, total=total, completed=completed, extra="") if bar is not None else None

    def line(self) -> str:
        el = time.monotonic() - self.t0
        done = self.completed - self.start_completed
        head = f"{self.what}: {self.completed:,}"
        if self.total:
            head += f"/{self.total:,} {self.unit} ({100 * self.completed / self.total:.0f}%)"
        else:
            head += f" {self.unit}"
        parts = [head] + [_field(k, v) for k, v in self.fields.items() if v is not None]
        parts.append(f"elapsed {_clock(el)}")
        if self.total and done > 0 and self.completed < self.total:
            parts.append(f"ETA {_clock(el / done * (self.total - self.completed))}")
        return " | ".join(parts)

    def _extra(self) -> str:
        return "  ".join(_field(k, v) for k, v in self.fields.items() if v is not None)

    def update(self, *, completed: int | None = None, total: int | None = None, force: bool = False,
               **fields: Any) -> None:
        if completed is not None:
            self.completed = int(completed)
        if total is not None:
            self.total = int(total)
        self.fields.update(fields)
        if not self.show:
            return
        if self.bar is not None:
            self.bar.update(self._id, completed=self.completed, total=self.total, extra=self._extra())
        now = time.monotonic()
        if force or now - self.last_line >= self.every_s:
            self.last_line, self.last_shown = now, self.completed
            get().info(self.line(), extra={"progress": True})

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.update(completed=self.completed + n, **fields)

    def finish(self) -> None:
        """The last count as a plain line too, unless the last line already showed it."""
        if self.show and self.completed != self.start_completed and self.completed != self.last_shown:
            self.update(force=True)


class Progress_:
    """The tasks of one :func:`progress` block."""

    def __init__(self, show: bool, every_s: float, bar: Any):
        self.show, self.every_s, self.bar = show, every_s, bar
        self.tasks: list[Task] = []

    def task(self, what: str, total: int | None = None, unit: str = "", completed: int = 0) -> Task:
        t = Task(what, total, unit, completed, self.every_s, self.show, self.bar)
        self.tasks.append(t)
        return t


@contextlib.contextmanager
def progress(enabled: bool | None = None, every_s: float | None = None) -> Iterator[Progress_]:
    """Progress for rank 0 (module docstring); ``enabled`` forces it on or off for this rank."""
    show = dist.env().rank == 0 if enabled is None else enabled
    every = _STATE["progress_s"] if every_s is None else every_s
    bar = None
    if show and interactive():
        cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        bar = Progress(*cols, console=console, transient=False)
    p = Progress_(show, every, bar)
    with (bar if bar is not None else contextlib.nullcontext()):
        try:
            yield p
        finally:
            for t in p.tasks:
                t.finish()
