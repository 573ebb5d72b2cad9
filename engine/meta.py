"""``meta.json``: what every stage output says about itself, and the fingerprint rules.

Schema (version 1)::

    {
      "schema": 1,
      "kind": "shards" | "journal" | "cache" | "checkpoint" | "model" | "eval" | "report",
      "created": ISO-8601 UTC time,
      "fingerprints": {name: "sha256:<hex>", ...},   # inputs this output depends on
      "libraries": {"python": ..., "torch": ..., "transformers": ..., ...},
      "command": [argv ...],
      "host": ..., "pid": ...,
      "config": {resolved config of the stage},
      "peak_memory": {"device": "cuda" | "cpu", "ranks": n, "rss_bytes": int,
                      "allocated_bytes": int, "reserved_bytes": int},   # the last two on CUDA only
      ...kind-specific fields (counts, per-unit provenance, ...)
    }

``peak_memory`` (always present in what :func:`build_meta` makes): the high-water marks of the stage's
processes, each number the maximum over the ``ranks`` processes it covers. ``rss_bytes``: peak resident
host memory of the process (``getrusage`` ``ru_maxrss``, since the process started). Where the process
used CUDA (``device`` ``"cuda"``): ``allocated_bytes`` / ``reserved_bytes``, ``torch.cuda``'s
``max_memory_allocated`` / ``max_memory_reserved`` of the rank's GPU (tensors / the caching allocator's
pool, since the process started, so for ``stc`` a stage's own peak: every stage is its own process).
:func:`build_meta` records the writing process (``ranks`` 1); when a stage run by ``stc`` returns,
every rank's figures are gathered and the field of each output's ``meta.json`` written during that run
is replaced by the maximum over all ranks (``ranks`` = world size; :func:`merge_peak_memory`,
:func:`record_peak_memory`).

Fingerprint rules (each is ``sha256:`` + hex of a canonical JSON document):

* model: ``config.json`` (parsed and re-serialised with sorted keys, so formatting does not matter)
  plus, for every ``*.safetensors`` file: its name, size, its JSON header (tensor names, dtypes,
  shapes, offsets) and a sampled content hash (64 evenly spaced 64 KiB reads of the tensor data).
  Headers alone cannot tell a fine-tuned checkpoint from its base (same shapes), and every weight
  changes in fine-tuning, so a few MB sampled from a 16 GB model tell them apart in milliseconds.
  ``full=True`` adds the sha256 of every file's whole content. (Headers and sizes alone were the first rule;
  the sample was added for all stages at once because the cache, the importance journal and the
  trainer's resume check must all refuse a base model's outputs for its fine-tuned copy.)
* tokenizer: the content of each tokenizer file present (``tokenizer.json``, ``tokenizer_config.json``,
  ``vocab.json``, ``merges.txt``, ``special_tokens_map.json``, ``added_tokens.json``,
  ``chat_template.jinja``/``.json``, ``*.tiktoken``) plus the special tokens.
* feature extractor: ``preprocessor_config.json`` parsed and re-serialised.
* prompt: the rendered chat template (text and token ids) of one fixed example.
* data: the shard names with their sha256 (as recorded by ``stc shards build``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import StcError
from .io import atomic_write_json, sha256_file

SCHEMA_VERSION = 1
KINDS = ("shards", "journal", "cache", "checkpoint", "model", "eval", "report", "pipeline")
META_NAME = "meta.json"

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
)


class MetaError(StcError):
    pass


def _digest(doc: Any) -> str:
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _json_file(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets), without the weights."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MetaError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.path.getsize(path)
        if n > size - 8 or n > 100 * (1 << 20):
            raise MetaError(f"{path}: corrupt safetensors header (claims {n} bytes)")
        return json.loads(f.read(n))


def weights_sample_hash(path: str | os.PathLike, samples: int = 64, chunk: int = 1 << 16) -> str:
    """sha256 of ``samples`` evenly spaced ``chunk``-byte reads from a safetensors file's tensor data."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MetaError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        start = 8 + struct.unpack("<Q", raw)[0]
        span = max(0, size - start)
        n = samples if span > chunk * samples else 1
        for k in range(n):
            f.seek(start + (span - min(chunk, span)) * k // max(1, n - 1))
            h.update(f.read(min(chunk, span)))
    return h.hexdigest()


def fingerprint_model(model_dir: str | os.PathLike, full: bool = False, sample: bool = True) -> str:
    d = Path(model_dir)
    cfg = d / "config.json"
    if not cfg.exists():
        raise MetaError(f"{d}: no config.json; is this a Hugging Face model directory?")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise MetaError(f"{d}: no *.safetensors weights (only safetensors are read; convert .bin first)")
    doc: dict[str, Any] = {"config": _json_file(cfg), "weights": []}
    for p in files:
        entry = {"name": p.name, "size": p.stat().st_size, "header": safetensors_header(p)}
        if sample:
            entry["sample"] = weights_sample_hash(p)
        if full:
            entry["sha256"] = sha256_file(p)
        doc["weights"].append(entry)
    return _digest(doc)


def fingerprint_tokenizer(tok_or_dir: Any) -> str:
    """Fingerprint a tokenizer directory, or a loaded tokenizer (vocab + specials + template)."""
    if isinstance(tok_or_dir, (str, os.PathLike)):
        d = Path(tok_or_dir)
        doc: dict[str, Any] = {"files": {}}
        for name in TOKENIZER_FILES:
            p = d / name
            if p.exists():
                doc["files"][name] = sha256_file(p)
        for p in sorted(d.glob("*.tiktoken")):
            doc["files"][p.name] = sha256_file(p)
        if not doc["files"]:
            raise MetaError(f"{d}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        stm = d / "special_tokens_map.json"
        doc["special"] = _json_file(stm) if stm.exists() else None
        return _digest(doc)
    tok = tok_or_dir
    vocab = tok.get_vocab()
    doc = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(getattr(tok, "special_tokens_map", {}).items())},
        "chat_template": getattr(tok, "chat_template", None),
    }
    return _digest(doc)


