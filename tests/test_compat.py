"""engine.compat: the tested ranges agree with constraints-floor.txt, constraints.txt and pyproject.toml;
the start-up check warns outside them and refuses known-broken releases; the version switches pick the
argument each transformers release understands."""
from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from engine import compat

ROOT = Path(__file__).resolve().parents[1]


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pkg, ver = line.split("==")
            out[canonicalize_name(pkg)] = ver
    return out


def requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def test_tested_table_is_the_two_constraint_files():
    floor, newest = pins("constraints-floor.txt"), pins("constraints.txt")
    for pkg, (lo, hi) in compat.TESTED.items():
        assert floor[canonicalize_name(pkg)] == lo, f"{pkg}: compat.TESTED floor {lo} vs constraints-floor.txt"
        assert newest[canonicalize_name(pkg)] == hi, f"{pkg}: compat.TESTED newest {hi} vs constraints.txt"
    assert floor["torch"] == newest["torch"] == "2.13.0"   # torch's floor is not tested (README)


def test_pyproject_floors_equal_the_floor_set_and_admit_both_sets():
    floor, newest = pins("constraints-floor.txt"), pins("constraints.txt")
    reqs = requirements()
    assert set(reqs) - {"torch"} == {canonicalize_name(p) for p in compat.TESTED}
    for name, req in reqs.items():
        if name == "torch":
            continue
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert lower == [floor[name]], f"{name}: pyproject floor {lower} vs constraints-floor.txt {floor[name]}"
        assert req.specifier.contains(floor[name]) and req.specifier.contains(newest[name]), name


def test_upper_bounds_where_internals_are_used_and_broken_releases_excluded():
    reqs = requirements()
    for name in ("transformers", "peft", "deepspeed", "bitsandbytes"):
        upper = [s for s in reqs[name].specifier if s.operator == "<"]
        assert upper, f"{name} needs an upper bound in pyproject.toml"
        assert Version(upper[0].version).major > Version(compat.TESTED[name][1]).major or \
            Version(upper[0].version) > Version(compat.TESTED[name][1])
    assert not reqs["transformers"].specifier.contains("4.54.1")
    assert not reqs["transformers"].specifier.contains("6.0.0")


@pytest.fixture
def stc_log(caplog, monkeypatch):
    """Warnings of the ``stc`` logger, each once (a stage's log set-up may have stopped propagation)."""
    logger = logging.getLogger("stc")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="stc")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_in_range_is_silent_patch_releases_of_the_newest_series_included(stc_log):
    lo, hi = compat.TESTED["transformers"]
    top = Version(hi)
    for v in (lo, hi, f"{top.major}.{top.minor}.{top.micro + 3}", "4.57.6"):
        assert compat.check_versions({"transformers": v}, force=True) == [], v
    assert not stc_log.records


def test_outside_the_range_warns_with_package_version_range_and_fix(stc_log):
    lo, hi = compat.TESTED["peft"]
    newer = f"{Version(hi).major}.{Version(hi).minor + 1}.0"
    older = "0.12.0"
    got = compat.check_versions({"peft": newer, "numpy": "1.23.5", "transformers": None}, force=True)
    assert len(got) == 2 and [r.getMessage() for r in stc_log.records] == got
    assert got[0].startswith(f"peft {newer} is newer than the tested range {lo} .. 0.21.x")
    assert f"pip install 'peft=={hi}'" in got[0]
    assert got[1].startswith("numpy 1.23.5 is older than the tested range 1.24.4 .. 2.3.x")
    assert "pip install 'numpy>=1.24.4'" in got[1]
    assert compat.version_problems({"peft": older}) == ([], [
        f"peft {older} is older than the tested range {lo} .. 0.21.x; if a stage fails, first install a tested "
        f"release: pip install 'peft>={lo}'"])


def test_known_broken_releases_are_refused_with_the_reason():
    with pytest.raises(compat.VersionError) as e:
        compat.check_versions({"soundfile": "0.12.1"}, force=True)
    msg = str(e.value)
    assert msg.startswith("soundfile 0.12.1 does not work with stc-engine:") and "compression_level" in msg
    assert "pip install 'soundfile==0.14.0'" in msg
    # a transformers release that breaks one family is not refused for everyone (the family refuses it)
    assert compat.version_problems({"transformers": "4.54.1"})[0] == []


