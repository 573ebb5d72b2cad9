"""Which layers to remove: the plan (targets, protected and forced layers), the parallel unit runner,
and the three search methods.

* ``iterative`` (the paper): score every remaining candidate, remove the one whose removal keeps the
  best score, re-score the rest, until the target count or the quality floor ``stop_below``. With
  ``shortlist`` N > 0 only the first iteration scores every candidate; each later one re-scores the N
  candidates that hurt least in the iteration before (the search a CPU can afford: 24 layers, 10
  removals: 22 + 9 N scans instead of 175). Layers that hurt most once rarely become the cheapest to
  remove after one more layer is gone; ranking.json lists what each iteration scored.
* ``oneshot``: score every candidate once against the unpruned model, drop the best N together.
* ``middle_block``: a contiguous block of N layers centred in the decoder (the baseline the paper beat).

The layers are those of one component, ``Plan.component`` (``importance.component``): the decoder's, or
the audio encoder's; the search itself does not depend on which (a unit names positions in that
component's layer list), only the scorers and the messages do.

Every decision is a pure function of the unit records, which every rank holds identically (rank 0
reads the journal and broadcasts it; each iteration's new records are all-gathered), so every rank
decides the same. Ties (also scores equal up to float noise: 9 significant digits) go to the lower
layer index, so a 1-rank and a 2-rank run, or a resumed one, choose the same layers.

Stopping: the runner asks ``Runner.stop`` after every journaled unit, and the scorers ask between dev
batches (raising :class:`StopScan`); a rank that stops goes on to the iteration's gather with what
it finished, and when any rank stopped every rank raises :class:`engine.errors.Resumable` (exit 75).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .. import dist
from ..config import ImportanceConfig
from ..errors import Resumable
from ..models import surgery
from . import journal as J
from .devset import ImportanceError
from .scorers import METRICS, check_metric


# ---------------------------------------------------------------------------------------------- plan

COMPONENT_LAYERS = {"decoder": "decoder layers", "audio": "audio-encoder layers"}


@dataclass(frozen=True)
class Plan:
    num_layers: int
    protected: tuple[int, ...]
    forced: tuple[int, ...]
    n_remove: int                 # total, forced layers included
    method: str
    metric: str
    stop_below: float
    shortlist: int = 0            # iterative: after the first iteration re-score only this many (0: all)
    component: str = "decoder"    # whose layers: "decoder" or "audio" (the audio encoder's)

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    @property
    def prunable(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.protected]

    @property
    def has_baseline(self) -> bool:
        return self.metric != "block_influence"

    @property
    def layer_word(self) -> str:
        """How messages name the candidates: "decoder layers" or "audio-encoder layers"."""
        return COMPONENT_LAYERS[self.component]

    def middle_block(self) -> list[int]:
        start = (self.num_layers - self.n_remove) // 2
        return list(range(start, start + self.n_remove))


def make_plan(icfg: ImportanceConfig, num_layers: int, metric: str) -> Plan:
    """Validate the targets against the model's depth; every problem is an :class:`ImportanceError`."""
    check_metric(metric)
    n = num_layers
    component = getattr(icfg, "component", "decoder")
    if component not in COMPONENT_LAYERS:
        raise ImportanceError(f"importance.component={component!r}: one of {', '.join(COMPONENT_LAYERS)}")
    word = COMPONENT_LAYERS[component]
    try:
        protected = tuple(sorted(surgery.normalise_indices(icfg.protect, n)))
    except surgery.SurgeryError as e:
        raise ImportanceError(f"importance.protect: {e}") from None
    try:
        forced = tuple(surgery.normalise_indices(icfg.force_remove, n))
    except surgery.SurgeryError as e:
        raise ImportanceError(f"importance.force_remove: {e}") from None
    bad = [f for f in forced if f in protected]
    if bad:
        raise ImportanceError(f"importance.force_remove: layer(s) {bad} are protected (importance.protect="
                              f"{list(icfg.protect)} -> {list(protected)}); unprotect them or do not force them out")
    if icfg.target_layers > 0:
        if icfg.target_layers >= n:
            raise ImportanceError(f"importance.target_layers={icfg.target_layers} keeps all {n} {word} or "
                                  f"more; it must be below {n}")
        count = n - icfg.target_layers
    elif icfg.remove >= 1:
        if not float(icfg.remove).is_integer():
            raise ImportanceError(f"importance.remove={icfg.remove}: a count must be a whole number "
                                  f"(a fraction must be below 1)")
        count = int(icfg.remove)
    elif icfg.remove > 0:
        count = max(1, int(round(icfg.remove * n)))
    else:
        count = 0
    if forced and count and len(forced) > count:
        raise ImportanceError(f"importance.force_remove lists {len(forced)} layers but the target removes only "
                              f"{count}; raise importance.remove or force fewer layers")
    count = max(count, len(forced))
    if count == 0:
        raise ImportanceError("nothing to remove: set importance.remove (count or fraction), "
                              "importance.target_layers or importance.force_remove")
    prunable = n - len(protected)
    if count > prunable:
        raise ImportanceError(f"the target removes {count} of {n} {word} but only {prunable} are prunable "
                              f"(protected: {list(protected)}); lower importance.remove/target_layers or protect less")
    if count >= n:
        raise ImportanceError(f"removing {count} of {n} {word} leaves no model")
    if not 0.0 <= icfg.stop_below <= 1.0:
        raise ImportanceError(f"importance.stop_below={icfg.stop_below}: a fraction of the unpruned score, 0..1 "
                              f"(0: no floor)")
    if icfg.stop_below > 0 and metric == "block_influence":
        raise ImportanceError("importance.stop_below needs a quality score; block_influence has none "
                              "(use scorer=nll or task, or stop_below=0)")
    if icfg.shortlist < 0:
        raise ImportanceError(f"importance.shortlist={icfg.shortlist}: a count of candidates (0: re-score all)")
    plan = Plan(n, protected, forced, count, icfg.method, metric, float(icfg.stop_below), int(icfg.shortlist),
                component)
    if icfg.method == "middle_block":
        if forced:
            raise ImportanceError("importance.force_remove cannot be combined with method=middle_block")
        hit = [i for i in plan.middle_block() if i in protected]
        if hit:
            raise ImportanceError(f"the middle block {plan.middle_block()} contains protected layer(s) {hit}")
    return plan


