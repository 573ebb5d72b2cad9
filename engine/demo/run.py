"""``stc demo``: build the demo data, then run the whole plan on it (the embedded default).

``stc demo [--config R] [demo.key=value ...] [section.key=value ...]``: ``demo.*`` overrides go to the
demo spec (``shards/demo.yaml``), the rest to the engine recipe (``configs/demo.yaml`` unless
``--config``), for the data build and the plan alike. ``--data-only`` stops after the data;
``--dry-run`` builds nothing and prints the plan (the shards it would build first are not a refusal).
``--real`` runs the real-weights benchmark instead (:mod:`engine.demo.real`), ``--real --tiny`` its CI twin.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import config as cfg
from .. import pipeline
from ..errors import EXIT_OK, StcError
from . import data


def main(recipe: Any, args: argparse.Namespace) -> int:
    if getattr(args, "real", False) or getattr(args, "tiny", False):
        from . import real

        return real.run(args)
    ovs = list(getattr(args, "overrides", None) or [])
    if getattr(args, "config", None):  # the engine recipe the demo builds shards with and runs
        ovs.insert(0, f"demo.recipe={Path(args.config).resolve()}")
    dry = bool(getattr(args, "dry_run", False))
    if not dry:
        rc = data.main(ovs)
        if rc != EXIT_OK or getattr(args, "data_only", False):
            return rc
    demo_ovs, recipe_ovs = data.split_overrides(ovs)
    spec = data.load_spec(overrides=demo_ovs)
    recipe_path = data._resolve(spec.recipe)
    recipe = cfg.load(recipe_path, recipe_ovs)
    teacher = data._resolve(recipe.model.path) if recipe.model.path else None
    if not recipe.pipeline.finetune and (teacher is None or not (teacher / "config.json").is_file()):
        raise StcError(f"the demo teacher is missing ({recipe.model.path!r} from {recipe_path}: model.path); it ships "
                       f"with the repository in shards/teacher; rebuild it with `make demo-teacher`")
    plan = pipeline.build_plan(recipe, nproc=getattr(args, "nproc", None), jobs=getattr(args, "jobs", None))
    if dry:
        return pipeline.dry_run(plan, data_pending=True, title="stc demo")
    return pipeline.run(plan)
