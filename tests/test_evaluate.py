"""interp.evaluate: Wilson intervals, teacher-forced scoring vs real greedy decoding, tables."""

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from interp.evaluate import (TABLE_COLUMNS, accuracy_table, greedy_answers, logits_at, score_examples,
                             wilson_interval)


@dataclass
class Ex:
    prompt: str
    answer: str
    kind: str = "two_hop"


def test_wilson_known_values_and_closed_form():
    # known values (e.g. Newcombe 1998, Table I; statsmodels proportion_confint(method="wilson"))
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=5e-4)
    # closed form: the bounds are the roots of (p - k/n)^2 = z^2 p(1-p)/n
    for k, n in [(3, 7), (50, 64), (1, 100)]:
        z = 1.96
        for p in wilson_interval(k, n, z):
            assert (p - k / n) ** 2 == pytest.approx(z * z * p * (1 - p) / n, abs=1e-12)
    # symmetry and width shrinking with n
    a, b = wilson_interval(3, 10)
    c, d = wilson_interval(7, 10)
    assert a == pytest.approx(1 - d) and b == pytest.approx(1 - c)
    assert (wilson_interval(32, 64)[1] - wilson_interval(32, 64)[0]) < (b - a)


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (0, 0), (1.5, 3), (True, 3)])
def test_wilson_bad_input(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def _greedy_ids(hm, prompt, n):
    ids = hm.encode(prompt)
    out = []
    for _ in range(n):
        nxt = int(hm.logits(torch.tensor([ids + out]))[0, -1].argmax())
        out.append(nxt)
    return out


def test_exact_match_equals_real_greedy(tiny_llama):
    hm = tiny_llama
    prompts = ["The city of Kel", "Zorbin Quell works in", "ab", "A longer prompt about things",
               "Vexmoor is in", "xyz", "Hello"]
    exs = []
    for p in prompts:
        g = _greedy_ids(hm, p, 3)
        right = hm.tokenizer.decode(g)
        wrong = g[:1] + [(g[1] + 1 - 3) % 256 + 3] + g[2:]  # first token right, 2nd wrong
        # keep continuations whose text re-encodes to the same byte tokens (valid UTF-8 etc.)
        if hm.encode(right) != g or hm.encode(hm.tokenizer.decode(wrong)) != wrong:
            continue
        exs.append(Ex(p, right))                         # greedy continuation: exact match
        exs.append(Ex(p, hm.tokenizer.decode(wrong)))
    assert len(exs) >= 4
    scored = score_examples(hm, exs, batch_size=3)
    assert list(scored["idx"]) == list(range(len(exs)))
    for e, (_, row) in zip(exs, scored.iterrows()):
        gold = hm.encode(e.answer)
        greedy = _greedy_ids(hm, e.prompt, len(gold))
        assert row["exact_match"] == (greedy == gold)
        assert row["first_token_correct"] == (greedy[0] == gold[0])
    assert scored["exact_match"].tolist() == [True, False] * (len(exs) // 2)
    assert scored["first_token_correct"].all()
    # batched greedy decoding (right padding, no KV cache) equals one-by-one decoding
    gen = greedy_answers(hm, [e.prompt for e in exs[::2]], max_new_tokens=3, batch_size=4,
                         stop_at_eos=False)
    assert gen == [e.answer for e in exs[::2]]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_kv_cached_greedy_equals_uncached_one_by_one(name, request):
    # left padding + position ids + KV cache must decode every row as the bridge does alone
    hm = request.getfixturevalue(name)
    prompts = ["The city of Kel", "ab", "A much longer prompt about several things here", "Hello", "x y"]
    got = greedy_answers(hm, prompts, max_new_tokens=4, batch_size=3, stop_at_eos=False)
    want = [hm.tokenizer.decode(_greedy_ids(hm, p, 4)) for p in prompts]
    assert got == want


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_logits_at_equals_full_bridge_logits(name, request):
    hm = request.getfixturevalue(name)
    toks, _ = hm.tokenize(["The city of Kel is in", "ab cd", "Hello there friend"])
    rows, cols = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 5, 1, 2, 3])
    full = hm.logits(toks).float()
    assert torch.allclose(logits_at(hm, toks, rows, cols), full[rows, cols], atol=1e-5)


def test_answer_logprob_matches_independent_computation(tiny_qwen2):
    hm = tiny_qwen2
    ex = Ex("Hello there", " world")
    row = score_examples(hm, [ex, Ex("x", " yz")], batch_size=2).iloc[0]
    p, a = hm.encode(ex.prompt), hm.encode(ex.answer)
    logp = torch.log_softmax(hm.logits(torch.tensor([p + a]))[0], -1)
    want = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
    assert row["answer_logprob"] == pytest.approx(want, abs=1e-4)
    assert row["n_answer_tokens"] == len(a) and row["kind"] == "two_hop"


