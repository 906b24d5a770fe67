"""train_expert: answer-only labels, learning, determinism, resume after a crash, cache, guards."""

import dataclasses
import hashlib
import json
import warnings

import pytest
import torch

from interp.adapters.factors import read_adapter
from interp.adapters.library import AdapterLibrary
from interp.adapters.train import TrainConfig, _batch, epoch_batches, lr_scale, train_expert
from interp.models import FusedProjectionError, verify_manifest

warnings.filterwarnings("ignore")
EX = [(f"Q{i} is", f" a{i % 4}") for i in range(12)]
CFG = TrainConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj"), lr=1e-2, max_steps=8,
                  batch_size=6, checkpoint_every=3, seed=1, loraplus_lr_ratio=0.0, precision="fp32")


def test_batch_labels_answer_only_right_padded():
    enc = [([5, 6, 7], [8]), ([5], [9, 10])]
    ids, mask, labels = _batch(enc, [0, 1], pad=0)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8], [-100, 9, 10, -100]]


def test_train_resume_equals_uninterrupted(tmp_path):
    full = train_expert("tiny-llama", EX, tmp_path / "full", CFG, progress=False)
    assert full["steps"] == 8 and full["losses"][-1] < full["losses"][0]
    assert verify_manifest(tmp_path / "full")[0]
    meta = json.loads((tmp_path / "full" / "interp_meta.json").read_text())
    assert meta["base_model"] == "tiny-llama" and 0 <= meta["train_exact_match"] <= 1
    AdapterLibrary.load("tiny-llama", {"e": tmp_path / "full"})  # a valid library member

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train_expert("tiny-llama", EX, tmp_path / "res", CFG, progress=False, callback=crash)
    assert not (tmp_path / "res").exists() and (tmp_path / "res.partial").is_dir()
    resumed = train_expert("tiny-llama", EX, tmp_path / "res", CFG, progress=False)
    assert resumed["resumed_from_step"] == 6
    assert resumed["losses"] == full["losses"]
    a, b = read_adapter(tmp_path / "full"), read_adapter(tmp_path / "res")
    assert set(a) == set(b) and all(torch.equal(a[m].A, b[m].A) and torch.equal(a[m].B, b[m].B) for m in a)
    assert not (tmp_path / "res.partial").exists()
    # complete dir with the same data and config: returned without training
    again = train_expert("tiny-llama", EX, tmp_path / "full", CFG, progress=False,
                         callback=lambda s, l: pytest.fail("retrained"))
    assert again["final_loss"] == full["final_loss"]


def test_train_learns_and_refuses_bad_input(tmp_path):
    cfg = TrainConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), lr=2e-2,
                      max_steps=30, batch_size=4, checkpoint_every=0, loraplus_lr_ratio=0.0, precision="fp32")
    m = train_expert("tiny-llama", EX[:4], tmp_path / "learn", cfg, progress=False)
    assert m["train_first_token_acc"] == 1.0 and m["final_loss"] < 0.1 * m["losses"][0]
    with pytest.raises(ValueError, match="no examples"):
        train_expert("tiny-llama", [], tmp_path / "x", cfg, progress=False)
    with pytest.raises(ValueError, match="pair of strings"):
        train_expert("tiny-llama", [("only prompt",)], tmp_path / "x", cfg, progress=False)
    with pytest.raises(FusedProjectionError):
        train_expert("tiny-gpt2", EX, tmp_path / "g", TrainConfig(target_modules=("c_attn",)), progress=False)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_answer_loss_equals_hf_causal_lm_loss_and_gradients(name):
    """Unembedding only the answer-predicting positions gives HF's loss and the same LoRA grads."""
    from peft import LoraConfig, get_peft_model

    from interp.adapters.train import _batch, answer_loss
    from interp.models import load_hf

    hf, tok = load_hf(name)
    pm = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"])
           for p, a in [("Zorb works in", " Vexmoor"), ("A b", " Qlm oo"), ("The city of Ulm is in", " X")]]
    ids, mask, labels = _batch(enc, [0, 1, 2], 0)
    ours = answer_loss(pm, ids, mask, labels)
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    ref = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    assert abs(float(ours) - float(ref)) < 1e-5
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-4, atol=1e-6)


