"""`interp run` under torchrun: two CPU processes (gloo) write the same tables as one process.

The tiny study (experiments/tiny.toml: random-init tiny Llama, one thread per process, fp32) runs
its sharded steps (experts, evaluate, mechanisms by unit; subspace by module) once in this process and
once as ``torchrun --standalone --nproc_per_node 2``; every results table must be byte-identical,
except the ``experts`` table's two timing columns (``wall_time_s``, ``steps_per_s``: seconds of
the wall clock, different in any two runs). Then units of the two-process run are deleted, as an
interruption leaves them, and a second two-process launch recomputes exactly those.
"""

import itertools
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from interp.errors import StudyError
from interp.study import run_study
from interp.study.distributed import World, assign, init_world
from interp.study.tables import TABLES

TINY = "experiments/tiny.toml"
STEPS = ["world", "experts", "evaluate", "mechanisms", "subspace"]
TIMING = ["wall_time_s", "steps_per_s"]  # experts table: wall-clock measurements


def torchrun(out: Path, steps: list[str], logs: Path) -> subprocess.CompletedProcess:
    """``interp run`` as two gloo processes; each rank's stdout/stderr in ``logs``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", "-m", "interp.cli", "run", "-c", TINY,
           "--out", str(out), "--steps", ",".join(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        rank_logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(logs.rglob("*.log")))
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stderr[-3000:]}\n{rank_logs}")
    return proc


def rank_log(logs: Path, rank: int) -> str:
    return "".join(p.read_text() for p in logs.rglob("stderr.log") if p.parent.name == str(rank))


def assert_same_tables(ref: Path, got: Path) -> None:
    names = sorted(p.name for p in (ref / "results").glob("*.csv"))
    assert sorted(p.name for p in (got / "results").glob("*.csv")) == names and len(names) >= 15
    for name in names:
        a, b = ref / "results" / name, got / "results" / name
        if name == "experts.csv":
            pd.testing.assert_frame_equal(pd.read_csv(a).drop(columns=TIMING), pd.read_csv(b).drop(columns=TIMING))
        else:
            assert a.read_bytes() == b.read_bytes(), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    run_study(TINY, out=base / "one", steps=STEPS)
    torchrun(base / "two", STEPS, base / "logs")
    return base


def test_two_gloo_processes_write_the_tables_of_one(runs):
    """Byte-identical tables, and the work was really shared: each variant scored by one rank,
    taken from the queue (which rank depends on timing), and both ranks scored some."""
    assert_same_tables(runs / "one", runs / "two")
    import json

    machine = json.loads((runs / "two" / "run.json").read_text())["machine"]
    assert machine["processes"] == {"world_size": 2, "per_host": 2, "backend": "gloo"}
    assert "threads_alone" not in machine  # tiny.toml fixes threads = 1: no shared threads to pool
    variants = ["base", "expert_ab", "expert_bc", "expert_ac", "uniform", "ties", "peft_linear", "arrow",
                "mixture", "uniform+ac", "joint_all"]  # tiny.toml's, the oracle derived by rank 0
    r0, r1 = rank_log(runs / "logs", 0), rank_log(runs / "logs", 1)
    scored_by = {v: [r for r, log in enumerate((r0, r1)) if f"evaluate {v}:" in log] for v in variants}
    assert all(len(ranks) == 1 for ranks in scored_by.values()), scored_by
    assert {r for ranks in scored_by.values() for r in ranks} == {0, 1}, scored_by
    # run.json `stages`: rank 0 gathered every rank's units, the same units as one process times
    one, two = (json.loads((runs / d / "run.json").read_text())["stages"] for d in ("one", "two"))
    for stages in (one, two):
        # a variant a rank scored while the other still trained is timed in the experts step
        early = {u for u, st in stages["experts"].items() if "score_while_waiting" in st}
        assert set(stages["evaluate"]) | early == set(variants)
        assert all({"load", "score", "chain"} <= set(st) for st in [*stages["evaluate"].values(), *(
            stages["experts"][u] for u in early)])
        assert {u for u, st in stages["experts"].items() if "train" in st} == {"ab", "bc", "ac", "joint_all"}
        assert {"adapters", "spectra", "overlap"} <= set(stages["subspace"]["modules"])
        assert all(x >= 0 for step in stages.values() for st in step.values() for x in st.values())
    assert set(one["mechanisms"]) == set(two["mechanisms"]) and set(one) == set(two)


def test_stage_times_each_unit_and_appends_to_the_stage_log(tmp_path, monkeypatch):
    """Run.stage adds a stage's wall seconds to stages[step][unit][stage] and, with
    $INTERP_STAGE_LOG, appends one JSON line per stage as it ends."""
    import json
    import time

    from interp.config import load_config
    from interp.study.runner import STAGE_LOG_ENV, Run

    log = tmp_path / "stages.jsonl"
    monkeypatch.setenv(STAGE_LOG_ENV, str(log))
    run = Run(load_config(TINY, {}), tmp_path, timings={})
    run.step = "evaluate"
    with run.stage("base", "load"):
        time.sleep(0.02)
    with run.stage("base", "load"):
        time.sleep(0.02)
    with pytest.raises(ValueError):  # a failing stage is still timed, and the error passes through
        with run.stage("uniform", "score"):
            raise ValueError("boom")
    assert 0.04 <= run.stages["evaluate"]["base"]["load"] < 1.0
    assert set(run.stages["evaluate"]) == {"base", "uniform"}
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["step"], x["unit"], x["stage"], x["rank"]) for x in lines] == [
        ("evaluate", "base", "load", 0), ("evaluate", "base", "load", 0), ("evaluate", "uniform", "score", 0)]
    assert abs(sum(x["seconds"] for x in lines[:2]) - run.stages["evaluate"]["base"]["load"]) < 2e-3


def test_interrupted_two_process_run_resumes_to_the_same_tables(runs, tmp_path):
    """Units lost as an interruption leaves them (an expert of each rank, a variant's scores,
    a variant's mechanism tables, every marker after ``world``) are recomputed by the next
    two-process launch, the others reused untouched, and the tables equal the one-process run's."""
    copy = tmp_path / "copy"
    shutil.copytree(runs / "two", copy)
    for step in STEPS[1:]:
        (copy / "steps" / f"{step}.json").unlink()
    for name, table in TABLES.items():  # the tables of the steps run again
        if table.step != "world":
            (copy / "results" / f"{name}.csv").unlink(missing_ok=True)
    lost = [copy / "adapters" / "joint_all", copy / "adapters" / "ab"]
    lost += list((copy / "cache" / "scores").glob("expert_bc.*.csv"))
    lost += list((copy / "cache" / "mechanisms").glob("uniform.*"))
    assert len(lost) >= 5
    for p in lost:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (copy / "cache").rglob("*.csv")}
    kept[copy / "adapters" / "bc" / "adapter_model.safetensors"] = \
        (copy / "adapters" / "bc" / "adapter_model.safetensors").stat().st_mtime_ns
    torchrun(copy, STEPS[1:], tmp_path / "logs")
    assert all(p.exists() for p in lost)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished units were not redone
    assert_same_tables(runs / "one", copy)


