"""Reliability (issue 8): nothing half-written, corrupted caches caught, kill -9 resumes to the
same result, and merge invariants hold over random shapes (hypothesis)."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interp import models
from interp.adapters import merge as M
from interp.adapters.factors import LoraDelta


def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "table.csv"
    target.write_text("good")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space"):
        models.atomic_write_text(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temporary left behind


def test_corrupted_adapter_is_refused(tmp_path):
    from interp.adapters import load_hooked
    from interp.adapters.library import AdapterFileError
    from interp.adapters.testing import make_random_adapter

    d = make_random_adapter("tiny-llama", tmp_path / "a", r=2, seed=1)
    st_file = Path(d) / "adapter_model.safetensors"
    data = bytearray(st_file.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the weights
    st_file.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="checksum"):
        load_hooked("tiny-llama", {"a": d}, combine="none")


_TRAIN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from interp.adapters.train import TrainConfig, train_expert
    pairs = [(f"Person {i} works in", f" City{i % 5}") for i in range(24)]
    kill_at = int(sys.argv[2])
    def cb(step, loss):
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no exception handlers
    cfg = TrainConfig(r=2, lora_alpha=4, lr=5e-3, epochs=3, batch_size=8, checkpoint_every=2, seed=3,
                      min_steps=0, loraplus_lr_ratio=0.0, precision="fp32")
    train_expert("tiny-llama", pairs, sys.argv[1], cfg, progress=False, callback=cb)
""")


def _train(out: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(out), str(kill_at)],
                          capture_output=True, text=True, timeout=600)


def test_kill_9_during_training_resumes_to_identical_weights(tmp_path):
    from safetensors.torch import load_file

    killed = _train(tmp_path / "killed", kill_at=5)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed").exists()  # the output dir only appears complete
    assert (tmp_path / "killed.partial").exists()
    assert _train(tmp_path / "killed", kill_at=0).returncode == 0
    assert _train(tmp_path / "clean", kill_at=0).returncode == 0
    meta = json.loads((tmp_path / "killed" / "interp_meta.json").read_text())
    assert meta["resumed_from_step"] > 0
    a = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "clean" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _random_adapter(seed: int, modules: list[str], r: int, d_out: int, d_in: int) -> dict[str, LoraDelta]:
    g = torch.Generator().manual_seed(seed)
    return {m: LoraDelta(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                         torch.randn(d_out, r, generator=g, dtype=torch.float64), 2.0 / r) for m in modules}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), r=st.integers(1, 6), d_out=st.integers(2, 24), d_in=st.integers(2, 24),
       seed=st.integers(0, 10_000))
