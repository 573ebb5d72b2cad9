"""The SLURM launcher: rendering and bad input without a cluster, then real jobs on a real one-node SLURM.

The real-SLURM tests use ``slurm_fixture.slurm_cluster`` (slurm-wlm + munge started for the session);
they prove what only a scheduler can: ranks from ``SLURM_PROCID`` in a 2-task job, ``afterok`` chains
and what ``--kill-on-invalid-dep`` does to a failed chain, the USR1 -> exit 75 -> requeue -> resume
loop, and the ledger that ``stc jobs`` reads once jobs vanish from ``scontrol``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from sine_data import build_sine_shards

from engine import cli
from engine import config as cfg
from engine.errors import EXIT_FAIL
from launchers import slurm
from node_procs import AGENT_ENV, run_nodes, told
from slurm_fixture import job_info, slurm_cluster, wait_job  # noqa: F401  (slurm_cluster: fixture)

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "slurm_standin_counter.py"


def run_stc(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "engine.cli", *argv], env=e, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def ledger_of(run: Path) -> list[dict]:
    p = run / "slurm" / "ledger.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """19 train + 3 dev samples in shards of 4 (uneven), built by the engine's shard builder."""
    import numpy as np
    import soundfile as sf

    from engine.data import shards

    root = tmp_path_factory.mktemp("slurm_data")
    write_manifest(root, np, sf)
    shards.build(cfg.load(None, [f"shards.manifest={root / 'm.jsonl'}", f"shards.out={root / 'sh'}",
                                 "shards.samples_per_shard=4"]), workers=1)
    return root / "sh"


