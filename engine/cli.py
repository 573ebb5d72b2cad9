"""``stc``: the command line, built from the stage registry (:mod:`engine.stages`).

``stc <stage> [options] [section.key=value ...]``: overrides may stand anywhere after the stage name,
before or after its options (:func:`engine.stages.parse`). Exit codes (:mod:`engine.errors`): 0 finished; 1 failed; 2 bad usage or
config; 75 stopped on request and resumable (SIGTERM/SIGUSR1 before a time limit: rerun the same
command to continue). A known problem prints one line (``stc <stage>: error: ...``), never a traceback.
"""
from __future__ import annotations

import sys

from . import __version__, dist, log, stages
from .errors import EXIT_FAIL, EXIT_USAGE, StcError


def main(argv: list[str] | None = None) -> int:
    """Parse and run one stage; returns the exit code (callable in-process: it leaves signal handling alone)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _, args = stages.parse(argv, version=__version__)
    except SystemExit as e:   # argparse: --help/--version (0) or a usage error (2, message printed)
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    st = stages.STAGES[args.stage]
    log.quiet_third_party()
    try:
        return stages.invoke(st, args)
    except StcError as e:
        env = dist.env()
        if getattr(e, "agreed", False) and env.rank != 0:
            return e.exit_code          # every rank has the same message: rank 0 prints it
        where = f" (rank {env.rank})" if env.distributed else ""
        log.fatal(f"stc {st.name}{where}: error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        log.fatal(f"stc {st.name}: interrupted")
        return 130
    except BrokenPipeError:   # `stc config keys | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(argv: list[str] | None) -> int:
    stages.note_stop_requests()
    code = main(argv)
    stages.done_with_signals()
    return code


def entry_point(argv: list[str] | None = None) -> int:
    """The ``stc`` program: a stop request (SIGTERM/SIGUSR1) is noted from the first instruction, so one
    that arrives while the stage is still importing ends it with 75, not 143; after the stage returned
    one no longer stops anything (:mod:`engine.stages`). A rank that ran a process group ends here,
    without the interpreter's finalization (:func:`engine.dist.end_process`)."""
    code = _run(argv)
    dist.end_process(code)
    return code


def _main_recording_exit(argv: list[str] | None = None) -> int:
    """``stc`` plus the rank's exit code for ``stc run`` (torchrun folds every failure into 1)."""
    from launchers.local import record_exit

    code = EXIT_FAIL
    try:
        code = _run(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAIL)
        raise
    finally:
        record_exit(code)
    dist.end_process(code)
    return code


if __name__ == "__main__":
    sys.exit(_main_recording_exit())
