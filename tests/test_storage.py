"""Bytes on disk: the prediction from config.json alone (engine/models/storage.py) against what `stc export`
writes, for every storage lever (nf4 / int8, per component, lm_head), each export reloaded in plain
transformers + bitsandbytes; the 7B arithmetic against a hand count; the size target refused at dry run
with the breakdown; the 4 GB recipes validated at the 7B shape."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Qwen2-Audio with linears wide enough that nf4 blocks and headers are realistic shares."""
    from engine.models.tiny import build_tiny

    return build_tiny("qwen2audio", tmp_path_factory.mktemp("st") / "m", num_layers=3, hidden_size=128,
                                 intermediate_size=256, audio_d_model=64, audio_layers=2)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    from engine.models.tiny import build_tiny

    d = build_tiny("causal_lm", tmp_path_factory.mktemp("st") / "lm", num_layers=2, hidden_size=128,
                             intermediate_size=256)
    from safetensors.torch import load_file, save_file

    c = json.loads((d / "config.json").read_text())
    c["tie_word_embeddings"] = True                     # as Qwen2.5-0.5B: one matrix for both, saved once
    (d / "config.json").write_text(json.dumps(c))
    w = load_file(d / "model.safetensors")
    del w["lm_head.weight"]
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _export(src: Path, out: Path, *sets: str) -> dict:
    from engine import config, export

    recipe = config.load(None, [f"model.path={src}", f"export.source={src}", f"export.out={out}",
                                "model.attn_implementation=eager", *sets])
    export.run(recipe)
    return json.loads((out / "meta.json").read_text())["exported"]


