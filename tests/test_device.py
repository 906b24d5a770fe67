"""Device and dtype at every entry that makes or moves a model (issue 16).

On the CPU the device cannot vary, so the dtype does (float32 / float64): every parameter, LoRA
factor, ``info`` delta and cached activation must have the requested dtype and device, and the
logits must match an independent computation in that dtype (the HF model, or W + Σ wᵢ sᵢ BᵢAᵢ
built from the safetensors files directly). The study's device is checked by spying on every model
load (a fake ``"cuda"`` device for the unit test, the real CPU run for the tiny study).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import interp
from interp.adapters import load_hooked, make_random_adapter
from interp.hardware import HardwareError, resolve_dtype
from interp.models import load_hf, load_model

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev-adapters")
    return {n: str(make_random_adapter("tiny-llama", d / n, r=4, seed=i + 1, b_std=0.2))
            for i, n in enumerate(("ab", "bc"))}


def _tokens(hm):
    toks, _ = hm.tokenize(["the cat sat on", "a b c d e f"])
    return toks


def _assert_placed(hm, dtype, device="cpu"):
    for n, p in hm.hf_model.named_parameters():
        assert p.dtype == dtype and p.device.type == device, (n, p.dtype, p.device)
    for group in [hm.info.get("deltas") or {}, *(hm.info.get("expert_deltas") or {}).values()]:
        for m, d in group.items():
            for t in (d.A, d.B, d.bias):
                assert t is None or t.device.type == device, (m, t.device)
    with torch.no_grad():
        _, cache = hm.bridge.run_with_cache(_tokens(hm))
    floats = {k: v for k, v in cache.items() if v.is_floating_point()}
    assert floats
    bad = {k: (v.dtype, v.device) for k, v in floats.items() if v.dtype != dtype or v.device.type != device}
    assert not bad, list(bad.items())[:3]
    return cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_model_honours_dtype_and_matches_hf(dtype):
    hm = load_model("tiny-llama", device="cpu", dtype=dtype)
    _assert_placed(hm, dtype)
    hf, _ = load_hf("tiny-llama")  # independent: the plain transformers model, cast here
    hf = hf.to(dtype).eval()
    toks = _tokens(hm)
    with torch.no_grad():
        ref = hf(toks).logits
    got = hm.logits(toks)
    assert got.dtype == dtype
    assert float((got - ref).abs().max()) <= TOL[dtype]


def _independent_uniform(adapters: dict[str, str], dtype) -> torch.nn.Module:
    """W + Σ (1/n) s B A per module, read from the safetensors files without interp."""
    from safetensors.torch import load_file

    hf, _ = load_hf("tiny-llama")
    hf = hf.to(torch.float64)
    mods = dict(hf.named_modules())
    n = len(adapters)
    with torch.no_grad():
        for d in adapters.values():
            cfg = json.loads((Path(d) / "adapter_config.json").read_text())
            s = cfg["lora_alpha"] / cfg["r"]
            sd = load_file(str(Path(d) / "adapter_model.safetensors"))
            for k, A in sd.items():
                if ".lora_A." not in k:
                    continue
                B = sd[k.replace(".lora_A.", ".lora_B.")]
                path = k.split(".lora_A.")[0].removeprefix("base_model.model.")
                mods[path].weight += (s / n) * (B.double() @ A.double())
    return hf.to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combine", ["none", "uniform", "task_arithmetic", "ties", "dare", "svd", "peft_linear",
                                     "arrow", "merge_and_unload"])
def test_load_hooked_places_everything_in_dtype(adapters, combine, dtype):
    hm = load_hooked("tiny-llama", adapters, combine=combine, device="cpu", dtype=dtype)
    cache = _assert_placed(hm, dtype)
    lora = [(n, p) for n, p in hm.hf_model.named_parameters() if "lora_" in n]
    if combine == "merge_and_unload":
        assert not lora
    else:
        assert lora and all(p.dtype == dtype for _, p in lora)
        assert any(".lora." in k and k.endswith("hook_delta") for k in cache)  # per-adapter hooks ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_in_dtype_matches_weights_built_from_files(adapters, dtype):
    from interp.adapters import fold_static_update

    hm = load_hooked("tiny-llama", adapters, combine="uniform", dtype=dtype)
    ref_model = _independent_uniform(adapters, dtype)
    toks = _tokens(hm)
    with torch.no_grad():
        ref = ref_model(toks).logits
    got = hm.logits(toks)
    assert got.dtype == dtype
    assert float((got - ref).abs().max()) <= TOL[dtype] * max(1.0, float(ref.abs().max()))
    with fold_static_update(hm) as folded:
        assert folded
        folded_logits = hm.logits(toks)
    assert folded_logits.dtype == dtype
    assert float((folded_logits - ref).abs().max()) <= TOL[dtype] * max(1.0, float(ref.abs().max()))


def test_load_hooked_takes_a_hooked_models_dtype(adapters):
    base = load_model("tiny-llama", dtype=torch.float64)
    hm = load_hooked(base, adapters, combine="uniform")
    assert {p.dtype for p in hm.hf_model.parameters()} == {torch.float64}
    assert {p.dtype for p in base.hf_model.parameters()} == {torch.float64}  # the caller's model untouched


def test_dtype_names_and_refusals():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float64") is torch.float64
    assert resolve_dtype(None) is None
    for bad in ("int8", torch.int64, "fp8"):
        with pytest.raises(HardwareError):
            resolve_dtype(bad)
    assert issubclass(HardwareError, interp.errors.InterpError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(adapters, tmp_path):
    from interp.adapters.train import train_expert

    with pytest.raises(HardwareError):
        load_model("tiny-llama", device="cuda")
    with pytest.raises(HardwareError):
        load_hooked("tiny-llama", adapters, combine="uniform", device="cuda")
    with pytest.raises(HardwareError):
        train_expert("tiny-llama", [("a b", " c")], tmp_path / "e", device="cuda", progress=False)
    with pytest.raises(HardwareError):
        load_model("tiny-llama", device="meta")


def test_run_loads_base_and_variants_on_the_study_device(monkeypatch, tmp_path):
    """Run.base and Run.load_variant pass cfg.study.device to the loaders (a fake "cuda" here)."""
    import interp.adapters as ad
    import interp.models as md
    from interp.study.runner import Run, resolve_config

    cfg = resolve_config("experiments/tiny.toml", {"study.device": "cuda"})
    seen = []
    monkeypatch.setattr(md, "load_model", lambda name, **kw: seen.append(("base", kw.get("device"))) or "B")
    monkeypatch.setattr(ad, "load_hooked", lambda m, a, **kw: seen.append((kw.get("combine"), kw.get("device"))))
    run = Run(cfg, tmp_path, timings={})
    assert run.base() == "B"
    for v in ("expert_ab", "uniform", "arrow", "peft_linear"):
        run.load_variant(v)
    assert seen == [("base", "cuda"), ("none", "cuda"), ("uniform", "cuda"), ("arrow", "cuda"),
                    ("peft_linear", "cuda")]


def test_tiny_study_loads_every_model_on_the_study_device(monkeypatch, tmp_path):
    """Every model of the tiny study (base, each variant) is asked for on cfg.study.device and
    lands there; fails if any loader is called without it (the old CPU fallback)."""
    import interp.adapters as ad
    import interp.models as md
    from interp.study import run_study
    from interp.study.runner import resolve_config
    from interp.study.variants import VARIANTS

    cfg = resolve_config("experiments/tiny.toml", {})
    want = torch.device(cfg.study.device)
    log = []
    orig_model, orig_hooked = md.load_model, ad.load_hooked

    def spy(fn, what):
        def wrapped(*args, **kw):
            hm = fn(*args, **kw)
            log.append((what, kw.get("combine"), kw.get("device"), {p.device for p in hm.hf_model.parameters()}))
            return hm
        return wrapped

    monkeypatch.setattr(md, "load_model", spy(orig_model, "load_model"))
    monkeypatch.setattr(ad, "load_hooked", spy(orig_hooked, "load_hooked"))
    run_study("experiments/tiny.toml", out=tmp_path / "run",
              steps=["world", "experts", "evaluate", "mechanisms", "subspace"])
    assert log[0][0] == "load_model"
    for what, combine, requested, devices in log:
        assert requested is not None and torch.device(requested) == want, (what, combine, requested)
        assert devices == {want}, (what, combine, devices)
    loaded = {c for w, c, _, _ in log if w == "load_hooked"}
    expected = {VARIANTS[v].load_combine for v in cfg.methods.variants if VARIANTS[v].experts}
    assert expected <= loaded


def test_subspace_step_keeps_experts_and_merges_on_the_study_device(monkeypatch, tmp_path):
    """The subspace step puts every expert and merge it analyses on cfg.study.device and leaves
    them there (no copy back to the host for the geometry). A fake "cuda" study device: LoraDelta.to
    is spied to label each copy with the device asked for (no tensor moves), and every update
    handed to the tables must carry the study's label: one moved to the CPU, or never moved,
    fails."""
    from types import SimpleNamespace

    from interp.adapters.factors import LoraDelta
    from interp.adapters.merge import uniform
    from interp.study.runner import Run, resolve_config
    from interp.study.steps import subspace as step
    from interp.study.variants import LIBRARY, needed_experts

    cfg = resolve_config("experiments/tiny.toml", {"study.device": "cuda"})
    run = Run(cfg, tmp_path, timings={})
    for i, e in enumerate(needed_experts(cfg)):
        make_random_adapter("tiny-llama", run.expert_dir(e), r=4, seed=i + 1)

    def labelled_to(self, device=None, dtype=None):
        out = LoraDelta(self.A, self.B, self.scale, self.bias)
        out.__dict__["label"] = str(torch.device(device)) if device is not None else self.__dict__.get("label")
        return out

    monkeypatch.setattr(LoraDelta, "to", labelled_to)
    monkeypatch.setattr(Run, "device", property(lambda self: "cuda"))
    loaded = []

    def fake_variant(name):  # a variant read off a model (peft_linear): its deltas as that model holds them
        loaded.append(name)
        return SimpleNamespace(info={"deltas": uniform([experts[e] for e in LIBRARY])})

    monkeypatch.setattr(run, "load_variant", fake_variant)
    monkeypatch.setattr(run, "release", lambda hm: None)
    experts = step.load_experts(run)
    merges = step.merged_deltas(run, {e: experts[e] for e in LIBRARY})
    assert set(experts) == set(needed_experts(cfg)) and merges and loaded == ["peft_linear"]
    placed = {(n, m): d.__dict__.get("label") for group in (experts, merges) for n, mods in group.items()
              for m, d in mods.items()}
    assert set(placed.values()) == {"cuda"}, {k: v for k, v in placed.items() if v != "cuda"}
