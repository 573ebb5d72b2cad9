"""The scan journal: one JSON-lines file per rank, a header that pins what the scores depend on, then
one record per finished unit of work.

Why one file per rank: two processes appending to one file can interleave a line; each rank only
ever appends (and fsyncs) its own ``journal.rank<NNN>.jsonl``, and a rerun, with any number of
ranks, reads all of them.

Unit: ``(iteration, removed_so_far, candidate)``; ``candidate`` None is the model with just
``removed_so_far`` taken out (the baseline when nothing is). The key uses the *set* of removed
layers (a unit's score depends on nothing else); the record keeps the removal order. Every scorer
journals a unit as soon as it is scored. A task-scorer record names its translations file
(``hypotheses``, relative to the journal's directory), written before the record.

The layers a journal scores belong to one component, named in its header (``component``: ``decoder``
or ``audio``, the audio encoder's; a header without it predates the key and is a decoder scan) and
in every audio unit record: unit keys are positions in that component's layer list, so a journal of
the other component is refused as a whole, never mixed in, and a record of the other component is
reported and not used.

Header fingerprints (``model``, ``tokenizer``, ``features``, ``prompt``, ``dev``, ``scorer``) are
compared on every rerun: a journal written for another model, dev set, metric or prompt is refused
with the names of what differs, never mixed in. A line that is not a valid record (a kill in the
middle of a write, a disk error, an edit) is reported with its file and line number and its unit is
simply not "done", so it is recomputed.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..io import append_jsonl
from .devset import ImportanceError

JOURNAL_GLOB = "journal.rank*.jsonl"
JOURNAL_SCHEMA = 1
FINGERPRINT_NAMES = {
    "model": "model (config + weight shapes)", "weights": "model weights (sampled content)", "tokenizer": "tokenizer", "features": "feature extractor",
    "prompt": "prompt template", "dev": "dev data (shards, split, max samples)",
    "scorer": "scorer/metric config",
}

UnitKey = tuple[int, tuple[int, ...], int]  # (iteration, sorted removed, candidate or -1)


def unit_key(iteration: int, removed: Iterable[int], candidate: int | None) -> UnitKey:
    return (int(iteration), tuple(sorted(int(r) for r in removed)), -1 if candidate is None else int(candidate))


def record_key(rec: Mapping[str, Any]) -> UnitKey:
    return unit_key(rec["iteration"], rec["removed"], rec["candidate"])


def journal_path(out: str | os.PathLike, rank: int) -> Path:
    return Path(out) / f"journal.rank{rank:03d}.jsonl"


def weights_probe(model_dir: str | os.PathLike) -> str:
    """Sampled content hash of every safetensors file (see :func:`engine.meta.weights_sample_hash`).

    Kept as its own journal fingerprint so a refusal names "model weights" rather than "model".
    """
    import hashlib

    from ..meta import weights_sample_hash

    h = hashlib.sha256()
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f"{p.name}:{p.stat().st_size}:{weights_sample_hash(p)}".encode())
    return "sha256:" + h.hexdigest()


def header(fingerprints: Mapping[str, str], info: Mapping[str, Any]) -> dict:
    return {"type": "header", "schema": JOURNAL_SCHEMA, "fingerprints": dict(fingerprints), **info}


def _unit_problem(rec: Mapping[str, Any], metric: str, component: str = "decoder") -> str | None:
    """Why a parsed JSON object is not a usable unit record (None when it is one)."""
    if rec.get("type") != "unit":
        return f"unexpected record type {rec.get('type')!r}"
    if rec.get("component", "decoder") != component:
        return f"a unit of the {rec.get('component')!r} layers, this scan ranks the {component!r} layers"
    if not isinstance(rec.get("iteration"), int) or rec["iteration"] < 0:
        return "bad 'iteration'"
    rem = rec.get("removed")
    if not isinstance(rem, list) or not all(isinstance(r, int) for r in rem):
        return "bad 'removed'"
    if rec.get("candidate") is not None and not isinstance(rec.get("candidate"), int):
        return "bad 'candidate'"
    if rec.get("metric") != metric:
        return f"metric {rec.get('metric')!r}, this scan ranks by {metric!r}"
    s = rec.get("score")
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
        return "bad 'score'"
    if not isinstance(rec.get("metrics"), dict):
        return "bad 'metrics'"
    return None


@dataclass
class JournalState:
    """What earlier runs finished: the first valid record of each unit, and the reported problems."""
    units: dict[UnitKey, dict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    duplicates: int = 0


def _lines(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield no, None, f"not a JSON line ({type(e).__name__}: {e})"
                continue
            if not isinstance(obj, dict):
                yield no, None, "not a JSON object"
                continue
            yield no, obj, None


def read(out: str | os.PathLike, fingerprints: Mapping[str, str], metric: str, *,
         component: str = "decoder") -> JournalState:
    """Read every rank's journal under ``out``; refuse one written for another scan (another
    ``component`` first, with its own message, then any fingerprint that differs)."""
    st = JournalState()
    for path in sorted(Path(out).glob(JOURNAL_GLOB)):
        st.files.append(path.name)
        head_seen = False
        lines = list(_lines(path))
        if len(lines) == 1 and lines[0][1] is None:
            # killed while writing its header: the file holds nothing (its writer will start it again)
            st.problems.append(f"{path.name} line 1: {lines[0][2]} (an unfinished header); ignored")
            continue
        for no, obj, problem in lines:
            if not head_seen:
                if obj is None or obj.get("type") != "header":
                    raise ImportanceError(
                        f"{path}: line {no} should be the journal header but is "
                        f"{problem or 'a ' + repr(obj.get('type')) + ' record'}; without it the file cannot be "
                        f"matched to this scan: delete {path.name} (its units will be recomputed)")
                theirs = obj.get("component", "decoder")
                if theirs != component:
                    raise ImportanceError(
                        f"{path} journals a scan of the {theirs} layers (importance.component={theirs}); this scan "
                        f"ranks the {component} layers (importance.component={component}). Refusing to mix their "
                        f"scores: use another importance.out, or delete the journal files in {path.parent}")
                diffs = [FINGERPRINT_NAMES.get(k, k) + f" differs ({str(obj.get('fingerprints', {}).get(k))[:19]}... "
                         f"in the journal, {str(v)[:19]}... now)"
                         for k, v in fingerprints.items() if obj.get("fingerprints", {}).get(k) != v]
                if diffs:
                    raise ImportanceError(
                        f"{path} belongs to another scan: " + "; ".join(diffs) + f". Refusing to mix scores: use "
                        f"another importance.out, or delete the journal files in {path.parent} to start over")
                head_seen = True
                continue
            if obj is not None and obj.get("type") == "header":
                problem = "a second header"
            if obj is not None and problem is None:
                problem = _unit_problem(obj, metric, component)
            if problem is not None:
                st.problems.append(f"{path.name} line {no}: {problem}; its unit will be recomputed")
                continue
            k = record_key(obj)
            if k in st.units:
                st.duplicates += 1
                continue
            st.units[k] = obj
    return st


def repair_tail(path: Path) -> bool:
    """End a line cut by a kill, so the next append starts on its own line (the cut line stays and is
    reported as corrupt). True when something was repaired."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
    with open(path, "ab") as f:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    return True


class Writer:
    """This rank's journal file: header on creation, then fsynced unit records."""

    def __init__(self, out: str | os.PathLike, rank: int, head: Mapping[str, Any]):
        self.path = journal_path(out, rank)
        self.repaired = repair_tail(self.path)
        lines = list(_lines(self.path)) if self.path.exists() else []
        if len(lines) == 1 and lines[0][1] is None:  # only an unfinished header: start the file again
            self.path.unlink()
            lines = []
        if not lines:
            append_jsonl(self.path, dict(head))

    def append(self, rec: Mapping[str, Any]) -> None:
        append_jsonl(self.path, dict(rec))


def unit_record(*, iteration: int, removed: list[int], candidate: int | None, score: Any,
                provenance: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict:
    """One finished unit; ``extra``: further fields (``hypotheses``: the task scorer's file, relative to
    the journal's directory)."""
    return {"type": "unit", "iteration": iteration, "removed": list(removed), "candidate": candidate,
            "metric": score.metric, "score": float(score.score),
            "metrics": {k: float(v) for k, v in score.metrics.items()}, "n_samples": score.n_samples,
            "n_tokens": score.n_tokens, "seconds": round(score.seconds, 6), **dict(provenance),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **dict(extra or {})}
