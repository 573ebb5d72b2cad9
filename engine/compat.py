"""Library versions: the tested ranges, the start-up check, and the few calls that differ across them.

Tested ranges. CI runs the test suite with two exact sets: ``constraints-floor.txt`` (the oldest release
of each dependency that ``pyproject.toml`` admits; ``make test-floor``) and ``constraints.txt`` (the newest
tested; ``make test``). :data:`TESTED` holds both ends per package; a unit test keeps it equal to the
two files. A release counts as tested when it lies between the floor and the newest tested release's
minor series (floor 4.53.0 and newest 5.24.0: 4.53.0 .. 5.24.x). torch is left out: CI runs only
torch 2.13.0 (see README, "Dependency ranges").

The start-up check (:func:`check_versions`, called by :func:`engine.stages.invoke` before a stage runs
and by :func:`engine.models.load.load_model`) looks at the installed versions once per process:

* outside the tested range: one warning per package naming the package, its version, the tested range
  and what to do; the stage runs (newer releases usually work; when one does not, that is the first
  place to look);
* a release known to break the engine (:data:`BROKEN`): refused with :class:`VersionError`, naming the
  package, the version, why, and the ``pip install`` that fixes it. A transformers release that breaks one model
  family only is that family's refusal (``Family.transformers_broken``, checked when its checkpoint is detected).

Call sites whose API changed inside the admitted range go through this module, so the differences
stay in one place: :func:`dtype_kwargs` (``from_pretrained(dtype=)`` vs ``torch_dtype=``),
:func:`set_config_dtype` (``config.dtype`` vs ``config.torch_dtype``) and :func:`generate_from_embeds`
(Qwen2-Audio's ``generate`` with ``inputs_embeds``).
"""
from __future__ import annotations

import inspect
import logging
from importlib import metadata
from typing import Any, Iterable, Mapping

from .errors import StcError

log = logging.getLogger("stc")

# package: (floor = constraints-floor.txt, newest tested = constraints.txt)
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("4.53.0", "5.24.0"),
    "peft": ("0.13.0", "0.21.2"),
    "accelerate": ("0.34.0", "1.15.0"),
    "deepspeed": ("0.15.0", "0.19.8"),
    "bitsandbytes": ("0.47.0", "0.50.2"),
    "webdataset": ("0.2.86", "1.0.2"),
    "sacrebleu": ("2.4.0", "2.6.0"),
    "safetensors": ("0.4.3", "0.8.0"),
    "rich": ("13.0.0", "15.0.0"),
    "numpy": ("1.24.4", "2.3.5"),
    "soundfile": ("0.13.0", "0.14.0"),
    "soxr": ("0.3.0", "1.1.0"),
    "matplotlib": ("3.7.0", "3.11.2"),
    "PyYAML": ("6.0", "6.0.4"),
}

# package: [(releases, why they do not work)]: refused, whatever the tested range says (pyproject.toml
# excludes them too). A stage would fail on them later, with a less helpful error.
BROKEN: dict[str, list[tuple[str, str]]] = {
    # transformers releases that break one model family are that family's business (Family.transformers_broken,
    # checked when a checkpoint of it is detected), not a refusal for every user
    "soundfile": [("<0.13", "soundfile.write() has no compression_level, which the FLAC shards need")],
}

_CHECKED = False


class VersionError(StcError):
    """An installed library release that is known not to work with the engine."""


def _version(text: str) -> Any:
    from packaging.version import Version

    return Version(text)


def installed(package: str) -> str | None:
    """The installed version of ``package`` (distribution name), or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def version_problems(versions: Mapping[str, str | None] | None = None) -> tuple[list[str], list[str]]:
    """``(refusals, warnings)`` for ``versions`` (default: what is installed), one message per package."""
    from packaging.specifiers import SpecifierSet

    if versions is None:
        versions = {p: installed(p) for p in TESTED}
    refusals, warnings = [], []
    for pkg, ver in versions.items():
        if ver is None or pkg not in TESTED:
            continue
        v = _version(ver)
        floor, newest = TESTED[pkg]
        why = next((reason for spec, reason in BROKEN.get(pkg, ()) if SpecifierSet(spec).contains(v, prereleases=True)),
                   None)
        if why is not None:
            refusals.append(f"{pkg} {ver} does not work with stc-engine: {why}; install a tested release "
                            f"({floor} .. {_series(newest)}): pip install '{pkg}=={newest}'")
            continue
        top = _version(newest)
        if v < _version(floor):
            warnings.append(f"{pkg} {ver} is older than the tested range {floor} .. {_series(newest)}; "
                            f"if a stage fails, first install a tested release: pip install '{pkg}>={floor}'")
        elif (v.major, v.minor) > (top.major, top.minor):
            warnings.append(f"{pkg} {ver} is newer than the tested range {floor} .. {_series(newest)}; "
                            f"it usually works, but if a stage fails or results look wrong, first try the "
                            f"tested release: pip install '{pkg}=={newest}'")
    return refusals, warnings


def _series(newest: str) -> str:
    v = _version(newest)
    return f"{v.major}.{v.minor}.x"


def check_versions(versions: Mapping[str, str | None] | None = None, *, force: bool = False) -> list[str]:
    """Warn about releases outside the tested range, refuse known-broken ones (module docstring).

    Runs once per process unless ``force``; returns the warnings it logged."""
    global _CHECKED
    if _CHECKED and not force:
        return []
    refusals, warnings = version_problems(versions)
    if refusals:
        raise VersionError("\n".join(refusals) if len(refusals) == 1 else
                           "library versions that do not work:\n" + "\n".join(f"  - {r}" for r in refusals))
    _CHECKED = True
    for w in warnings:
        log.warning("%s", w)
    return warnings


# --------------------------------------------------------------------------------------------------
# Calls whose API differs inside the admitted range
# --------------------------------------------------------------------------------------------------

def _transformers_at_least(text: str) -> bool:
    import transformers

    return _version(transformers.__version__) >= _version(text)


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` from transformers 4.56 on
    (``torch_dtype`` is deprecated there), ``torch_dtype`` before."""
    return {"dtype": dtype} if _transformers_at_least("4.56.0") else {"torch_dtype": dtype}


def set_config_dtype(config: Any, dtype: Any) -> None:
    """Record the weights' dtype in a config the way ``save_pretrained`` writes it: ``config.dtype``
    from transformers 4.56 on, ``config.torch_dtype`` before (an unknown ``dtype`` attribute there is
    not serialisable)."""
    setattr(config, "dtype" if _transformers_at_least("4.56.0") else "torch_dtype", dtype)


def generate_from_embeds(model: Any, inputs_embeds: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """``model.generate(inputs_embeds=..., attention_mask=..., **kwargs)``: the new tokens (B, N).

    Qwen2-Audio before transformers 5 refuses ``inputs_embeds`` in ``generate`` (its
    ``prepare_inputs_for_generation`` does not name the argument), although the embeddings already hold
    the projected audio and only the text decoder has work left. There the decoder (``language_model``,
    a causal LM with the same weights) generates from them; the result is the same tokens.
    """
    target = model
    if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
        lm = getattr(model, "language_model", None)
        if lm is not None and hasattr(lm, "generate") and lm.get_output_embeddings() is not None:
            target = lm
    return target.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def versions_table(packages: Iterable[str] | None = None) -> dict[str, str | None]:
    """Installed versions of the packages in :data:`TESTED` (or ``packages``)."""
    return {p: installed(p) for p in (packages or TESTED)}
