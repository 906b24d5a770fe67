"""Foundation: offline models inside the bridge, the SmolLM2 cache, the fused-projection guard."""

import shutil

import pytest
import torch

from interp import models
from interp.models import (FusedProjectionError, ModelLoadError, assert_lora_reached,
                           check_fused_targets, load_hf, load_model)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_bridge_logits_equal_hf(name):
    hm = load_model(name)
    ref, _ = load_hf(name)  # an independent, unbridged copy with the same seed
    toks, _ = hm.tokenize(["Zorbin Quell lives in", "The capital of Vexmoor is"])
    diff = (hm.logits(toks) - ref(toks).logits).abs().max().item()
    assert diff <= 1e-5


def test_tiny_models_are_seeded_and_non_square(tiny_llama):
    a, _ = load_hf("tiny-llama")
    b, _ = load_hf("tiny-llama")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    cfg = tiny_llama.bridge.cfg
    assert len({cfg.d_model, cfg.d_mlp, cfg.d_vocab}) == 3
    assert cfg.n_key_value_heads < cfg.n_heads  # GQA


def test_tokenize_right_pads_and_rejects_bad_text(tiny_llama):
    toks, lengths = tiny_llama.tokenize(["ab", "abcd"])
    assert toks.shape == (2, 4) and lengths.tolist() == [2, 4]
    assert toks[0, 2:].tolist() == [tiny_llama.pad_token_id] * 2
    with pytest.raises(ValueError, match="empty"):
        tiny_llama.tokenize([])
    with pytest.raises(ValueError, match="no tokens"):
        tiny_llama.tokenize([""])
    with pytest.raises(ValueError, match="context"):
        tiny_llama.tokenize(["x" * 300])


def test_right_padding_does_not_change_real_positions(tiny_llama):
    long_, short = "Quell lives in Vexmoor", "Quell"
    toks, lengths = tiny_llama.tokenize([long_, short])
    alone, _ = tiny_llama.tokenize([short])
    both = tiny_llama.logits(toks)
    single = tiny_llama.logits(alone)
    assert (both[1, : lengths[1]] - single[0]).abs().max() <= 1e-5


def test_unknown_model_is_refused_without_network(no_network, tmp_path):
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_model("some-org/some-model")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_local_directory_loads(tmp_path, tiny_qwen2):
    hf, tok = load_hf("tiny-qwen2")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hm = load_model(tmp_path)
    toks, _ = hm.tokenize(["hello"])
    assert (hm.logits(toks) - tiny_qwen2.logits(toks)).abs().max() <= 1e-5


def test_fused_projection_guard():
    from peft import LoraConfig, get_peft_model

    hf, _ = load_hf("tiny-gpt2")
    for target in (["c_attn"], "all-linear", r".*\.c_attn"):
        with pytest.raises(FusedProjectionError, match="c_attn"):
            check_fused_targets(hf, target)
    check_fused_targets(hf, ["c_fc"])  # MLP projections are honoured inside the bridge
    # The dynamic check catches the bypass itself, whatever the registry says.
    pm = get_peft_model(hf, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    hm = models.HookedModel("gpt2+lora", models.bridge_model(pm.base_model.model, load_hf("tiny-gpt2")[1],
                                                            "tiny-gpt2"),
                            pm.base_model.model, load_hf("tiny-gpt2")[1], peft_model=pm)
    with pytest.raises(FusedProjectionError, match="never ran"):
        assert_lora_reached(hm)


def test_manifest_detects_corruption(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    models.write_manifest(tmp_path)
    assert models.verify_manifest(tmp_path)[0]
    with open(tmp_path / "a.bin", "r+b") as f:
        f.seek(50)
        f.write(b"y")
    ok, reason = models.verify_manifest(tmp_path)
    assert not ok and "checksum" in reason
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    ok, reason = models.verify_manifest(tmp_path)
    assert not ok and "size" in reason


def test_atomic_directory_keeps_old_on_failure(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "good").write_text("1")
    with pytest.raises(RuntimeError):
        with models.atomic_directory(target) as tmp:
            (tmp / "half").write_text("partial")
            raise RuntimeError("crash")
    assert (target / "good").read_text() == "1" and not (target / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.smollm
def test_smollm2_matches_hf_and_knows_paris(smollm2):
    ref, _ = load_hf("smollm2-135m")
    toks, _ = smollm2.tokenize(["The capital of France is"])
    diff = (smollm2.logits(toks) - ref(toks).logits).abs().max().item()
    assert diff <= 1e-5
    assert smollm2.generate("The capital of France is", 3).startswith(" Paris")


@pytest.mark.smollm
def test_smollm2_cache_reused_and_corruption_rebuilt(tmp_path, monkeypatch, smollm2, no_network):
    good = models.smollm2_dir()
    cache = tmp_path / "cache"
    shutil.copytree(good, cache / "models" / "smollm2-135m")
    monkeypatch.setenv("INTERP_CACHE", str(cache))
    calls = []
    from interp import builders
    real = builders._convert_gguf_to_safetensors
    monkeypatch.setattr(builders, "_convert_gguf_to_safetensors", lambda *a: (calls.append(a), real(*a)))
    models.smollm2_dir()
    assert calls == []  # second load: from the cache
    st = cache / "models" / "smollm2-135m" / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    with pytest.warns(UserWarning, match="invalid"):
        d = models.smollm2_dir()
    assert len(calls) == 1 and models.verify_manifest(d)[0]
    hm = load_model("smollm2-135m")  # loads the rebuilt copy, still without network
    toks, _ = hm.tokenize(["The capital of France is"])
    assert (hm.logits(toks) - smollm2.logits(toks)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(models.REGISTRY))
def test_every_registered_model_loads_offline(name, no_network):
    if not models.REGISTRY[name].available():
        pytest.skip(f"{name} not installed")
    hm = load_model(name)
    toks, _ = hm.tokenize(["a b"])
    assert torch.isfinite(hm.logits(toks)).all()
