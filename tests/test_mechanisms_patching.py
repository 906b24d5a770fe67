"""Patching engine vs TransformerLens's own sweeps, back-patching, knockout, pairs, difference."""

import dataclasses

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

from interp.mechanisms.patching import (
    PatchPair,
    activation_patching,
    attention_knockout,
    back_patching,
    difference,
    _pack,
    auto_prompt_chunk,
    default_max_batch,
    stacked_ok,
    make_corrupted_pairs,
    patch_layer_pos,
)
from stand_ins import example as Ex




def make_examples():
    names = ["Zorba", "Quinn", "Milos", "Ferna", "Abdul", "Vexin"]
    # no leading space: the byte tokenizer would make every first answer token " "
    answers = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Bern"]
    out = []
    for i, (n, a) in enumerate(zip(names, answers)):
        prompt = f"The boss of {n} lives in"
        s = prompt.index(n)
        out.append(Ex(prompt, a, n, f"Boss{i}", a.strip(), chain_id=i,
                      char_spans={"e1": (s, s + len(n))}))
    return out


def byte_spans(hm, ex):
    """Token spans computed independently: tokens of the text before / through the mention."""
    out = {}
    for k, (a, b) in ex.char_spans.items():
        # the tiny tokenizer merges a space with the next letter: " Z" opens the mention
        pre = ex.prompt[:a]
        start = len(hm.encode(pre[:-1])) if pre.endswith(" ") and ex.prompt[a:a + 1].isalpha() else len(hm.encode(pre))
        out[k] = (start, len(hm.encode(ex.prompt[:b])))
    return out


def _setup(hm):
    clean = ["Alice lives in Paris", "Bob works at a bank", "Carl met Dana"]
    corr = ["Xlice lives in Paris", "Qob works at a bank", "Zarl met Dana"]
    ct, cl = hm.tokenize(clean)
    xt, xl = hm.tokenize(corr)
    assert torch.equal(cl, xl) and len(set(cl.tolist())) > 1  # unequal lengths on purpose
    g = torch.Generator().manual_seed(0)
    ca = torch.randint(3, 259, (3,), generator=g)
    xa = (ca + 7) % 256 + 3
    with torch.no_grad():
        clean_logits, clean_cache = hm.bridge.run_with_cache(ct)
    fin, ar = cl - 1, torch.arange(3)

    def metric(logits):
        return logits[ar, fin, ca] - logits[ar, fin, xa]
    return ct, xt, cl, ca, xa, clean_cache, metric, metric(clean_logits)


@pytest.mark.parametrize("model,hook,tl_fn,skip,stack", [
    ("tiny_llama", "resid_pre", tlp.get_act_patch_resid_pre, True, None),
    ("tiny_llama", "resid_pre", tlp.get_act_patch_resid_pre, False, None),  # every copy recomputed
    ("tiny_llama", "resid_pre", tlp.get_act_patch_resid_pre, False, False),  # one forward per layer
    ("tiny_qwen2", "resid_pre", tlp.get_act_patch_resid_pre, True, None),
    ("tiny_qwen2", "attn_out", tlp.get_act_patch_attn_out, True, None),
    ("tiny_qwen2", "attn_out", tlp.get_act_patch_attn_out, False, None),
    ("tiny_qwen2", "mlp_out", tlp.get_act_patch_mlp_out, False, False),
    ("tiny_llama", "mlp_out", tlp.get_act_patch_mlp_out, True, None),
    ("tiny_llama", "blocks.{layer}.hook_attn_out", tlp.get_act_patch_attn_out, True, None),  # full fwd
])
def test_layer_pos_sweep_equals_transformer_lens(model, hook, tl_fn, skip, stack, request):
    hm = request.getfixturevalue(model)
    ct, xt, cl, ca, xa, clean_cache, metric, clean_ld = _setup(hm)
    with torch.no_grad():
        ref = tl_fn(hm.bridge, xt, clean_cache, metric, reduce="none", baseline=True)
    grid = patch_layer_pos(hm, ct, xt, ca, xa, cl, hook=hook, max_batch=7, progress=False,
                           fast=None if hook in ("resid_pre", "attn_out", "mlp_out") else False,
                           skip_unchanged=skip, stack_layers=stack)
    assert grid.logit_diff.shape == ref.values.shape == (hm.n_layers, ct.shape[1], 3)
    assert (grid.logit_diff - ref.values).abs().max().item() <= 1e-4
    assert (grid.corrupted - ref.baseline).abs().max().item() <= 1e-4
    assert (grid.clean - clean_ld).abs().max().item() <= 1e-4
    ref_norm = (ref.values - ref.baseline) / (clean_ld - ref.baseline)
    assert (grid.value - ref_norm).abs().max().item() <= 1e-3
    assert grid.logit_diff.std() > 1e-3  # the sweep has signal