def test_lr_schedule_linear_warmup_then_decay_closed_form():
    cfg = TrainConfig(schedule="linear", warmup_ratio=0.1)
    total = 50  # warm-up: 5 steps
    got = [lr_scale(cfg, t, total) for t in range(total)]
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert got[5:] == pytest.approx([(total - t) / 45 for t in range(5, total)])
    assert all(a >= b for a, b in zip(got[4:], got[5:]))  # monotone decay after the peak
    assert lr_scale(TrainConfig(schedule="constant"), 7, total) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        train_expert("tiny-llama", EX, "/nonexistent/x", TrainConfig(schedule="cosine"), progress=False)


def test_epoch_batches_cover_each_example_once():
    batches = epoch_batches(37, 5, seed=2, epoch=1)
    assert len(batches) == 8 and sorted(i for b in batches for i in b) == list(range(37))
    assert batches == epoch_batches(37, 5, seed=2, epoch=1)  # a pure function of (seed, epoch)
    assert batches != epoch_batches(37, 5, seed=2, epoch=2)


def test_bf16_loraplus_min_steps_recipe(tmp_path):
    """The study's recipe: bf16 base + autocast, LoRA+ groups, a floor on steps; the adapter is
    saved in fp32 and its reported accuracy is what the fp32 base gives."""
    from peft import PeftModel

    from interp.adapters.train import _encode, answer_accuracy
    from interp.models import load_hf

    cfg = TrainConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), lr=5e-3,
                      epochs=1, min_steps=12, batch_size=4, checkpoint_every=0, precision="bf16",
                      loraplus_lr_ratio=8.0)
    m = train_expert("tiny-llama", EX[:8], tmp_path / "e", cfg, progress=False)
    assert m["steps"] == 12 and m["losses"][-1] < m["losses"][0]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    hf, tok = load_hf("tiny-llama")
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "e")).eval()
    first, exact = answer_accuracy(pm, _encode(tok, EX[:8], False), pad=0)
    assert (first, exact) == (m["train_first_token_acc"], m["train_exact_match"])
    with pytest.raises(ValueError, match="precision"):
        train_expert("tiny-llama", EX, tmp_path / "x", TrainConfig(precision="fp16"), progress=False)


def test_answer_accuracy_equals_full_logits_argmax(tmp_path):
    """Reading only answer positions gives the accuracy that full-vocabulary logits give."""
    from interp.adapters import make_random_adapter
    from interp.adapters.train import _encode, answer_accuracy
    from interp.models import load_hf
    from peft import PeftModel

    hf, tok = load_hf("tiny-llama")
    pm = PeftModel.from_pretrained(hf, str(make_random_adapter("tiny-llama", tmp_path / "a", r=4, seed=5))).eval()
    enc = _encode(tok, EX, False)
    # the gold answers of EX against a random model: build "gold" from the model's own argmax for
    # half the examples so both metrics are strictly between 0 and 1
    first_ref = exact_ref = 0
    forced = []
    with torch.no_grad():
        for k, (p, a) in enumerate(enc):
            ids = torch.tensor([p + a])
            pred = pm(input_ids=ids).logits[0].argmax(-1).tolist()
            if k % 2 == 0:
                a = pred[len(p) - 1: len(p) - 1 + len(a)]
                ids = torch.tensor([p + a])
                pred = pm(input_ids=ids).logits[0].argmax(-1).tolist()
            got = pred[len(p) - 1: len(p) - 1 + len(a)]
            first_ref += int(got[0] == a[0])
            exact_ref += int(got == a)
            forced.append((p, a))
    first, exact = answer_accuracy(pm, forced, pad=0, batch_size=3)
    assert (first, exact) == (first_ref / len(EX), exact_ref / len(EX))
    assert 0 < first < 1


def test_expert_init_seed_is_the_truncated_sha256_of_seed_and_name():
    from interp.adapters.recipe import expert_init_seed

    # independent formulation: the first 16 hex digits of the digest, top bit cleared
    ref = int(hashlib.sha256(b"3:ab").hexdigest()[:16], 16) % 2 ** 63
    assert expert_init_seed(3, "ab") == ref and 0 <= ref < 2 ** 63
    assert expert_init_seed(3, "ab") != expert_init_seed(3, "bc") != expert_init_seed(4, "bc")
    torch.manual_seed(expert_init_seed(0, "joint_all"))  # a seed torch accepts
    assert TrainConfig(seed=3).init_seed("ab") == ref
    assert TrainConfig(seed=3, init="shared").init_seed("ab") == 3 and TrainConfig(seed=3).init_seed(None) == 3
    assert "init='random'" in TrainConfig(init="random").problems()[0]


