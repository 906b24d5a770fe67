"""The precision switch of evaluation and the analyses (``[evaluation] dtype``, ``--dtype``), the
per-step GPU record in ``run.json``, and TIES/DARE/SVD merges on the factors' device."""

from __future__ import annotations

import json
import time

import pytest
import torch

from interp.config import ConfigError, load_config
from interp.devices import ANALYSIS_DTYPES, HardwareError, analysis_precision
from interp.hardware import GpuMonitor


def test_dtype_key_default_choices_and_refusals():
    assert load_config(None).evaluation.dtype == "auto"
    assert load_config("experiments/two_hop.toml").evaluation.dtype == "auto"
    assert load_config(None, {"evaluation.dtype": "bf16"}).evaluation.dtype == "bf16"
    assert load_config(None, {"evaluation.dtype": "tf32", "study.device": "cuda"}).evaluation.dtype == "tf32"
    with pytest.raises(ConfigError, match="evaluation.dtype must be one of auto, fp32, tf32, bf16, got 'fp16'"):
        load_config(None, {"evaluation.dtype": "fp16"})
    with pytest.raises(ConfigError, match="'tf32' needs study.device cuda"):
        load_config(None, {"evaluation.dtype": "tf32"})


def test_auto_resolves_to_tf32_on_cuda_and_fp32_on_the_cpu():
    """The resolution depends on the device type only (no GPU needed to resolve for one); an
    explicit name is kept on either; tf32 on a CPU and unknown names are refused."""
    from interp.devices import resolve_analysis_dtype

    for dev in ("cpu", torch.device("cpu")):
        c = resolve_analysis_dtype("auto", dev)
        assert (c.dtype, c.requested, c.device) == ("fp32", "auto", "cpu") and "auto" in c.reason
    for dev in ("cuda", "cuda:1", torch.device("cuda", 0)):
        c = resolve_analysis_dtype("auto", dev)
        assert (c.dtype, c.requested, c.device) == ("tf32", "auto", "cuda") and "TF32" in c.reason
    for name in ("fp32", "bf16"):
        assert resolve_analysis_dtype(name, "cpu").dtype == resolve_analysis_dtype(name, "cuda").dtype == name
    assert resolve_analysis_dtype("tf32", "cuda").dtype == "tf32"
    with pytest.raises(HardwareError, match="'tf32' needs a CUDA device"):
        resolve_analysis_dtype("tf32", "cpu")
    with pytest.raises(HardwareError, match="must be one of auto, fp32, tf32, bf16, got 'fp16'"):
        resolve_analysis_dtype("fp16", "cuda")
    with pytest.raises(HardwareError, match="device must be"):
        resolve_analysis_dtype("auto", "gpu")


def test_run_resolves_auto_for_its_device(monkeypatch, tmp_path):
    """A Run's analysis precision: fp32 (float32 weights) on the CPU, tf32 (float32 weights, TF32
    matmuls) on CUDA, bf16 when forced; the runner writes the resolved value into the config
    before any key, with its reason, and a forced value is kept."""
    import interp.hardware as hw
    from interp.study.runner import Run, _resolve_machine

    cpu = Run(load_config(None), tmp_path, timings={})
    assert (cpu.analysis_dtype, cpu.dtype) == ("fp32", torch.float32)
    gpu = Run(load_config(None, {"study.device": "cuda"}), tmp_path, timings={})  # a device name: no GPU used
    assert (gpu.analysis_dtype, gpu.dtype) == ("tf32", torch.float32)
    forced = Run(load_config(None, {"study.device": "cuda", "evaluation.dtype": "bf16"}), tmp_path, timings={})
    assert (forced.analysis_dtype, forced.dtype) == ("bf16", torch.bfloat16)

    monkeypatch.setattr(hw, "check_device", lambda device: str(device))  # a CUDA run, on this CPU
    for device, requested, want in (("cuda", "auto", "tf32"), ("cuda", "fp32", "fp32"), ("cpu", "auto", "fp32"),
                                    ("cpu", "bf16", "bf16")):
        cfg = load_config(None, {"study.device": device, "evaluation.dtype": requested,
                                 "training.precision": "fp32", "study.threads": 1})
        machine = _resolve_machine(cfg)
        assert cfg.evaluation.dtype == want
        got = machine["analysis_dtype"]
        assert (got["dtype"], got["requested"], got["device"]) == (want, requested, device), got


