"""One Ctrl-C stops a run within seconds and the re-run resumes to the same result (issue 20):
SIGINT mid-training, SIGINT raised inside a finaliser, SIGINT during a long C call. (The study's
mid-sweep interrupt is in tests/test_study.py, beside its kill -9 test.)"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

# Like the `interp` command: handle_interrupts around the work, exit 130 on KeyboardInterrupt.
_PRELUDE = textwrap.dedent("""
    import gc, os, signal, sys, time
    from interp.interrupts import EXIT_INTERRUPTED, handle_interrupts
    def guarded(fn, install=True):
        try:
            if install:
                with handle_interrupts(grace_s=3.0):
                    fn()
            else:
                fn()
        except KeyboardInterrupt:
            print("KeyboardInterrupt", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
""")

_TRAIN = _PRELUDE + textwrap.dedent("""
    from interp.adapters.train import TrainConfig, train_expert
    out, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pairs = [(f"Person {i} works in", f" City{i % 5}") for i in range(24)]
    cfg = TrainConfig(r=2, lora_alpha=4, lr=5e-3, batch_size=8, checkpoint_every=3, seed=3, min_steps=0,
                      max_steps=steps, loraplus_lr_ratio=0.0, precision="fp32")

    class Slow:  # a finaliser that runs Python for a while, as tqdm's __del__ does
        def __init__(self, step):
            self.step, self.me = step, self   # a cycle: freed by the collector, not by refcount
        def __del__(self):
            if self.step == 6 and mode.endswith("finaliser"):
                os.kill(os.getpid(), signal.SIGINT)   # the KeyboardInterrupt is raised in here
            t = time.perf_counter()
            while time.perf_counter() - t < 0.05:
                pass

    def cb(step, loss):
        if step == 4:
            print("READY", flush=True)
        Slow(step)
        gc.collect()
    guarded(lambda: train_expert("tiny-llama", pairs, out, cfg, progress=False, callback=cb),
            install=(mode != "plain-finaliser"))
""")


def _start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the default SIGINT disposition, whatever the parent's (a background shell job ignores it)
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_ready(p: subprocess.Popen) -> None:
    for line in p.stdout:
        if "READY" in line:
            return
    raise AssertionError(f"never ready: {p.wait()} {p.stderr.read()[-2000:]}")


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def test_sigint_mid_training_exits_fast_and_resumes_to_identical_weights(tmp_path):
    p = _start(_TRAIN, str(tmp_path / "cut"), "signal", "60")
    _wait_ready(p)
    time.sleep(1.0)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=60)
    assert rc == 130 and time.monotonic() - t0 < 5, (rc, p.stderr.read()[-2000:])
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial").is_dir()
    # resume with fewer steps than 60 would change the schedule: re-run the same command
    p = _start(_TRAIN, str(tmp_path / "cut"), "none", "60")
    assert p.wait(timeout=900) == 0, p.stderr.read()[-2000:]
    meta = json.loads((tmp_path / "cut" / "interp_meta.json").read_text())
    assert meta["resumed_from_step"] > 0
    p = _start(_TRAIN, str(tmp_path / "whole"), "none", "60")
    assert p.wait(timeout=900) == 0
    a, b = _weights(tmp_path / "cut"), _weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_raised_in_a_finaliser_is_not_lost(tmp_path):
    # without interp's handler Python prints "Exception ignored in ... __del__" and trains on
    plain = _start(_TRAIN, str(tmp_path / "plain"), "plain-finaliser", "30")
    assert plain.wait(timeout=300) == 0
    err = plain.stderr.read()
    assert "Exception ignored" in err and "KeyboardInterrupt" in err
    assert (tmp_path / "plain" / "adapter_model.safetensors").is_file()  # it went on to the end
    # with it, the same interrupt is delivered again and training stops
    p = _start(_TRAIN, str(tmp_path / "fixed"), "finaliser", "30")
    assert p.wait(timeout=300) == 130
    err = p.stderr.read()
    assert "Exception ignored" not in err and "KeyboardInterrupt" in err
    assert "stopped without waiting" not in err  # delivered again, not ended by the watchdog
    assert not (tmp_path / "fixed").exists()


_LONG_C_CALL = _PRELUDE + textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    a = torch.randn(1000, 1000) / 32
    def body():
        print("READY", flush=True)
        torch.linalg.multi_dot([a] * 4000)   # one C call of minutes; no bytecode runs meanwhile
    guarded(body)
""")


def test_sigint_during_a_long_c_call_exits_within_the_grace_period():
    p = _start(_LONG_C_CALL)
    _wait_ready(p)
    time.sleep(0.5)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=120)
    dt = time.monotonic() - t0
    assert rc == 130 and dt < 3.0 + 3, (rc, dt, p.stderr.read()[-2000:])
    assert "stopped without waiting" in p.stderr.read()