@pytest.mark.parametrize("hook,fast", [("resid_pre", None), ("mlp_out", None),
                                       ("blocks.{layer}.hook_attn_out", False)])
def test_prompt_chunks_give_the_unchunked_grid(tiny_llama, hook, fast):
    hm = tiny_llama
    ct, xt, cl, ca, xa, *_ = _setup(hm)
    whole = patch_layer_pos(hm, ct, xt, ca, xa, cl, hook=hook, fast=fast, prompt_chunk=3,
                            progress=False)
    for chunk in (1, 2):
        part = patch_layer_pos(hm, ct, xt, ca, xa, cl, hook=hook, fast=fast, prompt_chunk=chunk,
                               progress=False)
        # equal up to fp32 rounding (batch composition changes reduction order), not bitwise
        torch.testing.assert_close(part.logit_diff, whole.logit_diff, atol=1e-5, rtol=0)
        torch.testing.assert_close(part.clean, whole.clean, atol=1e-5, rtol=0)
        torch.testing.assert_close(part.corrupted, whole.corrupted, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt_chunk"):
        patch_layer_pos(hm, ct, xt, ca, xa, cl, prompt_chunk=0, progress=False)


def test_defaults_and_packing(tiny_llama):
    assert default_max_batch(tiny_llama, 16) == 64                # CPU; CUDA: from free memory
    assert stacked_ok(tiny_llama)
    assert auto_prompt_chunk(tiny_llama, 16, 8) >= 1000          # 1 GiB on the CPU
    assert auto_prompt_chunk(tiny_llama, 16, 8, budget_bytes=1) == 1
    assert auto_prompt_chunk(tiny_llama, 64, 8, budget_bytes=1 << 24) < \
        auto_prompt_chunk(tiny_llama, 16, 8, budget_bytes=1 << 24)
    seg = (16, 15, 14, 3, 2, 1, 1, 9, 8)
    for cap, most in ((16, 64), (17, 2), (16, 1)):
        rows = _pack(seg, cap, most)
        placed = sorted(i for row in rows for i, _ in row)
        assert placed == list(range(len(seg)))
        for row in rows:
            assert len(row) <= most and sum(seg[i] for i, _ in row) <= cap
            ends = sorted((o, o + seg[i]) for i, o in row)
            assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # segments do not overlap
    assert len(_pack(tuple(range(1, 17)), 17, 64)) == 8             # suffixes 1..16 pair up


def test_subset_and_bad_input(tiny_llama):
    hm = tiny_llama
    ct, xt, cl, ca, xa, clean_cache, metric, _ = _setup(hm)
    full = patch_layer_pos(hm, ct, xt, ca, xa, cl, progress=False)
    sub = patch_layer_pos(hm, ct, xt, ca, xa, cl, layers=[2], positions=[1, 4], max_batch=1,
                          progress=False)
    assert torch.allclose(sub.logit_diff, full.logit_diff[[2]][:, [1, 4]], atol=1e-4)
    with pytest.raises(ValueError, match="blocks"):
        patch_layer_pos(hm, ct, xt, ca, xa, cl, hook="hook_embed", progress=False)
    with pytest.raises(ValueError, match="did not fire"):
        patch_layer_pos(hm, ct, xt, ca, xa, cl, hook="blocks.{layer}.no_such_hook", progress=False)
    with pytest.raises(ValueError, match="equal"):
        patch_layer_pos(hm, ct, xt[:, :-1], ca, xa, cl, progress=False)


def test_corrupted_pairs_and_table(tiny_llama):
    hm = tiny_llama
    exs = make_examples()
    spans = [byte_spans(hm, ex) for ex in exs]
    pairs = make_corrupted_pairs(exs, hm, seed=1, spans=spans)
    assert len(pairs) == len(exs)
    for p in pairs:
        assert len(hm.encode(p.clean_prompt)) == len(hm.encode(p.corrupted_prompt))
        assert hm.encode(p.clean_answer)[0] != hm.encode(p.corrupted_answer)[0]
        assert p.corrupted_prompt != p.clean_prompt
    assert make_corrupted_pairs(exs, hm, seed=1, spans=spans) == pairs  # seeded
    df = activation_patching(hm, pairs[:3], hooks=("resid_pre",), progress=False)
    T = len(hm.encode(exs[0].prompt))
    assert len(df) == 3 * hm.n_layers * T
    assert set(df["position_label"]) >= {"e1_0", "e1_last", "final", "other"}
    # Closed form: at layer 0 resid_pre is the token embedding, so positions where clean and
    # corrupted tokens agree patch nothing (value 0), and the final position at layer 0 carries
    # everything the corrupted run is missing only if e1 tokens... (checked: value 0 off-span).
    l0 = df[(df.layer == 0) & (~df.position_label.str.startswith("e1"))]
    assert l0["value"].abs().max() < 1e-4
    # Patching every position at layer 0 would restore the clean run; one e1 token does not.
    assert df[df.layer == 0].groupby("example_id")["value"].apply(lambda v: v.abs().max()).min() > 0
    with pytest.raises(ValueError, match="donor"):
        make_corrupted_pairs(exs[:1], hm, spans=spans[:1])
    bad = PatchPair(0, "abc", "abcd", "x", "y")
    with pytest.raises(ValueError, match="token length"):
        activation_patching(hm, [bad], hooks=("resid_pre",), progress=False)


def test_back_patching_diagonal_is_noop_and_offdiagonal_matches_hooks(tiny_qwen2):
    hm = tiny_qwen2
    exs = make_examples()[:3]
    exs[1] = dataclasses.replace(exs[1], prompt=exs[1].prompt + " the")  # unequal lengths
    df = back_patching(hm, exs, max_batch=5, progress=False)
    L = hm.n_layers
    assert len(df) == 3 * L * (L + 1) // 2
    diag = df[df.source_layer == df.target_layer]
    assert (diag["logprob"] - diag["base_logprob"]).abs().max() < 1e-4
    assert not diag["fixed"].any() and (diag["correct"] == diag["was_correct"]).all()
    assert (df.target_layer <= df.source_layer).all()
    # independent computation of one off-diagonal cell: full forward with a resid_pre hook
    ls, lt, b = 3, 1, 1
    toks, lengths = hm.tokenize([ex.prompt for ex in exs])
    f = int(lengths[b]) - 1
    with torch.no_grad():
        _, cache = hm.bridge.run_with_cache(toks)
        src = cache[f"blocks.{ls}.hook_resid_pre"][b, f].clone()

        def hook(x, hook):
            x = x.clone()
            x[b, f] = src
            return x
        logits = hm.bridge.run_with_hooks(toks, fwd_hooks=[(f"blocks.{lt}.hook_resid_pre", hook)])
    ans = hm.encode(exs[b].answer)[0]
    want = torch.log_softmax(logits[b, f], -1)[ans].item()
    got = df[(df.source_layer == ls) & (df.target_layer == lt) & (df.example_id == b)]["logprob"]
    assert abs(got.item() - want) < 1e-4
    assert abs(want - diag[diag.example_id == b]["base_logprob"].iloc[0]) > 1e-4  # it did change
    sub = back_patching(hm, exs, source_layers=[3, 3, 1], target_layers=[1], progress=False)
    assert len(sub) == 3 * 2  # duplicate layers ignored
    for kwargs, msg in [({"source_layers": [0], "target_layers": [3]}, "no cell"), ({"max_batch": 0}, "max_batch")]:
        with pytest.raises(ValueError, match=msg):
            back_patching(hm, exs, progress=False, **kwargs)
    with pytest.raises(ValueError, match="answer"):
        back_patching(hm, [dataclasses.replace(exs[0], answer="")], progress=False)


def test_attention_knockout(tiny_llama):
    hm = tiny_llama
    exs = make_examples()[:3]
    exs[2] = dataclasses.replace(exs[2], prompt=exs[2].prompt + " now")
    spans = [byte_spans(hm, ex) for ex in exs]
    empty = [{"e1": (s["e1"][0], s["e1"][0])} for s in spans]
    none = attention_knockout(hm, exs, window=2, spans=empty, progress=False)
    assert len(none) == 3 * hm.n_layers
    assert none["delta"].abs().max() < 1e-4
    real = attention_knockout(hm, exs, window=2, spans=spans, max_batch=2, progress=False)
    assert real["delta"].abs().max() > 1e-3
    # independent computation: zero the pattern row and renormalise, full forward
    c, b = 1, 2
    row = real[(real.layer == c) & (real.example_id == b)].iloc[0]
    toks, lengths = hm.tokenize([ex.prompt for ex in exs])
    f = int(lengths[b]) - 1
    a, e = spans[b]["e1"]

    def renorm(p, hook):
        p = p.clone()
        p[b, :, f, a:e] = 0
        p[b, :, f] = p[b, :, f] / p[b, :, f].sum(-1, keepdim=True)
        return p
    hooks = [(f"blocks.{l}.attn.hook_pattern", renorm)
             for l in range(int(row.first_layer), int(row.last_layer) + 1)]
    with torch.no_grad():
        logits = hm.bridge.run_with_hooks(toks, fwd_hooks=hooks)
    want = torch.log_softmax(logits[b, f], -1)[hm.encode(exs[b].answer)[0]].item()
    assert abs(row.logprob - want) < 1e-4
    assert (row.first_layer, row.last_layer) == (1, 2)
    with pytest.raises(ValueError, match="window"):
        attention_knockout(hm, exs, window=0, spans=spans, progress=False)


def _alone(hm, ex, hooks=()):
    """Log-probabilities at the final position of ``ex.prompt`` run alone (no batch, no padding,
    no cache): the ungrouped, uncached reference of the grouped engines."""
    toks = torch.tensor([hm.encode(ex.prompt)])
    with torch.no_grad():
        logits = hm.bridge.run_with_hooks(toks, fwd_hooks=list(hooks))
    return torch.log_softmax(logits[0, -1].float(), -1)


def test_grouped_back_patching_and_knockout_equal_each_prompt_alone(tiny_llama):
    """Every cell of the length-grouped, cache-reading engines (back-patching's diagonal read from
    the clean run's cache; knockout computing the final position only) equals a full forward of
    that prompt alone with the intervention as a hook."""
    hm = tiny_llama
    exs = make_examples()[:4]
    exs[1] = dataclasses.replace(exs[1], prompt=exs[1].prompt + " the")  # three prompt lengths
    exs[3] = dataclasses.replace(exs[3], prompt=exs[3].prompt + " a big")
    assert len({len(hm.encode(e.prompt)) for e in exs}) == 3
    L = hm.n_layers
    bp = back_patching(hm, exs, max_batch=3, progress=False)
    assert len(bp) == 4 * L * (L + 1) // 2
    for b, ex in enumerate(exs):
        ans = hm.encode(ex.answer)[0]
        base = _alone(hm, ex)
        toks = torch.tensor([hm.encode(ex.prompt)])
        with torch.no_grad():
            _, cache = hm.bridge.run_with_cache(toks)
        for ls in range(L):
            for lt in range(ls + 1):
                src = cache[f"blocks.{ls}.hook_resid_pre"][0, -1].clone()

                def put(x, hook, src=src):
                    x = x.clone()
                    x[0, -1] = src
                    return x
                lp = _alone(hm, ex, [(f"blocks.{lt}.hook_resid_pre", put)])
                row = bp[(bp.example_id == b) & (bp.source_layer == ls) & (bp.target_layer == lt)].iloc[0]
                assert row.logprob == pytest.approx(float(lp[ans]), abs=1e-4), (b, ls, lt)
                assert row.correct == (int(lp.argmax()) == ans)
                assert row.base_logprob == pytest.approx(float(base[ans]), abs=1e-4)
    ko = attention_knockout(hm, exs, window=3, spans=[byte_spans(hm, e) for e in exs], max_batch=3, progress=False)
    assert len(ko) == 4 * L and ko["delta"].abs().max() > 1e-3
    for b, ex in enumerate(exs):
        a, e = byte_spans(hm, ex)["e1"]
        ans = hm.encode(ex.answer)[0]

        def renorm(pat, hook):  # zero the final row's weights on the span, renormalise
            pat = pat.clone()
            pat[0, :, -1, a:e] = 0
            pat[0, :, -1] = pat[0, :, -1] / pat[0, :, -1].sum(-1, keepdim=True)
            return pat
        for _, row in ko[ko.example_id == b].iterrows():
            hooks = [(f"blocks.{l}.attn.hook_pattern", renorm) for l in range(int(row.first_layer), int(row.last_layer) + 1)]
            assert row.logprob == pytest.approx(float(_alone(hm, ex, hooks)[ans]), abs=1e-4), (b, row.layer)


def test_difference():
    a = pd.DataFrame({"layer": [0, 0, 1], "position_label": ["f", "f", "f"], "value": [1., 3., 5.]})
    b = pd.DataFrame({"layer": [0, 1, 2], "position_label": ["f", "f", "f"], "value": [0.5, 1., 9.]})
    d = difference(a, b, on=["layer", "position_label"], labels=("uniform", "oracle"))
    assert d["difference"].tolist() == [1.5, 4.0]
    assert list(d.columns) == ["layer", "position_label", "value_uniform", "value_oracle",
                               "difference"]
    with pytest.raises(ValueError, match="lacks"):
        difference(a, b.drop(columns="value"), on=["layer"])
    with pytest.raises(ValueError, match="share no"):
        difference(a, b.assign(layer=b.layer + 10), on=["layer"])


def test_resid_mid_equals_transformer_lens_own_patch(tiny_llama):
    """``blocks.{layer}.hook_resid_mid`` (patched with full forwards) against the bridge's own
    ``run_with_hooks`` patch of the same hook, one (layer, position) cell at a time."""
    hm = tiny_llama
    ct, xt, cl, ca, xa, clean_cache, metric, _ = _setup(hm)
    hook = "blocks.{layer}.hook_resid_mid"
    grid = patch_layer_pos(hm, ct, xt, ca, xa, cl, hook=hook, layers=[0, 2], positions=[0, 3, 5],
                           progress=False)
    for i, layer in enumerate(grid.layers):
        name = hook.format(layer=layer)
        for j, p in enumerate(grid.positions):
            def patch(act, hook, p=p):
                act = act.clone()
                act[:, p] = clean_cache[name][:, p]
                return act
            with torch.no_grad():
                ref = metric(hm.bridge.run_with_hooks(xt, fwd_hooks=[(name, patch)]))
            live = p <= cl - 1  # positions after a prompt's end cannot change its answer
            assert (grid.logit_diff[i, j][live] - ref[live]).abs().max().item() <= 1e-4
    assert grid.logit_diff.std() > 1e-3


def test_resid_mid_patch_reaches_only_the_mlp_input(tiny_llama):
    """Semantics stated in ``patch_layer_pos``: on the bridge, ``hook_resid_mid`` is an alias of
    ``ln2.hook_in``; patching it replaces the MLP's input only, while the skip connection keeps the
    corrupted residual. So patching it at every position with the clean values equals patching
    ``hook_mlp_out`` with the clean MLP output, and does NOT restore the clean logits (as
    HookedTransformer's resid_mid patch would)."""
    hm = tiny_llama
    ct, xt, cl, ca, xa, clean_cache, metric, clean_ld = _setup(hm)
    mid, mlp = "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"
    with torch.no_grad():
        out = metric(hm.bridge.run_with_hooks(xt, fwd_hooks=[(mid, lambda act, hook: clean_cache[mid])]))
        via_mlp = metric(hm.bridge.run_with_hooks(xt, fwd_hooks=[(mlp, lambda act, hook: clean_cache[mlp])]))
    assert (out - via_mlp).abs().max().item() <= 1e-4
    assert (out - clean_ld).abs().max().item() > 1e-2
    torch.testing.assert_close(clean_cache[mid], clean_cache["blocks.1.hook_resid_pre"]
                               + clean_cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hook", ["blocks.{layer}.attn.hook_pattern", "blocks.{layer}.attn.hook_attn_scores",
                                  "blocks.{layer}.attn.hook_cos"])