def test_assign_is_a_longest_first_greedy_within_four_thirds_of_optimal():
    assert assign([5, 1, 5, 1], 2) == [0, 0, 1, 1]
    assert assign([126, 54, 54, 18], 2) == [0, 1, 1, 1]  # tiny.toml's experts: joint_all alone
    assert assign([1, 2, 3], 1) == [0, 0, 0] and assign([], 3) == []
    rng = random.Random(0)
    for _ in range(200):
        n, size = rng.randint(1, 7), rng.randint(1, 3)
        costs = [rng.randint(0, 9) for _ in range(n)]
        owner = assign(costs, size)
        assert assign(costs, size) == owner and all(0 <= r < size for r in owner)
        span = max(sum(c for c, r in zip(costs, owner) if r == k) for k in range(size))
        best = min(max(sum(c for c, r in zip(costs, split) if r == k) for k in range(size))
                   for split in itertools.product(range(size), repeat=n))  # brute force
        assert span <= best * 4 / 3 + 1e-9, (costs, size, owner)
    with pytest.raises(StudyError, match="costs must be finite"):
        assign([1, -1], 2)
    with pytest.raises(StudyError, match="size must be"):
        assign([1], 0)


def test_one_process_world_is_a_no_op(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    w = init_world("cuda")
    assert w == World() and w.is_main and w.size == 1
    assert w.shard(["a", "b", "c"]) == ["a", "b", "c"] and w.gather(3) == [3] and w.broadcast("x") == "x"
    w.barrier()
    assert w.device("cuda") == "cuda" and w.device("cpu") == "cpu"
    two = World(rank=1, size=2, local_rank=1, local_size=2)
    assert two.device("cuda") == "cuda:1" and two.device("cuda:0") == "cuda:1" and two.device("cpu") == "cpu"
    assert not two.is_main


def test_processes_share_gpus_only_when_asked(monkeypatch):
    from interp.study.distributed import SHARE_GPUS_ENV, gpu_index

    monkeypatch.delenv(SHARE_GPUS_ENV, raising=False)
    assert [gpu_index(r, 2) for r in range(4)] == [0, 1, 2, 3]  # rank 2, 3: refused by init_world
    monkeypatch.setenv(SHARE_GPUS_ENV, "1")
    assert [gpu_index(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert [gpu_index(r, 1) for r in range(3)] == [0, 0, 0]
    assert gpu_index(2, 0) == 2  # no GPU: unchanged, the device check refuses it
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert World(rank=2, size=3, local_rank=2, local_size=3).device("cuda") == "cuda:0"


def test_torchrun_variables_are_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(StudyError, match=r"\$RANK is not set"):
        init_world("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(StudyError, match=r"\$WORLD_SIZE must be an integer"):
        init_world("cpu")


def _two_ranks(rank: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    w = init_world("cpu")
    out = {"rank": w.rank, "shard": w.shard(["a", "b", "c"]), "costly": w.shard(["a", "b", "c"], cost={"a": 1, "b": 1, "c": 3}.get),
           "bcast": w.broadcast(f"from {w.rank}"), "gather": w.gather(10 + w.rank)}
    w.barrier()
    try:
        w.shard(["x"] if w.is_main else ["y"])
    except StudyError as e:
        out["error"] = str(e)
    queue.put(out)


def test_two_gloo_ranks_shard_gather_and_refuse_different_lists():
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted((queue.get(timeout=300) for _ in procs), key=lambda o: o["rank"])
    for p in procs:
        p.join(timeout=60)
    assert [o["shard"] for o in got] == [["a", "c"], ["b"]]
    assert [o["costly"] for o in got] == [["c"], ["a", "b"]]
    assert [o["bcast"] for o in got] == ["from 0", "from 0"] and got[1]["gather"] == [10, 11]
    assert all("disagree on the list of work units" in o.get("error", "") for o in got)


def test_claim_hands_each_unit_to_exactly_one_rank_longest_first(tmp_path, monkeypatch):
    """World.claim: a work queue. Two ranks asking in turn (one of them slower) split the units
    between them, every unit once, each rank's in decreasing cost; one process gets them all."""
    from interp.study.distributed import World

    costs = {"ab": 150, "bc": 120, "ac": 60, "joint_12": 270, "joint_all": 300}
    assert list(World().claim(costs, costs.get, tmp_path)) == ["joint_all", "joint_12", "ab", "bc", "ac"]
    monkeypatch.setattr(World, "gather", lambda self, obj: [obj, obj])
    monkeypatch.setattr(World, "broadcast", lambda self, obj: "launch")
    r0, r1 = World(rank=0, size=2), World(rank=1, size=2)
    q0, q1 = r0.claim(costs, costs.get, tmp_path), r1.claim(costs, costs.get, tmp_path)
    got0, got1 = [next(q0)], [next(q1)]          # both start: the two longest
    got0.append(next(q0))                          # rank 0 is free first: the next longest
    got0.append(next(q0))
    got1 += list(q1)                               # rank 1 finishes the queue
    got0 += list(q0)
    assert (got0, got1) == (["joint_all", "ab", "bc"], ["joint_12", "ac"])
    claims = {p.name: p.read_text() for p in (tmp_path / "launch").iterdir()}  # queue position: rank
    assert claims == {"0": "0", "1": "1", "2": "0", "3": "0", "4": "1"}
    r1.release_claims()
    assert (tmp_path / "launch").is_dir()          # only rank 0 removes them
    r0.release_claims()
    assert not (tmp_path / "launch").exists()


def test_rank0_alone_gets_every_shared_thread(monkeypatch):
    """With automatic threads shared by 2 processes, each takes half the free cores, and rank 0
    runs the steps it runs alone (world, figures, report) with all of them, then gives them back."""
    import torch

    import interp.hardware as hardware
    from interp.config import load_config
    from interp.study.runner import _resolve_machine, _threads

    monkeypatch.setattr(hardware, "free_cores", lambda: 4)
    monkeypatch.delenv("INTERP_THREADS", raising=False)
    monkeypatch.setattr(World, "broadcast", lambda self, obj: obj)
    before = torch.get_num_threads()
    try:
        cfg = load_config(TINY, {"study.threads": 0})
        machine = _resolve_machine(cfg, World(rank=0, size=2, local_rank=0, local_size=2))
        assert machine["threads"] == 2 and machine["threads_alone"] == 4 and torch.get_num_threads() == 2
        with _threads(machine["threads_alone"]):
            assert torch.get_num_threads() == 4
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_rank_waiting_on_an_expert_scores_what_is_ready(runs, tmp_path):
    """``score_while_waiting``: with expert ``ac`` still to train, a rank scores every variant
    that needs no ``ac`` (base first), into the evaluate step's cache files, byte-identical to
    what that step wrote; nothing that needs ``ac``; and nothing once every expert is trained."""
    from interp.study.runner import Run, resolve_config
    from interp.study.steps.evaluate import scores_path
    from interp.study.steps.experts import score_while_waiting
    from interp.study.variants import needed_experts

    out = tmp_path / "copy"
    shutil.copytree(runs / "one", out)
    shutil.rmtree(out / "cache" / "scores")
    run = Run(resolve_config(TINY, {}), out, timings={})
    names, tc = needed_experts(run.cfg), run.cfg.training
    assert score_while_waiting(run, names, tc) == []  # every expert trained: nothing to wait for
    shutil.rmtree(out / "adapters" / "ac")
    done = score_while_waiting(run, names, tc)
    assert done[0] == "base" and {"expert_ab", "expert_bc", "uniform", "ties", "arrow"} <= set(done)
    assert not {"expert_ac", "uniform+ac"} & set(done)
    for v in done:
        assert scores_path(run, v).read_bytes() == (runs / "one" / scores_path(run, v).relative_to(out)).read_bytes(), v


def _processes_of(out: Path) -> list[int]:
    """PIDs whose command line names the run directory ``out`` (launcher, torchrun, ranks)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and str(out).encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:  # ended meanwhile
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_stopping_the_launcher_stops_every_rank(tmp_path, sig):
    """``interp run --procs 2`` stopped by SIGTERM (kill, timeout, a CI cancel) or SIGKILL leaves
    no torchrun or rank behind writing the run directory (torchrun starts ranks in sessions of
    their own, so neither signal reached them before)."""
    import signal
    import time

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launcher = subprocess.Popen([sys.executable, "-m", "interp.cli", "run", "-c", TINY, "--out", str(out),
                                 "--procs", "2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_processes_of(out)) < 4:  # the launcher, torchrun and both ranks
            assert launcher.poll() is None, launcher.stderr.read()[-2000:]
            assert time.monotonic() < deadline, _processes_of(out)
            time.sleep(0.2)
        time.sleep(2.0)  # the ranks past their imports, watching their parent
        launcher.send_signal(getattr(signal, sig))
        code = launcher.wait(timeout=60)
        assert code == (143 if sig == "SIGTERM" else -9), code
        deadline = time.monotonic() + 15  # the whole study would take minutes more
        while _processes_of(out):
            assert time.monotonic() < deadline, f"left running: {_processes_of(out)}"
            time.sleep(0.2)
        assert not (out / "steps" / "evaluate.json").exists()
    finally:
        for pid in _processes_of(out):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
