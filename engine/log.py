"""Console output: rich on rank 0, plain log files for the other ranks.

Rank 0 shows progress bars and tables; other ranks write to ``<out>/logs/rank<N>.log`` so a
2-rank run does not interleave two progress bars on one terminal.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from . import dist

console = Console(stderr=True, highlight=False)
_CONFIGURED: dict[str, bool] = {}


def setup(level: str = "info", out_dir: str | os.PathLike | None = None) -> logging.Logger:
    log = logging.getLogger("stc")
    key = f"{level}:{out_dir}"
    if _CONFIGURED.get(key):
        return log
    log.handlers.clear()
    log.setLevel(level.upper())
    log.propagate = False
    r = dist.env().rank
    if r == 0:
        log.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    else:
        if out_dir is not None:
            p = Path(out_dir) / "logs" / f"rank{r}.log"
            p.parent.mkdir(parents=True, exist_ok=True)
            h: logging.Handler = logging.FileHandler(p, encoding="utf-8")
        else:
            h = logging.StreamHandler(sys.stderr)
            h.setLevel(logging.WARNING)
        h.setFormatter(logging.Formatter(f"%(asctime)s rank{r} %(levelname)s %(message)s"))
        log.addHandler(h)
    _CONFIGURED.clear()
    _CONFIGURED[key] = True
    return log


def get() -> logging.Logger:
    log = logging.getLogger("stc")
    if not log.handlers:
        setup()
    return log


class _NullProgress:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass


@contextlib.contextmanager
def progress(unit: str = "samples", enabled: bool | None = None) -> Iterator[Progress | _NullProgress]:
    """A rich progress bar (count, rate, ETA) on rank 0 when stderr is a terminal or forced."""
    show = dist.env().rank == 0 if enabled is None else enabled
    if not show:
        yield _NullProgress()
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console, transient=False, disable=not console.is_terminal) as p:
        yield p