LEVERS = [
    ("none", "[]"),
    ("nf4", "[encoder,projector,decoder]"),                 # the paper's student: lm_head stays bf16
    ("nf4", "[encoder,projector,decoder,lm_head]"),
    ("nf4", "[decoder]"),                                   # encoder and projector kept in bf16
    ("int8", "[encoder,projector,decoder,lm_head]"),
    ("int8", "[decoder,lm_head]"),
]
QUANT_CLASS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.mark.parametrize("quant,quantize", LEVERS, ids=[f"{q}-{c}" for q, c in LEVERS])
def test_predicted_bytes_match_the_export_and_it_reloads_in_plain_transformers(tiny, tmp_path, quant, quantize):
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from engine.models import storage

    comps = [c for c in quantize.strip("[]").split(",") if c]
    predicted = storage.predict(str(tiny), quant=quant, quantize=comps)
    ex = _export(tiny, tmp_path / "out", f"export.quant={quant}", f"export.quantize={quantize}")
    measured = storage.measure(tmp_path / "out")
    assert measured.total == ex["storage_bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert abs(measured.total - predicted.total) / measured.total < 0.01
    assert ex["size"]["predicted"]["total_bytes"] == predicted.total
    assert ex["size"]["relative_difference"] < 0.01
    for c in storage.COMPONENTS:                              # per component too, not only in sum
        assert measured.bytes.get(c, 0) == pytest.approx(predicted.bytes.get(c, 0), rel=0.01, abs=64), c
        assert measured.params.get(c, 0) == predicted.params.get(c, 0), c
    # each lever moves bytes where it should: a quantized component is smaller than in bf16 (the encoder
    # keeps its position table and convolutions in bf16, so only its linears shrink)
    plain = storage.predict(str(tiny))
    for c in ("encoder", "decoder", "lm_head"):
        if quant != "none" and c in comps:
            ratio = 0.9 if c == "encoder" else 0.6 if quant == "int8" else 0.4
            assert measured.bytes[c] < ratio * plain.bytes[c], c
        else:
            assert measured.bytes[c] == plain.bytes[c], c
    # plain transformers rebuilds exactly that layout from config.json and generates
    m = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager")
    from engine.models.load import bnb_cpu_workaround

    bnb_cpu_workaround(m)
    kinds: dict[str, set[str]] = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            kinds.setdefault(storage.component_of(name), set()).add(type(mod).__name__)
    for c in ("encoder", "projector", "decoder", "lm_head"):
        want = QUANT_CLASS[quant] if quant != "none" and c in comps else "Linear"
        assert kinds[c] == {want}, (c, kinds[c])
    proc = AutoProcessor.from_pretrained(tmp_path / "out")
    ids = proc.tokenizer("Hallo Welt", return_tensors="pt").input_ids
    with torch.no_grad():
        g = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert g.shape[1] > ids.shape[1]


def test_a_tied_lm_head_is_stored_once_and_cannot_be_quantized_apart(tiny_tied, tmp_path):
    from engine.models import storage

    p = storage.predict(str(tiny_tied), quant="nf4", quantize=["decoder"])
    assert "lm_head" not in p.bytes and p.bytes["embeddings"] > 0
    ex = _export(tiny_tied, tmp_path / "out", "export.quant=nf4", "export.quantize=[decoder]")
    assert abs(ex["size"]["measured"]["total_bytes"] - p.total) / p.total < 0.01
    with pytest.raises(storage.StorageError, match="lm_head is tied to the input embeddings"):
        storage.predict(str(tiny_tied), quant="nf4", quantize=["decoder", "lm_head"])


def test_the_embeddings_and_unknown_components_are_refused_naming_the_key():
    from engine import config

    with pytest.raises(config.ConfigError) as e:
        config.load(None, ["export.quantize=[decoder,embeddings]"])
    assert "export.quantize: 'embeddings' cannot be stored quantized" in str(e.value)
    assert "trimming the vocabulary" in str(e.value)
    with pytest.raises(config.ConfigError, match=r"export.quantize: unknown component 'audio'"):
        config.load(None, ["export.quantize=[audio]"])
    with pytest.raises(config.ConfigError, match=r"export.quant"):
        config.load(None, ["export.quant=int4"])


def _nf4_bytes(n: int) -> int:
    """Reference: one nf4 linear with double quant as bitsandbytes writes it (packed data, uint8 absmax per
    64 values, fp32 scale per 256 absmax, 256 + 16 fp32 code maps, ~171 bytes of JSON)."""
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 171


def test_the_7b_breakdown_matches_a_count_by_hand(tmp_path):
    from qwen2audio_7b import write_config_only_7b

    from engine.models import storage

    d = write_config_only_7b(tmp_path / "q7")
    full = storage.predict(str(d))
    h, i, v, layers = 4096, 11008, 156032, 32
    per_layer_linear = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]                 # q k v o, gate up down
    per_layer = sum(a * b for a, b in per_layer_linear) + 3 * h + 2 * h          # q/k/v biases, two norms
    assert full.params["decoder"] == layers * per_layer == 6_476_660_736
    assert full.params["embeddings"] == full.params["lm_head"] == v * h
    assert sum(full.params.values()) == 8_397_094_912                           # transformers' own count
    assert full.total == pytest.approx(2 * 8_397_094_912, rel=1e-4)
    # the paper's student: 24 layers, nf4 on every linear but lm_head
    paper = storage.predict(str(d), removed=8, quant="nf4", quantize=["encoder", "projector", "decoder"])
    dec = 24 * (sum(_nf4_bytes(a * b) for a, b in per_layer_linear) + 2 * (3 * h + 2 * h))
    assert paper.bytes["decoder"] == pytest.approx(dec, abs=24 * 7 * 2)          # JSON length varies by a byte
    assert paper.bytes["embeddings"] == paper.bytes["lm_head"] == 2 * v * h
    assert 5.40e9 < paper.total < 5.42e9
    small = storage.predict(str(d), removed=13, quant="nf4", quantize=list(storage.QUANTIZABLE))
    assert small.bytes["lm_head"] == pytest.approx(_nf4_bytes(v * h), abs=2)
    assert small.total < 4e9 < storage.predict(str(d), removed=12, quant="nf4",
                                               quantize=list(storage.QUANTIZABLE)).total
    t = small.table()
    assert "lm_head" in t and "nf4" in t and "GB" in t


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory) -> dict:
    from qwen2audio_7b import write_config_only_7b
    from sine_data import build_split_shards

    root = tmp_path_factory.mktemp("q7size")
    return {"model": write_config_only_7b(root / "model"), "shards": build_split_shards(root), "root": root}


def _validated_export_sizes(stc_inproc, args: tuple) -> tuple[str, list[float]]:
    """A recipe's dry run that must validate: its estimates (wrapped lines joined) and every export's GB."""
    r = stc_inproc(*args)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "the plan validates: every step would start" in r.stdout
    est = re.sub(r"\n {9}", " ", r.stdout)
    sizes = [float(x) for x in re.findall(r"writes (\d+\.\d+) GB on disk", est)]
    exports = re.findall(r"^\s*\d+\. (export-\S+)", r.stdout, flags=re.M)
    assert exports and len(sizes) == len(exports), (exports, sizes)
    return est, sizes