def write_manifest(root: Path, np, sf, n: int = 22) -> Path:
    rows = []
    for i in range(n):
        sr, dur = 16000, 0.2 + 0.05 * (i % 7)
        t = np.arange(int(dur * sr)) / sr
        sf.write(root / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t)).astype("float32"), sr)
        rows.append({"id": f"u{i:02d}", "audio": f"a{i}.wav", "src_text": "hello", "tgt_text": "Hallo Welt",
                     "src_lang": "en", "tgt_lang": "de", "split": "train" if i < n - 3 else "dev"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


STREAM = ["--split", "train", "data.batch_size=3", "data.bucket_window=6", "data.num_workers=0"]


# ===================================================================================== no cluster needed

def test_no_sbatch_on_path_suggests_stc_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    code = cli.main(["submit", "shards", "stream", f"run.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == EXIT_FAIL
    assert "`sbatch` not found on PATH" in err and "stc run --nproc" in err
    assert not (tmp_path / "run" / "slurm" / "ledger.jsonl").exists()
    # --dry-run needs no SLURM: it only shows what would be submitted
    assert cli.main(["submit", "shards", "stream", f"run.out_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    assert "#SBATCH --requeue" in capsys.readouterr().out


def test_dry_run_prints_exactly_the_rendered_script(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    run = tmp_path / "run"
    argv = ["shards", "stream", "--shards", "S", f"run.out_dir={run}"]
    assert cli.main(["submit", *argv, "--nodes", "2", "--ntasks-per-node", "3", "--time", "01:00:00",
                     "--signal-seconds", "120", "--dry-run"]) == 0
    out = capsys.readouterr().out
    head, text = out.split("\n", 1)
    assert head == f"# sbatch --parsable {run.resolve() / 'slurm' / 'shards-stream.sbatch'}"
    opts = slurm.JobOptions(nodes=2, ntasks_per_node=3, time="01:00:00", signal_seconds=120, cpus_per_task=1)
    want = slurm.render("shards stream", slurm.stage_command(argv), opts, run / "slurm")
    assert text == want.text
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=3", "#SBATCH --time=01:00:00",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert line in text.splitlines()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert "--nodes" not in text.split("#SBATCH --nodes=2", 1)[1].split("srun --ntasks")[0]  # written once
    assert "srun --kill-on-bad-exit=1 " in text                      # a dead task takes the job down
    assert "SLURM_NNODES" in text
    assert "unset STC_STEP_RECORD" in text.splitlines()                 # a lone stage is no plan step
    assert not run.exists()  # a dry run writes nothing
    r = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_recipe_section_gives_defaults_and_cli_wins(tmp_path, capsys):
    y = tmp_path / "r.yaml"
    y.write_text(f"run: {{out_dir: {tmp_path / 'run'}}}\nslurm: {{partition: gpu, time: '02:00:00', "
                 "signal_seconds: 600, stage_to_local_disk: true, extra_sbatch: ['--constraint=a100']}\n"
                 f"data: {{shards: {tmp_path / 'sh'}}}\n")
    assert cli.main(["submit", "--config", str(y), "importance", "--time", "00:30:00", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --time=00:30:00" in text
    assert "#SBATCH --signal=B:USR1@600" in text and "#SBATCH --constraint=a100" in text
    assert 'data.shards="$LOCAL_SHARDS"' in text and "cp -a" in text
    assert "--config " + str(y) in text


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory) -> dict:
    """A config-only Qwen2-Audio-7B directory and tiny shards with train/dev/test splits."""
    from qwen2audio_7b import write_config_only_7b
    from sine_data import build_split_shards

    root = tmp_path_factory.mktemp("q7")
    return {"model": write_config_only_7b(root / "model"), "shards": build_split_shards(root), "root": root}


def test_jobs_follow_the_plan_one_task_steps_ask_host_memory(seven_b, tmp_path):
    """`stc submit pipeline`'s jobs are the plan's steps: multi-rank steps get the allocation (one task per
    GPU), single-task steps one task, no GPU (export: one) and the host memory of their model; each job
    depends on the jobs of the steps it reads from."""
    from engine import pipeline as P

    recipe = cfg.load(ROOT / "configs" / "qwen2audio-7b-en-de.yaml",
                      [f"model.path={seven_b['model']}", f"data.shards={seven_b['shards']}",
                       f"run.out_dir={tmp_path / 'run'}", "finetune.global_batch=16", "distill.global_batch=16"])
    opts = slurm.JobOptions(nodes=2, gpus_per_node=8)
    assert opts.tasks_per_node == 8
    with pytest.raises(slurm.SubmitError, match="one task per GPU"):
        slurm.JobOptions(gpus_per_node=8, ntasks_per_node=2).check()
    plan = P.build_plan(recipe, nproc=16)
    assert P.check(plan) == []
    sub = slurm.plan_jobs(plan, opts)
    assert [name for name, *_ in sub.items] == [s.name for s in plan.steps]
    text = {name: r.text for name, r, _, _ in sub.items}
    deps = {name: d for name, _, _, d in sub.items}
    ft = text["finetune"]
    assert "#SBATCH --nodes=2" in ft and "#SBATCH --ntasks-per-node=8" in ft and "#SBATCH --gpus-per-node=8" in ft
    prune = text["prune-25"]
    assert "#SBATCH --nodes=1" in prune and "#SBATCH --ntasks-per-node=1" in prune and "gpus-per-node" not in prune
    mem = int(re.search(r"#SBATCH --mem=(\d+)G", prune).group(1))
    assert 16 <= mem <= 24                      # the 8.4B teacher in bf16 (~16.8 GB) plus room, not 8 GPUs
    assert "#SBATCH --gpus-per-node=1" in text["export-kd-25"] and "#SBATCH --mem=" in text["report"]
    assert deps["prune-25"] == ("finetune", "importance") and deps["distill-kd-25"] == ("prune-25", "cache")
    assert deps["distill-ce-25"] == ("prune-25",) and deps["distill-middle-25"] == ("prune-middle-25", "cache")
    assert deps["report"] == tuple(s.name for s in plan.steps if s.stage == "evaluate")
    for name, r, _, _ in sub.items:   # each job runs exactly the step's command line of `stc pipeline`
        step = plan.step(name)
        assert f"engine.cli {step.stage} --config {plan.config_path}" in r.text, name
        assert "srun --kill-on-bad-exit=1 " in r.text
        assert f"export STC_STEP_RECORD={plan.step_record(step).resolve()}" in r.text.splitlines(), name


def test_pipeline_skips_done_steps_and_selects_with_stages(seven_b, tmp_path):
    from engine import pipeline as P

    recipe = cfg.load(ROOT / "configs" / "qwen2audio-7b-en-de.yaml",
                      [f"model.path={seven_b['model']}", f"data.shards={seven_b['shards']}",
                       f"run.out_dir={tmp_path / 'run'}", "pipeline.finetune=false"])
    plan = P.build_plan(recipe, nproc=8)
    imp = plan.step("importance")
    imp.marker.parent.mkdir(parents=True)
    imp.marker.write_text(json.dumps({"config": cfg.to_dict(plan.recipe_of(imp))}))
    sub = slurm.plan_jobs(plan, slurm.JobOptions(gpus_per_node=8))
    skipped = [n for n, r, why, _ in sub.items if r is None]
    assert skipped == ["importance"] and "done" in sub.items[2][2]
    deps = {n: d for n, _, _, d in sub.items}
    assert deps["prune-25"] == ()                  # its input is done: no dependency on a job
    sel = P.build_plan(recipe, nproc=8, select="prune,eval-teacher")
    assert [s.name for s in sel.active] == ["eval-teacher", "prune-25", "prune-middle-25", "prune-50"]
    problems = P.check(sel)
    assert any("prune-middle-25 needs" in p and "importance-middle-25" in p and "--stages" in p for p in problems)
    assert any("'nope'" in p for p in P.build_plan(recipe, select="nope").problems)


def test_gpu_jobs_cores_memory_and_one_jit_cache_per_run(seven_b, tmp_path):
    """GPU jobs: one task per GPU; cores per task data.num_workers + 1 where the step reads shards, else 1;
    --mem per node the step's host estimate x its tasks (single-task steps: the estimate); srun in every
    script kills the job when a task dies and is given the cores itself; every job of the run shares one
    node-local JIT cache, readied on each node before the DeepSpeed stages only."""
    from engine import pipeline as P
    from engine import preflight

    recipe = cfg.load(ROOT / "configs" / "qwen2audio-7b-en-de.yaml",
                      [f"model.path={seven_b['model']}", f"data.shards={seven_b['shards']}",
                       f"run.out_dir={tmp_path / 'run'}", "finetune.global_batch=16", "distill.global_batch=16",
                       "data.num_workers=3", "run.threads=0", "cache.zero3=false"])
    opts = slurm.JobOptions(nodes=2, gpus_per_node=8)
    plan = P.build_plan(recipe, nproc=16)
    sub = slurm.plan_jobs(plan, opts)
    text = {name: r.text for name, r, _, _ in sub.items}
    ext = {re.search(r"^STC_EXT_DIR=(.*)$", t, re.M).group(1) for t in text.values()}
    assert len(ext) == 1 and ext.pop().startswith('"${TMPDIR:-/tmp}/stc-ext-$(id -u)-')
    for name, t in text.items():
        step = plan.step(name)
        srun = [ln for ln in t.splitlines() if re.match(r"\s*srun ", ln)]
        assert srun and all("--kill-on-bad-exit=1 " in ln for ln in srun), name
        assert 'srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ' in t, name
        cpus = int(re.search(r"#SBATCH --cpus-per-task=(\d+)", t).group(1))
        assert cpus == (4 if slurm.reads_shards(step) else 1), name
        assert (" -m launchers.slurm jit-ops" in t) == (step.stage in ("finetune", "distill")), name
        mem = int(re.search(r"#SBATCH --mem=(\d+)G", t).group(1))
        per_rank = preflight.host_mem_gib(plan, step)
        if step.stage != "shards build" and per_rank:
            tasks = 8 if stages_many(step.stage) else 1
            assert mem == per_rank * tasks, name
    for name in ("finetune", "distill-kd-25", "eval-teacher", "importance", "cache"):
        assert "#SBATCH --gpus-per-node=8" in text[name] and "#SBATCH --ntasks-per-node=8" in text[name]
        assert sub.host_mem_gib[name] == int(re.search(r"#SBATCH --mem=(\d+)G", text[name]).group(1))
    assert sub.host_mem_gib["distill-kd-25"] > sub.host_mem_gib["prune-25"]   # 8 ranks on a node, not one
    for name, r, _, _ in sub.items:
        check = subprocess.run(["bash", "-n"], input=r.text, text=True, capture_output=True)
        assert check.returncode == 0, (name, check.stderr)
    # the recipe's slurm section wins over the defaults, also for the JIT cache
    site = cfg.load(None, [f"run.out_dir={tmp_path / 'run'}", "slurm.cpus_per_task=6", "slurm.mem=900G",
                           f"slurm.extensions_dir={tmp_path / 'site ext'}"])
    o = slurm.options_from(site)
    assert (o.cpus_per_task, o.mem, o.extensions_dir) == (6, "900G", str(tmp_path / "site ext"))
    st = slurm.step_options(plan, plan.step("distill-kd-25"), replace(opts, cpus_per_task=6, mem="900G"))
    assert (st.cpus_per_task, st.mem) == (6, "900G")
    t = slurm.render("distill", ["x"], o, tmp_path / "run" / "slurm", deepspeed=True).text
    assert f"STC_EXT_DIR={shlex.quote(str(tmp_path / 'site ext'))}" in t.splitlines()


def stages_many(stage: str) -> bool:
    from engine import stages

    return stages.get(stage).ranks == "many"


def test_jit_ops_build_under_a_kernel_lock_and_clear_stale_locks(tmp_path):
    """build_jit_ops holds an flock on the cache (a second builder waits; a dead holder's flock is gone), and
    removes torch's build locks that no process holds open, keeping the one a live builder holds."""
    root = tmp_path / "ext"
    (root / "dead_op").mkdir(parents=True)
    (root / "live_op").mkdir()
    (root / "dead_op" / "lock").write_text("")
    (root / "live_op" / "lock").write_text("")

    def hold(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, time\n{code}\nprint('held', flush=True)\n"
                                 "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        return proc

    # a live torch build: its lock held open for the whole test; another builder holding the flock 1.5 s
    builder = hold(f"fd = os.open({str(root / 'live_op' / 'lock')!r}, os.O_RDONLY)")
    other = hold(f"f = open({str(root / slurm.JIT_LOCK)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)")
    killer = threading.Timer(1.5, other.kill)
    killer.start()
    try:
        built = []
        r = slurm.build_jit_ops(root, build=lambda: built.append(1))
    finally:
        killer.cancel()
        other.kill()
        other.wait()
    assert built == [1] and r["op"] is None and not r["compiled"]
    assert r["waited_s"] >= 1.0     # waited for the other builder; its flock went with it (killed, never unlocked)
    assert r["stale_locks"] == [str(root / "dead_op" / "lock")]
    assert not (root / "dead_op" / "lock").exists() and (root / "live_op" / "lock").exists()
    builder.kill()   # the compiler is killed mid-build: its lock is left behind, now stale
    builder.wait()
    r = slurm.build_jit_ops(root, build=lambda: None)
    assert r["waited_s"] < 1.0 and r["stale_locks"] == [str(root / "live_op" / "lock")]


def test_gpu_count_of_sinfo_gres():
    assert slurm._gpu_count("(null)") == 0
    assert slurm._gpu_count("gpu:8") == 8
    assert slurm._gpu_count("gpu:a100:4(S:0-1)") == 4
    assert slurm._gpu_count("gpu:h100:4(S:0),shard:8") == 4


def test_jobs_from_the_ledger_alone(tmp_path):
    """Finished jobs vanish from scontrol (MinJobAge) and accounting may be off: the ledger decides."""
    led = tmp_path / "slurm" / "ledger.jsonl"
    log = tmp_path / "slurm" / "x-1.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "Traceback: boom\n")
    ids = ["990000001", "990000002", "990000003", "990000004"]  # not known to any scontrol
    for i, (job, stage, dep) in enumerate(zip(ids, ["shards build", "importance", "prune", "finetune"],
                                               [None, ids[0], ids[1], None])):
        slurm.append(led, "submitted", job=job, stage=stage, pipeline="p1" if i < 3 else "p2", dependency=dep,
                     log=str(log) if i == 1 else str(tmp_path / f"none-{i}.log"))
    slurm.append(led, "started", job=ids[0], restarts=0)
    slurm.append(led, "finished", job=ids[0], restarts=0, exit=0)
    slurm.append(led, "started", job=ids[1], restarts=0)
    slurm.append(led, "requeued", job=ids[1], restarts=0, exit=75)
    slurm.append(led, "started", job=ids[1], restarts=1)
    slurm.append(led, "finished", job=ids[1], restarts=1, exit=1)
    with open(led, "a") as f:
        f.write('{"event": "fini')  # a line cut by a crash: skipped
    views = {v.job: v for v in slurm.job_views(led)}
    assert views[ids[0]].state == "COMPLETED"
    assert (views[ids[1]].state, views[ids[1]].restarts, views[ids[1]].exit) == ("FAILED", 1, 1)
    assert views[ids[2]].state == "CANCELLED" and f"dependency {ids[1]}" in views[ids[2]].why
    assert views[ids[3]].state == "UNKNOWN"
    buf = io.StringIO()
    slurm.print_jobs([led], lines=5, out=buf)
    text = buf.getvalue()
    assert f"log: {log}" in text and "| Traceback: boom" in text and "| line 26" in text and "| line 25" not in text
    assert "never ran" in text


# ===================================================================================== a real SLURM

def test_daemons_are_live(slurm_cluster):
    daemons = {"slurmctld": "slurmctld", "munged": "munged", **{f"slurmd-{n}": "slurmd" for n in slurm_cluster.nodes}}
    assert len(slurm_cluster.nodes) == 2
    for name, comm in daemons.items():
        pid = slurm_cluster.pids[name]
        assert Path(f"/proc/{pid}/comm").read_text().strip() == comm, name
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %c"], capture_output=True, text=True)
    assert r.stdout.split()[:2] == [slurm_cluster.node, "idle"]
    r = subprocess.run(["sinfo", "-h", "-N", "-p", slurm_cluster.multi_partition, "-o", "%N %T"], capture_output=True,
                       text=True)
    assert sorted(r.stdout.split()) == sorted([*slurm_cluster.nodes, "idle", "idle"])


def submission(tmp_path: Path, jobs: list) -> "slurm.Submission":
    """Jobs (name, command, options, dependencies) rendered into <tmp>/run/slurm, ready for submit_jobs."""
    out = tmp_path / "run" / "slurm"
    return slurm.Submission(items=[(n, slurm.render(n, cmd, o, out), "", d) for n, cmd, o, d in jobs],
                            ledger=(out / "ledger.jsonl").resolve())


def submit_ok(*argv: str) -> list[str]:
    r = run_stc("submit", *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()


def test_two_task_job_ranks_from_slurm(slurm_cluster, tiny_shards, tmp_path):
    """`stc submit shards stream` on 2 tasks: SLURM_PROCID 0 and 1 in distinct processes, each sample
    delivered once, the same samples as a local 1-rank run; the script on disk is the dry-run's."""
    run, dump = tmp_path / "run", tmp_path / "dump"
    argv = ["shards", "stream", "--shards", str(tiny_shards), "--dump", str(dump), *STREAM, f"run.out_dir={run}",
            "--ntasks-per-node", "2"]
    dry = run_stc("submit", *argv, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    (job,) = submit_ok(*argv)
    info = wait_job(job)
    log = run / "slurm" / f"shards-stream-{job}.log"
    assert info["JobState"] == "COMPLETED", log.read_text()
    assert (run / "slurm" / "shards-stream.sbatch").read_text() == dry.stdout.split("\n", 1)[1]
    ranks = {r: [json.loads(x) for x in (dump / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert {b["rank"] for r in ranks for b in ranks[r]} == {0, 1}
    assert all(b["rank"] == r for r in ranks for b in ranks[r])
    assert len({ranks[0][0]["pid"], ranks[1][0]["pid"]}) == 2
    keys = [k for r in ranks for b in ranks[r] for k, p in zip(b["keys"], b["pad"]) if not p]
    assert len(keys) == 19 and max(Counter(keys).values()) == 1
    local = run_stc("shards", "stream", "--shards", str(tiny_shards), "--dump", str(tmp_path / "one"), *STREAM)
    assert local.returncode == 0, local.stderr
    one = [k for x in (tmp_path / "one" / "rank0.jsonl").read_text().splitlines()
           for k, p in zip(json.loads(x)["keys"], json.loads(x)["pad"]) if not p]
    assert sorted(one) == sorted(keys)
    events = [e["event"] for e in ledger_of(run)]
    assert events == ["submitted", "started", "finished"]
    jobs = run_stc("jobs", "--ledger", str(run))
    assert jobs.returncode == 0 and f"{job}" in jobs.stdout and "COMPLETED" in jobs.stdout


def tiny_plan(root: Path) -> Path:
    """A 4-layer tiny Qwen2-Audio, shards with train/dev/test, and a 7-step recipe: eval-teacher, importance,
    prune-50, cache, distill-kd-50, export-kd-50, eval-kd-50."""
    from engine.models.tiny import build_tiny

    from sine_data import build_split_shards

    build_tiny("qwen2audio", root / "model", num_layers=4, hidden_size=64, dtype="fp32", seed=0)
    sh = build_split_shards(root, train=8, dev=3, test=3)
    y = root / "recipe.yaml"
    y.write_text(
        f"model: {{path: {root / 'model'}, dtype: fp32}}\n"
        f"data: {{shards: {sh}, batch_size: 2}}\n"
        f"run: {{out_dir: {root / 'run'}, threads: 1, device: cpu, progress_s: 0}}\n"
        "importance: {scorer: nll, decode_batch_size: 4}\n"
        "cache: {k: 8, max_new_tokens: 4, batch_size: 4}\n"
        "distill: {mode: lora, epochs: 1, global_batch: 4, lr: 1.0e-3, lora: {r: 4}, save_every: 100, zero_stage: 2}\n"
        "evaluate: {max_new_tokens: 4, batch_size: 4}\n"
        "pipeline: {students: [0.5], ablations: false, shuffle_check: false, report: false}\n")
    return y


def test_failing_step_mid_chain_then_resubmission_skips_finished_steps(slurm_cluster, tmp_path):
    """The plan as jobs with afterok edges: rank 1 of the distill job dies (SIGKILL after step 1); srun
    --kill-on-bad-exit ends the job within 60 s, its dependents never run, `stc jobs` shows the failure
    with its log; resubmitting submits only the unfinished steps, a third submission while they are
    queued is refused, and `stc cancel` stops them."""
    y = tiny_plan(tmp_path)
    run = tmp_path / "run"
    env = dict(os.environ, STC_SIGNAL_AT_STEP="1:1:KILL", STC_TORCH_EXTENSIONS_DIR=os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")))
    r = run_stc("submit", "pipeline", "--config", str(y), "--ntasks-per-node", "2", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    jobs = r.stdout.split()
    names = ["eval-teacher", "importance", "prune-50", "cache", "distill-kd-50", "export-kd-50", "eval-kd-50"]
    assert len(jobs) == len(names)
    job = dict(zip(names, jobs))
    assert job_info(job["distill-kd-50"]).get("Dependency", "").startswith(
        f"afterok:{job['prune-50']}(")            # scontrol shows each edge: afterok:<id>(state)
    info = wait_job(job["distill-kd-50"], timeout=600)
    assert info["JobState"] == "FAILED", (run / "slurm" / f"distill-kd-50-{job['distill-kd-50']}.log").read_text()
    for n in names[:4]:
        assert (job_info(job[n]).get("JobState") or "COMPLETED") == "COMPLETED", n
    ev = ledger_of(run)
    fin = next(e for e in ev if e["event"] == "finished" and e["job"] == job["distill-kd-50"])
    died = [json.loads(x) for x in (run / "students" / "r50" / "kd" / "distill" / "metrics.jsonl").read_text()
            .splitlines() if '"loss"' in x][-1]["time"]
    ended = time.mktime(time.strptime(fin["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert ended - died < 60, (ended, died)      # not the 1800 s process-group timeout
    for n in ("export-kd-50", "eval-kd-50"):     # dependents never ran (cancelled: --kill-on-invalid-dep)
        assert wait_job(job[n], timeout=60).get("JobState", "CANCELLED") == "CANCELLED", n
    ev = ledger_of(run)
    for n in ("export-kd-50", "eval-kd-50"):
        assert [e["event"] for e in ev if e["job"] == job[n]] == ["submitted"]
        assert not list((run / "slurm").glob(f"{n}-*.log"))
    view = run_stc("jobs", "--config", str(y))
    assert view.returncode == 0, view.stderr
    log = run / "slurm" / f"distill-kd-50-{job['distill-kd-50']}.log"
    assert f"job {job['distill-kd-50']} distill-kd-50 (stc distill) FAILED" in view.stdout
    assert f"log: {log}" in view.stdout and "|" in view.stdout
    assert f"never ran: dependency {job['distill-kd-50']} (distill-kd-50)" in view.stdout

    again = run_stc("submit", "pipeline", "--config", str(y), "--ntasks-per-node", "2", timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(again.stdout.split()) == 3
    for n in names[:4]:
        assert f"skip {n}: done" in again.stderr
    twice = run_stc("submit", "pipeline", "--config", str(y), "--ntasks-per-node", "2", timeout=120)
    assert twice.returncode == 1 and "is queued or running as job" in twice.stderr
    pid = re.search(r"stc cancel --pipeline (\S+)", again.stderr).group(1)
    c = run_stc("cancel", "--pipeline", pid, "--ledger", str(run))
    assert c.returncode == 0 and all(j in c.stderr for j in again.stdout.split())
    for j in again.stdout.split():
        assert wait_job(j, timeout=60).get("JobState", "CANCELLED") == "CANCELLED"


def test_bad_partition_shows_slurms_message(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    r = run_stc("submit", "shards", "stream", f"run.out_dir={run}", "--partition", "nope")
    assert r.returncode == 1 and "partition 'nope'" in r.stderr and "not found" in r.stderr.lower()
    assert "debug" in r.stderr  # the partitions that exist
    assert not ledger_of(run)


def test_half_submitted_chain_is_cancelled(slurm_cluster, tmp_path, monkeypatch):
    """The second sbatch of a chain fails (SLURM rejects the partition): the first job is cancelled."""
    real = slurm.sbatch
    calls: list[str] = []

    def flaky(script: Path, dependency: str | None = None) -> str:
        calls.append(str(script))
        if len(calls) == 2:
            bad = script.with_name("bad.sbatch")
            bad.write_text(script.read_text().replace("#SBATCH --nodes=1", "#SBATCH --partition=nope\n#SBATCH --nodes=1"))
            return real(bad, dependency)
        return real(script, dependency)

    monkeypatch.setattr(slurm, "sbatch", flaky)
    p = submission(tmp_path, [("first", ["sleep", "30"], slurm.JobOptions(), ()),
                              ("second", ["sleep", "30"], slurm.JobOptions(), ("first",))])
    with pytest.raises(slurm.SubmitError) as e:
        slurm.submit_jobs(p)
    assert "invalid partition" in str(e.value).lower() and "cancelled the jobs already submitted" in str(e.value)
    first = next(x["job"] for x in ledger_of(tmp_path / "run") if x["event"] == "submitted")
    assert wait_job(first, timeout=30).get("JobState", "CANCELLED") == "CANCELLED"
    assert [v.state for v in slurm.job_views(tmp_path / "run" / "slurm" / "ledger.jsonl")] == ["CANCELLED"]


def test_gpus_on_a_cpu_only_partition_are_refused(slurm_cluster, tmp_path):
    r = run_stc("submit", "shards", "stream", f"run.out_dir={tmp_path}", "--gpus-per-node", "1")
    assert r.returncode == 1 and "has no GPUs" in r.stderr and "debug" in r.stderr
    assert not ledger_of(tmp_path)


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """USR1 to the batch script (what SLURM does at --signal=B:USR1@s or on preemption) with the
    test-only stand-in stage: forwarded to both tasks, exit 75, requeued, resumed, each step once."""
    work, steps = tmp_path / "work", 30
    p = submission(tmp_path, [("finetune", [sys.executable, str(STANDIN), str(work), str(steps)],
                               slurm.JobOptions(ntasks_per_node=2), ())])
    (rec,) = slurm.submit_jobs(p)
    job = rec["job"]
    end = time.monotonic() + 60
    while time.monotonic() < end:
        data = work / "data.rank1.jsonl"
        if data.exists() and len(data.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = wait_job(job, timeout=90)
    log = Path(rec["log"]).read_text()
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) >= 1
    starts = [json.loads(x) for x in (work / "starts.jsonl").read_text().splitlines()]
    assert sorted((s["rank"], s["restart"]) for s in starts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(s["from"] > 0 for s in starts if s["restart"] == 1)  # resumed, not restarted
    for rank in (0, 1):
        got = [json.loads(x)["step"] for x in (work / f"data.rank{rank}.jsonl").read_text().splitlines()]
        assert got == list(range(steps))  # exactly once
    assert "forwarding to the tasks" in log and "requeueing job" in log
    events = [e["event"] for e in ledger_of(tmp_path / "run")]
    assert events == ["submitted", "started", "signal", "requeued", "started", "finished"]
    (view,) = slurm.job_views(tmp_path / "run" / "slurm" / "ledger.jsonl")
    assert (view.state, view.restarts) == ("COMPLETED", 1)


# ===================================================================================== real stages

@pytest.fixture(scope="module")
def imp_one(tmp_path_factory) -> dict:
    """A tiny model + dev shards and its local 1-rank importance scan: the reference for both tests below."""
    from test_importance import SCAN, build_env

    root = tmp_path_factory.mktemp("imp")
    env = build_env(root / "env")
    common = [f"model.path={env['model']}", "model.dtype=fp32", f"data.shards={env['shards']}", *SCAN,
              "importance.remove=2"]
    r = run_stc("importance", *common, f"importance.out={root / 'one'}", f"run.out_dir={root / 'r1'}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"common": common, "ranking": json.loads((root / "one" / "ranking.json").read_text())}


def same_scan_both_ranks_once(imp_one: dict, out: Path) -> None:
    from test_importance import units_of

    from engine.importance import journal as J

    a, b = imp_one["ranking"], json.loads((out / "ranking.json").read_text())
    assert b["removed"] == a["removed"] and b["baseline"] == a["baseline"]
    assert [it["scores"] for it in b["iterations"]] == [it["scores"] for it in a["iterations"]]
    units = units_of(out)
    assert {u["rank"] for u in units} == {0, 1} and len({u["pid"] for u in units}) == 2
    keys = [J.record_key(u) for u in units]
    assert len(keys) == len(set(keys)) == 1 + 4 + 3  # baseline + the candidates of two iterations, each once


def test_two_task_importance_equals_one_rank(slurm_cluster, imp_one, tmp_path):
    """`stc importance` on a tiny model as a 2-task SLURM job: both SLURM_PROCIDs computed units, each
    unit once, and the ranking equals the local 1-rank scan."""
    two, run = tmp_path / "two", tmp_path / "run"
    (job,) = submit_ok("importance", *imp_one["common"], f"importance.out={two}", f"run.out_dir={run}",
                       "--ntasks-per-node", "2")
    info = wait_job(job, timeout=240)
    assert info["JobState"] == "COMPLETED", (run / "slurm" / f"importance-{job}.log").read_text()[-3000:]
    same_scan_both_ranks_once(imp_one, two)


@pytest.mark.slow
def test_two_node_rendezvous_without_slurm(imp_one, tmp_path):
    """Multi-node rendezvous as two `torchrun --nnodes 2 --node_rank i` processes on 127.0.0.1."""
    from launchers.local import free_port, torchrun_command

    out = tmp_path / "nodes"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **AGENT_ENV)
    argv = ["importance", *imp_one["common"], f"importance.out={out}", f"run.out_dir={tmp_path / 'run'}"]
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    codes = run_nodes([torchrun_command(1, argv, master_port=port, nnodes=2, node_rank=i) for i in (0, 1)], env,
                      logs, timeout=300)
    assert codes == [0, 0], told(codes, logs)
    same_scan_both_ranks_once(imp_one, out)


def train_workspace(root: Path) -> Path:
    """16 train + 6 dev samples, a 4-layer teacher and a 2-layer student (the trainer tests' sizes)."""
    from engine.models.tiny import build_tiny

    root.mkdir(parents=True, exist_ok=True)
    build_sine_shards(root, 22, 16)
    build_tiny("qwen2audio", root / "teacher", num_layers=4, dtype="fp32", seed=0)
    build_tiny("qwen2audio", root / "student", num_layers=2, dtype="fp32", seed=1)
    return root


def test_preempted_trainer_resumes_with_the_same_losses(slurm_cluster, tmp_path):
    """`stc distill` as a 2-task job gets USR1 (to the batch script, as SLURM sends it) mid-run: all
    ranks checkpoint the same step, exit 75, the job is requeued (restart 1), resumes and ends with
    every sample once per epoch and the losses of an uninterrupted run."""
    ws = train_workspace(tmp_path / "ws")

    def args(out: Path) -> list[str]:
        kv = {"model.path": ws / "teacher", "model.dtype": "fp32", "data.shards": ws / "sh", "data.batch_size": 2,
              "distill.student": ws / "student", "distill.mode": "lora", "distill.teacher_mode": "online",
              "distill.seq_kd": "false", "distill.global_batch": 4, "distill.epochs": 1, "distill.out": out,
              "distill.lr": "1e-3", "distill.lora.r": 4, "distill.save_every": 100, "distill.zero_stage": 2,
              "cache.k": 8, "run.threads": 1, "run.out_dir": out.parent / "run"}
        return [f"{k}={v}" for k, v in kv.items()]

    def metrics(out: Path) -> list[dict]:
        p = out / "metrics.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    env = dict(os.environ, STC_TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")))
    ref = tmp_path / "ref" / "out"
    r = run_stc("run", "--nproc", "2", "distill", *args(ref), env=env, timeout=400)
    assert r.returncode == 0, r.stderr[:6000]
    out = tmp_path / "slurm" / "out"
    e = dict(env, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    sub = subprocess.run([sys.executable, "-m", "engine.cli", "submit", "distill", *args(out), "--ntasks-per-node", "2"],
                         env=e, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.split()[0]
    end = time.monotonic() + 240
    while time.monotonic() < end and not any(m.get("step", 0) >= 1 and "loss" in m for m in metrics(out)):
        assert job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_info(job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_job(job, timeout=300)
    log = (out.parent / "run" / "slurm" / f"distill-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) >= 1 and "requeueing job" in log
    started = [x for x in ledger_of(out.parent / "run") if x["event"] == "started"]
    assert [x["restarts"] for x in started] == [0, 1]  # SLURM_RESTART_COUNT as the resumed job saw it
    m = metrics(out)
    stops = [x for x in m if x.get("event") == "stopped"]
    assert len(stops) == 1 and stops[0]["exit"] == 75
    assert any(x.get("resumed_from") for x in m if x.get("event") == "start")
    got = [(x["step"], x["loss"]) for x in m if "loss" in x]
    want = [(x["step"], x["loss"]) for x in metrics(ref) if "loss" in x]
    assert [s for s, _ in got] == [s for s, _ in want]  # every step once
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    keys = Counter(k for x in m if "loss" in x for k in x["keys"])
    assert keys == Counter(k for x in metrics(ref) if "loss" in x for k in x["keys"]) and set(keys.values()) == {1}