def test_route_context_entered_per_batch(tiny_llama):
    seen = []

    @contextlib.contextmanager
    def route(batch):
        seen.append(len(batch))
        yield

    score_examples(tiny_llama, [Ex("ab", " c")] * 5, batch_size=2, route=route)
    assert seen == [2, 2, 1]


def test_score_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match="empty"):
        score_examples(tiny_llama, [])
    with pytest.raises(ValueError, match="tokenises to no tokens"):
        score_examples(tiny_llama, [Ex("abc", "")])
    with pytest.raises(ValueError, match="batch_size"):
        score_examples(tiny_llama, [Ex("abc", " d")], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_answers(tiny_llama, [Ex("abc", " d")], max_new_tokens=0)


def test_accuracy_table_columns_and_values():
    rows = []
    for method, k in (("uniform", 3), ("arrow", 8)):
        for i in range(10):
            rows.append({"method": method, "library": "2-comb", "test_set": "F", "hop": "two_hop",
                         "first_token_correct": i < k, "exact_match": i < k - 1})
    table = accuracy_table(pd.DataFrame(rows))
    assert list(table.columns) == TABLE_COLUMNS
    assert len(table) == 4
    r = table[(table.method == "uniform") & (table.metric == "first_token")].iloc[0]
    assert r["n"] == 10 and r["accuracy"] == pytest.approx(0.3)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(3, 10))
    r = table[(table.method == "arrow") & (table.metric == "exact")].iloc[0]
    assert r["accuracy"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="missing grouping"):
        accuracy_table(pd.DataFrame(rows).drop(columns="hop"))
    with pytest.raises(ValueError, match="empty"):
        accuracy_table(pd.DataFrame())
    with pytest.raises(ValueError, match="unknown metric"):
        accuracy_table(pd.DataFrame(rows), metrics=("bleu",))
    extra = accuracy_table(pd.DataFrame(rows).assign(tier="F"),
                           by=("method", "library", "test_set", "hop", "tier"))
    assert list(extra.columns) == TABLE_COLUMNS[:4] + ["tier"] + TABLE_COLUMNS[4:]
    assert not math.isnan(extra["ci_low"].sum())


def test_length_sorted_batches_score_each_example_as_alone(tiny_llama):
    # batches are formed by token length; every row must equal scoring that example alone, in input order
    exs = [Ex("A much longer prompt about several things here", " yes"), Ex("ab", " c"),
           Ex("The city of Kel is in", " Vexmoor"), Ex("x", " y z"), Ex("Hello there", " w")]
    got = score_examples(tiny_llama, exs, batch_size=2)
    assert list(got["idx"]) == list(range(len(exs))) and list(got["prompt"]) == [e.prompt for e in exs]
    alone = pd.concat([score_examples(tiny_llama, [e]) for e in exs], ignore_index=True)
    assert np.allclose(got["answer_logprob"], alone["answer_logprob"], atol=1e-5)
    assert list(got["exact_match"]) == list(alone["exact_match"])


def _score_through_the_bridge(monkeypatch, hm, exs, **kw):
    import interp.evaluate as ev

    with monkeypatch.context() as m:
        m.setattr(ev, "_bridge_bypass_ok", lambda *a, **k: False)
        return score_examples(hm, exs, **kw)


def _bypass_entries(monkeypatch):
    """Count the entries into interp.surgery.bridge_bypassed (score_examples imports it per call)."""
    import interp.surgery as surgery

    entered, real = [], surgery.bridge_bypassed

    @contextlib.contextmanager
    def spy(model):
        with real(model) as n:
            entered.append(n)
            yield n

    monkeypatch.setattr(surgery, "bridge_bypassed", spy)
    return entered


@pytest.mark.parametrize("combine", [None, "uniform", "uniform_folded", "arrow"])
def test_scoring_without_the_bridge_wrappers_is_bit_identical(tmp_path, monkeypatch, combine):
    """After the first batch, scoring runs the transformers modules without the bridge's wrappers
    (checked bit-identical once per model): every column equals scoring through the bridge, for a
    base model, a hooked Uniform merge, a folded one and an input-dependent router (Arrow)."""
    from interp.adapters import fold_static_update, load_hooked, make_random_adapter
    from interp.models import load_model

    if combine is None:
        hm = load_model("tiny-llama")
    else:
        ads = {n: str(make_random_adapter("tiny-llama", tmp_path / n, r=4, seed=s)) for n, s in (("ab", 1), ("bc", 2))}
        hm = load_hooked("tiny-llama", ads, combine=combine.removesuffix("_folded"))
    exs = [Ex(f"The city of K{'e' * (i % 5)}l is in", f" Ar{'o' * (i % 3)}n") for i in range(11)]
    entered = _bypass_entries(monkeypatch)
    with fold_static_update(hm) if combine == "uniform_folded" else contextlib.nullcontext():
        want = _score_through_the_bridge(monkeypatch, hm, exs, batch_size=3)
        got = score_examples(hm, exs, batch_size=3)
    assert hm.info["bridge_bypass_exact"] is True
    assert len(entered) == 2 and entered[-1] > 0  # the exactness check, then batches 2..4
    pd.testing.assert_frame_equal(got, want)
    with fold_static_update(hm) if combine == "uniform_folded" else contextlib.nullcontext():
        again = score_examples(hm, exs, batch_size=3)  # checked: every batch bypasses the wrappers
    assert len(entered) == 3
    pd.testing.assert_frame_equal(again, want)
    assert type(hm.hf_model.model.layers[0]).__name__ == "BlockBridge"  # the wrappers are back


