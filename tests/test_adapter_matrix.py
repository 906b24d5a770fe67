"""Every real PEFT adapter feature × architecture × combine: exact against peft, or refused by name.

Adapters are saved by peft itself (``get_peft_model`` + ``save_pretrained``) on tiny random-init models
of real architectures built from configs; their trainable tensors are randomised ("trained").
References are peft's own computations, never ours:

* single adapter (``none``): ``PeftModel.from_pretrained(...)`` logits, also under ``fold_static_update``;
* linear merges (``uniform``, ``merge_and_unload``): the weights ``W₀ + Σ wᵢ (Mᵢ − W₀)`` where ``Mᵢ``
  is peft's ``merge_and_unload()`` of adapter ``i`` alone (every parameter: biases included);
* ``ties``: ``peft.utils.merge_utils.ties`` on each parameter's ``Mᵢ − W₀``; ``svd`` (rank k): the
  best rank-k ΔW of ``Σ wᵢ (Mᵢ − W₀)`` per weight by ``torch.linalg.svd``, biases summed exactly;
* ``arrow``: peft's ``create_arrow_model``.

A cell that cannot be exact must raise its named error. LoRA on fused projections (which the bridge runs
as split copies) is compared in float64 (float32 rounding alone reaches 1e-5 on the tiny NeoX model).
"""

import copy
import functools
import tempfile
import warnings

import pytest
import torch

from interp.adapters import (ExtraModulesError, FeatureCombineError, UnsupportedOptionError, fold_static_update,
                             load_hooked)
from interp.adapters.features import ReservedAdapterNameError, UnsupportedInitError
from interp.models import FusedProjectionError

# every model and adapter directory of this module lives here; removed at interpreter exit
_SCRATCH = tempfile.TemporaryDirectory(prefix="interp-matrix-")


def _mkdtemp(prefix: str = "d-") -> str:
    return tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH.name)

TOL = 1e-5
V = 311

# architecture -> (config factory, non-fused targets, a fused target)
def _cfg(arch):
    from transformers import (FalconConfig, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, Phi3Config,
                              Qwen2Config)

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    return {
        "llama": lambda: LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2),
        "gemma2": lambda: Gemma2Config(**common, num_key_value_heads=2, head_dim=8),
        "phi3": lambda: Phi3Config(**common, num_key_value_heads=2),
        "neox": lambda: GPTNeoXConfig(**common),
        "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                   eos_token_id=2),
        "falcon": lambda: FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       new_decoder_architecture=False, multi_query=True, alibi=False,
                                       parallel_attn=True, bias=True, bos_token_id=1, eos_token_id=2),
    }[arch]()


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "o_proj"],
           "gemma2": ["q_proj", "o_proj", "up_proj"], "phi3": ["o_proj", "down_proj"],
           "neox": ["dense", "dense_4h_to_h"], "gpt2": ["c_proj", "c_fc"], "falcon": ["dense", "dense_h_to_4h"]}
FUSED = {"phi3": ["qkv_proj", "gate_up_proj"], "neox": ["query_key_value"], "gpt2": ["c_attn"],
         "falcon": ["query_key_value"]}


@functools.lru_cache(maxsize=None)
def model_dir(arch):
    """A tiny random-init model of ``arch`` saved as a local HF directory (with the byte tokenizer)."""
    from transformers import AutoModelForCausalLM

    from interp.models import byte_tokenizer

    cfg = _cfg(arch)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in hf.named_parameters():  # larger than the default init: peaked logits, adapters that matter
            if p.dim() >= 2 or n.endswith(".bias") and "norm" not in n and "ln" not in n:
                p.normal_(0, 0.15 if p.dim() >= 2 else 0.05)
    d = _mkdtemp(prefix=f"matrix-{arch}-")
    hf.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _hf(arch, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir(arch), dtype=dtype, attn_implementation="eager")