def _initial_A(seed: int) -> dict[str, torch.Tensor]:
    """A of every LoRA module right after peft's init under ``torch.manual_seed(seed)`` (the
    training code is not used: this is what the old shared init drew)."""
    from peft import LoraConfig, get_peft_model

    from interp.models import load_hf

    hf, _ = load_hf("tiny-llama")
    torch.manual_seed(seed)
    pm = get_peft_model(hf, LoraConfig(r=INIT_CFG.r, lora_alpha=INIT_CFG.lora_alpha,
                                       target_modules=list(INIT_CFG.target_modules), bias="none",
                                       task_type="CAUSAL_LM"))
    return {n.split("base_model.model.")[1].rsplit(".lora_A", 1)[0]: p.detach().clone()
            for n, p in pm.named_parameters() if ".lora_A." in n}


# one step: B = 0 at init, so A's gradient is exactly 0 and the saved A is the init itself
INIT_CFG = dataclasses.replace(CFG, max_steps=1, checkpoint_every=0, seed=2)


def test_per_expert_init_differs_by_name_and_shared_reproduces_the_old_init(tmp_path):
    from interp.adapters.recipe import expert_init_seed

    def trained_A(name, cfg, expert):
        meta = train_expert("tiny-llama", EX, tmp_path / name, cfg, progress=False, expert=expert)
        return meta, {m: d.A for m, d in read_adapter(tmp_path / name).items()}

    meta_ab, ab = trained_A("ab", INIT_CFG, "ab")
    _, ab2 = trained_A("ab_again", INIT_CFG, "ab")
    meta_bc, bc = trained_A("bc", INIT_CFG, "bc")
    assert meta_ab["init_seed"] == expert_init_seed(2, "ab") and meta_ab["seed"] == 2
    assert all(torch.equal(ab[m], ab2[m]) for m in ab)              # same name: same A
    assert all(not torch.allclose(ab[m], bc[m]) for m in ab)        # another name: another A
    ref_ab = _initial_A(expert_init_seed(2, "ab"))
    assert set(ref_ab) == set(ab) and all(torch.equal(ab[m], ref_ab[m].to(ab[m].dtype)) for m in ab)
    shared = dataclasses.replace(INIT_CFG, init="shared")
    meta_s, s_ab = trained_A("s_ab", shared, "ab")
    _, s_bc = trained_A("s_bc", shared, "bc")
    old = _initial_A(2)  # what every expert started from before per-expert inits
    assert meta_s["init_seed"] == 2
    assert all(torch.equal(s_ab[m], old[m]) and torch.equal(s_bc[m], old[m]) for m in old)
    # a finished expert is reused only under the same init: another name retrains
    again = train_expert("tiny-llama", EX, tmp_path / "ab", INIT_CFG, progress=False, expert="bc")
    assert again["init_seed"] == meta_bc["init_seed"]


def test_answer_positions_select_what_the_boolean_mask_selects():
    from interp.adapters.train import answer_positions

    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100], [-100, -100, -100, 9]])
    rows, cols, targets = answer_positions(labels)
    keep = labels[:, 1:] != -100
    hidden = torch.randn(3, 4, 2)
    assert torch.equal(hidden[rows, cols], hidden[:, :-1][keep])
    assert torch.equal(targets, labels[:, 1:][keep])


def test_training_with_fewer_host_syncs_equals_the_step_by_step_loop(tmp_path, monkeypatch):
    """Answer positions by index and losses read in blocks of LOSS_READ_EVERY steps give the very
    losses and LoRA weights of the old loop: boolean-mask answer positions and a loss read after
    every step (forced here by ignoring the positions and by a per-step callback)."""
    import interp.adapters.train as T

    cfg = TrainConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj"), lr=1e-2, max_steps=40,
                      batch_size=5, checkpoint_every=0, seed=2, loraplus_lr_ratio=4.0, precision="fp32")
    assert cfg.max_steps > T.LOSS_READ_EVERY  # a block boundary is crossed
    new = train_expert("tiny-llama", EX, tmp_path / "new", cfg, progress=False)
    orig = T.answer_loss
    monkeypatch.setattr(T, "answer_loss", lambda pm, ids, mask, labels, positions=None, position_ids=None:
                        orig(pm, ids, mask, labels, position_ids=position_ids))
    seen = []
    old = train_expert("tiny-llama", EX, tmp_path / "old", cfg, progress=False,
                       callback=lambda s, loss: seen.append(loss))
    assert len(new["losses"]) == 40 and new["losses"] == old["losses"] == seen
    a, b = read_adapter(tmp_path / "new"), read_adapter(tmp_path / "old")
    assert set(a) == set(b) and all(torch.equal(a[m].A, b[m].A) and torch.equal(a[m].B, b[m].B) for m in a)


