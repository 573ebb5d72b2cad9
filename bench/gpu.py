"""One-call GPU check: the engine's own code paths at the Qwen2-Audio-7B shape on one GPU, next to the
H100 anchors of plain transformers + peft (+ DeepSpeed) measured on the same shapes.

What runs (each item in its own try block: a failure becomes a row with its error, the rest still run;
a global time guard skips what no longer fits the budget, and a watchdog writes the table and exits if
one item hangs past the hard limit):

1. a random-init Qwen2-Audio-7B-shaped teacher (32 decoder layers, bf16) built directly on the GPU with
   the attention :func:`engine.models.load.choose_attn` picks (or ``--model PATH``: a real checkpoint
   through :func:`engine.models.load.load_model`), and synthetic audio (10 s clips, a ~20-token prompt,
   ~60 label tokens; the encoder still runs its padded 30 s window);
2. the importance dev set (:func:`engine.importance.devset.prepare`: the encoder once for 100 segments);
3. the task scan per candidate (:func:`engine.importance.scorers.task_scores`: greedy, one batch of 100,
   40 new tokens) and the projected paper scan (212 candidates x that);
4. the nll scan per candidate (:func:`engine.importance.scorers.iter_nll_scores`, prefix reuse);
5. the cache build (:func:`engine.cache.teacher.process_shard` with ``ref`` targets at k=64): tokens/s
   of the word-level pass and bytes per label token of the engine's records (:mod:`engine.cache.codec`);
6. evaluate throughput (the loop of :mod:`engine.evaluate`: prompt embeddings, greedy ``generate``,
   decoding; batch 16, 40 new tokens);
7. the 24-layer student (:func:`engine.models.surgery.drop_layers`, saved with
   :func:`engine.models.surgery.save_pruned`), then on the same batch of 4: a plain-peft LoRA step
   (:func:`engine.models.load.apply_lora`, the trainer's label-row head and loss, torch AdamW), the
   trainer's own DeepSpeed ZeRO-2 step (:class:`engine.train.trainer.Trainer`: ``_plan_zero``,
   ``_setup_engine``, ``train_step``; a one-process torch.distributed group) and last, the most
   expensive, a QLoRA step (the saved student reloaded nf4 by ``load_model`` on the GPU, ``apply_lora``
   with gradient checkpointing).

Peak memory per item: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after a reset (on
the CPU the process's peak RSS, a high-water mark since start). Random weights never stop early, so
every greedy row decodes the full number of new tokens, and their top-k distributions are flat: the
cache's bytes per label token are a worst case.

The GPU machine's Python may lack packages the engine imports (deepspeed, bitsandbytes, rich, soundfile,
soxr, webdataset, sacrebleu): wheels in ``.whl/`` at the repository root are installed into a
temporary directory first (``--fetch-wheels`` fills ``.whl/`` on a machine with PyPI). A row whose
package is still missing says "not installed".

``--tiny`` (automatic without CUDA) runs the same functions at a tiny shape on the CPU in well under a
minute, so tests keep this script working.

Usage: ``python bench/gpu.py [--out DIR] [--model PATH] [--tiny] [--budget-s 480]``;
``python bench/gpu.py --fetch-wheels`` (on a machine with PyPI, before copying the repository over).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

T_START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))

WHEEL_DIR = ROOT / ".whl"
# modules the engine imports (or the rows need) that a bare torch + transformers + peft Python may lack
NEEDED = ("rich", "soundfile", "soxr", "webdataset", "sacrebleu", "yaml", "deepspeed", "bitsandbytes")
WHEELS = ("bitsandbytes==0.50.2", "rich", "markdown-it-py", "mdurl", "pygments", "soundfile", "cffi", "pycparser",
          "soxr", "webdataset", "braceexpand", "sacrebleu", "portalocker", "regex", "tabulate", "colorama", "lxml",
          "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "py-cpuinfo", "msgpack",
          "einops", "ninja", "nvidia-ml-py")

SCRATCH: list[Path] = []   # temporary directories, removed at the end (also by the watchdog)
PAPER_CANDIDATES = 212   # 30 + 29 + ... + 23: eight iterations over 32 layers, first and last protected
QWEN_TOKENS = 151_649    # Qwen2-Audio's tokenizer length: the cache codec's id width depends on it

# The H100 anchors (plain transformers + peft + DeepSpeed, random weights, same shapes), measured
# 2026-11-26 on one H100 80GB; see the module doc for what each engine row measures.
A_SCAN_BATCH1_H = 6.45
A_SCAN_BATCHED_MIN = 10.0
A_GREEDY_100_S = 2.84
A_GREEDY_16_S = 1.32
A_TEACHER_TOK_S = 17050.0
A_FORWARD_TOKENS = 330
A_DECODER_ONLY = 0.55
A_LORA_S = 0.38
A_LORA_TOK_S = 3468.0
A_QLORA_X = 1.78
A_ZERO2_X = 1.53
A_ZERO3_X = 5.06
A_TEACHER_PARAMS = 8_397_094_912
A_STUDENT_PARAMS = 6_777_929_728
A_TRAINABLE = 2.41


@dataclass(frozen=True)
class Shape:
    """The model and workload sizes of one run (``FULL``: the paper's 7B; ``TINY``: CPU smoke shape)."""
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int                   # embedding rows (Qwen2-Audio's 156,032 also in the tiny shape: same id widths)
    audio_layers: int
    audio_d: int
    audio_heads: int
    audio_ffn: int
    audio_window_s: int          # the encoder's padded window (Qwen2-Audio: 30 s)
    clip_s: float                # synthetic utterance length
    prompt_words: int            # source-text words in the prompt
    label_tokens: int            # reference length in tokens
    segments: int                # dev / cache / eval samples
    scan_batch: int              # importance decode batch (one batch of 100 in the paper's setting)
    new_tokens: int
    task_timed: int              # task candidates timed after one warm-up
    nll_candidates: tuple[int, ...]
    cache_batch: int
    eval_batch: int
    eval_segments: int
    student_layers: int
    train_batch: int
    steps: int                   # timed optimizer steps after one warm-up
    budget_s: float


FULL = Shape("qwen2-audio-7b", layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=156032,
             audio_layers=32, audio_d=1280, audio_heads=20, audio_ffn=5120, audio_window_s=30, clip_s=10.0,
             prompt_words=8, label_tokens=60, segments=100, scan_batch=100, new_tokens=40, task_timed=2,
             nll_candidates=(1, 9, 16, 23, 30), cache_batch=8, eval_batch=16, eval_segments=48, student_layers=24,
             train_batch=4, steps=3, budget_s=480.0)
TINY = Shape("tiny", layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=156032, audio_layers=2,
             audio_d=32, audio_heads=2, audio_ffn=64, audio_window_s=2, clip_s=1.0, prompt_words=3, label_tokens=8,
             segments=6, scan_batch=6, new_tokens=4, task_timed=1, nll_candidates=(1, 2), cache_batch=3,
             eval_batch=3, eval_segments=6, student_layers=3, train_batch=2, steps=1, budget_s=240.0)

# Seconds each item needs at the full shape on an H100-class GPU (the time guard skips an item that
# would end past the budget); the tiny shape needs a few seconds each.
EST_FULL = {"teacher": 25, "devset": 25, "task": 15, "nll": 15, "cache": 30, "evaluate": 20, "student": 70,
            "lora": 15, "zero2": 60, "qlora": 90}


# ============================================================================================ rows

@dataclass
class Row:
    item: str
    value: str = ""
    anchor: str = ""
    status: str = "ok"             # ok | failed | skipped | not installed
    reason: str = ""
    seconds: float = 0.0
    peak: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


class Table:
    """Rows as they finish; written to ``out`` (JSON + markdown) after every row, so a run killed at its
    time limit still leaves what it measured."""

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out, self.header, self.rows = out, header, []
        self.lock = threading.Lock()

    def add(self, row: Row) -> None:
        with self.lock:
            self.rows.append(row)
            self.write()
        print(f"[{time.monotonic() - T_START:6.1f}s] {row.item}: "
              f"{row.value if row.status == 'ok' else row.status + ': ' + row.reason}", flush=True)

    def doc(self) -> dict[str, Any]:
        return {**self.header, "elapsed_s": round(time.monotonic() - T_START, 1),
                "rows": [vars(r) for r in self.rows]}

    def markdown(self) -> str:
        h = self.header
        lines = [f"GPU check: {h['device']}; shape {h['shape']}; torch {h['versions'].get('torch')}, "
                 f"transformers {h['versions'].get('transformers')}; {h['elapsed']}", "",
                 "| item | engine | H100 anchor (plain HF/peft/DeepSpeed) | peak GiB (alloc/reserved or RSS) | note |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            val = r.value if r.status == "ok" else f"**{r.status}**"
            note = r.reason.replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {r.item} | {val} | {r.anchor} | {fmt_peak(r.peak)} | {note} |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.header["elapsed"] = f"{time.monotonic() - T_START:.0f} s wall"
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu.json", json.dumps(self.doc(), indent=1, default=str)), ("gpu.md", self.markdown())):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.out / name)


def gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.1f}"


def fmt_peak(p: dict[str, Any]) -> str:
    if not p:
        return "-"
    if p.get("device") == "cuda":
        return f"{gib(p.get('allocated_bytes'))} / {gib(p.get('reserved_bytes'))}"
    return f"RSS {gib(p.get('rss_bytes'))}"


# ============================================================================================ environment

def missing_modules(names: tuple[str, ...] | None = None) -> list[str]:
    return [n for n in (names or NEEDED) if importlib.util.find_spec(n) is None]


def install_wheels(site_root: str | None = None) -> str:
    """Wheels from ``.whl/`` into a temporary site directory (under ``site_root``, default the system's
    temporary directory) put first on ``sys.path``, when something the engine needs is missing and the
    directory exists. Returns what was done, for the table."""
    missing = missing_modules()
    if not missing:
        return "all needed packages present"
    wheels = sorted(WHEEL_DIR.glob("*.whl")) if WHEEL_DIR.is_dir() else []
    wheels = [w for w in wheels if not _installed(w.name.split("-")[0])]   # never shadow what is there
    if not wheels:
        return f"missing {', '.join(missing)}; no {WHEEL_DIR.name}/ wheels to install (bench/gpu.py --fetch-wheels)"
    site = Path(tempfile.mkdtemp(prefix="stc-gpu-site-", dir=site_root))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"missing {', '.join(missing)}; installing {len(wheels)} wheels failed: {r.stderr.strip()[-300:]}"
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    still = missing_modules()
    return (f"installed {len(wheels)} wheels from {WHEEL_DIR.name}/ for {', '.join(missing)}"
            + (f"; still missing {', '.join(still)}" if still else ""))


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def fetch_wheels(python_version: str) -> int:
    """Fill ``.whl/`` for an offline GPU machine (run where pip reaches PyPI)."""
    WHEEL_DIR.mkdir(exist_ok=True)
    from importlib import metadata

    ds = metadata.version("deepspeed") if importlib.util.find_spec("deepspeed") else "0.19.8"
    cmds = [[sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEEL_DIR), f"deepspeed=={ds}"],
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
             python_version, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
             "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
             "-d", str(WHEEL_DIR), *WHEELS]]
    for c in cmds:
        if subprocess.run(c).returncode != 0:
            print(f"failed: {' '.join(c)}", file=sys.stderr)
            return 1
    size = sum(p.stat().st_size for p in WHEEL_DIR.glob("*.whl"))
    print(f"{WHEEL_DIR}: {len(list(WHEEL_DIR.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB "
          f"(carry it with the repository: it is git-ignored)")
    return 0


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for d in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "flash-attn"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