def fingerprint_feature_extractor(model_dir: str | os.PathLike) -> str | None:
    p = Path(model_dir) / "preprocessor_config.json"
    if not p.exists():
        return None
    return _digest(_json_file(p))


def fingerprint_prompt(render: Callable[[], Any]) -> str:
    """``render()`` returns the rendered template of a fixed example (text, ids, or both)."""
    out = render()
    if hasattr(out, "tolist"):
        out = out.tolist()
    return _digest(out)


def fingerprint_data(shards: Iterable[Mapping[str, Any]]) -> str:
    """``shards``: records with at least ``name`` and ``sha256`` (as in shards meta.json)."""
    doc = sorted((s["name"], s["sha256"]) for s in shards)
    if not doc:
        raise MetaError("no shards to fingerprint")
    return _digest(doc)


def fingerprint_obj(obj: Any) -> str:
    return _digest(obj)


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "webdataset",
                 "sacrebleu", "stc-engine"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


PEAK_MEMORY = "peak_memory"


def peak_memory() -> dict[str, Any]:
    """This process's memory high-water marks (module doc, ``peak_memory``), ``ranks`` 1."""
    import resource

    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # ru_maxrss is KiB on Linux, bytes on macOS
    out: dict[str, Any] = {"device": "cpu", "ranks": 1, "rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    torch = sys.modules.get("torch")          # a stage that never imported torch used no GPU
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_available() and cuda.is_initialized():
        out.update(device="cuda", allocated_bytes=int(cuda.max_memory_allocated()),
                   reserved_bytes=int(cuda.max_memory_reserved()))
    return out


def merge_peak_memory(peaks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Several processes' :func:`peak_memory` (one per rank) -> one record: every number the maximum,
    ``ranks`` summed, ``device`` ``"cuda"`` when any used CUDA."""
    peaks = [p for p in peaks if p]
    if not peaks:
        raise MetaError("no peak memory records to merge")
    out: dict[str, Any] = {"device": "cuda" if any(p.get("device") == "cuda" for p in peaks) else "cpu",
                           "ranks": sum(int(p.get("ranks", 1)) for p in peaks)}
    for key in ("rss_bytes", "allocated_bytes", "reserved_bytes"):
        vals = [int(p[key]) for p in peaks if p.get(key) is not None]
        if vals:
            out[key] = max(vals)
    return out


def record_peak_memory(directory: str | os.PathLike, peak: Mapping[str, Any], *, since: float | None = None,
                       name: str = META_NAME) -> bool:
    """Replace the ``peak_memory`` field of ``directory/name`` (atomically). ``since``: only a file
    modified at or after this ``time.time()`` (written by the run that measured ``peak``), so an output
    a rerun skipped keeps the peak of the run that made it. Returns whether the file was updated."""
    path = Path(directory) / name
    try:
        if not path.is_file() or (since is not None and path.stat().st_mtime < since):
            return False
        meta = _json_file(path)
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA_VERSION:
        return False
    meta[PEAK_MEMORY] = dict(peak)
    atomic_write_json(path, meta)
    return True


def build_meta(kind: str, *, fingerprints: Mapping[str, str | None] | None = None,
               config: Any = None, **fields: Any) -> dict:
    if kind not in KINDS:
        raise MetaError(f"unknown meta kind {kind!r}; one of {', '.join(KINDS)}")
    from .config import to_dict  # local: config imports nothing from here

    meta: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprints": {k: v for k, v in (fingerprints or {}).items() if v is not None},
        "libraries": library_versions(),
        "command": list(sys.argv),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "config": to_dict(config) if config is not None else None,
        PEAK_MEMORY: peak_memory(),
    }
    meta.update(fields)
    return meta


def write_meta(directory: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    path = Path(directory) / META_NAME
    atomic_write_json(path, dict(meta))
    return path


def read_meta(directory: str | os.PathLike, kind: str | None = None) -> dict:
    path = Path(directory) / META_NAME
    if not path.exists():
        raise MetaError(f"{path} is missing: {directory} is not a finished stage output"
                        + (f" of kind {kind!r}" if kind else "") + "; run the stage that makes it first")
    try:
        meta = _json_file(path)
    except json.JSONDecodeError as e:
        raise MetaError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); delete it and rerun the stage")
    if meta.get("schema") != SCHEMA_VERSION:
        raise MetaError(f"{path}: schema {meta.get('schema')!r}, this engine reads {SCHEMA_VERSION}")
    if kind is not None and meta.get("kind") != kind:
        raise MetaError(f"{path}: kind is {meta.get('kind')!r}, expected {kind!r} (wrong directory?)")
    return meta


def compare_fingerprints(expected: Mapping[str, str], actual: Mapping[str, str], *, what: str) -> list[str]:
    """Names of fingerprints present in both and different, as readable lines."""
    diffs = []
    for k in sorted(set(expected) & set(actual)):
        if expected[k] != actual[k]:
            diffs.append(f"{what}: {k} differs ({expected[k][:19]}... vs {actual[k][:19]}...)")
    return diffs