def features(arch):
    t = TARGETS[arch]
    return {
        "plain": {},
        "rslora": {"use_rslora": True},
        "dora": {"use_dora": True},
        "lora_bias": {"lora_bias": True},
        "bias_lora_only": {"bias": "lora_only"},
        "bias_all": {"bias": "all"},
        "modules_to_save": {"modules_to_save": ["lm_head"]},
        "embed_tokens": {"target_modules": t + ["embed_tokens" if arch not in ("gpt2", "neox", "falcon")
                                                else {"gpt2": "wte", "neox": "embed_in", "falcon": "word_embeddings"}[arch]]},
        "trainable_tokens": {"trainable_token_indices": [3, 5, 7]},
        "alpha_regex": {"alpha_pattern": {f"{t[0]}|{t[1]}": 16}, "rank_pattern": {t[-1]: 3}},
        "overlapping_patterns": {"alpha_pattern": {f"layers?.1.*{t[0]}": 3, t[0]: 20},
                                 "rank_pattern": {f"h?\\.?1\\..*{t[1]}": 2, t[1]: 5}},
        "pissa": {"init_lora_weights": "pissa"},
        "olora": {"init_lora_weights": "olora"},
        "layers_to_transform": {"layers_to_transform": [1]},
        **({"fused": {"target_modules": FUSED[arch] + t[:1]},
            "fused_dora": {"target_modules": FUSED[arch] + t[:1], "use_dora": True},
            "fused_lora_bias": {"target_modules": FUSED[arch] + t[:1], "lora_bias": True},
            "fused_pissa": {"target_modules": FUSED[arch] + t[:1], "init_lora_weights": "pissa"}}
           if arch in FUSED else {}),
    }


EXTRAS = {"modules_to_save", "embed_tokens", "trainable_tokens", "bias_all"}
SITE = {"dora", "lora_bias", "bias_lora_only", "pissa", "olora", "fused_dora", "fused_lora_bias", "fused_pissa"}


