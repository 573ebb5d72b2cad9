"""meta.json fingerprints: a changed input changes the fingerprint, an unchanged one does not."""
from __future__ import annotations

import json
import struct

import pytest

from engine import meta


def _safetensors(path, tensors: dict[str, tuple[str, list[int]]], payload: bytes | None = None):
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 1
        for s in shape:
            n *= s
        size = n * {"F32": 4, "BF16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}
        off += size
    h = json.dumps(header).encode()
    data = payload if payload is not None else bytes(off)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _model_dir(tmp_path, name="m", layers=2, payload=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": layers, "hidden_size": 4}, indent=2))
    _safetensors(d / "model.safetensors", {f"l{i}.w": ("F32", [4, 4]) for i in range(layers)}, payload)
    return d


def test_model_fingerprint_stable_and_sensitive(tmp_path):
    a = _model_dir(tmp_path, "a")
    b = _model_dir(tmp_path, "b")
    assert meta.fingerprint_model(a) == meta.fingerprint_model(b)
    assert meta.fingerprint_model(a) == meta.fingerprint_model(a)
    # config formatting does not matter, config content does
    cfg = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps(cfg))
    assert meta.fingerprint_model(a) == meta.fingerprint_model(b)
    cfg["num_hidden_layers"] = 3
    (b / "config.json").write_text(json.dumps(cfg))
    assert meta.fingerprint_model(a) != meta.fingerprint_model(b)
    # a pruned model (other tensor list) differs
    c = _model_dir(tmp_path, "c", layers=1)
    assert meta.fingerprint_model(a) != meta.fingerprint_model(c)


def test_model_values_are_told_apart(tmp_path):
    """A fine-tuned checkpoint has its base's headers: the sampled content hash tells them apart."""
    a = _model_dir(tmp_path, "a", payload=bytes(128))
    b = _model_dir(tmp_path, "b", payload=b"\x01" + bytes(127))
    assert meta.fingerprint_model(a, sample=False) == meta.fingerprint_model(b, sample=False)  # headers equal
    assert meta.fingerprint_model(a) != meta.fingerprint_model(b)
    assert meta.fingerprint_model(a, full=True) != meta.fingerprint_model(b, full=True)


def test_sampled_hash_reaches_the_whole_file(tmp_path):
    """Changes near the start, middle and end of large tensor data all change the fingerprint."""
    n = 64 * (1 << 16) * 2  # larger than the sample budget, so reads are spread out
    base = meta.fingerprint_model(_model_dir(tmp_path, "base", layers=1, payload=bytes(n)))
    for name, pos in (("first", 0), ("last", n - 1)):
        data = bytearray(n)
        data[pos] = 1
        assert meta.fingerprint_model(_model_dir(tmp_path, name, layers=1, payload=bytes(data))) != base


def test_model_fingerprint_errors(tmp_path):
    with pytest.raises(meta.MetaError, match="config.json"):
        meta.fingerprint_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(meta.MetaError, match="safetensors"):
        meta.fingerprint_model(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    with pytest.raises(meta.MetaError, match="corrupt"):
        meta.fingerprint_model(tmp_path)


def test_tokenizer_fingerprint(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (a / "special_tokens_map.json").write_text('{"eos_token": "<|im_end|>"}')
    f1 = meta.fingerprint_tokenizer(a)
    assert f1 == meta.fingerprint_tokenizer(a)
    (a / "special_tokens_map.json").write_text('{"eos_token": "<|endoftext|>"}')
    assert meta.fingerprint_tokenizer(a) != f1
    with pytest.raises(meta.MetaError, match="no tokenizer files"):
        meta.fingerprint_tokenizer(tmp_path / "a" / "..")  # the parent has none


def test_tokenizer_object_fingerprint():
    class Tok:
        def __init__(self, vocab, tmpl):
            self._v, self.chat_template = vocab, tmpl
            self.special_tokens_map = {"eos_token": "<e>"}

        def get_vocab(self):
            return dict(self._v)

    assert meta.fingerprint_tokenizer(Tok({"a": 0, "b": 1}, "t")) == meta.fingerprint_tokenizer(Tok({"b": 1, "a": 0}, "t"))
    assert meta.fingerprint_tokenizer(Tok({"a": 0, "b": 1}, "t")) != meta.fingerprint_tokenizer(Tok({"a": 1, "b": 0}, "t"))
    assert meta.fingerprint_tokenizer(Tok({"a": 0}, "t")) != meta.fingerprint_tokenizer(Tok({"a": 0}, "u"))


def test_prompt_data_feature_fingerprints(tmp_path):
    assert meta.fingerprint_prompt(lambda: "<s>x") == meta.fingerprint_prompt(lambda: "<s>x")
    assert meta.fingerprint_prompt(lambda: "<s>x") != meta.fingerprint_prompt(lambda: "<s>y")
    s1 = [{"name": "train-000000.tar", "sha256": "aa"}, {"name": "train-000001.tar", "sha256": "bb"}]
    assert meta.fingerprint_data(s1) == meta.fingerprint_data(list(reversed(s1)))  # order-free
    assert meta.fingerprint_data(s1) != meta.fingerprint_data([s1[0], {**s1[1], "sha256": "cc"}])
    with pytest.raises(meta.MetaError):
        meta.fingerprint_data([])
    assert meta.fingerprint_feature_extractor(tmp_path) is None
    (tmp_path / "preprocessor_config.json").write_text('{"feature_size": 128}')
    f = meta.fingerprint_feature_extractor(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"feature_size": 80}')
    assert meta.fingerprint_feature_extractor(tmp_path) != f


def test_write_read_meta(tmp_path):
    from engine import config as cfg

    m = meta.build_meta("shards", fingerprints={"data": "sha256:1", "none": None}, config=cfg.load(None), counts={"read": 1})
    meta.write_meta(tmp_path, m)
    back = meta.read_meta(tmp_path, kind="shards")
    assert back["schema"] == meta.SCHEMA_VERSION and back["counts"] == {"read": 1}
    assert back["fingerprints"] == {"data": "sha256:1"}
    assert back["config"]["data"]["batch_size"] == 4
    assert "torch" in back["libraries"] and back["pid"] > 0 and back["host"]
    with pytest.raises(meta.MetaError, match="expected 'cache'"):
        meta.read_meta(tmp_path, kind="cache")
    with pytest.raises(meta.MetaError, match="missing"):
        meta.read_meta(tmp_path / "nowhere")
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(meta.MetaError, match="not valid JSON"):
        meta.read_meta(tmp_path)
    with pytest.raises(meta.MetaError, match="unknown meta kind"):
        meta.build_meta("bogus")


def test_compare_fingerprints():
    diffs = meta.compare_fingerprints({"a": "sha256:1", "b": "sha256:2"}, {"a": "sha256:1", "b": "sha256:3"}, what="cache")
    assert len(diffs) == 1 and "b differs" in diffs[0]
