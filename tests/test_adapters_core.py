"""Adapters inside the bridge: equality with PEFT / dense-by-hand, hooks, merges, routing, validation."""

import json
import warnings

import pytest
import torch

from interp.adapters import load_hooked, make_random_adapter, route_examples, route_tokens
from interp.adapters import library as L
from interp.adapters import merge as M
from interp.adapters.factors import read_adapter
from interp.models import FusedProjectionError, load_hf

warnings.filterwarnings("ignore")
BASE = "tiny-llama"
TEXTS = ["The cat sat on", "Paris is in"]
TOL = 1e-5


@pytest.fixture(scope="module")
def ads(tmp_path_factory):
    d = tmp_path_factory.mktemp("ads")
    return {"a": str(make_random_adapter(BASE, d / "a", r=4, seed=1)),
            "b": str(make_random_adapter(BASE, d / "b", r=4, seed=2))}


def _tokens(hm):
    return hm.tokenize(TEXTS)[0]


def _dense_logits(tokens, deltas):
    """Base HF model (float64) with a dense ΔW added by hand to each weight."""
    hf, _ = load_hf(BASE)
    hf.double()
    mods = dict(hf.named_modules())
    with torch.no_grad():
        for m, W in deltas.items():
            mods[m].weight += W
    hf.eval()
    with torch.no_grad():
        return hf(tokens).logits.double()


