"""The one-layer key-value model's claims and the Zeng & Lee linear bound."""

import math

import pytest
import torch

from interp import theory as th
from interp.adapters.factors import LoraDelta


@pytest.fixture(scope="module")
def kv():
    return th.build_kv_model(seed=0)


def _other(model, x, rel, k=1):
    return (int(model.facts[x, rel]) + k) % model.n_entities


def test_model_stores_its_facts(kv):
    assert torch.equal(kv.answers(), kv.facts)
    assert kv.W.shape == (32, 256) and kv.keys().shape == (64, 256)
    with pytest.raises(th.TheoryError, match="exceed the MLP width"):
        th.build_kv_model(n_entities=40, n_relations=2, width=64)


def test_rank_one_edit_flips_exactly_that_fact(kv):
    for x, rel in [(0, 0), (3, 1), (17, 0)]:
        new = _other(kv, x, rel)
        dW = th.rank_one_edit(kv, x, rel, new)
        assert torch.linalg.matrix_rank(dW).item() == 1
        v = kv.key(x, rel)
        # closed form: (W + ΔW) v = i_new exactly
        assert torch.allclose(kv.scores(v, dW), torch.nn.functional.one_hot(torch.tensor(new), 32).double(),
                              atol=1e-9)
        rep = th.edit_report(kv, dW, x, rel, new)
        assert rep["flipped"]
        # disturbed facts, counted independently from the key overlaps: fact f changes iff its
        # score vector i_{y_f} + (i_new − i_old)·⟨v, k_f⟩/‖v‖² has a new argmax
        K = kv.keys()
        c = K @ v / (v @ v)
        old = int(kv.facts[x, rel])
        n_expected = 0
        for f, (xf, rf) in enumerate((a, b) for a in range(32) for b in range(2)):
            if (xf, rf) == (x, rel):
                continue
            s = torch.nn.functional.one_hot(kv.facts[xf, rf], 32).double()
            s[new] += c[f]
            s[old] -= c[f]
            n_expected += int(s.argmax() != kv.facts[xf, rf])
        assert rep["n_disturbed"] == n_expected
        assert rep["n_disturbed"] < 0.1 * 63
    with pytest.raises(th.TheoryError, match="already answers"):
        th.rank_one_edit(kv, 0, 0, int(kv.facts[0, 0]))


@pytest.mark.parametrize("mode", ["sum", "last"])
def test_summed_edits_do_not_answer_two_hop(kv, mode):
    t = th.two_hop_trials(kv, n_trials=60, mode=mode, seed=1)
    assert len(t) == 60
    # each hop is learned by the summed update ...
    assert t.hop1_ok.mean() >= 0.95 and t.hop2_ok.mean() >= 0.95
    # ... but the composed query is mostly not answered with c
    assert t.answers_c.mean() < 0.3
    if mode == "sum":
        assert t.answers_b.mean() > 0.5          # it outputs the bridge (first hop) instead
    # C's gain on the two-hop key does not depend on the bridge that the first edit installed
    assert torch.allclose(torch.tensor(t.c_gain.values), torch.tensor(t.c_gain_other_bridge.values), atol=1e-12)
    # the composing edit lies largely outside the two edits' spans
    assert t.oracle_span_deficit.mean() > 0.3


def test_composing_edit_answers_two_hop(kv):
    a, r1, r2 = 5, 0, 1
    vq = kv.two_hop_key(a, r1, r2)
    old = int(kv.scores(vq).argmax())
    c = (old + 3) % 32
    d = torch.zeros(32, dtype=torch.float64)
    d[c], d[old] = 1, -1
    assert int(kv.scores(vq, torch.outer(d, vq) / (vq @ vq)).argmax()) == c
    with pytest.raises(th.TheoryError, match="mode"):
        kv.two_hop_key(a, r1, r2, mode="concat")


def test_trained_lora_matches_closed_form(kv):
    for x, rel in [(2, 0), (9, 1)]:
        new = _other(kv, x, rel, 5)
        r = th.compare_lora_closed_form(kv, x, rel, new)
        assert r["lora_flips"] and r["closed_flips"]
        assert r["cosine"] > 0.99
        assert r["norm_ratio"] == pytest.approx(1.0, abs=0.05)
        assert r["loss"] < 1e-10


