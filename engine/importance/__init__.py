"""Layer importance: score decoder layers (or, with ``importance.component=audio``, the audio encoder's
layers) by what removing them costs, and pick the ones to prune.

Modules (public names re-exported here):

* :mod:`.layers`: :func:`without_layers` / :func:`without_audio_layers`, the reversible skips (no model copy);
* :mod:`.devset`: the dev set read once, checked against the test split, decoder inputs cached
  (:func:`reembed` recomputes them for an audio-encoder candidate);
* :mod:`.scorers`: :func:`nll_scores` / :func:`iter_nll_scores` (prefix reuse), :func:`block_influence`,
  :func:`task_scores`; :func:`iter_audio_scores`, :func:`audio_block_influence` for audio-encoder layers;
* :mod:`.journal`: per-rank JSON-lines journal with fingerprinted header;
* :mod:`.search`: plan validation, parallel unit runner, iterative / one-shot / middle-block search;
* :mod:`.report`: ``ranking.json``, ``ranking.md``, ``importance.png``;
* :mod:`.stage`: ``stc importance`` and ``stc prune``.
"""
from __future__ import annotations

from .devset import (DevBatch, DevSample, DevSet, ImportanceError, check_disjoint, decoder_inputs, prepare,
                     read_dev, reembed)
from .layers import backbone, without_audio_layers, without_layers
from .scorers import (METRICS, BlockInfluence, Score, audio_block_influence, block_influence, block_influence_scores,
                      corpus_metrics, generation_config, iter_audio_scores, iter_nll_scores, nll_scores,
                      resolve_metric, task_scores, translate)
from .search import Plan, Result, Runner, Unit, assign, make_plan, rank_order, run_search
from .stage import run_importance, run_prune

__all__ = [
    "BlockInfluence", "DevBatch", "DevSample", "DevSet", "ImportanceError", "METRICS", "Plan", "Result", "Runner",
    "Score", "Unit", "assign", "audio_block_influence", "backbone", "block_influence", "block_influence_scores",
    "check_disjoint", "corpus_metrics", "decoder_inputs", "generation_config", "iter_audio_scores", "iter_nll_scores",
    "make_plan", "nll_scores", "prepare", "reembed", "rank_order", "read_dev", "resolve_metric", "run_importance",
    "run_prune", "run_search", "task_scores", "translate", "without_audio_layers", "without_layers",
]