def test_hooks_or_fused_projections_keep_scoring_on_the_bridge(tiny_llama, monkeypatch):
    """A hook on any hook point fires for every batch (no bypass); a model whose bridge runs a
    fused projection as split copies (GPT-2) is never bypassed; bridge_bypassed puts the
    wrappers back on an error."""
    from interp.models import load_model
    from interp.surgery import bridge_bypassed, runs_split_copies

    entered = _bypass_entries(monkeypatch)
    calls = []
    with tiny_llama.bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))]):
        score_examples(tiny_llama, [Ex("ab", " c")] * 5, batch_size=2)
    assert len(calls) == 3 and entered == []
    gpt2 = load_model("tiny-gpt2")
    assert runs_split_copies(gpt2.hf_model) and not runs_split_copies(tiny_llama.hf_model)
    score_examples(gpt2, [Ex("ab", " c")] * 5, batch_size=2)
    assert entered == [] and "bridge_bypass_exact" not in gpt2.info
    layers = tiny_llama.hf_model.model.layers
    with pytest.raises(RuntimeError, match="boom"):
        with bridge_bypassed(tiny_llama.hf_model) as n:
            assert n > 0 and type(layers[0]).__name__ == "LlamaDecoderLayer"
            raise RuntimeError("boom")
    assert type(layers[0]).__name__ == "BlockBridge"


def test_torch_hooks_on_bridge_components_keep_scoring_on_the_bridge(monkeypatch):
    """A plain torch hook on a bridge component (``bridge.blocks[0]``, also the module in the HF
    model's slot) is not a hook point, yet the bypass would skip it: set after the verdict was
    cached, it must still fire and change the scores, as through the bridge."""
    from interp.models import load_model

    hm = load_model("tiny-llama")
    exs = [Ex(f"The city of K{'e' * (i % 5)}l is in", f" Ar{'o' * (i % 3)}n") for i in range(7)]
    before = score_examples(hm, exs, batch_size=3)
    assert hm.info["bridge_bypass_exact"] is True
    entered = _bypass_entries(monkeypatch)
    for register in (lambda f: hm.bridge.blocks[0].register_forward_hook(lambda m, i, o: f(o)),
                     lambda f: hm.bridge.blocks[1].mlp.register_forward_pre_hook(lambda m, a: (f(a[0]), *a[1:]))):
        zero = (lambda x: (x[0] * 0, *x[1:]) if isinstance(x, tuple) else x * 0)
        handle = register(zero)
        try:
            want = _score_through_the_bridge(monkeypatch, hm, exs, batch_size=3)
            got = score_examples(hm, exs, batch_size=3)
        finally:
            handle.remove()
        assert not want["answer_logprob"].equals(before["answer_logprob"])  # the hook matters
        pd.testing.assert_frame_equal(got, want)
    assert entered == []


def test_a_bypass_verdict_is_checked_again_when_the_bridge_computes_differently(monkeypatch):
    """The cached verdict belongs to how the model computed when it was checked: after
    ``set_use_attn_result`` (the bridge sums per-head results) or another attention kernel, the
    bypassed scores must still equal the bridge's, bit for bit."""
    from interp.models import load_model

    exs = [Ex(f"The city of K{'e' * (i % 5)}l is in", f" Ar{'o' * (i % 3)}n") for i in range(7)]
    for change in (lambda hm: hm.bridge.set_use_attn_result(True),
                   lambda hm: setattr(hm.hf_model.config, "_attn_implementation", "sdpa")):
        hm = load_model("tiny-llama")
        score_examples(hm, exs, batch_size=3)
        assert hm.info["bridge_bypass_exact"] is True
        change(hm)
        got = score_examples(hm, exs, batch_size=3)
        want = _score_through_the_bridge(monkeypatch, hm, exs, batch_size=3)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
