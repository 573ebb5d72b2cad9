"""GPU placement decisions of engine.models.load, checked on a CPU-only machine: the automatic attention
choice, the rank's device and device_map, and the bitsandbytes CPU workaround staying off GPU layers.
CUDA and flash_attn availability are faked where a decision depends on them."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from engine.config import ModelConfig
from engine.models import load
from engine.models.tiny import build_tiny


def _no_flash_probe():
    raise AssertionError("flash_attn must not be probed when the device or dtype cannot use it")


def test_explicit_attention_is_kept(monkeypatch):
    monkeypatch.setattr(load, "flash_attn_importable", _no_flash_probe)
    for req in ("eager", "sdpa", "flash_attention_2"):
        assert load.choose_attn(req, "cuda", "bf16") == (req, "set by model.attn_implementation")
        assert load.choose_attn(req, "cpu", "fp32")[0] == req


@pytest.mark.parametrize("requested", ["", "auto", "AUTO", " auto "])
def test_auto_attention_off_cuda_or_in_fp32_is_sdpa_without_probing(monkeypatch, requested):
    monkeypatch.setattr(load, "flash_attn_importable", _no_flash_probe)
    attn, why = load.choose_attn(requested, "cpu", "bf16")
    assert attn == "sdpa" and "cpu" in why
    attn, why = load.choose_attn(requested, "cuda", "fp32")
    assert attn == "sdpa" and "fp32" in why


def test_auto_attention_on_cuda_follows_flash_attn_import(monkeypatch):
    fake = types.ModuleType("flash_attn")
    fake.__version__ = "9.9.9"
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    for dt in ("bf16", "fp16"):
        attn, why = load.choose_attn("auto", "cuda", dt)
        assert attn == "flash_attention_2" and "9.9.9" in why and dt in why
    monkeypatch.setitem(sys.modules, "flash_attn", None)   # `import flash_attn` raises ImportError
    attn, why = load.choose_attn("", "cuda", "bf16")
    assert attn == "sdpa" and "does not import" in why and "ModuleNotFoundError" in why


@pytest.fixture
def four_gpus(monkeypatch):
    """Four visible GPUs; the rank session (engine.dist.init) made GPU 3 current for this rank."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)


def test_rank_device_is_the_current_one_that_the_rank_session_set(four_gpus):
    from engine import dist

    assert load.rank_cuda_device() == torch.device("cuda", 3)
    # what engine.dist.init makes current: the local rank among the visible GPUs
    assert dist.gpu_index(1, 4) == 1
    assert dist.gpu_index(5, 4) == 1       # more local ranks than visible GPUs (one GPU bound per task)


def test_device_map_is_one_device_never_a_strategy(four_gpus):
    assert load.device_map("cuda") == {"": "cuda:3"}
    assert load.device_map(torch.device("cuda")) == {"": "cuda:3"}
    assert load.device_map("cuda:0") == {"": "cuda:0"}       # an explicit index is kept
    assert load.device_map("cpu") == {"": "cpu"}
    assert load.device_map(None) is None
    for bad in ("auto", "balanced"):
        with pytest.raises(load.ModelLoadError, match="one device"):
            load.device_map(bad)


def test_nf4_default_device_is_the_ranks_gpu(four_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load._default_device(quantized=True) == torch.device("cuda", 3)
    assert load._default_device(quantized=False) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load._default_device(quantized=True) == torch.device("cpu")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_tiny("causal_lm", tmp_path_factory.mktemp("lm") / "lm", num_layers=2, seed=5)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def stc_lines():
    h = _Lines()
    lg = logging.getLogger("stc")
    old = lg.level
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    yield h.lines
    lg.removeHandler(h)
    lg.setLevel(old)


def test_load_auto_attention_on_cpu_logs_one_line(lm_dir, stc_lines, monkeypatch):
    monkeypatch.setattr(load, "flash_attn_importable", _no_flash_probe)
    m = load.load_model(ModelConfig(path=str(lm_dir), dtype="fp32", attn_implementation="auto"), device="cpu")
    assert m.config._attn_implementation == "sdpa"
    said = [x for x in stc_lines if x.startswith("attention for")]
    assert len(said) == 1 and "sdpa" in said[0] and "cpu" in said[0], stc_lines


def test_auto_flash_refused_falls_back_to_sdpa(lm_dir, stc_lines, monkeypatch):
    # flash_attn "imports" and the model will run on CUDA: auto asks for flash_attention_2, which
    # transformers refuses on this machine (no flash_attn package, no GPU); auto then takes sdpa, not eager
    monkeypatch.setattr(load, "flash_attn_importable", lambda: (True, "faked"))
    m = load.load_model(ModelConfig(path=str(lm_dir), dtype="bf16", attn_implementation="auto"),
                        device="cpu", run_device="cuda")
    assert m.config._attn_implementation == "sdpa"
    assert any("flash_attention_2" in x and "faked" in x for x in stc_lines), stc_lines
    assert any("falling back to sdpa" in x for x in stc_lines), stc_lines


def test_bnb_workaround_touches_cpu_layers_only():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(bnb.nn.Linear4bit(8, 8), bnb.nn.Linear4bit(8, 8))
    # the second layer stands for one on a GPU: its weight is not on the CPU
    model[1].weight = torch.nn.Parameter(torch.empty(8, 8, device="meta"), requires_grad=False)
    # bitsandbytes starts the flag from this CPU's features (False without avx512_bf16): set it as on a CPU
    # that has them, so the test checks the workaround on any machine
    for layer in model:
        layer.support_avx512bf16_for_cpu = True
    assert load.bnb_cpu_workaround(model) == 1
    assert model[0].support_avx512bf16_for_cpu is False
    assert model[1].support_avx512bf16_for_cpu is True