def test_weighted_average_is_the_exact_dense_sum(n, r, d_out, d_in, seed):
    experts = [_random_adapter(seed + i, ["m"], r, d_out, d_in) for i in range(n)]
    w = torch.linspace(0.2, 1.0, n).tolist()
    merged = M.weighted_average(experts, w)["m"]
    dense = sum(wi * e["m"].dense() for wi, e in zip(w, experts))
    assert merged.rank == n * r
    torch.testing.assert_close(merged.dense(), dense, rtol=1e-5, atol=1e-5)
    rep = M.faithfulness_report({"m": merged}, experts, w)
    assert float(rep["rel_error"].max()) < 1e-4


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 6), d_out=st.integers(2, 20), d_in=st.integers(2, 20), seed=st.integers(0, 10_000))
def test_merge_invariants(r, d_out, d_in, seed):
    a = _random_adapter(seed, ["m"], r, d_out, d_in)
    b = _random_adapter(seed + 1, ["m"], r, d_out, d_in)
    # Uniform of an adapter with itself is that adapter; task arithmetic with λ is λ·sum
    torch.testing.assert_close(M.weighted_average([a, a])["m"].dense(), a["m"].dense(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(M.task_arithmetic([a, b], 0.7)["m"].dense(),
                               0.7 * (a["m"].dense() + b["m"].dense()), rtol=1e-5, atol=1e-5)
    # TIES keeping every entry of one expert returns that expert
    torch.testing.assert_close(M.ties([a], 1.0, [1.0])["m"].dense(), a["m"].dense(), rtol=1e-4, atol=1e-4)
    # SVD truncation to the full rank loses nothing; energy kept is monotone in k
    full, e_full = M.svd_truncate(a["m"], r)
    torch.testing.assert_close(full.dense(), a["m"].dense(), rtol=1e-4, atol=1e-4)
    energies = [M.svd_truncate(a["m"], k)[1] for k in range(1, r + 1)]
    assert all(x <= y + 1e-9 for x, y in zip(energies, energies[1:])) and abs(e_full - 1) < 1e-6


def test_atomic_writes_follow_the_umask(tmp_path):
    """mkstemp/mkdtemp create 0600/0700; files interp writes (report.html) must be readable as
    any plain open() would make them."""
    old = os.umask(0o022)
    try:
        models.atomic_write_text(tmp_path / "report.html", "x")
        with models.atomic_directory(tmp_path / "adapter") as d:
            (d / "f").write_text("y")
        os.umask(0o077)
        models.atomic_write_text(tmp_path / "private.txt", "z")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600


def test_atomic_directory_interrupted_between_renames_keeps_the_old(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "w").write_text("old")
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:  # after moving the old one aside, before the new one is in place
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with models.atomic_directory(target) as d:
            (d / "w").write_text("new")
    monkeypatch.undo()
    assert (target / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_second_run_on_a_busy_directory_is_refused_until_its_holder_ends(tmp_path):
    from interp.errors import StudyError
    from interp.study.runner import Step, resolve_config, run_pipeline

    out = tmp_path / "run"
    out.mkdir()
    hold = "import sys, time\nfrom interp.files import directory_lock\nwith directory_lock(sys.argv[1]):\n" \
           "    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        ran = []
        cfg = resolve_config("experiments/tiny.toml", {})
        pipeline = (Step("a", lambda run: ran.append("a")),)
        with pytest.raises(StudyError, match=rf"in use by another interp run \(process {holder.pid}\)"):
            run_pipeline(pipeline, cfg, out)
        assert ran == [] and not (out / "run.json").exists()  # refused before any step
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, nothing is left to clean up
        holder.wait()
    (out / "cache" / "claims" / "f00d").mkdir(parents=True)  # a killed distributed run's claims
    with pytest.raises(RuntimeError, match="boom"):  # a run that fails lets go of the directory too
        run_pipeline((Step("a", lambda run: (_ for _ in ()).throw(RuntimeError("boom"))),), cfg, out)
    assert not (out / "cache" / "claims").exists()
    run_pipeline(pipeline, cfg, out)
    assert ran == ["a"]


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import fcntl

    from interp.files import directory_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(UserWarning, match="cannot be locked"):
        with directory_lock(tmp_path):
            ran.append(1)
    assert ran == [1]


def _lock_from_another_process(directory) -> str:
    """What a second process gets when it tries to hold ``directory``: 'held' or the refusal."""
    probe = "import sys\nfrom interp.errors import StudyError\nfrom interp.files import directory_lock\n" \
            "try:\n    with directory_lock(sys.argv[1]):\n        print('held')\n" \
            "except StudyError as e:\n    print(e)\n"
    return subprocess.run([sys.executable, "-c", probe, str(directory)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_run_over_seeds_holds_its_directory_between_and_during_the_seeds(tmp_path):
    from interp.study.runner import Step, resolve_config, run_over_seeds

    out = tmp_path / "run"
    cfg = resolve_config("experiments/tiny.toml", {"study.seeds": [0, 1]})
    seen = []

    def look(run):  # inside one seed's run: its seed-S and the parent DIR are both held
        seen.append((run.out.name, _lock_from_another_process(run.out), _lock_from_another_process(out)))

    run_over_seeds((Step("look", look),), cfg, out, None, Step("aggregate", look))
    assert [s[0] for s in seen] == ["seed-0", "seed-1", "run"]
    pid = str(os.getpid())
    for name, own, parent in seen:
        assert f"in use by another interp run (process {pid})" in own
        assert f"in use by another interp run (process {pid})" in parent
    assert _lock_from_another_process(out) == "held"  # let go at the end


def test_holding_a_directory_again_in_the_same_process_is_free_and_the_outer_hold_lets_go(tmp_path):
    from interp.files import directory_lock

    with directory_lock(tmp_path):
        with directory_lock(tmp_path / "."):  # the same directory under another spelling
            assert "in use" in _lock_from_another_process(tmp_path)
        assert "in use" in _lock_from_another_process(tmp_path)  # the inner exit kept the lock
    assert _lock_from_another_process(tmp_path) == "held"