@pytest.mark.parametrize("lang", ["de", "zh"])
def test_the_4gb_recipes_validate_at_the_7b_shape_and_print_every_students_size(seven_b, lang, stc_inproc):
    name = f"qwen2audio-7b-en-{lang}-4gb"
    _, sizes = _validated_export_sizes(stc_inproc, (
        "pipeline", "--config", ROOT / "configs" / f"{name}.yaml", "--dry-run", "--nproc", "8",
        f"model.path={seven_b['model']}", f"data.shards={seven_b['shards']}",
        f"run.out_dir={seven_b['root'] / 'runs' / name}"))
    assert all(3.0 < s < 4.0 for s in sizes), sizes
    assert not (seven_b["root"] / "runs" / name).exists()


def test_a_size_target_the_levers_cannot_reach_is_refused_before_any_job_with_the_breakdown(seven_b, stc_inproc):
    name = "qwen2audio-7b-en-de-4gb"
    r = stc_inproc("pipeline", "--config", ROOT / "configs" / f"{name}.yaml", "--dry-run", "--nproc", "8",
                   f"model.path={seven_b['model']}", f"data.shards={seven_b['shards']}",
                   f"run.out_dir={seven_b['root'] / 'runs' / name}", "export.max_gb=3.5",
                   "export.quantize=[encoder,projector,decoder]")
    assert r.returncode == 2, r.stdout[-3000:]
    out = r.stdout
    assert "over export.max_gb=3.5" in out and "export.quantize" in out
    assert re.search(r"lm_head\s+639,107,072 bf16\s+1,278,214,144", out), out[-3000:]
    assert re.search(r"total\s+[\d,]+\s+[\d,]+ = 4\.88\d GB", out), out[-3000:]


def test_export_trims_the_vocabulary_to_the_train_split_and_the_prediction_follows(tiny, tmp_path):
    """export.trim_vocab: the rows the train split's prompts and translations use (+ specials, bytes, merge
    closure) before nf4; the train texts encode as before (mapped ids); dev/test are counted; the predicted
    bytes (from the trimmed config.json) match the files; plain transformers reloads and generates."""
    import torch
    from sine_data import build_split_shards
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from engine import config as cfg
    from engine.data.prompt import PromptBuilder
    from engine.export import split_texts
    from engine.models import storage

    shards = build_split_shards(tmp_path)
    full = _export(tiny, tmp_path / "full", "export.quant=nf4", "export.quantize=[encoder,projector,decoder,lm_head]")
    ex = _export(tiny, tmp_path / "trim", "export.quant=nf4", "export.quantize=[encoder,projector,decoder,lm_head]",
                 "export.trim_vocab=true", f"data.shards={shards}")
    v = ex["vocab"]
    assert v["new_rows"] < v["old_rows"] and v["corpus"]["differ"] == 0
    assert set(v["verify"]) == {"dev", "test"} and all(c["sentences"] > 0 for c in v["verify"].values())
    assert ex["size"]["relative_difference"] < 0.01
    assert ex["storage_bytes"] < full["storage_bytes"]
    saved = full["size"]["measured"]["components"]["embeddings"]["bytes"] - \
        ex["size"]["measured"]["components"]["embeddings"]["bytes"]
    assert saved == (v["old_rows"] - v["new_rows"]) * 128 * 2                     # bf16 rows of hidden 128
    kept = json.loads((tmp_path / "trim" / "vocab_map.json").read_text())["kept"]
    old = AutoProcessor.from_pretrained(tiny)
    new = AutoProcessor.from_pretrained(tmp_path / "trim")
    recipe = cfg.load(None, [f"data.shards={shards}"])
    for text in split_texts(recipe, "train", PromptBuilder(old, recipe.data)):
        a = old.tokenizer(text, add_special_tokens=False).input_ids
        b = new.tokenizer(text, add_special_tokens=False).input_ids
        assert [kept[i] for i in b] == a, text
    m = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "trim", attn_implementation="eager")
    from engine.models.load import bnb_cpu_workaround

    bnb_cpu_workaround(m)
    assert m.config.text_config.vocab_size == v["new_rows"]
    assert m.config.audio_token_index == new.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    ids = new.tokenizer("hello number 3", return_tensors="pt").input_ids
    with torch.no_grad():
        g = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert g.shape[1] > ids.shape[1] and int(g.max()) < v["new_rows"]
    # plan validation counts the same rows from the tokenizer and the shards, before any job runs
    from engine import preflight

    r = cfg.load(None, [f"model.path={tiny}", f"data.shards={shards}", "export.trim_vocab=true", "export.quant=nf4",
                        "export.quantize=[encoder,projector,decoder,lm_head]"])
    assert preflight.trimmed_rows(r, str(tiny)) == v["new_rows"]
    assert preflight.export_size(str(tiny), 0, r, v["new_rows"]).total == pytest.approx(ex["storage_bytes"], rel=0.01)
    assert preflight.trimmed_rows(cfg.load(None, [f"data.shards={tmp_path / 'none'}", "export.trim_vocab=true"]),
                                  str(tiny)) is None