# ============================================================================================ the run

class Bench:
    def __init__(self, args: argparse.Namespace, table: Table, shape: Shape, device: Any):
        import torch

        self.args, self.table, self.shape, self.device = args, table, shape, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.dtype_name = "bf16" if device.type == "cuda" else "fp32"
        self.budget = args.budget_s or shape.budget_s
        self.results: dict[str, Row] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="stc-gpu-bench-", dir=args.tmp or None))
        SCRATCH.append(self.tmp)
        self.model = self.proc = self.tok = self.dev = self.samples = None
        self.lora = self.batch = None
        self.student_dir: Path | None = None
        self.item_limit_s: float | None = None   # None: what is left of the budget, + 30 s

    # ------------------------------------------------------------------ measuring
    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak(self) -> dict[str, Any]:
        from engine import meta

        return meta.peak_memory()

    def run_item(self, key: str, item: str, anchor: str, fn: Callable[[Row], None], *, needs: tuple[str, ...] = (),
                 after: tuple[str, ...] = ()) -> Row:
        import torch

        row = Row(item, anchor=anchor)
        est = EST_FULL.get(key, 5) if self.shape is FULL else 2
        elapsed = time.monotonic() - T_START
        gone = [n for n in needs if importlib.util.find_spec(n) is None]
        failed_before = [a for a in after if self.results.get(a) is None or self.results[a].status != "ok"]
        if gone:
            row.status, row.reason = "not installed", f"{', '.join(gone)} not installed on this machine"
        elif failed_before:
            row.status, row.reason = "skipped", f"needs {', '.join(failed_before)}, which did not succeed"
        elif elapsed + est > self.budget:
            row.status, row.reason = "skipped", (f"time budget: {elapsed:.0f} s used of {self.budget:.0f} s, "
                                                 f"this item needs ~{est} s")
        else:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.monotonic()
            try:
                with item_alarm(self.item_limit_s or max(5.0, self.budget + 30 - elapsed)):
                    fn(row)
            except Exception as e:  # one failure is a row, the rest still run
                row.status = "failed"
                row.reason = f"{type(e).__name__}: {e}".strip()[:600]
                tb = traceback.format_exc()
                row.data["traceback"] = tb[-4000:]
                print(tb, file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                self.sync()
            row.seconds = round(time.monotonic() - t0, 2)
            row.peak = self.peak()
        self.results[key] = row
        self.table.add(row)
        return row

    # ------------------------------------------------------------------ model and data
    def build_tokenizer_and_processor(self) -> None:
        from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

        from engine.models import tiny

        self.tok = tiny.resolve_tokenizer("bpe")
        self.proc = Qwen2AudioProcessor(
            feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=self.shape.audio_window_s),
            tokenizer=self.tok, chat_template=tiny.CHAT_TEMPLATE)

    def config(self) -> Any:
        """The Qwen2-Audio config of the shape (the 7B numbers as in tests/qwen2audio_7b.py)."""
        from transformers import Qwen2AudioConfig

        from engine.models import tiny

        s = self.shape
        text = tiny._text_config(self.tok, vocab_size=s.vocab, num_layers=s.layers, hidden_size=s.hidden,
                                 intermediate_size=s.intermediate, num_heads=s.heads, num_kv_heads=s.kv_heads)
        if s is FULL:
            text.update(rms_norm_eps=1e-5, rope_theta=10000.0)
        c = Qwen2AudioConfig(
            text_config=text,
            audio_config=dict(model_type="qwen2_audio_encoder", d_model=s.audio_d, encoder_layers=s.audio_layers,
                              encoder_attention_heads=s.audio_heads, encoder_ffn_dim=s.audio_ffn, num_mel_bins=128,
                              max_source_positions=s.audio_window_s * 50),
            audio_token_index=self.tok.convert_tokens_to_ids(tiny.AUDIO_TOKEN))
        c.architectures = ["Qwen2AudioForConditionalGeneration"]
        return c

    def make_samples(self) -> None:
        """Synthetic utterances: a few harmonics with a wandering pitch plus noise (speech-like energy)."""
        import numpy as np

        from engine.importance.devset import DevSample

        s, sr = self.shape, 16000
        rng = np.random.default_rng(0)
        words = ("the meeting starts at nine tomorrow morning and we measured the latency of the model on one "
                 "machine while the weather was cold but the room was warm").split()
        de = ("die Besprechung beginnt morgen um neun Uhr und wir haben die Latenz des Modells auf einer Maschine "
              "gemessen während das Wetter kalt aber der Raum warm war").split()
        out = []
        for i in range(s.segments):
            n = int(s.clip_s * sr * (0.9 + 0.1 * (i % 3) / 2))
            t = np.arange(n) / sr
            f0 = 120 + 40 * np.sin(2 * np.pi * 0.5 * t + i)
            ph = 2 * np.pi * np.cumsum(f0) / sr
            wave = sum(np.sin(k * ph) / k for k in (1, 2, 3, 4)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
            wave = (0.2 * wave + 0.01 * rng.standard_normal(n)).astype(np.float32)
            src = " ".join(words[(i + j) % len(words)] for j in range(s.prompt_words))
            tgt, j = "", 0
            while len(self.tok(tgt, add_special_tokens=False)["input_ids"]) < s.label_tokens - 1:
                tgt = (tgt + " " + de[(i + j) % len(de)]).strip()
                j += 1
            meta = {"src_lang": "en", "tgt_lang": "de", "src_text": src, "tgt_text": tgt}
            out.append(DevSample(f"g{i:04d}", "synthetic", i, meta, wave, sr))
        self.samples = out

    def feature_samples(self, samples: list) -> list[dict]:
        from engine.importance import devset as D

        return [D._as_feature_sample(x) for x in samples]

    def step_batch(self) -> dict:
        """One training batch (CPU tensors, as the stream yields them)."""
        from engine.data.prompt import Featurizer
        from engine.config import DataConfig

        feat = Featurizer(self.proc, DataConfig())
        return feat(self.feature_samples(self.samples[:self.shape.train_batch]))

    # ------------------------------------------------------------------ items
    def item_teacher(self, row: Row) -> None:
        import torch

        from engine.config import ModelConfig
        from engine.models import load

        if self.args.model:
            path = Path(self.args.model)
            self.proc = load.load_processor(path)
            self.tok = getattr(self.proc, "tokenizer", self.proc)
            self.model = load.load_model(ModelConfig(path=str(path), dtype=self.dtype_name, attn_implementation="auto"),
                                         device=str(self.device))
            attn = self.model.config._attn_implementation
            how = f"loaded {path} with load_model"
        else:
            from transformers import Qwen2AudioForConditionalGeneration as Cls

            from engine.models import tiny

            self.build_tokenizer_and_processor()
            config = self.config()
            attn, why = load.choose_attn("auto", self.device.type, self.dtype_name)
            torch.manual_seed(0)
            try:
                with torch.device(self.device):
                    self.model = Cls._from_config(config, dtype=self.dtype, attn_implementation=attn)
            except (ValueError, ImportError) as e:   # as load_model: an automatic choice falls back to sdpa
                row.data["attn_refused"] = f"{attn}: {e}"
                attn, why = "sdpa", f"{attn} refused ({str(e)[:80]})"
                with torch.device(self.device):
                    self.model = Cls._from_config(config, dtype=self.dtype, attn_implementation=attn)
            self.model.generation_config = tiny._generation_config(self.tok)
            how = f"random init on {self.device} ({why})"
        self.model.eval()
        n = sum(p.numel() for p in self.model.parameters())
        row.data.update(params=n, attn=attn)
        row.value = f"{n:,} params, {self.dtype_name}, attention {attn}"
        row.reason = how
        if self.shape is FULL and not self.args.model and n != A_TEACHER_PARAMS:
            row.reason += f"; parameter count differs from the anchor's {A_TEACHER_PARAMS:,}"

    def item_devset(self, row: Row) -> None:
        from engine.config import DataConfig
        from engine.importance import devset as D

        self.make_samples()
        t0 = time.perf_counter()
        self.dev = D.prepare(self.model, self.proc, self.samples, DataConfig(), batch_size=self.shape.scan_batch,
                             teacher_forced=True, prompt_only=True)
        self.sync()
        dt = time.perf_counter() - t0
        if self.dev.skipped:
            raise RuntimeError(f"dev preparation skipped samples: {self.dev.skipped[:3]}")
        tokens = sum(int(b.attention_mask.sum()) for b in self.dev.batches)
        labels = sum(b.n_label_tokens for b in self.dev.batches)
        row.data.update(seconds=dt, tokens=tokens, label_tokens=labels, segments=self.dev.n_samples)
        row.value = (f"{dt:.2f} s for {self.dev.n_samples} segments ({tokens / self.dev.n_samples:.0f} tokens, "
                     f"{labels / self.dev.n_samples:.0f} label tokens each)")
        row.reason = "audio encoder + projector once for all candidates and iterations"

    def _gen_cfg(self, max_new: int) -> Any:
        from engine.importance import scorers as S
        from engine.data.prompt import PromptBuilder
        from engine.config import DataConfig

        b = PromptBuilder(self.proc, DataConfig())
        return S.generation_config(self.model, b.end_id, b.pad_id, max_new)

    def item_task(self, row: Row) -> None:
        from engine.importance import scorers as S

        n = len(self._decoder_layers())
        gen = self._gen_cfg(self.shape.new_tokens)
        cands = [n - 2] + [1 + (k * 7) % (n - 2) for k in range(self.shape.task_timed)]
        times, tok_counts = [], []
        for i, (c, sc) in enumerate(S.task_scores(self.model, self.tok, self.dev, cands, metric="chrf++", gen_cfg=gen)):
            self.sync()
            if i > 0:                                   # the first is the warm-up
                times.append(sc.seconds)
                tok_counts.append(sum(len(self.tok(h, add_special_tokens=False)["input_ids"]) for h in sc.hypotheses))
        per = statistics.median(times)
        proj_min = per * PAPER_CANDIDATES / 60
        row.data.update(per_candidate_s=times, paper_scan_min=proj_min, batch=self.shape.scan_batch,
                        new_tokens=self.shape.new_tokens)
        row.value = (f"{per:.2f} s per candidate ({self.dev.n_samples} segments, batch {self.shape.scan_batch}, "
                     f"{self.shape.new_tokens} new tokens) -> paper scan 212 x = {proj_min:.1f} min")
        row.reason = (f"task_scores incl. chrF++/chrF/BLEU; median of {len(times)} after 1 warm-up; "
                      f"{per / A_GREEDY_100_S:.2f}x the anchor")

    def _decoder_layers(self) -> Any:
        from engine.models import surgery

        return surgery.decoder_layers(self.model)

    def item_nll(self, row: Row) -> None:
        from engine.importance import scorers as S

        n = len(self._decoder_layers())
        cands = sorted({c for c in self.shape.nll_candidates if 0 < c < n - 1})
        list(S.iter_nll_scores(self.model, self.dev, cands[:1]))       # warm-up
        self.sync()
        t0 = time.perf_counter()
        got = list(S.iter_nll_scores(self.model, self.dev, cands + [None]))
        self.sync()
        wall = time.perf_counter() - t0
        per = wall / len(got)
        row.data.update(candidates=cands, wall_s=wall, per_candidate_s=per,
                        scores={str(c): s.score for c, s in got})
        if not all(math.isfinite(s.score) for _, s in got):
            raise RuntimeError(f"non-finite nll scores {row.data['scores']}")
        row.value = (f"{per:.2f} s per candidate ({len(got)} units incl. baseline, layers {cands}) -> 212 x = "
                     f"{per * PAPER_CANDIDATES / 60:.1f} min")
        row.reason = "prefix reuse from cached audio embeddings; label-row logits only"

    def item_cache(self, row: Row) -> None:
        from collections import defaultdict

        from engine import config as cfg
        from engine.cache import format as cf
        from engine.cache import teacher as ct
        from engine.data.prompt import Featurizer

        recipe = cfg.load(None, ["cache.k=64", "cache.targets=[ref]", f"cache.batch_size={self.shape.cache_batch}",
                                 f"model.dtype={self.dtype_name}"])
        feat = Featurizer(self.proc, recipe.data)
        # records are coded for Qwen2-Audio's vocabulary (ids as wide as in a real cache), whatever the
        # small tokenizer that built the prompts; a real checkpoint's own tokenizer otherwise
        vocab = len(self.tok) if self.args.model else QWEN_TOKENS
        timings: dict[str, float] = defaultdict(float)
        samples = self.feature_samples(self.samples)
        ct.process_shard(self.model, feat, samples[:self.shape.cache_batch], recipe, vocab, self.device,
                         defaultdict(float))                                  # warm-up batch
        self.sync()
        t0 = time.perf_counter()
        records = ct.process_shard(self.model, feat, samples, recipe, vocab, self.device, timings)
        self.sync()
        wall = time.perf_counter() - t0
        tokens = sum(int(b.attention_mask.sum()) for b in self.dev.batches)
        labels = sum(len(cf.decode_record(r, vocab, decode_topk=False)["ref"].label_ids) for r in records)
        back = cf.decode_record(records[0], vocab)["ref"]                     # the codec round trip holds
        if back.topk is None or back.topk.ids.shape[1] != 64:
            raise RuntimeError("a cache record did not decode back to 64 ids per label position")
        nbytes = sum(len(r) for r in records)
        wl = timings["word_level"]
        row.data.update(tokens=tokens, label_tokens=labels, bytes=nbytes, wall_s=wall, timings=dict(timings))
        row.value = (f"word-level pass {tokens / wl:,.0f} tok/s ({labels / wl:,.0f} label tok/s); with featurizing "
                     f"+ codec {tokens / wall:,.0f} tok/s; {nbytes / labels:.1f} B/label token at k=64")
        row.anchor = (f"teacher forward {A_TEACHER_TOK_S:,.0f} tok/s (batch 8 x {A_FORWARD_TOKENS}); "
                      f"cache target <= 160 B/label token")
        row.reason = (f"process_shard, batch {self.shape.cache_batch}; random weights give flat top-64 "
                      f"distributions: the bytes are a worst case; featurize {timings['featurize']:.2f} s")

    def item_evaluate(self, row: Row) -> None:
        import torch

        from engine.config import DataConfig
        from engine.evaluate import make_batches
        from engine.importance import devset as D
        from engine.importance import scorers as SC

        gen = self._gen_cfg(self.shape.new_tokens)
        stop = set(int(e) for e in gen.eos_token_id)
        samples = self.samples[:self.shape.eval_segments]
        batches = make_batches(samples, self.shape.eval_batch)

        def one(idx: list[int]) -> tuple[int, int]:
            dev = D.prepare(self.model, self.proc, [samples[i] for i in idx], DataConfig(), batch_size=len(idx),
                            teacher_forced=False, prompt_only=True)
            n_sent = n_tok = 0
            for batch in dev.batches:
                with torch.inference_mode():
                    seqs = generate_from_embeds(self.model, batch.gen_embeds, batch.gen_mask, gen)
                SC.decode_new_tokens(self.tok, seqs, gen.eos_token_id)
                for r in seqs.tolist():
                    n_tok += next((j for j, t in enumerate(r) if t in stop), len(r))
                n_sent += len(batch.keys)
            return n_sent, n_tok

        one(batches[0])                                                       # warm-up
        self.sync()
        t0 = time.perf_counter()
        sent = toks = 0
        for idx in batches:
            a, b = one(idx)
            sent, toks = sent + a, toks + b
        self.sync()
        wall = time.perf_counter() - t0
        per_batch = wall / len(batches)
        row.data.update(sentences=sent, generated_tokens=toks, wall_s=wall, batch=self.shape.eval_batch)
        row.value = (f"{sent / wall:.1f} sentences/s, {toks / wall:,.0f} generated tok/s ({per_batch:.2f} s per "
                     f"batch of {self.shape.eval_batch}, encoder included)")
        row.anchor = f"greedy 40 tok, batch 16: {A_GREEDY_16_S} s per batch ({16 / A_GREEDY_16_S:.1f} sentences/s)"
        row.reason = "the evaluate stage's loop: prompt embeddings (encoder), generate, decode"

    def item_student(self, row: Row) -> None:
        import torch

        from engine.models import surgery

        n = len(self._decoder_layers())
        k = self.shape.student_layers
        drop = list(range(n - 1 - (n - k), n - 1))          # the deepest layers but the last
        kept = surgery.drop_layers(self.model, drop)
        self.dev = None                                      # the dev set's cached embeddings are freed too
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        p = sum(x.numel() for x in self.model.parameters())
        self.model.config.save_pretrained(self.tmp / "student-config")   # for the ZeRO-2 row's planning
        row.data.update(params=p, kept=kept)
        row.value = f"{len(kept)} decoder layers, {p:,} params"
        row.anchor = f"24 layers, {A_STUDENT_PARAMS:,} params" if self.shape is FULL else ""
        row.reason = f"drop_layers {drop}"
        if not self.args.model and importlib.util.find_spec("bitsandbytes") is not None:
            # saved now, before LoRA wraps it in place: the QLoRA row reloads it nf4, as `stc distill` does
            t0 = time.perf_counter()
            self.student_dir = surgery.save_pruned(self.model, scratch_dir(self.tmp, 2 * p) / "student", self.proc)
            row.data["save_s"] = time.perf_counter() - t0
            row.reason += f"; saved with save_pruned in {row.data['save_s']:.0f} s ({self.student_dir.parent})"

    def _plain_steps(self, model: Any, batch: dict) -> tuple[list[float], float]:
        """Plain peft training steps with the trainer's label-row head and loss, torch AdamW; returns the
        step times after one warm-up and the last loss."""
        import torch

        from engine.train import trainer as T

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        b = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if "input_features" in b:
            b["input_features"] = b["input_features"].to(self.dtype)
        inputs = {k: b[k] for k in T.MODEL_KEYS if k in b}
        head = model.get_output_embeddings()
        model.train()
        times, loss_v = [], float("nan")
        for i in range(1 + self.shape.steps):
            self.sync()
            t0 = time.perf_counter()
            with T.head_at_label_rows(head, b["labels"]):
                logits = model(**inputs).logits
            ce, _, n = T.micro_loss_sums(logits, b, kd=False, kd_kind="forward_kl", temperature=1.0)
            loss = ce / max(n, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_v = float(loss.detach())
            self.sync()
            if i > 0:
                times.append(time.perf_counter() - t0)
        del opt
        if not math.isfinite(loss_v):
            raise RuntimeError(f"loss is {loss_v}")
        return times, loss_v

    def item_qlora(self, row: Row) -> None:
        import gc

        import torch

        from engine.config import LoraConfig, ModelConfig
        from engine.models import load, surgery

        self.lora = self.batch = None                        # the LoRA rows are done: free their model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        src = Path(self.args.model) if self.args.model else self.student_dir
        if src is None:
            raise RuntimeError("the student was not saved (see the student row)")
        t1 = time.perf_counter()
        q = load.load_model(ModelConfig(path=str(src), dtype=self.dtype_name, quant="nf4",
                                        attn_implementation="auto"), device=str(self.device), for_training=True)
        n = len(surgery.decoder_layers(q))
        if n > self.shape.student_layers:                  # --model: the full checkpoint, pruned in memory
            surgery.drop_layers(q, list(range(n - 1 - (n - self.shape.student_layers), n - 1)))
        load_s = time.perf_counter() - t1
        if len(surgery.decoder_layers(q)) != self.shape.student_layers:
            raise RuntimeError(f"the reloaded student has {len(surgery.decoder_layers(q))} decoder layers, "
                               f"not {self.shape.student_layers}")
        if not load.is_quantized(q):
            raise RuntimeError("load_model(quant=nf4) returned an unquantized model")
        on = {p.device.type for p in q.parameters()}
        qlora = load.apply_lora(q, LoraConfig(), gradient_checkpointing=True)
        times, loss = self._plain_steps(qlora, self.step_batch())
        per = statistics.median(times)
        row.data.update(step_s=times, loss=loss, load_s=load_s, devices=sorted(on))
        row.value = f"{per:.3f} s per step"
        row.anchor = f"{A_QLORA_X}x the plain LoRA step ({A_QLORA_X * A_LORA_S:.2f} s)"
        row.reason = (f"load_model nf4 + double quant on {', '.join(sorted(on))} in {load_s:.0f} s, apply_lora "
                      f"with gradient checkpointing, AdamW, loss {loss:.3f}")
        del qlora, q

    def item_lora(self, row: Row) -> None:
        from engine.config import LoraConfig
        from engine.models import load

        self.lora = load.apply_lora(self.model, LoraConfig())
        n_all = sum(p.numel() for p in self.lora.parameters())
        n_tr = sum(p.numel() for p in self.lora.parameters() if p.requires_grad)
        self.batch = self.step_batch()
        times, loss = self._plain_steps(self.lora, self.batch)
        per = statistics.median(times)
        tokens = int(self.batch["attention_mask"].sum())
        row.data.update(step_s=times, loss=loss, trainable=n_tr, params=n_all, tokens=tokens)
        row.value = f"{per:.3f} s per step ({tokens / per:,.0f} tok/s; {100 * n_tr / n_all:.2f}% trainable)"
        row.anchor = f"{A_LORA_S} s ({A_LORA_TOK_S:,.0f} tok/s; {A_TRAINABLE}% trainable)"
        row.reason = (f"apply_lora r=64 alpha=128 rsLoRA all-linear, batch {self.shape.train_batch} x "
                      f"{tokens // self.shape.train_batch} tokens, AdamW, loss {loss:.3f}")

    def item_zero2(self, row: Row) -> None:
        import logging

        from engine import config as cfg
        from engine import dist
        from engine.train import trainer as T

        b = self.shape.train_batch
        recipe = cfg.load(None, [f"distill.student={self.tmp / 'student-config'}", "distill.mode=lora",
                                 "distill.kd_weight=0", "distill.seq_kd=false", "distill.zero_stage=2",
                                 f"data.batch_size={b}", f"distill.global_batch={b}", f"distill.out={self.tmp / 'ds'}",
                                 f"model.dtype={self.dtype_name}", "distill.lr=1e-5"])
        t = T.Trainer(recipe, "distill")
        t.env = dist.init()
        t.log = logging.getLogger("stc")
        t.device = self.device
        t.accum = 1
        t._plan_zero()
        if t.zero.stage != 2:
            raise RuntimeError(f"the trainer planned ZeRO-{t.zero.stage}, not 2")
        t.model = self.lora
        t.head = self.lora.get_output_embeddings()
        t.named_trainable = [(n, p) for n, p in self.lora.named_parameters() if p.requires_grad]
        t.stream = _Epochs(8)
        t._setup_engine()
        times, m = [], {}
        for i in range(1 + self.shape.steps):
            m = t.train_step([self.batch])
            if i > 0:
                times.append(m["step_s"])
        per = statistics.median(times)
        lora = self.results.get("lora")
        base = statistics.median(lora.data["step_s"]) if lora is not None and lora.status == "ok" else None
        row.data.update(step_s=times, loss=m.get("loss"), ratio=per / base if base else None,
                        world_size=t.env.world_size, ds_config=t.ds_config)
        row.value = f"{per:.3f} s per step" + (f" ({per / base:.2f}x plain LoRA)" if base else "")
        row.anchor = f"{A_ZERO2_X}x plain ({A_ZERO2_X * A_LORA_S:.2f} s); ZeRO-3 {A_ZERO3_X}x"
        row.reason = (f"Trainer.train_step under deepspeed.initialize (ZeRO-2, {self.dtype_name}, one-process "
                      f"group), loss {m.get('loss', float('nan')):.3f}")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.student_dir is not None:
            shutil.rmtree(self.student_dir.parent, ignore_errors=True)


def scratch_dir(default: Path, need_bytes: int) -> Path:
    """Where to write the saved student: ``/dev/shm`` (memory, fastest) when it has room for it with a
    wide margin, else ``default`` (the run's temporary directory on disk)."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 3 * need_bytes + (8 << 30):
            d = Path(tempfile.mkdtemp(prefix="stc-gpu-bench-", dir=shm))
            SCRATCH.append(d)
            return d
    except OSError:
        pass
    return default


def generate_from_embeds(model: Any, embeds: Any, mask: Any, gen: Any) -> Any:
    """Greedy generation from prompt embeddings as the evaluate stage calls it (through
    :mod:`engine.compat` where the engine routes it, for the transformers versions it admits)."""
    from engine import compat

    fn = getattr(compat, "generate_from_embeds", None)
    if fn is not None:
        return fn(model, embeds, mask, generation_config=gen)
    return model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen)


class _Epochs:
    """What the trainer reads of its stream for planning and metrics: a length and an epoch."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n


@contextlib.contextmanager
def item_alarm(seconds: float):
    """SIGALRM raises TimeoutError in the main thread after ``seconds`` (Python code only; a hang in C
    code is left to the watchdog)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"item exceeded the remaining time budget ({seconds:.0f} s)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def watchdog(table: Table, hard_s: float) -> None:
    """After ``hard_s`` seconds of wall time: write what was measured and leave (exit 3), whatever the
    main thread is stuck in."""
    def run() -> None:
        time.sleep(max(0.0, hard_s - (time.monotonic() - T_START)))
        table.add(Row("watchdog", status="failed", reason=f"hard time limit {hard_s:.0f} s reached; the item "
                                                          f"running then did not return"))
        print(table.markdown(), flush=True)
        for d in SCRATCH:
            shutil.rmtree(d, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=run, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-gpu"), help="writes gpu.json and gpu.md here")
    ap.add_argument("--model", default="", help="a local Qwen2-Audio checkpoint instead of random weights")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (automatic without CUDA)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="time guard (default 480 full, 240 tiny)")
    ap.add_argument("--hard-s", type=float, default=0.0, help="watchdog limit (default budget + 60 s)")
    ap.add_argument("--tmp", default="", help="scratch directory for the saved student (default: the system's)")
    ap.add_argument("--fetch-wheels", action="store_true", help="fill .whl/ for an offline GPU machine and exit")
    ap.add_argument("--python-version", default="3.12", help="with --fetch-wheels: the GPU machine's Python")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.python_version)

    wheels = install_wheels(args.tmp or None)
    import torch

    cuda = torch.cuda.is_available()
    shape = TINY if args.tiny or not cuda else FULL
    device = torch.device("cuda", torch.cuda.current_device()) if cuda and shape is FULL else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    budget = args.budget_s or shape.budget_s
    table = Table(Path(args.out), {"device": name, "shape": shape.name, "versions": versions(), "wheels": wheels,
                                   "budget_s": budget, "model": args.model or "random init"})
    watchdog(table, args.hard_s or budget + 60)
    print(f"bench/gpu.py: {name}, shape {shape.name}, budget {budget:.0f} s; {wheels}", flush=True)
    b = Bench(args, table, shape, device)
    try:
        from engine import log

        log.quiet_third_party()
    except Exception as e:  # the table then says which import failed, row by row
        print(f"engine.log: {e}", file=sys.stderr)
    try:
        b.run_item("env", "environment", "", lambda r: env_row(r, wheels, b))
        b.run_item("teacher", "teacher (32 layers)" if shape is FULL else "teacher", f"{A_TEACHER_PARAMS:,} params",
                   b.item_teacher)
        b.run_item("devset", f"dev set preparation ({shape.segments} segments)", "-", b.item_devset,
                   after=("teacher",))
        b.run_item("task", "importance task scan per candidate",
                   f"{A_GREEDY_100_S} s (one batch of 100, 40 tok) -> paper scan {A_SCAN_BATCHED_MIN:.0f} min; "
                   f"plain HF batch 1: {A_SCAN_BATCH1_H} h", b.item_task, needs=("sacrebleu",), after=("devset",))
        b.run_item("nll", "importance nll scan per candidate",
                   f"~{A_DECODER_ONLY * 100 * A_FORWARD_TOKENS / A_TEACHER_TOK_S:.2f} s naive decoder-only (derived: "
                   f"{A_DECODER_ONLY}x a full forward of 100 x {A_FORWARD_TOKENS} tok at {A_TEACHER_TOK_S:,.0f} tok/s)",
                   b.item_nll, after=("devset",))
        b.run_item("cache", "cache build (ref targets, k=64)", "", b.item_cache, after=("devset",))
        b.run_item("evaluate", "evaluate throughput (greedy)", "", b.item_evaluate, after=("teacher",))
        b.run_item("student", "student (layers dropped)", "", b.item_student, after=("teacher",))
        b.run_item("lora", "plain peft LoRA step" + (" (24 layers)" if shape is FULL else ""), "", b.item_lora,
                   needs=("peft",), after=("student",))
        b.run_item("zero2", "DeepSpeed ZeRO-2 LoRA step (engine trainer)", "", b.item_zero2,
                   needs=("deepspeed", "peft"), after=("lora",))
        b.run_item("qlora", "QLoRA step (24 layers, nf4)" if shape is FULL else "QLoRA step (nf4)", "",
                   b.item_qlora, needs=("bitsandbytes", "peft"), after=("student",))
        finish(b)
    finally:
        b.close()
        with contextlib.suppress(Exception):
            from engine import dist

            dist.finalize()
    print("\n" + table.markdown(), flush=True)
    print(f"wrote {Path(args.out) / 'gpu.json'} and {Path(args.out) / 'gpu.md'}", flush=True)
    return 0


def env_row(row: Row, wheels: str, b: Bench) -> None:
    import torch

    v = versions()
    from engine.models import load

    attn, why = load.choose_attn("auto", b.device.type, b.dtype_name)
    row.value = (f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, deepspeed "
                 f"{v['deepspeed']}, bitsandbytes {v['bitsandbytes']}, flash-attn {v['flash-attn']}")
    row.reason = f"auto attention: {attn} ({why}); {wheels}"
    if b.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(b.device)
        row.reason += f"; GPU memory {total / 2**30:.0f} GiB ({free / 2**30:.0f} free)"
    row.anchor = "H100 80GB, torch 2.11, transformers 5.17, peft 0.21, deepspeed 0.19.8, bitsandbytes 0.50.2"


def finish(b: Bench) -> None:
    """The ratio rows: QLoRA against the plain LoRA step measured here."""
    q, lo = b.results.get("qlora"), b.results.get("lora")
    if q is not None and lo is not None and q.status == lo.status == "ok":
        r = statistics.median(q.data["step_s"]) / statistics.median(lo.data["step_s"])
        q.data["ratio"] = r
        q.value += f" ({r:.2f}x plain LoRA)"
        b.table.write()


if __name__ == "__main__":
    sys.exit(main())
