"""interp.hardware: precision chosen by measurement, thread counts from free cores; both honoured
by the study and recorded in run.json."""

import json
import subprocess
import sys
import time

import pytest
import torch

from interp import hardware
from interp.adapters.recipe import TrainConfig


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("speedup, expect", [(0.2, "fp32"), (1.0, "fp32"), (4.0, "bf16")])
def test_auto_precision_follows_the_measurement(fresh_cache, monkeypatch, speedup, expect):
    calls = []
    monkeypatch.setattr(hardware, "measure_bf16_speedup", lambda: calls.append(1) or speedup)
    c = hardware.choose_precision("auto", "cpu")
    assert c.precision == expect and c.requested == "auto" and c.bf16_speedup == speedup
    assert f"{speedup:.2f}x" in c.reason and expect in c.reason
    again = hardware.choose_precision("auto", "cpu")
    assert again == c and calls == [1]  # measured once per machine, then read from the cache
    table = json.loads((fresh_cache / "hardware.json").read_text())
    (entry,) = table.values()
    assert entry["bf16_speedup"] == speedup and entry["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()


def test_forced_precision_is_honoured(fresh_cache, monkeypatch):
    monkeypatch.setattr(hardware, "measure_bf16_speedup", lambda: 0.2)
    assert hardware.choose_precision("fp32").precision == "fp32"
    slow = hardware.choose_precision("bf16")  # forced bf16 where it is slow: kept, penalty stated
    assert slow.precision == "bf16" and "0.20x" in slow.reason
    with pytest.raises(hardware.HardwareError, match="fp16"):
        hardware.choose_precision("fp16")


def test_probe_measures_both_dtypes():
    s = hardware.measure_bf16_speedup()
    assert 0.005 < s < 100  # a ratio of two real timings, whatever this CPU does


def test_threads_resolution(monkeypatch):
    monkeypatch.delenv("INTERP_THREADS", raising=False)
    monkeypatch.setattr(hardware, "_busy_cores", lambda window_s=0.5: 0.9)
    cores = hardware.cpu_description()["cores"]
    assert hardware.resolve_threads("auto") == max(1, cores - 1)
    assert hardware.resolve_threads(0) == hardware.resolve_threads(None) == max(1, cores - 1)
    assert hardware.resolve_threads(3) == 3
    monkeypatch.setenv("INTERP_THREADS", "5")
    assert hardware.resolve_threads("auto") == 5 and hardware.resolve_threads(2) == 2
    for bad in (-1, "two", 1.5):
        with pytest.raises(hardware.HardwareError, match="threads"):
            hardware.resolve_threads(bad)
    monkeypatch.setenv("INTERP_THREADS", "two")
    with pytest.raises(hardware.HardwareError, match=r"\$INTERP_THREADS .*'two'"):
        hardware.resolve_threads("auto")
    monkeypatch.setattr(hardware, "_busy_cores", lambda window_s=0.5: 64.0)
    monkeypatch.delenv("INTERP_THREADS")
    assert hardware.free_cores() == 1  # never zero


def test_busy_cores_sees_a_spinning_neighbour():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert hardware._busy_cores(0.5) >= 0.7
    finally:
        spin.kill()
        spin.wait()


def test_train_config_checks_and_auto_default():
    assert TrainConfig().precision == "auto" and TrainConfig().problems() == []
    bad = TrainConfig(precision="fp16", lr=0, schedule="cosine").problems()
    assert any("precision" in b for b in bad) and any("lr" in b for b in bad) and any("schedule" in b for b in bad)
    assert TrainConfig(max_steps=0).max_steps is None


def test_study_resolves_auto_and_records_machine(tmp_path, fresh_cache, monkeypatch):
    """The run uses the measured choice, keys its experts on it, and says so in run.json."""
    from interp.study import run_study

    monkeypatch.setattr(hardware, "measure_bf16_speedup", lambda: 0.2)  # an AVX2-only CPU
    before = torch.get_num_threads()
    try:
        out = run_study("experiments/tiny.toml", tmp_path / "r", steps=["world"],
                        overrides={"training.precision": "auto", "study.threads": 1})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    run = json.loads((out / "run.json").read_text())
    m = run["machine"]
    assert m["threads"] == 1 and m["precision"]["precision"] == "fp32" and m["precision"]["requested"] == "auto"
    assert "0.20x" in m["precision"]["reason"] and run["config"]["training"]["precision"] == "fp32"
    assert m["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()


def test_oversubscription_warns_beyond_the_cores():
    from interp.hardware import oversubscription

    assert oversubscription(2, cores=2) is None and oversubscription(1, cores=2) is None
    msg = oversubscription(64, cores=2)
    assert "64 torch threads on 2 core(s)" in msg and "--threads 2" in msg


def test_check_threads_checks_without_sampling_the_cores(monkeypatch):
    def no_sampling(window_s=0.5):
        raise AssertionError("sampled the cores")

    monkeypatch.setattr(hardware, "_busy_cores", no_sampling)
    monkeypatch.delenv("INTERP_THREADS", raising=False)
    assert hardware.check_threads("auto") is None and hardware.check_threads(0) is None
    assert hardware.check_threads(3) == 3
    monkeypatch.setenv("INTERP_THREADS", "5")
    assert hardware.check_threads(None) == 5
    monkeypatch.setenv("INTERP_THREADS", "two")
    with pytest.raises(hardware.HardwareError, match=r"\$INTERP_THREADS .*'two'"):
        hardware.check_threads("auto")
    assert hardware.check_threads(2) == 2  # an explicit count does not read the environment