def _peft_model(ads, names):
    from peft import PeftModel

    hf, _ = load_hf(BASE)
    pm = PeftModel.from_pretrained(hf, ads[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(ads[n], adapter_name=n)
    pm.eval()
    return pm


def _f64(hm):
    """Run a hooked model in float64, so dense-vs-factored comparisons are not float32 noise."""
    hm.hf_model.double()
    hm.bridge.double()
    return hm


def _maxdiff(a, b):
    return float((a - b).abs().max())


def test_single_adapter_equals_peft(ads):
    hm = load_hooked(BASE, {"a": ads["a"]})
    toks = _tokens(hm)
    pm = _peft_model(ads, ["a"])
    with torch.no_grad():
        ref = pm(toks).logits
    assert _maxdiff(hm.logits(toks), ref) <= TOL
    assert _maxdiff(ref, _dense_logits(toks, {}),) > 1e-2  # the adapter matters


@pytest.mark.parametrize("combine,kw", [("uniform", {}), ("weighted", {"weights": [0.3, 1.2]}),
                                        ("task_arithmetic", {"lam": 0.7}), ("merge_and_unload", {})])
def test_exact_linear_merges_equal_dense_sum(ads, combine, kw):
    hm = _f64(load_hooked(BASE, ads, combine=combine, **kw))
    da, db = read_adapter(ads["a"]), read_adapter(ads["b"])
    wa, wb = {"uniform": (0.5, 0.5), "merge_and_unload": (0.5, 0.5), "weighted": (0.3, 1.2),
              "task_arithmetic": (0.7, 0.7)}[combine]
    dense = {m: wa * da[m].dense() + wb * db[m].dense() for m in da}
    toks = _tokens(hm)
    assert _maxdiff(hm.logits(toks), _dense_logits(toks, dense)) <= TOL
    f = hm.info["faithfulness"]
    assert len(f) == len(da) and f.rel_error.max() < 1e-6
    for m in da:  # the stored effective update is the exact sum
        assert torch.allclose(hm.info["deltas"][m].dense(), dense[m], atol=1e-6)


@pytest.mark.parametrize("combine,opts", [("ties", {"density": 0.25}), ("dare", {"density": 0.5, "seed": 3}),
                                          ("svd", {"rank": 3})])
def test_nonlinear_merges_loaded_model_reproduces_dense(ads, combine, opts):
    hm = _f64(load_hooked(BASE, ads, combine=combine, **opts))
    dense = {m: d.dense() for m, d in hm.info["deltas"].items()}
    toks = _tokens(hm)
    assert _maxdiff(hm.logits(toks), _dense_logits(toks, dense)) <= TOL
    assert hm.info["faithfulness"].rel_error.min() > 1e-3  # these are not the exact sum


def test_ties_matches_peft_merge_utils(ads):
    from peft.utils import merge_utils

    da, db = read_adapter(ads["a"]), read_adapter(ads["b"])
    merged = M.ties([da, db], density=0.25, weights=[1.0, 0.5])
    for m in list(da)[:6]:
        stack = torch.stack([da[m].dense(), db[m].dense()])
        ref = merge_utils.ties(stack, torch.tensor([1.0, 0.5], dtype=torch.float64), 0.25, "total")
        assert torch.allclose(merged[m].dense(), ref, atol=1e-6)


def test_dare_closed_form_single_expert(ads):
    da = read_adapter(ads["a"])
    m = "model.layers.1.mlp.up_proj"
    out = M.dare([{m: da[m]}], density=0.5, seed=0)[m].dense()
    W = da[m].dense()
    kept = out.abs() > 1e-6
    assert torch.allclose(out[kept], 2 * W[kept], rtol=1e-4, atol=1e-6)
    assert 0.45 < kept.double().mean() < 0.55


def test_svd_truncate_matches_dense_svd(ads):
    da, db = read_adapter(ads["a"]), read_adapter(ads["b"])
    m = "model.layers.2.self_attn.o_proj"
    avg = M.uniform([da, db])[m]
    W = 0.5 * (da[m].dense() + db[m].dense())
    U, S, Vh = torch.linalg.svd(W)
    trunc, energy = M.svd_truncate(avg, 3)
    assert torch.allclose(trunc.dense(), (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-5)
    assert abs(energy - float((S[:3] ** 2).sum() / (S ** 2).sum())) < 1e-9
    _, S2, _ = M.factored_svd(avg)
    assert torch.allclose(S2, S[:8], atol=1e-9)


@pytest.mark.parametrize("combine", ["peft_linear", "peft_ties", "peft_cat", "peft_svd"])
def test_peft_combinations_equal_peft_forward(ads, combine):
    hm = load_hooked(BASE, ads, combine=combine, **({"density": 0.5} if combine == "peft_ties" else {}))
    pm = _peft_model(ads, ["a", "b"])
    ctype = M.PEFT_COMBINATIONS[combine]
    kw = {"density": 0.5} if ctype == "ties" else {}
    pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type=ctype, **kw)
    pm.set_adapter("m")
    toks = _tokens(hm)
    with torch.no_grad():
        ref = pm(toks).logits
    assert _maxdiff(hm.logits(toks), ref) <= TOL
    err = hm.info["faithfulness"].rel_error
    if combine == "peft_cat":
        assert err.max() < 1e-6
    else:
        assert err.min() > 1e-3  # cross terms B_i A_j / truncation


def test_arrow_equals_peft_create_arrow_model(ads):
    from peft import ArrowConfig, create_arrow_model

    hm = load_hooked(BASE, ads, combine="arrow", top_k=1, temperature=0.5, seed=7)
    hf, _ = load_hf(BASE)
    pm = create_arrow_model(hf, [ads["a"], ads["b"]], ArrowConfig(top_k=1, router_temperature=0.5, rng_seed=7))
    pm.eval()
    toks = _tokens(hm)
    with torch.no_grad():
        ref = pm(toks).logits
    assert _maxdiff(hm.logits(toks), ref) <= TOL
    # router weights are exposed per token and are one-hot with top_k=1
    _, cache = hm.bridge.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_router"))
    w = cache["blocks.0.attn.q.lora.hook_router"]
    assert w.shape == (*toks.shape, 2) and torch.allclose(w.sum(-1), torch.ones(toks.shape))
    assert set(w.unique().tolist()) <= {0.0, 1.0}


def test_hook_contributions_sum_to_adapted_minus_base(ads):
    hm = load_hooked(BASE, ads, combine="mixture")
    toks = _tokens(hm)
    rt = hm.info["lora_runtime"]
    _, cache = hm.bridge.run_with_cache(toks)
    for site in rt.sites:
        x = cache[f"{site.name}.hook_in"]
        x = x.reshape(*x.shape[:2], -1)  # the bridge shows q/k/v/o per head: [batch, pos, head, d_head]
        out = cache[f"{site.name}.hook_out"]
        out = out.reshape(*out.shape[:2], -1)
        with torch.no_grad():
            base = site.layer.base_layer(x)
        contrib = sum(cache[f"{site.name}.lora.{a}.hook_delta"] for a in ("a", "b"))
        assert _maxdiff(out - base, contrib) <= 1e-5
        assert _maxdiff(cache[f"{site.name}.lora.hook_router"], torch.full((*toks.shape, 2), 0.5)) == 0


def test_zero_ablating_adapter_equals_model_without_it(ads):
    hm = load_hooked(BASE, ads)
    toks = _tokens(hm)
    hm.peft_model.base_model.set_adapter(["a", "b"])  # LoraModel takes a list
    both = hm.logits(toks)
    names = [n for n in hm.bridge.hook_dict if n.endswith(".lora.b.hook_delta")]
    assert len(names) == 28
    ablated = hm.bridge.run_with_hooks(toks, fwd_hooks=[(n, lambda t, hook: torch.zeros_like(t)) for n in names])
    hm.peft_model.set_adapter("a")
    only_a = hm.logits(toks)
    assert _maxdiff(ablated, only_a) <= TOL and _maxdiff(both, only_a) > 1e-3


def test_oracle_routing_per_example_and_per_token(ads):
    hm = load_hooked(BASE, ads, combine="oracle")
    toks = _tokens(hm)
    with route_examples(hm, ["a", "b"]):
        routed = hm.logits(toks)
    ref = load_hooked(BASE, ads)
    ra = ref.logits(toks)
    ref.peft_model.set_adapter("b")
    rb = ref.logits(toks)
    assert _maxdiff(routed[0], ra[0]) <= TOL and _maxdiff(routed[1], rb[1]) <= TOL
    # per token: first 3 positions -> a, later -> b; prefix equals adapter a's run (causal)
    w = torch.zeros(*toks.shape, 2)
    w[:, :3, 0] = 1
    w[:, 3:, 1] = 1
    with route_tokens(hm, w):
        mixed = hm.logits(toks)
    assert _maxdiff(mixed[:, :3], ra[:, :3]) <= TOL and _maxdiff(mixed[:, 3:], ra[:, 3:]) > 1e-3
    with pytest.raises(ValueError, match="oracle routing needs"):
        hm.logits(toks)
    with pytest.raises(ValueError, match="unknown adapter"):
        with route_examples(hm, ["zzz", "a"]):
            pass


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    save_file(fn(t), str(p))
    (d / "manifest.json").unlink()  # a bad adapter from elsewhere: no manifest of ours to catch it first


def test_bad_adapters_refused(tmp_path):
    hf, _ = load_hf(BASE)
    ok = make_random_adapter(BASE, tmp_path / "ok", r=2, target_modules=["q_proj"], seed=0)
    L.AdapterLibrary.load(BASE, {"ok": ok}, hf_model=hf)

    other = make_random_adapter("tiny-qwen2", tmp_path / "qwen", r=2, target_modules=["q_proj"])
    with pytest.raises(L.BaseModelMismatchError, match="tiny-qwen2"):
        L.AdapterLibrary.load(BASE, {"q": other}, hf_model=hf)
    L.AdapterLibrary.load(BASE, {"q": other}, hf_model=hf, expected_base="tiny-qwen2")  # override

    shape = make_random_adapter(BASE, tmp_path / "shape", r=2, target_modules=["q_proj"])
    _edit_tensors(shape, lambda t: {k: (torch.ones(v.shape[0] + 1, v.shape[1]) if "lora_B" in k and ".0." in k else v)
                                    for k, v in t.items()})
    with pytest.raises(L.ShapeMismatchError, match="'shape'.*layers.0.self_attn.q_proj"):
        L.AdapterLibrary.load(BASE, {"shape": shape}, hf_model=hf)

    missing = make_random_adapter(BASE, tmp_path / "missing", r=2, target_modules=["q_proj"])
    _edit_tensors(missing, lambda t: {k.replace("layers.3.", "layers.9."): v for k, v in t.items()})
    with pytest.raises(L.TargetModuleError, match="layers.9"):
        L.AdapterLibrary.load(BASE, {"missing": missing}, hf_model=hf)

    nan = make_random_adapter(BASE, tmp_path / "nan", r=2, target_modules=["q_proj"])
    _edit_tensors(nan, lambda t: {k: (v * float("nan") if "layers.2" in k and "lora_A" in k else v)
                                  for k, v in t.items()})
    with pytest.raises(L.NonFiniteWeightsError, match="layers.2"):
        L.AdapterLibrary.load(BASE, {"nan": nan}, hf_model=hf)

    zero = make_random_adapter(BASE, tmp_path / "zero", r=2, target_modules=["q_proj"], b_std=0.0)
    with pytest.raises(L.ZeroUpdateError, match="never"):
        L.AdapterLibrary.load(BASE, {"zero": zero}, hf_model=hf)

    pk = make_random_adapter(BASE, tmp_path / "pk", r=2, target_modules=["q_proj"])
    from safetensors.torch import load_file
    torch.save(load_file(str(pk / "adapter_model.safetensors")), pk / "adapter_model.bin")
    (pk / "adapter_model.safetensors").unlink()
    (pk / "manifest.json").unlink()  # hand-converted: our checksum manifest no longer applies
    with pytest.raises(L.PickleRefusedError, match="pickle"):
        L.AdapterLibrary.load(BASE, {"pk": pk}, hf_model=hf)
    assert L.AdapterLibrary.load(BASE, {"pk": pk}, hf_model=hf, allow_pickle=True).names == ["pk"]

    with pytest.raises(L.AdapterFileError, match="does not exist"):
        L.AdapterLibrary.load(BASE, {"gone": tmp_path / "nope"}, hf_model=hf)
    with pytest.raises(L.AdapterFileError, match=r"is a file; pass the adapter directory that holds it"):
        L.AdapterLibrary.load(BASE, {"f": ok / "adapter_model.safetensors"}, hf_model=hf)
    import shutil
    shutil.copytree(ok, tmp_path / "saved" / "ab")  # peft's layout for a named adapter
    with pytest.raises(L.AdapterFileError, match=r"its sub-folder\(s\) ab do .*pass the sub-folder"):
        L.AdapterLibrary.load(BASE, {"ab": tmp_path / "saved"}, hf_model=hf)
    with pytest.raises(ValueError, match="hook names"):
        L.AdapterLibrary.load(BASE, {"a.b": ok}, hf_model=hf)

    with pytest.raises(FusedProjectionError):
        make_random_adapter("tiny-gpt2", tmp_path / "g", r=2, target_modules=["c_attn"])
    g = make_random_adapter("tiny-gpt2", tmp_path / "g2", r=2, target_modules=["c_fc"])
    cfg = json.loads((g / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn", "c_fc"]
    (g / "adapter_config.json").write_text(json.dumps(cfg))
    (g / "manifest.json").unlink(missing_ok=True)
    with pytest.raises(FusedProjectionError, match="c_attn"):
        L.AdapterLibrary.load("tiny-gpt2", {"g": g})


def test_weights_not_landed_detected(ads):
    hm = load_hooked(BASE, {"a": ads["a"]})
    lib = hm.info["library"]
    lib.verify_attached(hm.peft_model)
    site = hm.info["lora_runtime"].sites[5]
    with torch.no_grad():
        site.layer.lora_B["a"].weight.zero_()
    with pytest.raises(L.WeightsNotLoadedError, match=site.module_path):
        lib.verify_attached(hm.peft_model)


def test_caller_model_not_mutated(tiny_llama, ads):
    toks = _tokens(tiny_llama)
    before = tiny_llama.logits(toks)
    hm = load_hooked(tiny_llama, {"a": ads["a"]})
    assert tiny_llama.peft_model is None and _maxdiff(tiny_llama.logits(toks), before) == 0
    assert _maxdiff(hm.logits(toks), before) > 1e-3


@pytest.mark.smollm
def test_smollm2_lora_equals_peft(tmp_path):
    from peft import PeftModel

    d = make_random_adapter("smollm2-135m", tmp_path / "s", r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                            seed=0, b_std=0.02)
    hm = load_hooked("smollm2-135m", {"s": str(d)})
    toks = hm.tokenize(["The capital of France is"])[0]
    hf, _ = load_hf("smollm2-135m")
    pm = PeftModel.from_pretrained(hf, str(d)).eval()
    with torch.no_grad():
        ref = pm(toks).logits
    got = hm.logits(toks)
    assert _maxdiff(got, ref) <= 1e-4
    with pm.disable_adapter(), torch.no_grad():
        assert _maxdiff(pm(toks).logits, ref) > 1e-3


@pytest.mark.parametrize("combine,kw", [("none", {}), ("uniform", {}), ("task_arithmetic", {"lam": 0.7}),
                                        ("ties", {"density": 0.25}), ("arrow", {"top_k": 1})])
def test_fold_static_update_equals_unfolded_and_restores(ads, combine, kw):
    from interp.adapters import fold_static_update

    hm = _f64(load_hooked(BASE, ads, combine=combine, **kw))  # float64: folding is exact up to 1e-12
    toks = _tokens(hm)
    before = {n: p.detach().clone() for n, p in hm.hf_model.named_parameters()}
    ref = hm.logits(toks)
    base = _f64(load_hooked(BASE, ads, combine="none"))
    with base.peft_model.disable_adapter():
        plain = base.logits(toks)
    assert _maxdiff(ref, plain) > 1e-2  # the update matters, so equality below is informative
    fired = []
    hook = hm.info["lora_runtime"].sites[0].hook_router
    h = hook.register_forward_hook(lambda m, i, o: fired.append(1))
    with fold_static_update(hm) as folded:
        inside = hm.logits(toks)
        n_inside = len(fired)
    assert folded == (combine != "arrow")  # Arrow's weights depend on the input: never folded
    assert _maxdiff(inside, ref) <= 1e-9
    assert (n_inside == 0) == folded  # folded sites skip the adapter hook points
    h.remove()
    for n, p in hm.hf_model.named_parameters():  # weights restored bit for bit
        assert torch.equal(p, before[n]), n
    assert torch.equal(hm.logits(toks), ref)


def test_fold_static_update_skips_routed_and_training(ads):
    from interp.adapters import fold_static_update

    hm = load_hooked(BASE, ads, combine="oracle")
    with fold_static_update(hm) as folded:
        assert not folded
    hm = load_hooked(BASE, ads, combine="uniform")
    hm.hf_model.train()
    with fold_static_update(hm) as folded:
        assert not folded
    hm.hf_model.eval()
    with fold_static_update(hm):
        with pytest.raises(RuntimeError, match="already active"):
            with fold_static_update(hm):
                pass
    with fold_static_update(object()) as folded:
        assert not folded  # anything without a LoRA runtime (a bare HookedModel) runs unchanged