def test_dtype_enters_cache_keys_only_off_its_default():
    """fp32 runs cached before the key existed keep their keys; auto hashes as fp32 on a CPU and
    as tf32 on CUDA; bf16 gets its own key."""
    import hashlib

    fp32, bf16, auto = (load_config(None, {"evaluation.dtype": d}) for d in ("fp32", "bf16", "auto"))
    d = fp32.to_dict()["evaluation"]
    d.pop("dtype")
    old = hashlib.sha256(json.dumps({"evaluation": d}, sort_keys=True).encode()).hexdigest()[:16]
    assert fp32.section_hash("evaluation") == auto.section_hash("evaluation") == old
    assert bf16.section_hash("evaluation") != old
    assert fp32.section_hash("study", "world") == bf16.section_hash("study", "world")  # experts not retrained
    on_gpu = {n: load_config(None, {"study.device": "cuda", "evaluation.dtype": n}).section_hash("study", "evaluation")
              for n in ("auto", "tf32", "fp32")}
    assert on_gpu["auto"] == on_gpu["tf32"] != on_gpu["fp32"]


#: step keys of CPU runs computed by main at 95ff6c5, before ``evaluation.dtype = "auto"`` existed
#: (training.precision forced to fp32, so that no processor's bf16 probe enters them, and
#: training.packing off, as it was then: packing changes the experts' keys, checked below)
PINNED_CPU_KEYS = {
    None: {"world": "5d4b5ccd17563dce", "experts": "f7329bd3b2711d41", "evaluate": "296d1783b89671a7",
           "mechanisms": "a61dfd6fa84af7cb", "subspace": "f2e4a7fb3974cfb1", "figures": "db200ae1ce101050",
           "report": "2ce21aad2af010d5", "mechanism_unit": "2a0197ca325a828d"},
    "experiments/two_hop.toml": {"world": "5d4b5ccd17563dce", "experts": "f7329bd3b2711d41",
                                 "evaluate": "296d1783b89671a7", "mechanisms": "a61dfd6fa84af7cb",
                                 "subspace": "f2e4a7fb3974cfb1", "figures": "db200ae1ce101050",
                                 "report": "2ce21aad2af010d5", "mechanism_unit": "2a0197ca325a828d"},
    "experiments/tiny.toml": {"world": "b945a259c4fb35ab", "experts": "3dd9255629be0efe",
                              "evaluate": "d9ce93918fa28e4a", "mechanisms": "89038a1bd523c9a0",
                              "subspace": "4a2d5062eb2b52bc", "figures": "0618e529b9e1225f",
                              "report": "523c6e541eb145fb", "mechanism_unit": "5737a419fa2b2b62"},
    "experiments/math.toml": {"world": "7074c10b085089d8", "experts": "0c42c0a5afe5899e",
                              "evaluate": "6140ba26eaae61eb", "mechanisms": "34c942a374fb3138",
                              "subspace": "b7bed374fd7487b1", "report": "08671d5939d70370",
                              "mechanism_unit": "d2365708cc06fe50"},
}