def test_head_or_batch_axis_hooks_are_refused(tiny_llama, hook):
    """A hook whose activation is not [batch, pos, ...] would patch head p (or fail): refused by
    name (head axis first) or by its cached shape, with the supported hooks listed."""
    from interp.errors import InterpError, UnsupportedHookError

    hm = tiny_llama
    ct, xt, cl, ca, xa, *_ = _setup(hm)
    with pytest.raises(UnsupportedHookError, match="supported: short names") as e:
        patch_layer_pos(hm, ct, xt, ca, xa, cl, hook=hook, layers=[0], progress=False)
    assert isinstance(e.value, InterpError) and isinstance(e.value, ValueError)


def test_hook_z_patches_every_head_at_the_position(tiny_llama):
    """attn.hook_z is [batch, pos, head, d_head]: a cell patches all heads at position p."""
    hm = tiny_llama
    ct, xt, cl, ca, xa, clean_cache, metric, _ = _setup(hm)
    grid = patch_layer_pos(hm, ct, xt, ca, xa, cl, hook="blocks.{layer}.attn.hook_z", layers=[1],
                           positions=[4], progress=False)
    name = "blocks.1.attn.hook_z"

    def patch(act, hook):
        act = act.clone()
        act[:, 4] = clean_cache[name][:, 4]
        return act
    with torch.no_grad():
        ref = metric(hm.bridge.run_with_hooks(xt, fwd_hooks=[(name, patch)]))
    assert (grid.logit_diff[0, 0] - ref).abs().max().item() <= 1e-4