def test_continue_from_a_finished_expert(tmp_path, monkeypatch):
    """``start_from``: the trained factors replace the init, the batches go on with the next
    epochs, the continuation resumes after a crash (continuing in place) to the same weights,
    a finished continuation is cached under its own identity, and a foreign start is refused."""
    import shutil

    import interp.adapters.train as train_mod
    from interp.errors import TrainingError

    cfg = dataclasses.replace(CFG, max_steps=None, epochs=2, min_steps=0)  # 12 examples / 6: 2 steps an epoch
    first = train_expert("tiny-llama", EX, tmp_path / "first", cfg, progress=False, expert="ab")
    assert first["steps"] == 4 and first["start_from"] is None
    start = read_adapter(tmp_path / "first")
    # with a vanishing rate the continuation ends where it started (a fresh init would have B = 0)
    still = train_expert("tiny-llama", EX, tmp_path / "still", dataclasses.replace(cfg, lr=1e-12),
                         progress=False, expert="ab", start_from=tmp_path / "first")
    got = read_adapter(tmp_path / "still")
    assert any(float(start[m].B.abs().max()) > 1e-3 for m in start)
    for m in start:
        torch.testing.assert_close(got[m].A, start[m].A, rtol=0, atol=1e-9)
        torch.testing.assert_close(got[m].B, start[m].B, rtol=0, atol=1e-9)
    assert still["start_from"] == hashlib.sha256((tmp_path / "first" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert still["start_from_steps"] == 4
    # the batch order goes on with epochs 2 and 3
    seen = []
    real = train_mod.epoch_batches
    monkeypatch.setattr(train_mod, "epoch_batches", lambda n, b, s, e: seen.append(e) or real(n, b, s, e))
    shutil.copytree(tmp_path / "first", tmp_path / "full")
    full = train_expert("tiny-llama", EX, tmp_path / "full", cfg, progress=False, expert="ab",
                        start_from=tmp_path / "full")
    assert seen == [2, 3] and full["steps"] == 4
    assert full["losses"][0] < first["losses"][0]  # starts from trained factors, not the init

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == 3:
            raise Crash

    shutil.copytree(tmp_path / "first", tmp_path / "res")
    with pytest.raises(Crash):
        train_expert("tiny-llama", EX, tmp_path / "res", dataclasses.replace(cfg, checkpoint_every=2), progress=False,
                     expert="ab", start_from=tmp_path / "res", callback=crash)
    assert (tmp_path / "res.partial").is_dir()
    resumed = train_expert("tiny-llama", EX, tmp_path / "res", dataclasses.replace(cfg, checkpoint_every=2),
                           progress=False, expert="ab", start_from=tmp_path / "res")
    assert resumed["resumed_from_step"] == 2 and resumed["losses"] == full["losses"]
    a, b = read_adapter(tmp_path / "full"), read_adapter(tmp_path / "res")
    assert all(torch.equal(a[m].A, b[m].A) and torch.equal(a[m].B, b[m].B) for m in a)
    # a finished continuation is returned as is
    again = train_expert("tiny-llama", EX, tmp_path / "still", dataclasses.replace(cfg, lr=1e-12), progress=False,
                         expert="ab", start_from=tmp_path / "first", callback=lambda s, l: pytest.fail("retrained"))
    assert again["final_loss"] == still["final_loss"]
    with pytest.raises(TrainingError, match="data_sha256"):
        train_expert("tiny-llama", EX[:6], tmp_path / "x", cfg, progress=False, start_from=tmp_path / "first")
    with pytest.raises(TrainingError, match="r = 4"):
        train_expert("tiny-llama", EX, tmp_path / "x", dataclasses.replace(cfg, r=2), progress=False,
                     start_from=tmp_path / "first")
    with pytest.raises(TrainingError, match="not a finished expert"):
        train_expert("tiny-llama", EX, tmp_path / "x", cfg, progress=False, start_from=tmp_path / "nothing")


def test_packed_batch_layout_by_hand():
    """First-fit decreasing into rows of 2x the longest (5 tokens -> capacity 10); positions
    restart per example; each pad token is a one-token segment at position 0; labels only on answers."""
    from interp.adapters.train import _packed_batch

    enc = [([5, 6, 7], [8, 9]), ([5], [9]), ([4, 4], [3]), ([7, 7, 7], [1])]  # lengths 5, 2, 3, 4
    ids, pos, labels, example = _packed_batch(enc, [0, 1, 2, 3], pad=0)
    # longest first: 0 (5) row 0; 3 (4) row 0 at 5; 2 (3) row 1; 1 (2) row 1 at 3
    assert ids.tolist() == [[5, 6, 7, 8, 9, 7, 7, 7, 1, 0], [4, 4, 3, 5, 9, 0, 0, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0], [0, 1, 2, 0, 1, 0, 0, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9, -100, -100, -100, 1, -100],
                               [-100, -100, 3, -100, 9, -100, -100, -100, -100, -100]]
    assert example.tolist() == [[0, 0, 0, 0, 0, 3, 3, 3, 3, -1], [2, 2, 2, 1, 1, -1, -1, -1, -1, -1]]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_packed_rows_give_the_padded_loss_and_gradients(name):
    """The packed layout is the padded one rearranged: same answer loss, same LoRA gradients,
    and packing_error at rounding level."""
    from peft import LoraConfig, get_peft_model

    from interp.adapters.train import _packed_batch, answer_loss, answer_positions, packing_error
    from interp.models import load_hf

    hf, tok = load_hf(name)
    pairs = [("Zorb works in", " Vexmoor"), ("A b", " Qlm oo"), ("The city of Ulm is in", " X"), ("Q", " r s")]
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"])
           for p, a in pairs]
    assert packing_error(hf, enc, [0, 1, 2, 3], 0) < 1e-5
    pm = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    grads = []
    for packed in (False, True):
        pm.zero_grad()
        if packed:
            ids, pos, labels, _ = _packed_batch(enc, [0, 1, 2, 3], 0)
            assert ids.shape[0] < len(pairs)  # some row does hold two examples
            loss = answer_loss(pm, ids, None, labels, answer_positions(labels), position_ids=pos)
        else:
            ids, mask, labels = _batch(enc, [0, 1, 2, 3], 0)
            loss = answer_loss(pm, ids, mask, labels)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-4)


