"""One error base for the whole engine, and the exit codes of ``stc``.

Every problem a user can fix (a bad config key, a missing input, a refused checkpoint, a locked
output directory) is raised as a subclass of :class:`StcError` by the module that finds it, with a
message that names the file, key and fix. ``engine.cli.main`` catches the base once, prints the
message without a traceback and exits with the error's ``exit_code``. A traceback therefore always
means a bug in the engine (or a library), never a user mistake.

Exit codes (also what launchers and the pipeline read):

* ``EXIT_OK`` 0: finished.
* ``EXIT_FAIL`` 1: failed; the message says why.
* ``EXIT_USAGE`` 2: bad command line or config; nothing ran.
* ``EXIT_RESUMABLE`` 75 (``EX_TEMPFAIL``): stopped on request (SIGTERM/SIGUSR1 before a time limit)
  after writing a checkpoint or finishing the unit in flight; rerun the same command to continue.

Error classes live next to the code that raises them (``engine.data.stream.StreamError``,
``engine.cache.format.CacheError``, ...); only the base classes are here, so any module can import
this one without importing anything else of the engine.
"""
from __future__ import annotations

from typing import Sequence

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: the stage checkpointed and wants to be rerun


class StcError(RuntimeError):
    """A problem with a message for the user (printed without a traceback); exit code 1."""

    exit_code = EXIT_FAIL


class UsageError(StcError, ValueError):
    """A bad command line or config: nothing ran; exit code 2."""

    exit_code = EXIT_USAGE


class StageError(StcError):
    """A stage refused or failed for a reason the message explains (generic stage error)."""


class ProblemsError(StcError):
    """Several independent problems, all reported at once (one per line)."""

    def __init__(self, problems: Sequence[str] | str, head: str = "cannot run"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        text = self.problems[0] if len(self.problems) == 1 else \
            f"{head}:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class Resumable(StcError):
    """Stopped on request after saving progress; rerun the same command to continue (exit 75)."""

    exit_code = EXIT_RESUMABLE