def test_export_trimmed_to_the_languages_scripts_changes_no_text_of_them(tiny, tmp_path):
    """export.trim_languages=[en, de]: the train split's tokens plus every token written in Latin script; the
    dev and test sentences (English and German, never in the corpus) now all encode exactly as before, the
    table keeps more rows than the train-split trim, and plan validation predicts the same row count."""
    from sine_data import build_split_shards

    from engine import config as cfg
    from engine import preflight

    shards = build_split_shards(tmp_path)
    corpus_only = _export(tiny, tmp_path / "trim", "export.trim_vocab=true", f"data.shards={shards}")["vocab"]
    ex = _export(tiny, tmp_path / "scripts", "export.trim_vocab=true", "export.trim_languages=[en, de]",
                 f"data.shards={shards}")
    v = ex["vocab"]
    assert corpus_only["new_rows"] < v["new_rows"] < v["old_rows"]
    assert all(c["sentences"] > 0 and c["differ"] == 0 for c in v["verify"].values())
    assert json.loads((tmp_path / "scripts" / "vocab_map.json").read_text())["scripts"] == ["LATIN"]
    r = cfg.load(None, [f"model.path={tiny}", f"data.shards={shards}", "export.trim_vocab=true",
                        "export.trim_languages=[en, de]"])
    assert preflight.trimmed_rows(r, str(tiny)) == v["new_rows"]


@pytest.fixture(scope="module")
def seven_b_with_vocab(seven_b, tmp_path_factory) -> Path:
    """The config-only 7B beside a real Qwen vocabulary and a Qwen2-Audio processor (those of a tiny model
    built with Qwen's tokenizer): the plan can then count the rows a vocabulary trim keeps."""
    import shutil

    from engine.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("q7vocab")
    tiny = build_tiny("qwen2audio", root / "tiny", tokenizer="qwen", num_layers=1, hidden_size=32,
                      intermediate_size=64, audio_layers=1, audio_d_model=16)
    d = root / "model"
    shutil.copytree(seven_b["model"], d)
    for f in tiny.iterdir():
        if f.is_file() and f.name not in ("config.json", "generation_config.json", "meta.json") \
                and not f.name.endswith(".safetensors"):
            shutil.copy2(f, d / f.name)
    return d


def test_the_2gb_stretch_recipe_validates_at_the_7b_shape_with_its_trimmed_vocabulary(seven_b, seven_b_with_vocab,
                                                                                    stc_inproc):
    name = "qwen2audio-7b-en-de-2gb"
    args = ("pipeline", "--config", ROOT / "configs" / f"{name}.yaml", "--dry-run", "--nproc", "8",
            f"model.path={seven_b_with_vocab}", f"data.shards={seven_b['shards']}",
            f"run.out_dir={seven_b['root'] / 'runs' / name}")
    est, sizes = _validated_export_sizes(stc_inproc, args)
    assert all(1.0 < s < 2.0 for s in sizes), sizes
    rows = [int(x.replace(",", "")) for x in re.findall(r"vocabulary trimmed to ([\d,]+) rows", est)]
    assert rows and all(256 < n < 156032 for n in rows), est[-3000:]
    # the paper's 24 layers with the same levers cannot fit: refused before any job, with the breakdown
    r = stc_inproc(*args, "pipeline.students=[0.25]")
    assert r.returncode == 2 and "over export.max_gb=2" in r.stdout, r.stdout[-3000:]
    assert re.search(r"decoder\s+[\d,]+ nf4", r.stdout), r.stdout[-3000:]
    assert not (seven_b["root"] / "runs" / name).exists()
