"""interp.surgery: the library internals interp relies on still behave as assumed (a version bump
that breaks one fails here, by name)."""

import torch

from interp.surgery import (clean_module_path, peft_inner_model, register_hook_point, unembed_linear, unwrap,
                            use_eager_attention)


def test_bridge_paths_clean_to_the_hf_names(tiny_llama):
    """The bridge wraps the HF model in place; cleaned paths are those of an unbridged copy."""
    from interp.models import load_hf

    plain, _ = load_hf("tiny-llama")
    want = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    raw = {n for n, m in tiny_llama.hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert raw != want and any("_original_component" in n for n in raw)  # wrapped: cleaning is needed
    assert {clean_module_path(n) for n in raw} == want
    assert clean_module_path("base_model.model.model.layers.0.mlp.down_proj.base_layer", drop_lora_wrapper=True,
                             drop_peft_prefix=True) == "model.layers.0.mlp.down_proj"


def test_unwrap_reaches_the_linear_under_lora_and_bridge(tmp_path):
    from interp import load_hooked
    from interp.adapters import make_random_adapter

    d = make_random_adapter("tiny-llama", tmp_path / "a", r=2, target_modules=["q_proj"], seed=0)
    hm = load_hooked("tiny-llama", {"a": str(d)})
    inner = peft_inner_model(hm.peft_model)
    assert inner is not None and peft_inner_model(inner) is None
    m = inner.get_submodule("model.layers.0.self_attn.q_proj")
    seen = [type(m).__name__]
    while not isinstance(m, torch.nn.Linear) or type(m).__name__ != "Linear" or hasattr(m, "lora_A"):
        m = unwrap(m)
        assert m is not None, seen
        seen.append(type(m).__name__)
    assert type(m) is torch.nn.Linear and unwrap(m) is None


def test_registered_hook_point_is_seen_by_run_with_hooks(tiny_llama):
    from transformer_lens.hook_points import HookPoint

    hp = HookPoint()
    hp.name = "interp_test.hook_x"
    register_hook_point(tiny_llama.bridge, hp)
    assert tiny_llama.bridge.hook_dict["interp_test.hook_x"] is hp
    lin = unembed_linear(tiny_llama.bridge)
    assert lin is not None and lin.weight.shape[0] == tiny_llama.hf_model.config.vocab_size


def test_eager_attention_selected():
    from transformers import LlamaConfig

    assert use_eager_attention(LlamaConfig())._attn_implementation == "eager"