def test_packing_is_checked_and_turned_off_where_examples_would_see_each_other(tmp_path, monkeypatch):
    """A model that does not keep packed examples apart (transformers' packed-sequence detection
    disabled: every row is one causal sequence) is caught by packing_error, and train_expert then
    right-pads: its expert equals the one trained with packing=False."""
    import transformers.masking_utils as mu

    from interp.adapters.train import PACKING_ATOL, packing_error
    from interp.models import load_hf

    import interp.adapters.train as T

    layouts = []  # what the training loop fed the model: position_ids given (packed) or not
    real_loss = T.answer_loss
    monkeypatch.setattr(T, "answer_loss", lambda *a, position_ids=None, **k: layouts.append(position_ids is not None)
                        or real_loss(*a, position_ids=position_ids, **k))
    packed = train_expert("tiny-llama", EX, tmp_path / "packed", CFG, progress=False)
    assert packed["packed"] is True and layouts == [True] * CFG.max_steps
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    hf, tok = load_hf("tiny-llama")
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"]) for p, a in EX]
    assert packing_error(hf, enc, list(range(6)), 0) > PACKING_ATOL
    layouts.clear()
    leaky = train_expert("tiny-llama", EX, tmp_path / "leaky", CFG, progress=False)
    assert layouts == [False] * CFG.max_steps
    monkeypatch.undo()
    padded = train_expert("tiny-llama", EX, tmp_path / "padded", dataclasses.replace(CFG, packing=False),
                          progress=False)
    assert leaky["packed"] is False and padded["packed"] is False
    assert leaky["losses"] == padded["losses"]
    # packing changes the arithmetic's shapes, not the mathematics: the same losses to rounding
    assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-4, abs=1e-5)


def test_packing_check_fails_safe_on_a_model_that_refuses_position_ids():
    """An architecture whose forward raises on the packed layout gets ``inf`` (pad), not a crash."""
    from interp.adapters.train import packing_error
    from interp.models import load_hf

    hf, tok = load_hf("tiny-llama")
    enc = [(tok(p, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"]) for p, a in EX]
    forward = hf.forward

    def no_positions(*a, position_ids=None, **k):
        if position_ids is not None:
            raise TypeError("forward() got an unexpected keyword argument 'position_ids'")
        return forward(*a, **k)

    hf.forward = no_positions
    assert packing_error(hf, enc, range(4), 0) == float("inf")