@pytest.mark.parametrize("path", list(PINNED_CPU_KEYS))
def test_cpu_runs_keep_their_cache_keys(tmp_path, path):
    """With ``evaluation.dtype = "auto"`` (the default) a CPU run's step keys and mechanism unit
    keys are exactly those its config had before auto existed, so no cached step re-runs;
    run.json records the resolved precision and why. Fails if any key of these configs moves."""
    from interp.study.math import PIPELINE as MATH
    from interp.study.runner import Run, Step, resolve_config, run_pipeline
    from interp.study.steps.math_mechanisms import math_mechanism_key
    from interp.study.steps.mechanisms import mechanism_key
    from interp.study.two_hop import PIPELINE

    old = {"training.precision": "fp32", "study.threads": 1, "training.packing": False}
    cfg = resolve_config(path, old)
    assert cfg.evaluation.dtype == "auto"
    math = path == "experiments/math.toml"
    pipeline = [Step(s.name, lambda run: None, s.deps, analysis=s.analysis) for s in (MATH if math else PIPELINE)]
    run_pipeline(pipeline, cfg, tmp_path)
    rj = json.loads((tmp_path / "run.json").read_text())
    unit = (math_mechanism_key if math else lambda r: mechanism_key(r, "uniform"))(Run(cfg, tmp_path, timings={}))
    assert {**rj["step_keys"], "mechanism_unit": unit} == PINNED_CPU_KEYS[path]
    assert rj["config"]["evaluation"]["dtype"] == "fp32"  # resolved before any key, as run.json keeps it
    a = rj["machine"]["analysis_dtype"]
    assert (a["dtype"], a["requested"], a["device"]) == ("fp32", "auto", "cpu") and a["reason"]
    forced = resolve_config(path, {**old, "evaluation.dtype": "fp32"})
    run_pipeline(pipeline, forced, tmp_path / "forced")
    assert json.loads((tmp_path / "forced" / "run.json").read_text())["step_keys"] == rj["step_keys"]
    packed = resolve_config(path, {**old, "training.packing": True})  # the default: experts train again
    run_pipeline(pipeline, packed, tmp_path / "packed")
    keys = json.loads((tmp_path / "packed" / "run.json").read_text())["step_keys"]
    assert keys["world"] == rj["step_keys"]["world"] and keys["experts"] != rj["step_keys"]["experts"]


