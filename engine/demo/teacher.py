"""The demo teacher's starting point: a small Qwen2-Audio with a tokenizer trained on the demo task.

``stc finetune --config configs/demo-teacher.yaml`` trains it (CE on the demo's train split) into the
teacher that ``make demo`` compresses; ``make demo-teacher`` runs both steps. The architecture is the
real ``Qwen2AudioForConditionalGeneration`` (Whisper-style encoder -> projector -> Qwen2 decoder),
narrow enough to train on two CPU cores, deep enough (8 decoder layers) for layer pruning to mean
something. The audio window is 3 s (the demo's phrases last 1.1-2.3 s), a tenth of the real model's.

Run: ``python -m engine.demo.teacher OUT_DIR`` (refuses to overwrite a non-empty directory);
``python -m engine.demo.teacher --publish SRC DST`` copies a trained model to ``DST``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DataConfig
from ..models.tiny import build_bpe_tokenizer, build_tiny

ARCH = dict(num_layers=8, hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=2,
            audio_layers=2, audio_d_model=128, audio_heads=4, audio_ffn_dim=384, audio_seconds=3, audio_hop=320)


VOCAB = 640  # 256 bytes + 384 merges: prompt and task words, one token per Chinese character


def tokenizer_texts() -> list[str]:
    """What the demo tokenizer is trained on: the prompt words and the task's three languages."""
    from .quantities import all_phrases
    from .. import langs

    d = DataConfig()
    prompts = [d.system_prompt, "system user assistant Audio"]
    for tgt in ("de", "zh"):
        names = {"src": langs.get("en").name, "tgt": langs.get(tgt).name}
        prompts += [d.instruction.format(**names), d.text_instruction.format(**names)]
    texts = prompts * 200  # as frequent as the phrases: the prompt becomes a few tokens
    for en, de, zh in all_phrases():
        # Chinese one character per text: merges stay inside a character, so every character becomes
        # one token instead of byte pieces or whole colour+noun blocks (better generalisation).
        texts += [en, de, *zh]
    return texts


def build_init(out: str | Path, *, seed: int = 0, dtype: str = "fp32") -> Path:
    tok = build_bpe_tokenizer(tokenizer_texts(), vocab_size=VOCAB)
    return build_tiny("qwen2audio", out, tokenizer=tok, dtype=dtype, seed=seed, **ARCH)


def publish(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained model directory (``stc finetune``'s ``final``) to ``dst``, replacing it atomically."""
    import shutil

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
        raise SystemExit(f"{src} is not a trained model directory (no config.json / *.safetensors); "
                         f"run `stc finetune` first")
    tmp = dst.with_name(dst.name + ".tmp-publish")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints", "*.tmp-*"))
    old = dst.with_name(dst.name + ".old-publish")
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.demo.teacher", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="+", help="directory for the randomly initialised model "
                                          "(with --publish: SRC DST)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", action="store_true", help="copy a trained model SRC to DST (shards/teacher)")
    a = p.parse_args(argv)
    if a.publish:
        if len(a.out) != 2:
            p.error("--publish takes SRC DST")
        print(publish(*a.out))
        return 0
    if len(a.out) != 1:
        p.error("give one output directory")
    out = Path(a.out[0])
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty; choose another directory or delete it", file=sys.stderr)
        return 2
    build_init(out, seed=a.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