def _random_chain(D, L, seed):
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64)
          for _ in range(L)]
    return Ws, torch.randn(D, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("D,L,R", [(16, 3, 2), (12, 2, 3), (10, 4, 1), (8, 1, 3)])
def test_zeng_lee_construction_achieves_bound(D, L, R):
    Ws, Wt = _random_chain(D, L, seed=D * 10 + L)
    E = Wt - th._prod(Ws, D)
    bound = th.zeng_lee_error(E, R, L)
    assert bound == pytest.approx(float(torch.linalg.svdvals(E)[R * L]), rel=1e-12)
    dWs = th.zeng_lee_construction(Ws, Wt, R)
    assert all(torch.linalg.matrix_rank(d).item() <= R for d in dWs)
    err = th.chain_error(Ws, dWs, Wt)
    assert err == pytest.approx(bound, rel=1e-8)
    # no random rank-R-per-layer update beats it, nor small perturbations of the optimum
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        rnd = [torch.randn(D, R, generator=g, dtype=torch.float64) @ torch.randn(R, D, generator=g, dtype=torch.float64)
               * (0.1 if trial % 2 else 1.0) for _ in range(L)]
        assert th.chain_error(Ws, rnd, Wt) >= bound - 1e-9
        pert = []
        for d in dWs:
            U, S, Vh = torch.linalg.svd(d)
            Bf = U[:, :R] * S[:R] + 1e-3 * torch.randn(D, R, generator=g, dtype=torch.float64)
            Af = Vh[:R] + 1e-3 * torch.randn(R, D, generator=g, dtype=torch.float64)
            pert.append(Bf @ Af)
        assert th.chain_error(Ws, pert, Wt) >= bound - 1e-9


def test_zeng_lee_exact_threshold_and_min_rank():
    D, L = 12, 3
    Ws, Wt = _random_chain(D, L, seed=7)
    E = Wt - th._prod(Ws, D)
    R0 = th.zeng_lee_min_rank(E, 0.0, L)
    assert R0 == math.ceil(D / L)                 # generic E has full rank
    assert th.chain_error(Ws, th.zeng_lee_construction(Ws, Wt, R0), Wt) < 1e-8
    s = torch.linalg.svdvals(E)
    eps = float(s[5]) * 1.0001                    # 5 singular values above eps
    R = th.zeng_lee_min_rank(E, eps, L)
    assert R == 2
    assert th.zeng_lee_error(E, R, L) <= eps < th.zeng_lee_error(E, R - 1, L)
    assert th.zeng_lee_error(E, 0, L) == pytest.approx(float(s[0]))
    with pytest.raises(th.TheoryError, match="R >= 0"):
        th.zeng_lee_error(E, -1, L)


def test_rank_need_table_closed_form():
    g = torch.Generator().manual_seed(3)
    D, k = 40, 6
    U = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0]
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    mods = [f"model.layers.{l}.mlp.up_proj" for l in range(4)]
    oracle = {m: LoraDelta(V.T.clone(), U * sig, 1.0) for m in mods}
    # candidate: the oracle's top-2 directions (a rank-2 "merge") -> residual spectrum [2, 1, .5, .25]
    cand = {m: LoraDelta(V[:, :2].T.clone(), U[:, :2] * sig[:2], 1.0) for m in mods}
    t = th.rank_need_table(oracle, cand, eps=0.1, block_size=2)
    tail = sig[2:] ** 2
    expect = next(kk for kk in range(5) if float(tail[kk:].sum()) <= 0.01 * float(tail.sum()))
    assert (t.r_need == expect).all() and (t.r_avail == 2).all()
    assert t.tail_ratio.iloc[0] == pytest.approx(0.5 / 2.0, rel=1e-9)
    assert not t.sufficient.any()
    assert (t.block_avail == 4).all() and (t.block_need == expect).all()
    assert list(t.block) == [0, 0, 1, 1]
    t2 = th.rank_need_table(oracle, None, eps=0.1, available_rank=6)
    assert t2.sufficient.all()
    with pytest.raises(th.TheoryError, match="candidate or available_rank"):
        th.rank_need_table(oracle)