@functools.lru_cache(maxsize=None)
def adapter(arch, feature, seed):
    """Directory of a peft-saved adapter with ``feature`` on ``arch``, its tensors randomised."""

    from peft import LoraConfig, get_peft_model

    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], "lora_dropout": 0.0, **features(arch)[feature]}
    if arch == "gpt2":
        kw["fan_in_fan_out"] = True
    hf = _hf(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf, LoraConfig(**kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:  # "training": every trainable tensor moves
                noise = torch.randn(p.shape, generator=gen)
                p.add_(0.3 * noise * (p.abs().mean() if "magnitude" in n else 1.0))
    d = _mkdtemp(prefix=f"ad-{arch}-{feature}-{seed}-")
    pm.save_pretrained(d)
    return d


@functools.lru_cache(maxsize=None)
def peft_merged(arch, feature, seed, dtype=torch.float32):
    """peft's own ``merge_and_unload()`` of one adapter on the base in ``dtype``: ``{param: tensor}`` (float64)."""
    from peft import PeftModel

    hf = _hf(arch, dtype)
    with torch.no_grad():  # a zero bias is the same base; peft needs one to merge lora_bias
        for name in TARGETS[arch] + FUSED.get(arch, []):
            for n, m in hf.named_modules():
                if n.endswith(name) and hasattr(m, "bias") and m.bias is None:
                    m.bias = torch.nn.Parameter(torch.zeros(m.weight.shape[0 if type(m).__name__ == "Linear" else 1],
                                                            dtype=dtype))
    pm = PeftModel.from_pretrained(hf, adapter(arch, feature, seed))
    merged = pm.merge_and_unload()
    return {n: p.detach().double() for n, p in merged.state_dict().items()}


def _base_params(arch, dtype=torch.float32):
    return {n: p.detach().double() for n, p in _hf(arch, dtype).state_dict().items()}


def _tokens():
    return torch.tensor([[1, 7, 40, 99, 3, 250, 12, 5], [1, 200, 31, 4, 77, 9, 5, 3]])


def _logits_with(arch, params, dtype=torch.float32):
    hf = _hf(arch, dtype)
    sd = hf.state_dict()
    extra = {n: p for n, p in params.items() if n not in sd}
    with torch.no_grad():
        for n, p in extra.items():  # biases created by the zero-bias trick
            mod = hf.get_submodule(n.rsplit(".", 1)[0])
            setattr(mod, n.rsplit(".", 1)[1], torch.nn.Parameter(p.to(dtype)))
        hf.load_state_dict({n: p.to(dtype) for n, p in params.items() if n in sd}, strict=False)
        return hf(_tokens()).logits


def _zero_extended(d):
    """A copy of a ``layers_to_transform=[1]`` adapter that also covers layer 0 with B = 0."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = _mkdtemp()
    shutil.copytree(d, out, dirs_exist_ok=True)
    cfg = json.load(open(f"{out}/adapter_config.json"))
    cfg["layers_to_transform"] = None
    json.dump(cfg, open(f"{out}/adapter_config.json", "w"))
    t = load_file(f"{out}/adapter_model.safetensors")
    for k in list(t):
        if ".layers.1." in k:
            z = k.replace(".layers.1.", ".layers.0.")
            t[z] = torch.zeros_like(t[k]) if ".lora_B." in k else t[k].clone()
    save_file(t, f"{out}/adapter_model.safetensors")
    return out


def _maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def _merge_reference(arch, feature, combine, w=(0.5, 0.5), density=0.2, rank=2, dtype=torch.float32):
    from peft.utils.merge_utils import ties as peft_ties

    W0 = _base_params(arch, dtype)
    Ms = [peft_merged(arch, feature, s, dtype) for s in (0, 1)]
    out = {}
    for n in Ms[0]:
        base = W0.get(n, torch.zeros_like(Ms[0][n]))
        deltas = [M[n] - base for M in Ms]
        if all(float(d.abs().max()) == 0 for d in deltas):
            out[n] = base
        elif combine in ("uniform", "merge_and_unload"):
            out[n] = base + sum(wi * d for wi, d in zip(w, deltas))
        elif combine == "ties":
            out[n] = base + peft_ties(deltas, torch.ones(2, dtype=torch.float64), density)
        elif combine == "svd":
            avg = sum(wi * d for wi, d in zip(w, deltas))
            if avg.dim() == 2:
                U, S, Vh = torch.linalg.svd(avg, full_matrices=False)
                avg = (U[:, :rank] * S[:rank]) @ Vh[:rank]
            out[n] = base + avg
    return _logits_with(arch, out, dtype)


COMBINES = ["none", "uniform", "ties", "svd", "merge_and_unload", "arrow"]
OPTS = {"none": {}, "uniform": {}, "ties": {"density": 0.2}, "svd": {"rank": 2}, "merge_and_unload": {},
        "arrow": {"top_k": 1, "seed": 3}}


def _expected_refusal(feature, combine):
    if feature in EXTRAS and combine != "none":
        return ExtraModulesError, "outside the LoRA linear layers"
    if feature in SITE and combine == "arrow":
        return FeatureCombineError, "Arrow"
    return None


def _check_cell(arch, feature, combine, dtype=torch.float32):
    ads = {"a": adapter(arch, feature, 0)} if combine == "none" else {"a": adapter(arch, feature, 0),
                                                                        "b": adapter(arch, feature, 1)}
    refusal = _expected_refusal(feature, combine)
    if refusal is not None:
        with pytest.raises(refusal[0], match=refusal[1]):
            load_hooked(model_dir(arch), ads, combine=combine, dtype=dtype, **OPTS[combine])
        return
    hm = load_hooked(model_dir(arch), ads, combine=combine, dtype=dtype, **OPTS[combine])
    toks = _tokens()
    got = hm.logits(toks)
    if combine == "none":
        from peft import PeftModel

        pm = PeftModel.from_pretrained(_hf(arch, dtype), ads["a"])
        with torch.no_grad():
            ref = pm(toks).logits
            base = _logits_with(arch, _base_params(arch, dtype), dtype)
    elif combine == "arrow":
        from peft import ArrowConfig, create_arrow_model

        dirs = [ads["a"], ads["b"]]
        if feature == "layers_to_transform":  # peft's Arrow crashes on layers without experts (empty stack):
            dirs = [_zero_extended(d) for d in dirs]  # give it zero updates there (ΔW = 0: routing moot)
        pm = create_arrow_model(_hf(arch, dtype), dirs, ArrowConfig(top_k=1, rng_seed=3))
        pm.eval()
        with torch.no_grad():
            ref = pm(toks).logits
            base = _logits_with(arch, _base_params(arch, dtype), dtype)
    else:
        ref = _merge_reference(arch, feature, combine, dtype=dtype)
        base = _logits_with(arch, _base_params(arch, dtype), dtype)
    assert _maxdiff(ref, base) > 1e-3, "the adapter must change the logits, or the cell proves nothing"
    assert _maxdiff(got, ref) <= TOL, f"{arch}/{feature}/{combine}: {_maxdiff(got, ref)}"
    with fold_static_update(hm) as folded:
        assert folded == (combine not in ("arrow", "merge_and_unload"))
        assert _maxdiff(hm.logits(toks), ref) <= TOL
    if combine in ("uniform", "merge_and_unload") and feature in SITE:
        assert hm.info["faithfulness"].rel_error.max() < 1e-5


ALL_FEATURES = list(features("qwen2"))


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("feature", ALL_FEATURES)
def test_feature_by_combine_qwen2(feature, combine):
    """Every feature × combine on Qwen2 (q/k/v biases, so trained and lora biases have a base bias)."""
    _check_cell("qwen2", feature, combine)


ARCH_FEATURES = ["plain", "dora", "lora_bias", "pissa"]
ARCH_COMBINES = ["none", "uniform", "merge_and_unload"]


@pytest.mark.parametrize("combine", ARCH_COMBINES)
@pytest.mark.parametrize("feature", ARCH_FEATURES)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3", "neox", "gpt2", "falcon"])
def test_feature_by_arch(arch, feature, combine):
    """The main site features on every architecture (Conv1D for GPT-2, ``.h.N.`` layers for Falcon)."""
    _check_cell(arch, feature, combine)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_projection_by_combine(arch, combine):
    """LoRA on fused q/k/v (GPT-2 ``c_attn`` Conv1D, Phi-3 ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's
    per-head interleaved and Falcon's multi-query ``query_key_value``), which the bridge runs as split
    copies: every combine equals peft. In float64, because float32 rounding on these deliberately
    sensitive tiny models reaches 1e-5 by itself (NeoX TIES: 2.5e-6 to 1.1e-5 depending on memory
    layout, the float32 reference as far from the float64 one); in float64 the split is exact to 1e-14
    on GPT-2 and Falcon, and to the bridge's own attention re-implementation (5e-7 from HF without
    any adapter) on Phi-3 and GPT-NeoX."""
    _check_cell(arch, "fused", combine, torch.float64)


@pytest.mark.parametrize("combine", ["none", "uniform", "arrow"])
@pytest.mark.parametrize("feature", ["fused_dora", "fused_lora_bias"])
@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_projection_site_features(arch, feature, combine):
    """DoRA (row by row: peft's DoRA arithmetic on each split copy's rows) and ``lora_bias`` (the rows of
    ``lora_B``'s bias) on fused projections; Arrow refuses them as on any site (float64, see above)."""
    _check_cell(arch, feature, combine, torch.float64)


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_projection_pissa(arch):
    """PiSSA rewrites the fused base weight before the bridge splits it (peft runs PiSSA only in float32)."""
    _check_cell(arch, "fused_pissa", "none")


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_projection_hook_delta_per_part(arch):
    """Each split copy has its own readable hook points (``blocks.{l}.attn.q.lora.a.hook_delta``, …,
    ``mlp.gate`` / ``mlp.in`` for Phi-3's gate_up_proj), holding exactly its rows of ``s·B·A·x``."""
    hm = load_hooked(model_dir(arch), {"a": adapter(arch, "fused", 0)}, dtype=torch.float64)
    split = [s for s in hm.info["lora_runtime"].sites if s.rows is not None]
    kinds = {"attn": ("q", "k", "v"), **({"mlp": ("gate", "in")} if arch == "phi3" else {})}
    expected = {f"blocks.{i}.{k}.{p}.lora.a.hook_delta" for i in (0, 1) for k, ps in kinds.items() for p in ps}
    assert {s.hook_delta["a"].name for s in split} == expected
    inputs = {f"{s.name}.hook_in" for s in split}
    _, cache = hm.bridge.run_with_cache(_tokens(), names_filter=lambda n: n in expected or n in inputs)
    with torch.no_grad():
        for s in split:
            x = cache[f"{s.name}.hook_in"]
            full = s.layer.lora_B["a"](s.layer.lora_A["a"](x)) * s.layer.scaling["a"]  # the fused layer's s·B·A·x
            assert _maxdiff(cache[s.hook_delta["a"].name], full[..., s.rows]) <= 1e-12
            assert float(full[..., s.rows].abs().max()) > 1e-3


@pytest.mark.parametrize("combine", ["peft_linear", "peft_cat"])
@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_projection_peft_combinations(arch, combine):
    """peft's ``add_weighted_adapter`` on fused projections equals peft's own forward of that adapter
    (float64, see ``test_fused_projection_by_combine``)."""
    from peft import PeftModel

    ads = {"a": adapter(arch, "fused", 0), "b": adapter(arch, "fused", 1)}
    hm = load_hooked(model_dir(arch), ads, combine=combine, dtype=torch.float64)
    pm = PeftModel.from_pretrained(_hf(arch, torch.float64), ads["a"], adapter_name="a")
    pm.load_adapter(ads["b"], adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type=combine[len("peft_"):])
    pm.set_adapter("m")
    pm.eval()
    with torch.no_grad():
        ref = pm(_tokens()).logits
        base = _logits_with(arch, _base_params(arch, torch.float64), torch.float64)
    assert _maxdiff(ref, base) > 1e-3
    assert _maxdiff(hm.logits(_tokens()), ref) <= TOL


@pytest.mark.parametrize("arch", ["phi3", "neox"])
def test_fused_projection_module_inputs(arch):
    """The subspace key analyses read a fused layer's input from the bridge's split copies that run it."""
    from interp.subspace.keys import module_inputs

    hm = load_hooked(model_dir(arch), {"a": adapter(arch, "fused", 0)})
    site = next(s for s in hm.info["lora_runtime"].sites if s.rows is not None)
    _, cache = hm.bridge.run_with_cache(hm.tokenize(["hello there"])[0], names_filter=f"{site.name}.hook_in")
    got = module_inputs(hm, ["hello there"], [site.module_path], position="all")[site.module_path]
    assert _maxdiff(got, cache[f"{site.name}.hook_in"][0]) == 0


def test_peft_merge_adapter_on_fused_projection_refused():
    hm = load_hooked(model_dir("gpt2"), {"a": adapter("gpt2", "fused", 0)})
    hm.peft_model.merge_adapter()
    with pytest.raises(FusedProjectionError, match="c_attn.*merge_adapter"):
        hm.logits(_tokens())


@pytest.mark.parametrize("name", ["peft_cat", "peft_linear", "arrow_router", "lora_A", "ties", "__base__"])
def test_reserved_adapter_names_refused(name):
    with pytest.raises(ReservedAdapterNameError, match="reserved"):
        load_hooked(model_dir("qwen2"), {name: adapter("qwen2", "plain", 0)})


@pytest.mark.parametrize("combine,opts,match", [
    ("svd", {"svd_rank": 2}, "svd_rank is peft_svd's option"),
    ("uniform", {"density": 0.5}, "accepts no options"),
    ("peft_cat", {"density": 0.5}, "accepts no options"),
    ("ties", {"majority_sign_method": "mass"}, "total' or 'frequency"),
])
def test_inapplicable_options_refused(combine, opts, match):
    ads = {"a": adapter("qwen2", "plain", 0), "b": adapter("qwen2", "plain", 1)}
    with pytest.raises(UnsupportedOptionError, match=match):
        load_hooked(model_dir("qwen2"), ads, combine=combine, **opts)


def test_ties_frequency_sign_equals_peft():
    from peft.utils.merge_utils import ties as peft_ties

    ads = {"a": adapter("qwen2", "plain", 0), "b": adapter("qwen2", "plain", 1)}
    hm = load_hooked(model_dir("qwen2"), ads, combine="ties", density=0.3, majority_sign_method="frequency")
    hm_total = load_hooked(model_dir("qwen2"), ads, combine="ties", density=0.3)
    W0 = _base_params("qwen2")
    Ms = [peft_merged("qwen2", "plain", s) for s in (0, 1)]
    out = {}
    for n in Ms[0]:
        base = W0.get(n, torch.zeros_like(Ms[0][n]))
        deltas = [M[n] - base for M in Ms]
        out[n] = base + (peft_ties(deltas, torch.ones(2, dtype=torch.float64), 0.3, "frequency")
                          if any(float(d.abs().max()) > 0 for d in deltas) else 0)
    ref = _logits_with("qwen2", out)
    assert _maxdiff(hm.logits(_tokens()), ref) <= TOL
    assert _maxdiff(hm_total.logits(_tokens()), ref) > 1e-4  # the option is not ignored


@pytest.mark.parametrize("combine", ["peft_linear", "peft_cat", "peft_svd"])
def test_rslora_through_peft_combines_refused(combine):
    ads = {"a": adapter("qwen2", "rslora", 0), "b": adapter("qwen2", "rslora", 1)}
    with pytest.raises(FeatureCombineError, match="rsLoRA"):
        load_hooked(model_dir("qwen2"), ads, combine=combine)


@pytest.mark.parametrize("feature", ["dora", "lora_bias", "pissa"])
def test_site_features_through_peft_combines_refused(feature):
    ads = {"a": adapter("qwen2", feature, 0), "b": adapter("qwen2", feature, 1)}
    with pytest.raises(FeatureCombineError, match="add_weighted_adapter"):
        load_hooked(model_dir("qwen2"), ads, combine="peft_linear")


def test_randomised_pissa_refused():
    import json
    import shutil

    d = _mkdtemp()
    shutil.copytree(adapter("qwen2", "pissa", 0), d, dirs_exist_ok=True)
    cfg = json.load(open(f"{d}/adapter_config.json"))
    cfg["init_lora_weights"] = "pissa_niter_4"
    json.dump(cfg, open(f"{d}/adapter_config.json", "w"))
    with pytest.raises(UnsupportedInitError, match="pissa_niter_4"):
        load_hooked(model_dir("qwen2"), {"a": d})


def test_layer_replication_refused_by_name():
    """An adapter trained with ``layer_replication`` targets layers the base does not have (peft repeats base
    layers): refused naming the option, not as an unknown target module."""

    from peft import LoraConfig, get_peft_model

    from interp.adapters import UnsupportedVariantError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_hf("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                     layer_replication=[[0, 2], [1, 2]]))
    d = _mkdtemp(prefix="ad-llama-layer-replication-")
    pm.save_pretrained(d)
    for combine in ("none", "merge_and_unload"):
        with pytest.raises(UnsupportedVariantError, match="layer_replication"):
            load_hooked(model_dir("llama"), {"a": d}, combine=combine)


def test_several_residual_adapters_under_none_refused():
    from interp.adapters import SharedBaseError

    ads = {"a": adapter("qwen2", "pissa", 0), "b": adapter("qwen2", "pissa", 1)}
    with pytest.raises(SharedBaseError, match="pissa"):
        load_hooked(model_dir("qwen2"), ads)


@pytest.mark.parametrize("keys,module", [
    (["q_proj|v_proj", "v_proj"], "model.layers.0.self_attn.v_proj"),
    (["layers.1.self_attn.q_proj", "q_proj"], "model.layers.1.self_attn.q_proj"),
    (["q_proj", "layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),
    (["_proj"], "model.layers.0.self_attn.q_proj"),
    (["self_attn.*"], "model.layers.0.self_attn.o_proj"),
    (["h.1.attn.c_proj"], "transformer.h.11.attn.c_proj"),
])
def test_pattern_key_resolves_as_peft(keys, module):
    from peft.utils.other import get_pattern_key

    from interp.adapters.factors import pattern_key

    got = pattern_key(keys, module)
    assert (got if got is not None else module) == get_pattern_key(keys, module)
