"""Synthetic speech-translation rows for tests: short sine-wave WAVs with German targets.

Several test modules need the same tiny corpus (a train split and a dev split of varied lengths);
one builder keeps them identical and cheap.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def write_sine_manifest(root: Path, n: int, n_train: int, *, period: int = 7) -> Path:
    """``n`` rows u00.. (the first ``n_train`` in split train, the rest dev); returns the manifest path."""
    rows = []
    for i in range(n):
        sr, dur = 16000, 0.2 + 0.05 * (i % period)
        t = np.arange(int(dur * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t)).astype("float32"), sr)
        rows.append({"id": f"u{i:02d}", "audio": f"a{i}.wav", "src_text": "hello",
                     "tgt_text": "Hallo Welt " * (1 + i % 3), "src_lang": "en", "tgt_lang": "de",
                     "split": "train" if i < n_train else "dev"})
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def build_sine_shards(root: Path, n: int, n_train: int, *, period: int = 7, samples_per_shard: int = 4) -> Path:
    """Write the manifest and build its shards into ``root/sh`` (returned)."""
    from engine import config as cfg
    from engine.data import shards

    manifest = write_sine_manifest(root, n, n_train, period=period)
    shards.build(cfg.load(None, [f"shards.manifest={manifest}", f"shards.out={root / 'sh'}",
                                 f"shards.samples_per_shard={samples_per_shard}"]), workers=1)
    return root / "sh"


def build_split_shards(root: Path, *, train: int = 8, dev: int = 3, test: int = 3, samples_per_shard: int = 4) -> Path:
    """Shards with train, dev and test splits whose source texts are all distinct (the dev/test check
    of the plan passes); returns ``root/sh``."""
    from engine import config as cfg
    from engine.data import shards

    n = train + dev + test
    m = write_sine_manifest(root, n, train, period=5)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["split"] = "train" if i < train else "dev" if i < train + dev else "test"
        r["src_text"] = f"hello number {i}"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards.build(cfg.load(None, [f"shards.manifest={m}", f"shards.out={root / 'sh'}",
                                 f"shards.samples_per_shard={samples_per_shard}"]), workers=1)
    return root / "sh"


def audio_prompt_batch(model_dir: Path, processor=None) -> dict:
    """One processor batch for the model at ``model_dir``: a user turn with 1 s of a 300 Hz sine and
    "Translate:", rendered by its chat template with the generation prompt (``processor``: the model's, by
    default its ``AutoProcessor``)."""
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_dir)
    t = np.arange(16000) / 16000
    msgs = [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": "Translate:"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if processor.audio_token not in text:      # a template of string contents (Granite's): the placeholder in the text
        msgs = [{"role": "user", "content": processor.audio_token + "Translate:"}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], audio=[(0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)],
                          sampling_rate=16000, return_tensors="pt"))


def write_split_manifest(root: Path) -> Path:
    """8 train, 3 dev, 3 test rows with distinct source texts, plus a split `leak` that repeats a dev source."""
    m = write_sine_manifest(root, 15, 8, period=5)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["split"] = "train" if i < 8 else "dev" if i < 11 else "test" if i < 14 else "leak"
        r["src_text"] = f"hello number {i}"
    rows[14]["src_text"] = rows[9]["src_text"]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m


def write_plan_recipe(root: Path, *, distill: str, extra: str = "") -> Path:
    """Shards of :func:`write_split_manifest` in ``root/sh`` and a recipe for the model in ``root/model`` with
    the small settings a whole plan on a tiny model runs with; ``distill``: the distill section's extra
    keys (e.g. ``"mode: lora, zero_stage: 2"``); ``extra``: more YAML lines."""
    from engine import config as cfg
    from engine.data import shards

    m = write_split_manifest(root)
    shards.build(cfg.load(None, [f"shards.manifest={m}", f"shards.out={root / 'sh'}", "shards.samples_per_shard=4"]),
                 workers=1)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {root / 'model'}, dtype: fp32}}\n"
        f"data: {{shards: {root / 'sh'}, batch_size: 2}}\n"
        f"run: {{out_dir: {root / 'run'}, threads: 1, device: cpu}}\n"
        "importance: {max_new_tokens: 4, decode_batch_size: 4}\n"
        "cache: {k: 8, max_new_tokens: 6, batch_size: 2}\n"
        f"distill: {{{distill}, epochs: 1, global_batch: 4, lr: 1.0e-3, lora: {{r: 4}}, save_every: 100}}\n"
        "evaluate: {max_new_tokens: 6, batch_size: 4}\n" + extra)
    return recipe