def test_a_family_refuses_the_transformers_releases_that_break_it(tmp_path, monkeypatch, stc_inproc):
    """Qwen2-Audio under transformers 4.54 (its generate passes cache_position, which its forward rejects) and
    Voxtral under transformers 4 (no tekken.json conversion) are refused when their checkpoint is detected: on
    load and in the plan's validation, before any step runs; other families load."""
    import sys

    from engine.models import families
    from engine.models.load import ModelLoadError, detect_family
    from engine.models.tiny import build_tiny

    with pytest.raises(families.UnsupportedModel) as e:
        families.get("qwen2audio").check_transformers("4.54.1")
    assert "Qwen2-Audio does not work with transformers 4.54.1" in str(e.value) and "cache_position" in str(e.value)
    assert "pip install 'transformers==5.24.0'" in str(e.value)
    with pytest.raises(families.UnsupportedModel, match="Voxtral does not work with transformers 4.57.1: .*tekken"):
        families.get("voxtral").check_transformers("4.57.1")
    families.get("causal_lm").check_transformers("4.54.1")                     # no refusal
    families.get("qwen2audio").check_transformers("5.24.0")

    d = build_tiny("qwen2audio", tmp_path / "qa", num_layers=8, dtype="fp32")
    # the module now registered (transformers may swap its lazy module object in sys.modules after first import)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.54.1")
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'qa'}: Qwen2-Audio does not work with transformers 4.54.1"):
        detect_family(d)
    # the plan's validation says so before any step runs
    from sine_data import build_split_shards

    shards = build_split_shards(tmp_path)
    r = stc_inproc("pipeline", "--config", "configs/qwen2audio-7b-en-de.yaml", "--dry-run", "--nproc", "2",
                   f"model.path={d}", f"data.shards={shards}", f"run.out_dir={tmp_path / 'runs'}")
    assert r.returncode != 0
    assert "Qwen2-Audio does not work with transformers 4.54.1" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr
    assert not (tmp_path / "runs").exists()
def test_checks_once_per_process(monkeypatch, stc_log):
    monkeypatch.setattr(compat, "_CHECKED", False)
    assert compat.check_versions({"numpy": "1.20.0"}) and compat.check_versions({"numpy": "1.20.0"}) == []
    assert len(stc_log.records) == 1


def test_a_stage_start_runs_the_check(monkeypatch, stc_inproc, stc_log):
    """``stc`` (stages.invoke) checks the installed versions before the stage's own code runs."""
    monkeypatch.setattr(compat, "_CHECKED", False)
    monkeypatch.setitem(compat.TESTED, "rich", ("0.1.0", "0.1.0"))
    r = stc_inproc("config", "keys")
    assert r.returncode == 0
    assert any(re.match(r"rich \S+ is newer than the tested range 0\.1\.0 \.\. 0\.1\.x", m.getMessage())
               for m in stc_log.records)
    monkeypatch.setattr(compat, "_CHECKED", False)
    monkeypatch.setitem(compat.BROKEN, "rich", [(">=0", "a test marks every rich release broken")])
    r = stc_inproc("config", "keys")
    assert r.returncode == 1 and "a test marks every rich release broken" in r.stderr


def test_the_installed_set_passes():
    refusals, _ = compat.version_problems()
    assert refusals == []


@pytest.mark.parametrize("version,key", [("4.53.0", "torch_dtype"), ("4.55.4", "torch_dtype"), ("4.56.0", "dtype"),
                                         ("5.24.0", "dtype")])
def test_dtype_keyword_follows_the_transformers_release(monkeypatch, version, key):
    import torch
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert compat.dtype_kwargs(torch.bfloat16) == {key: torch.bfloat16}

    class Cfg:
        pass

    c = Cfg()
    compat.set_config_dtype(c, torch.float16)
    assert vars(c) == {key: torch.float16}


class _LM:
    def __init__(self, head=True):
        self.calls, self.head = [], head

    def get_output_embeddings(self):
        return object() if self.head else None

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        return {}

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return "tokens"


class _OldAudio(_LM):
    """Qwen2-Audio before transformers 5: generate() would refuse inputs_embeds."""

    def __init__(self, lm):
        super().__init__()
        self.language_model = lm

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return {}


def test_generate_from_embeds_routes_to_the_decoder_only_when_generate_would_refuse():
    plain = _LM()
    assert compat.generate_from_embeds(plain, "E", "M", max_new_tokens=3) == "tokens"
    assert plain.calls == [{"inputs_embeds": "E", "attention_mask": "M", "max_new_tokens": 3}]
    lm = _LM()
    old = _OldAudio(lm)
    assert compat.generate_from_embeds(old, "E", "M") == "tokens"
    assert old.calls == [] and lm.calls == [{"inputs_embeds": "E", "attention_mask": "M"}]
    headless = _OldAudio(_LM(head=False))     # a decoder without an LM head cannot generate: the model's own error
    compat.generate_from_embeds(headless, "E", "M")
    assert headless.calls and not headless.language_model.calls


def test_floor_marker_is_registered():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("floor:") for m in markers)