def decision_value(score: float) -> float:
    """Scores equal to 9 significant digits are ties (robust to float noise between ranks/threads)."""
    return float(f"{score:.9g}")


def rank_order(scores: dict[int, float], higher_is_better: bool) -> list[int]:
    """Candidates best first; ties by lower layer index."""
    sign = -1.0 if higher_is_better else 1.0
    return sorted(scores, key=lambda c: (sign * decision_value(scores[c]), c))


def relative(score: float, baseline: float | None, higher_is_better: bool) -> float | None:
    """Quality relative to the unpruned model (1.0 = unchanged; below 1 = worse), None without a baseline."""
    if baseline is None or baseline <= 0:
        return None
    if higher_is_better:
        return score / baseline
    return baseline / score if score > 0 else None


# ---------------------------------------------------------------------------------------------- runner

@dataclass(frozen=True)
class Unit:
    iteration: int
    removed: tuple[int, ...]      # removal order
    candidate: int | None

    @property
    def key(self) -> J.UnitKey:
        return J.unit_key(self.iteration, self.removed, self.candidate)


def assign(units: Sequence[Unit], world: int, cost: Callable[[Unit], float]) -> list[list[Unit]]:
    """Longest-processing-time first: each unit, most expensive first (ties: key order), to the rank
    with the least work so far (ties: lower rank). Deterministic, so every rank computes the same
    assignment; any world size works, ranks without units just wait at the gather."""
    out: list[list[Unit]] = [[] for _ in range(world)]
    load = [0.0] * world
    for u in sorted(units, key=lambda u: (-cost(u), u.key)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[r].append(u)
        load[r] += cost(u)
    for r in range(world):
        out[r].sort(key=lambda u: u.key)
    return out


# compute(units) -> iterable of (unit, Score), yielded as each unit finishes
ComputeFn = Callable[[Sequence[Unit]], Iterable[tuple[Unit, Any]]]


class StopScan(Exception):
    """A stop was requested while a unit was being computed (raised between dev batches); the unit in
    flight is abandoned, finished ones are in the journal."""


@dataclass
class Runner:
    """Runs units on this rank, journals them, gathers everybody's records.

    ``annotate(unit, score)``: extra fields of the unit's journal record (written before the record,
    e.g. the task scorer's hypotheses file). ``stop()``: why to stop (e.g. ``"SIGTERM"``) or None.
    """
    compute: ComputeFn
    writer: J.Writer
    done: dict[J.UnitKey, dict]
    cost: Callable[[Unit], float]
    on_unit: Callable[[Unit, dict], None] = lambda u, r: None
    on_start: Callable[[int, int], None] = lambda it, n: None
    annotate: Callable[[Unit, Any], dict] = lambda u, s: {}
    stop: Callable[[], str | None] = lambda: None
    computed: int = 0
    skipped: int = 0

    def run(self, units: Sequence[Unit]) -> dict[J.UnitKey, dict]:
        env = dist.env()
        todo = [u for u in units if u.key not in self.done]
        self.skipped += len(units) - len(todo)
        mine = assign(todo, env.world_size, self.cost)[env.rank]
        self.on_start(units[0].iteration if units else 0, len(mine))
        prov = dist.provenance()
        new: list[dict] = []
        reason = self.stop()
        if mine and reason is None:
            it = iter(self.compute(mine))
            try:
                for unit, score in it:
                    rec = J.unit_record(iteration=unit.iteration, removed=list(unit.removed),
                                        candidate=unit.candidate, score=score, provenance=prov,
                                        extra=self.annotate(unit, score))
                    self.writer.append(rec)
                    new.append(rec)
                    self.computed += 1
                    self.on_unit(unit, rec)
                    reason = self.stop()
                    if reason is not None:
                        break
            except StopScan:
                reason = self.stop() or "a stop request"
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # restores the model (the scorers' layer-skip contexts) at once
        gathered = dist.all_gather_object({"records": new, "stop": reason})
        for g in gathered:
            for rec in g["records"]:
                self.done.setdefault(J.record_key(rec), rec)
        stops = [g["stop"] for g in gathered if g["stop"]]
        if stops:
            exc = Resumable(f"stopped by {stops[0]}; every finished unit is in the journal ({self.computed} from this "
                            f"run on this rank): rerun the same command to continue")
            exc.agreed = True  # type: ignore[attr-defined]
            raise exc
        missing = [u for u in units if u.key not in self.done]
        if missing:
            raise ImportanceError(f"internal: units {[(u.iteration, u.candidate) for u in missing]} were not computed")
        return {u.key: self.done[u.key] for u in units}


# ---------------------------------------------------------------------------------------------- methods

@dataclass
class Result:
    method: str
    metric: str
    higher_is_better: bool
    removed: list[int] = field(default_factory=list)
    baseline: dict | None = None
    final: dict | None = None
    iterations: list[dict] = field(default_factory=list)
    stopped: str | None = None
    block: list[int] | None = None


def _summary(rec: dict | None, baseline: float | None, hib: bool) -> dict | None:
    if rec is None:
        return None
    out = {"score": rec["score"], "metrics": rec["metrics"], "relative": relative(rec["score"], baseline, hib),
           "n_samples": rec["n_samples"]}
    if rec.get("hypotheses"):
        out["hypotheses"] = rec["hypotheses"]
    return out


def _iteration_entry(it: int, before: Sequence[int], recs: dict[int, dict], chosen: list[int],
                     baseline: float | None, hib: bool) -> dict:
    entry = {"iteration": it, "removed_before": list(before),
             "scores": {str(c): recs[c]["score"] for c in sorted(recs)},
             "metrics": {str(c): recs[c]["metrics"] for c in sorted(recs)},
             "computed_by": {str(c): {k: recs[c].get(k) for k in ("host", "rank", "pid")} for c in sorted(recs)},
             "seconds": round(sum(recs[c].get("seconds", 0.0) for c in recs), 6),
             "ranked": rank_order({c: r["score"] for c, r in recs.items()}, hib),
             "chosen": chosen,
             "score": recs[chosen[0]]["score"] if len(chosen) == 1 else None,
             "relative": relative(recs[chosen[0]]["score"], baseline, hib) if len(chosen) == 1 else None}
    hyps = {str(c): recs[c]["hypotheses"] for c in sorted(recs) if recs[c].get("hypotheses")}
    if hyps:
        entry["hypotheses"] = hyps
    return entry


def run_search(plan: Plan, runner: Runner, log: Any = None) -> Result:
    hib = plan.higher_is_better
    res = Result(plan.method, plan.metric, hib)
    base_unit = Unit(0, (), None)
    base_val: float | None = None
    floor_note = False

    def floor_hit(score: float) -> bool:
        nonlocal floor_note
        if plan.stop_below <= 0:
            return False
        rel = relative(score, base_val, hib)
        if rel is None:
            if not floor_note and log is not None:
                log.warning("importance.stop_below ignored: the unpruned score is not positive")
            floor_note = True
            return False
        return rel < plan.stop_below

    removed = list(plan.forced)
    if plan.method == "middle_block":
        block = plan.middle_block()
        res.block = block
        if plan.has_baseline:
            recs = runner.run([base_unit, Unit(1, tuple(block), None)])
            res.baseline = _summary(recs[base_unit.key], None, hib)
            base_val = recs[base_unit.key]["score"]
            res.final = _summary(recs[J.unit_key(1, block, None)], base_val, hib)
        res.removed = block
        return res

    if plan.method == "oneshot":
        cands = [c for c in plan.prunable if c not in removed]
        units = [Unit(0, tuple(removed), c) for c in cands] + ([base_unit] if plan.has_baseline else [])
        recs = runner.run(units)
        if plan.has_baseline:
            base_val = recs[base_unit.key]["score"]
            res.baseline = _summary(recs[base_unit.key], None, hib)
        by_c = {c: recs[J.unit_key(0, removed, c)] for c in cands}
        chosen = []
        for c in rank_order({c: r["score"] for c, r in by_c.items()}, hib)[:plan.n_remove - len(removed)]:
            if floor_hit(by_c[c]["score"]):
                res.stopped = (f"layer {c} alone scores {by_c[c]['score']:.4g}, below stop_below={plan.stop_below} "
                               f"of the unpruned {base_val:.4g}")
                break
            chosen.append(c)
        res.iterations.append(_iteration_entry(0, removed, by_c, chosen, base_val, hib))
        removed += chosen
        res.removed = removed
        if plan.has_baseline:
            fin = Unit(1, tuple(removed), None)
            res.final = _summary(runner.run([fin])[fin.key], base_val, hib)
        return res

    # iterative
    last: dict | None = None
    prev: list[int] = []          # the previous iteration's candidates, best first
    for it in range(plan.n_remove - len(plan.forced)):
        cands = [c for c in plan.prunable if c not in removed]
        if plan.shortlist and prev:
            # re-score only the layers whose removal hurt least last time (in layer order: same units on every rank)
            keep = set([c for c in prev if c not in removed][:plan.shortlist])
            cands = [c for c in cands if c in keep]
        units = [Unit(it, tuple(removed), c) for c in cands]
        if it == 0 and plan.has_baseline:
            units.append(base_unit)
        recs = runner.run(units)
        if it == 0 and plan.has_baseline:
            base_val = recs[base_unit.key]["score"]
            res.baseline = _summary(recs[base_unit.key], None, hib)
        by_c = {c: recs[J.unit_key(it, removed, c)] for c in cands}
        order = rank_order({c: r["score"] for c, r in by_c.items()}, hib)
        best = order[0]
        prev = order if not (plan.shortlist and prev) else order + [c for c in prev if c not in order]
        if floor_hit(by_c[best]["score"]):
            res.stopped = (f"iteration {it}: the best removal (layer {best}) scores {by_c[best]['score']:.4g}, "
                           f"below stop_below={plan.stop_below} of the unpruned {base_val:.4g}")
            res.iterations.append(_iteration_entry(it, removed, by_c, [], base_val, hib))
            break
        res.iterations.append(_iteration_entry(it, removed, by_c, [best], base_val, hib))
        if log is not None:
            rel = relative(by_c[best]["score"], base_val, hib)
            log.info(f"iteration {it}: remove layer {best} ({plan.metric} {by_c[best]['score']:.4f}"
                     + (f", {100 * rel:.1f}% of unpruned" if rel is not None else "") + ")")
        removed.append(best)
        last = by_c[best]
    res.removed = removed
    if plan.has_baseline:
        if last is None and removed:  # only forced layers are out (no search step, or stopped at once)
            fin = Unit(len(res.iterations), tuple(removed), None)
            last = runner.run([fin])[fin.key]
        res.final = _summary(last, base_val, hib) if last is not None else res.baseline
    return res