def test_analysis_precision_sets_and_restores_tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with analysis_precision("tf32", "cuda"):  # a device name: the flags exist without a GPU
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 is False
        torch.backends.cuda.matmul.allow_tf32 = True
        with analysis_precision("fp32", "cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    with pytest.raises(HardwareError, match="needs a CUDA device"):
        analysis_precision("tf32", "cpu")
    with pytest.raises(HardwareError, match="analysis dtype must be one of"):
        analysis_precision("fp8")
    with analysis_precision("auto", "cuda") as p:  # auto: resolved for the device
        assert p.name == "tf32" and torch.backends.cuda.matmul.allow_tf32
    with analysis_precision("auto", "cpu") as p:
        assert p.name == "fp32" and not torch.backends.cuda.matmul.allow_tf32
    assert ANALYSIS_DTYPES["bf16"] is torch.bfloat16 and ANALYSIS_DTYPES["tf32"] is torch.float32


def test_analysis_precision_after_torch_new_tf32_api():
    """TF32 set with torch's per-backend API (``torch.backends.cuda.matmul.fp32_precision``, the one
    torch recommends since 2.9) leaves its legacy ``allow_tf32`` flags unreadable (torch raises on
    a "mix of the legacy and new APIs"): analysis_precision must still set fp32/tf32 and restore
    the caller's setting exactly."""
    b = torch.backends
    state = lambda: (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,  # noqa: E731
                     b.cudnn.rnn.fp32_precision)
    saved = state()
    try:
        for user in ({"matmul": "tf32"}, {"global": "tf32"}):
            if "matmul" in user:
                b.cuda.matmul.fp32_precision = user["matmul"]
            else:
                b.fp32_precision = user["global"]
            before = state()
            with analysis_precision("fp32", "cuda"):
                assert b.cuda.matmul.fp32_precision == "ieee"
            assert state() == before
            with analysis_precision("tf32", "cuda"):
                assert b.cuda.matmul.fp32_precision == "tf32"
            assert state() == before
            b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved
    finally:
        b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved


def test_run_loads_models_in_the_analysis_dtype(tmp_path):
    """evaluation.dtype = bf16: the base and every variant in bf16; a float32 request (the world
    step's familiarity checks) replaces the base; a bf16 variant agrees with fp32 to bf16 rounding."""
    from interp.adapters import make_random_adapter
    from interp.study.runner import Run, resolve_config

    for name, seed in (("ab", 1), ("bc", 2)):
        make_random_adapter("tiny-llama", tmp_path / "adapters" / name, r=4, seed=seed)
    runs = {dt: Run(resolve_config("experiments/tiny.toml", {"evaluation.dtype": dt}), tmp_path, timings={})
            for dt in ("fp32", "bf16")}
    run = runs["bf16"]
    assert {p.dtype for p in run.base().hf_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.base(torch.float32).hf_model.parameters()} == {torch.float32}
    assert {p.dtype for p in run.base().hf_model.parameters()} == {torch.bfloat16}
    hm16, hm32 = run.load_variant("uniform"), runs["fp32"].load_variant("uniform")
    assert {p.dtype for n, p in hm16.hf_model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    toks, _ = hm32.tokenize(["The spouse of Vaelin Ostrov works in"])
    with torch.no_grad():
        l32, l16 = hm32.logits(toks), hm16.logits(toks).float()
    assert not torch.equal(l32, l16)
    assert (l32 - l16).abs().max() <= 0.05 * l32.abs().max()  # bf16: 8 mantissa bits


def test_gpu_monitor_samples_and_summarises():
    with GpuMonitor("cpu", interval_s=0.01, read=lambda: 40.0) as mon:
        time.sleep(0.2)
    s = mon.summary()
    assert s["samples"] >= 3 and s["util_mean_pct"] == 40.0 and s["util_max_pct"] == 40.0
    assert s["peak_mib"] is None  # no CUDA memory on a CPU device
    with GpuMonitor("cpu") as mon:  # no reader on a CPU: nothing to record
        pass
    assert mon.read is None and mon.summary() is None


def test_runjson_records_gpu_per_step_on_cuda_only(monkeypatch, tmp_path):
    import interp.hardware as hw
    import interp.study.runner as runner
    from interp.study.runner import Step, resolve_config, run_pipeline

    cfg = resolve_config("experiments/tiny.toml", {})
    pipeline = (Step("a", lambda run: time.sleep(0.15)), Step("b", lambda run: None, analysis=True))
    run_pipeline(pipeline, cfg, tmp_path / "cpu")
    assert "gpu" not in json.loads((tmp_path / "cpu" / "run.json").read_text())

    class FakeMonitor(hw.GpuMonitor):
        def __init__(self, device, interval_s=0.5, read=None):
            super().__init__("cpu", interval_s=0.01, read=lambda: 75.0)

    monkeypatch.setattr(runner, "torch_device_type", lambda device: "cuda")  # a CUDA run, on this CPU
    monkeypatch.setattr(hw, "GpuMonitor", FakeMonitor)
    run_pipeline(pipeline, resolve_config("experiments/tiny.toml", {}), tmp_path / "gpu")
    gpu = json.loads((tmp_path / "gpu" / "run.json").read_text())["gpu"]
    assert set(gpu) == {"a", "b"} and gpu["a"]["util_mean_pct"] == 75.0 and gpu["a"]["samples"] >= 3


def _experts(shapes, seed=0):
    from interp.adapters.factors import LoraDelta

    g = torch.Generator().manual_seed(seed)
    return [{m: LoraDelta(torch.randn(3, i, generator=g, dtype=torch.float64),
                          torch.randn(o, 3, generator=g, dtype=torch.float64), 2.0) for m, (o, i) in shapes.items()}
            for _ in range(2)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merges_on_the_gpu_equal_the_cpu_merges():
    from interp.adapters.merge import dare, svd_merge, ties

    cpu = _experts({"q": (24, 16), "down": (16, 40)})
    gpu = [{m: d.to("cuda") for m, d in e.items()} for e in cpu]
    for fn in (lambda ex: ties(ex, 0.5, [1.0, 1.0]), lambda ex: dare(ex, 0.5, 3),
               lambda ex: svd_merge(ex, [0.5, 0.5], 3)[0]):
        mc, mg = fn(cpu), fn(gpu)
        for m in mc:
            assert mg[m].A.device.type == "cuda"
            torch.testing.assert_close(mg[m].to("cpu").dense(), mc[m].dense(), rtol=1e-6, atol=1e-8)


def test_merges_keep_the_factors_device_and_dare_masks_from_the_generator():
    """On the CPU (the only device here): the merged factors stay where the experts were, and the
    DARE masks come from the CPU generator whatever the tensors' device (the same draws)."""
    from interp.adapters.merge import dare_dense, ties_dense

    t = torch.randn(2, 5, 7, dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    keep = torch.rand(t.shape, generator=g2, dtype=torch.float64) < 0.5
    torch.testing.assert_close(dare_dense(t, [1.0, 2.0], 0.5, g1), (t * keep / 0.5 * torch.tensor([1.0, 2.0],
                               dtype=torch.float64).view(2, 1, 1)).sum(0))
    assert ties_dense(t, [1.0, 1.0], 0.5).device == t.device
