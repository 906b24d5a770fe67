"""Subspace geometry of LoRA updates, checked against dense computations and closed forms."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interp.adapters.factors import LoraDelta
from interp import subspace as sp


def rand_delta(d_out, d_in, r, seed, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return LoraDelta(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                     torch.randn(d_out, r, generator=g, dtype=torch.float64), scale)


def orthonormal(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def constructed(sigma, d_out=40, d_in=30, seed=0):
    """ΔW = U diag(σ) Vᵀ with known singular values, as LoraDelta(A = Vᵀ, B = U diag σ)."""
    k = len(sigma)
    U, V = orthonormal(d_out, k, seed), orthonormal(d_in, k, seed + 1)
    return LoraDelta(V.T.clone(), U * torch.tensor(sigma, dtype=torch.float64), 1.0), U, V


# ---------------------------------------------------------------- spectrum and ranks


@pytest.mark.parametrize("d_out,d_in,r", [(50, 30, 8), (17, 64, 5), (6, 9, 12), (128, 96, 16)])
def test_spectrum_matches_dense_svd(d_out, d_in, r):
    d = rand_delta(d_out, d_in, r, seed=d_out + r)
    fast, dense = sp.spectrum(d), torch.linalg.svdvals(d.dense())
    k = min(r, d_out, d_in)
    assert fast.shape == (r,)
    assert torch.allclose(fast[:k], dense[:k], rtol=1e-5, atol=1e-12 * float(dense[0]))
    assert torch.all(fast[k:] == 0)
    assert torch.allclose(sp.spectrum(d, dense=True), fast, rtol=1e-9, atol=1e-9 * float(dense[0]))


def test_factor_svd_reconstructs_and_is_orthonormal():
    d = rand_delta(40, 25, 6, seed=3)
    U, S, V = sp.factor_svd(d)
    assert torch.allclose(U @ torch.diag(S) @ V.T, d.dense(), atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(V.T @ V, torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_factor_svd_memo_follows_edits_of_the_factors():
    d = rand_delta(40, 25, 6, seed=3)
    first = sp.factor_svd(d)
    assert sp.factor_svd(d) is first  # memoised
    with torch.no_grad():
        d.A.mul_(2.0)  # in place: the version counter moves
    assert torch.allclose(sp.factor_svd(d)[1], 2 * first[1], rtol=1e-12)
    d.B = d.B[:, :6].clone() * 3  # replaced tensor: the identity moves
    assert torch.allclose(sp.factor_svd(d)[1], 6 * first[1], rtol=1e-12)
    d.scale = -d.scale
    assert torch.allclose(sp.spectrum(d), torch.linalg.svdvals(d.dense())[:6], rtol=1e-9)


def test_negative_scale_gives_nonnegative_spectrum():
    d = rand_delta(20, 15, 4, seed=1, scale=-2.0)
    assert torch.all(sp.spectrum(d) >= 0)
    assert torch.allclose(sp.spectrum(d), torch.linalg.svdvals(d.dense())[:4], rtol=1e-9)


def test_ranks_of_constructed_flat_spectrum():
    for k in (1, 3, 7):
        d, _, _ = constructed([2.0] * k)
        s = sp.spectrum(d)
        assert torch.allclose(s, torch.full((k,), 2.0, dtype=torch.float64), rtol=1e-10)
        assert sp.effective_rank(s) == pytest.approx(k, rel=1e-10)
        assert sp.stable_rank(s) == pytest.approx(k, rel=1e-10)
        assert sp.participation_ratio(s) == pytest.approx(k, rel=1e-10)
        assert sp.energy_rank(s, 0.9) == math.ceil(0.9 * k)
        assert sp.energy_rank(s, 0.99) == math.ceil(0.99 * k)


def test_ranks_of_constructed_two_level_spectrum():
    d, _, _ = constructed([3.0, 1.0])
    s = sp.spectrum(d)
    p = np.array([0.75, 0.25])
    assert sp.effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert sp.stable_rank(s) == pytest.approx(10 / 9, rel=1e-10)
    assert sp.participation_ratio(s) == pytest.approx(100 / 82, rel=1e-10)
    assert sp.energy_rank(s, 0.9) == 1      # 9/10 of the energy in σ₁
    assert sp.energy_rank(s, 0.99) == 2
    assert sp.tail_energy_rank(s, 0.5) == 1  # tail 1/10 ≤ 0.25
    assert sp.tail_energy_rank(s, 0.3) == 2  # tail 1/10 > 0.09


def test_rank_deficient_update_has_known_rank():
    g = torch.Generator().manual_seed(5)
    B = torch.randn(30, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 6, generator=g, dtype=torch.float64)
    d = LoraDelta(torch.randn(6, 20, generator=g, dtype=torch.float64), B, 1.0)
    s = sp.spectrum(d)
    assert int((s > 1e-10 * s[0]).sum()) == 2
    U, V = sp.left_right_bases(d)
    assert U.shape == (30, 2) and V.shape == (20, 2)
    assert sp.effective_rank(s) <= 2 + 1e-9


def test_rank_statistics_reject_bad_input():
    with pytest.raises(sp.SubspaceError, match="zero"):
        sp.effective_rank(torch.zeros(3))
    with pytest.raises(sp.SubspaceError, match=">= 0"):
        sp.stable_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="tau"):
        sp.energy_rank(torch.ones(3), 1.5)
    with pytest.raises(sp.SubspaceError, match="LoraDelta"):
        sp.spectrum(torch.ones(3, 3))
    with pytest.raises(sp.SubspaceError, match="k="):
        sp.left_right_bases(rand_delta(5, 5, 2, 0), k=3)


# ---------------------------------------------------------------- subspace overlap


def test_identical_subspaces_angles_zero_phi_one():
    U = orthonormal(50, 6, 0)
    rot = orthonormal(6, 6, 1)
    for Q2 in (U, U @ rot):                 # the same span in another basis
        th = sp.principal_angles(U, Q2)
        assert th.shape == (6,)
        assert float(th.max()) < 1e-7
        assert sp.subspace_similarity(U, Q2) == pytest.approx(1.0, abs=1e-12)
        assert sp.grassmann_distance(U, Q2) < 1e-7


def test_orthogonal_subspaces_phi_zero():
    Q = orthonormal(40, 10, 2)
    U1, U2 = Q[:, :4], Q[:, 4:10]
    assert sp.subspace_similarity(U1, U2) == pytest.approx(0.0, abs=1e-12)
    th = sp.principal_angles(U1, U2)
    assert torch.allclose(th, torch.full((4,), math.pi / 2, dtype=torch.float64), atol=1e-10)
    assert sp.grassmann_distance(U1, U2) == pytest.approx(math.pi / 2 * 2, rel=1e-10)
    assert sp.grassmann_distance(U1, U2, "projection") == pytest.approx(2.0, rel=1e-10)


@pytest.mark.parametrize("theta", [1e-4, 0.3, 1.2])
def test_principal_angle_known_value(theta):
    Q = orthonormal(12, 3, 4)
    e1, e2, e3 = Q.T
    U1 = torch.stack([e1, e3], 1)
    U2 = torch.stack([math.cos(theta) * e1 + math.sin(theta) * e2, e3], 1)
    th = sp.principal_angles(U1, U2)
    assert torch.allclose(th, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-12)
    assert sp.grassmann_distance(U1, U2) == pytest.approx(theta, rel=1e-9)
    d_p = sp.grassmann_distance(U1, U2, "projection")
    assert d_p == pytest.approx(math.sin(theta), rel=1e-9)
    # φ = 1 − d_P²/p
    assert sp.subspace_similarity(U1, U2) == pytest.approx(1 - d_p ** 2 / 2, abs=1e-12)


def test_phi_partial_containment_and_leading_columns():
    Q = orthonormal(30, 8, 7)
    U1, U2 = Q[:, :4], Q[:, 2:8]            # share 2 directions
    assert sp.subspace_similarity(U1, U2) == pytest.approx(2 / 4, abs=1e-12)
    assert sp.subspace_similarity(U1, U2, i=2, j=6) == pytest.approx(0.0, abs=1e-12)
    assert sp.subspace_similarity(U1, U2, i=4, j=1) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(sp.SubspaceError, match="i=5"):
        sp.subspace_similarity(U1, U2, i=5)
    with pytest.raises(sp.SubspaceError, match="same d"):
        sp.principal_angles(U1, orthonormal(31, 2, 0))


def test_task_cosine_matches_dense():
    d1, d2 = rand_delta(33, 21, 5, 1), rand_delta(33, 21, 3, 2, scale=-1.3)
    a, b = d1.dense().flatten(), d2.dense().flatten()
    dense = float(a @ b / (a.norm() * b.norm()))
    assert sp.task_cosine(d1, d2) == pytest.approx(dense, abs=1e-12)
    assert sp.frobenius_inner(d1, d2) == pytest.approx(float(a @ b), rel=1e-10)
    assert sp.task_cosine(d1, d1) == pytest.approx(1.0, abs=1e-12)
    neg = LoraDelta(d1.A, d1.B, -d1.scale)
    assert sp.task_cosine(d1, neg) == pytest.approx(-1.0, abs=1e-12)
    with pytest.raises(sp.SubspaceError, match="different shapes"):
        sp.task_cosine(d1, rand_delta(21, 33, 3, 0))


def test_sign_conflict_exact_matches_dense_and_sample_is_close():
    d1, d2 = rand_delta(70, 50, 4, 11), rand_delta(70, 50, 4, 12)
    x1, x2 = d1.dense(), d2.dense()
    both = (x1 != 0) & (x2 != 0)
    expected = int(((x1 * x2 < 0) & both).sum()) / int(both.sum())
    assert sp.sign_conflict_rate(d1, d2, chunk_rows=16) == pytest.approx(expected, abs=1e-15)
    est = sp.sign_conflict_rate(d1, d2, sample=20000, seed=3)
    assert abs(est - expected) < 4 * 0.5 / math.sqrt(20000)
    assert sp.sign_conflict_rate(d1, LoraDelta(d1.A, d1.B, -2.0)) == 1.0
    assert sp.sign_conflict_rate(d1, LoraDelta(d1.A, d1.B, 3.0)) == 0.0


# ---------------------------------------------------------------- base weight


def test_amplification_factor_matches_dense():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(40, 24, generator=g, dtype=torch.float64)
    d = rand_delta(40, 24, 3, 8, scale=0.1)
    U, S, Vh = torch.linalg.svd(d.dense(), full_matrices=False)
    expected = float(d.dense().norm() / (U[:, :3].T @ W @ Vh[:3].T).norm())
    assert sp.amplification_factor(d, W) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(sp.SubspaceError, match="does not match"):
        sp.amplification_factor(d, W.T)


def test_intruder_dimensions_constructed():
    n = 16
    W = torch.diag(torch.linspace(2.0, 1.0, n, dtype=torch.float64))   # singular vectors e_i
    u = torch.zeros(n, dtype=torch.float64)
    u[:4] = 0.5                              # max |cos| with every e_i is 0.5
    big = LoraDelta(u[None, :].clone(), 100 * u[:, None].clone(), 1.0)
    assert sp.intruder_dimensions(W, big, k=1, eps=[0.4, 0.6]) == {0.4: 0, 0.6: 1}
    for side in ("left", "right"):
        assert sp.intruder_dimensions(W, big, k=1, eps=0.6, side=side) == {0.6: 1}
    tiny = LoraDelta(u[None, :].clone(), 1e-6 * u[:, None].clone(), 1.0)
    assert sp.intruder_dimensions(W, tiny, k=5, eps=0.9) == {0.9: 0}
    with pytest.raises(ValueError, match="k must"):
        sp.intruder_dimensions(W, tiny, k=0)


# ---------------------------------------------------------------- merge geometry


def test_energy_kept_and_cross_terms():
    e1, e2 = rand_delta(30, 20, 3, 1), rand_delta(30, 20, 3, 2)
    exact = sp.weighted_sum([e1, e2], [0.5, 0.5])
    assert torch.allclose(exact.dense(), 0.5 * (e1.dense() + e2.dense()), atol=1e-12)
    assert sp.energy_kept(e1, exact) == pytest.approx(1.0, abs=1e-10)
    assert sp.cross_term_energy(exact, [e1, e2], [0.5, 0.5]) == pytest.approx(0.0, abs=1e-20)
    # a factor-space merge (average A and B separately) against the dense cross terms
    fm = LoraDelta((e1.A + e2.A) / 2, (e1.B + e2.B) / 2, e1.scale)
    target = 0.5 * (e1.dense() + e2.dense())
    dense_ratio = float((fm.dense() - target).norm() ** 2 / target.norm() ** 2)
    assert sp.cross_term_energy(fm, [e1, e2], [0.5, 0.5]) == pytest.approx(dense_ratio, rel=1e-9)
    assert dense_ratio > 0.01
    # energy kept against dense projectors
    U, S, Vh = torch.linalg.svd(fm.dense())
    k = 3
    PC, PR = U[:, :k] @ U[:, :k].T, Vh[:k].T @ Vh[:k]
    dense_kept = float((PC @ e1.dense() @ PR).norm() ** 2 / e1.dense().norm() ** 2)
    assert sp.energy_kept(e1, fm) == pytest.approx(dense_kept, rel=1e-9)
    # an expert orthogonal to the merge keeps nothing
    Q = orthonormal(30, 6, 3)
    P = orthonormal(20, 6, 4)
    m = LoraDelta(P[:, :3].T.clone(), Q[:, :3].clone(), 1.0)
    o = LoraDelta(P[:, 3:].T.clone(), Q[:, 3:].clone(), 1.0)
    assert sp.energy_kept(o, m) == pytest.approx(0.0, abs=1e-20)


def test_truncation_loss_matches_dense():
    e = sp.weighted_sum([rand_delta(25, 35, 4, 1), rand_delta(25, 35, 4, 2)])
    s = torch.linalg.svdvals(e.dense())
    for k in (0, 2, 4, 8):
        assert sp.truncation_loss(e, k) == pytest.approx(float((s[k:] ** 2).sum() / (s ** 2).sum()), abs=1e-12)


# ---------------------------------------------------------------- span deficit


def test_span_deficit_inside_orthogonal_and_dense():
    g = torch.Generator().manual_seed(0)
    l1, l2 = rand_delta(40, 30, 3, 1), rand_delta(40, 30, 3, 2)
    # O inside both spans: columns from [B1 B2], rows from [A1; A2]
    Bo = torch.cat([l1.B, l2.B], 1) @ torch.randn(6, 4, generator=g, dtype=torch.float64)
    Ao = torch.randn(4, 6, generator=g, dtype=torch.float64) @ torch.cat([l1.A, l2.A], 0)
    inside = LoraDelta(Ao, Bo, 0.3)
    assert sp.span_deficit(inside, [l1, l2]) == pytest.approx(0.0, abs=1e-10)
    # O orthogonal to the column span (and, separately, to the row span)
    QC = torch.linalg.qr(torch.cat([l1.B, l2.B], 1), mode="complete")[0][:, 6:]
    QR = torch.linalg.qr(torch.cat([l1.A, l2.A], 0).T, mode="complete")[0][:, 6:]
    out_col = LoraDelta(torch.randn(2, 30, generator=g, dtype=torch.float64), QC[:, :2].clone(), 1.0)
    out_row = LoraDelta(QR[:, :2].T.clone(), torch.randn(40, 2, generator=g, dtype=torch.float64), 1.0)
    assert sp.span_deficit(out_col, [l1, l2]) == pytest.approx(1.0, abs=1e-10)
    assert sp.span_deficit(out_col, [l1, l2], one_sided=True) == pytest.approx(1.0, abs=1e-10)
    assert sp.span_deficit(out_row, [l1, l2]) == pytest.approx(1.0, abs=1e-10)
    assert sp.span_deficit(out_row, [l1, l2], one_sided=True) < 0.9     # the column side sees it
    # random O against dense projectors, and the merge lower bound
    o = rand_delta(40, 30, 5, 9)
    PC = torch.linalg.qr(torch.cat([l1.B, l2.B], 1))[0]
    PR = torch.linalg.qr(torch.cat([l1.A, l2.A], 0).T)[0]
    PC, PR = PC @ PC.T, PR @ PR.T
    O = o.dense()
    deficit = float((O - PC @ O @ PR).norm() ** 2 / O.norm() ** 2)
    assert sp.span_deficit(o, [l1, l2]) == pytest.approx(deficit, rel=1e-9)
    assert sp.span_deficit(o, [l1, l2], one_sided=True) == pytest.approx(
        float(((O - PC @ O).norm() ** 2) / O.norm() ** 2), rel=1e-9)
    for seed in range(5):
        X = torch.randn(40, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        M = PC @ X @ PR                      # any span-preserving merge
        assert float((O - M).norm() ** 2) >= deficit * float(O.norm() ** 2) - 1e-9
    with pytest.raises(sp.SubspaceError, match="empty library"):
        sp.span_deficit(o, [])


# ---------------------------------------------------------------- key overlap and activations


def test_key_overlap_inside_orthogonal_dense():
    d = rand_delta(20, 32, 4, 5)
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(d.A.T, mode="complete")[0]          # row space first, then complement
    x_in = torch.randn(7, 4, generator=g, dtype=torch.float64) @ Q[:, :4].T
    x_out = torch.randn(7, 28, generator=g, dtype=torch.float64) @ Q[:, 4:].T
    assert torch.allclose(sp.key_overlap(x_in, d), torch.ones(7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sp.key_overlap(x_out, d), torch.zeros(7, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 32, generator=g, dtype=torch.float64)
    P = Q[:, :4] @ Q[:, :4].T
    expected = ((x @ P) ** 2).sum(1) / (x ** 2).sum(1)
    assert torch.allclose(sp.key_overlap(x, d), expected, atol=1e-12)
    with pytest.raises(sp.SubspaceError, match="not \\[n, d_in=32\\]"):
        sp.key_overlap(torch.ones(3, 31), d)


PROMPTS = ["Alice lives in", "The capital of Zorbia is", "x"]


def _direct_q_inputs(hf, tok, layer):
    """Input of q_proj at `layer`, computed from hidden states and the layer's RMSNorm."""
    outs = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hs = hf(input_ids=ids, output_hidden_states=True).hidden_states[layer]
            outs.append(hf.model.layers[layer].input_layernorm(hs)[0])
    return outs


def test_module_inputs_equals_direct_computation(tiny_llama):
    from interp.models import load_hf

    mods = ["model.layers.1.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    got = sp.module_inputs(tiny_llama, PROMPTS, mods, position="final")
    allp = sp.module_inputs(tiny_llama, PROMPTS, mods, position="all")
    hf, tok = load_hf("tiny-llama")                        # an independent, unbridged copy
    direct = _direct_q_inputs(hf, tok, 1)
    assert got[mods[0]].shape == (3, 96) and got[mods[1]].shape == (3, 160)
    for i, ref in enumerate(direct):
        assert torch.allclose(got[mods[0]][i], ref[-1], atol=1e-5)
    assert torch.allclose(allp[mods[0]], torch.cat(direct, 0), atol=1e-5)
    assert allp[mods[1]].shape == (sum(len(r) for r in direct), 160)
    with pytest.raises(ValueError, match="position"):
        sp.module_inputs(tiny_llama, PROMPTS, mods, position="first")
    with pytest.raises(KeyError):
        sp.module_inputs(tiny_llama, PROMPTS, ["model.layers.9.mlp.up_proj"])


def test_resolve_linear_plain_bridged_and_bridged_peft(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from interp.models import HookedModel, bridge_model, load_hf

    m = "model.layers.2.mlp.up_proj"
    hf, tok = load_hf("tiny-llama")
    w_plain = sp.base_weight(hf, m)
    assert torch.equal(w_plain, sp.base_weight(tiny_llama.hf_model, m))
    peft = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    assert torch.equal(sp.base_weight(peft, m), w_plain)          # through PeftModel + base_layer
    inner = peft.base_model.model
    hm = HookedModel(name="tiny-llama+lora", bridge=bridge_model(inner, tok, "tiny-llama"),
                     hf_model=inner, tokenizer=tok, peft_model=peft)
    assert torch.equal(sp.base_weight(hm.hf_model, m), w_plain)   # bridge + PEFT wrappers
    q = "model.layers.1.self_attn.q_proj"
    got = sp.module_inputs(hm, PROMPTS, [q])[q]
    ref = sp.module_inputs(tiny_llama, PROMPTS, [q])[q]           # LoRA B = 0: inputs unchanged
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(sp.SubspaceError, match="not a linear"):
        sp.resolve_linear(hf, "model.layers.0.mlp")


def test_key_overlap_table_on_tiny_model(tiny_llama):
    m = "model.layers.2.mlp.down_proj"
    x_native = sp.module_inputs(tiny_llama, PROMPTS[:2], [m])[m].double()
    expert = {m: LoraDelta(x_native.clone(), torch.randn(96, 2, dtype=torch.float64,
                                                         generator=torch.Generator().manual_seed(0)), 1.0)}
    t = sp.key_overlap_table(tiny_llama, expert, composed_prompts=[PROMPTS[2]], native_prompts=PROMPTS[:2])
    assert list(t.module) == [m] and t.layer.iloc[0] == 2
    assert t.kappa_native.iloc[0] == pytest.approx(1.0, abs=1e-6)  # keys are the row space
    assert 0 <= t.kappa_composed.iloc[0] <= 1
    assert t.kappa_ratio.iloc[0] == pytest.approx(t.kappa_composed.iloc[0] / t.kappa_native.iloc[0])


# ---------------------------------------------------------------- layer placement and tables


def test_layer_energy_and_late_mass():
    d1 = rand_delta(8, 8, 2, 1)
    d2 = rand_delta(8, 8, 2, 2)
    deltas = {"model.layers.0.mlp.up_proj": d1, "model.layers.2.self_attn.q_proj": d2,
              "model.layers.2.mlp.up_proj": d1}
    e = sp.layer_energy(deltas, n_layers=4)
    f1, f2 = d1.frobenius_sq(), d2.frobenius_sq()
    tot = 2 * f1 + f2
    assert torch.allclose(e, torch.tensor([f1 / tot, 0, (f1 + f2) / tot, 0], dtype=torch.float64))
    assert sp.late_mass(e, 0) == pytest.approx((f1 + f2) / tot)
    assert sp.late_mass(e, -1) == pytest.approx(1.0)
    assert sp.late_mass(e, 3) == 0.0
    with pytest.raises(ValueError, match="bridge_layer"):
        sp.late_mass(e, 4)
    with pytest.raises(sp.SubspaceError, match="no layer index"):
        sp.layer_energy({"lm_head": d1})


def _adapter(seed, layers=(0, 1, 2, 3), r=4):
    out = {}
    for l in layers:
        out[f"model.layers.{l}.self_attn.q_proj"] = rand_delta(96, 96, r, seed * 100 + l)
        out[f"model.layers.{l}.mlp.down_proj"] = rand_delta(96, 160, r, seed * 100 + 50 + l)
    return out


def test_tables_agree_with_functions(tiny_llama):
    deltas = {"e1": _adapter(1), "e2": _adapter(2)}
    deltas["copy"] = {m: LoraDelta(d.A @ torch.eye(96 if "q_proj" in m else 160, dtype=torch.float64),
                                   d.B, d.scale) for m, d in deltas["e1"].items()}
    at = sp.adapter_table(deltas, base_hf=tiny_llama.hf_model)
    assert len(at) == 24 and at.isna().sum().sum() == 0
    m = "model.layers.1.mlp.down_proj"
    row = at[(at.adapter == "e2") & (at.module == m)].iloc[0]
    s = sp.spectrum(deltas["e2"][m])
    assert row.layer == 1 and row.proj == "down_proj" and row.d_in == 160
    assert row.effective_rank == pytest.approx(sp.effective_rank(s))
    assert row.k90 == sp.energy_rank(s, 0.9)
    assert row.fro_norm == pytest.approx(math.sqrt(deltas["e2"][m].frobenius_sq()), rel=1e-9)
    assert row.amplification == pytest.approx(
        sp.amplification_factor(deltas["e2"][m], sp.base_weight(tiny_llama.hf_model, m)), rel=1e-9)

    ot = sp.overlap_table(deltas, sign_conflict="exact")
    assert len(ot) == 3 * 8
    same = ot[(ot.adapter_1 == "e1") & (ot.adapter_2 == "copy")]
    assert np.allclose(same.phi_col, 1) and np.allclose(same.phi_row, 1) and np.allclose(same.cosine, 1)
    assert np.allclose(same.sign_conflict, 0)
    diff = ot[(ot.adapter_1 == "e1") & (ot.adapter_2 == "e2")]
    assert ((diff.phi_row >= 0) & (diff.phi_row <= 1)).all() and (diff.phi_row < 0.5).all()
    r = diff[diff.module == m].iloc[0]
    assert r.cosine == pytest.approx(sp.task_cosine(deltas["e1"][m], deltas["e2"][m]))
    with pytest.raises(sp.SubspaceError, match="unknown adapter"):
        sp.overlap_table(deltas, pairs=[("e1", "nope")])

    spt = sp.spectra_table(deltas)
    assert len(spt) == 3 * 8 * 4
    sub = spt[(spt.adapter == "e2") & (spt.module == m)].sort_values("index")
    assert np.allclose(sub.sigma.values, s.numpy())

    le = sp.layer_energy_table(deltas, bridge_layer=1)
    assert set(le.columns) == {"adapter", "layer", "energy_fraction", "late_mass"}
    assert np.allclose(le.groupby("adapter").energy_fraction.sum(), 1)


def test_merge_and_span_deficit_tables():
    e1, e2 = _adapter(1, layers=(0, 1)), _adapter(2, layers=(0, 1))
    exact = {m: sp.weighted_sum([e1[m], e2[m]], [0.5, 0.5]) for m in e1}
    factor = {m: LoraDelta((e1[m].A + e2[m].A) / 2, (e1[m].B + e2[m].B) / 2, e1[m].scale) for m in e1}
    t = sp.merge_table({"exact": exact, "factor": factor}, {"e1": e1, "e2": e2})
    ex, fa = t[t.merged == "exact"], t[t.merged == "factor"]
    assert np.allclose(ex.energy_kept_e1, 1) and np.allclose(ex.cross_term_energy, 0, atol=1e-20)
    assert (fa.cross_term_energy > 0.01).all() and (fa.energy_kept_e1 < 1).all()
    assert np.allclose(ex.truncation_loss, 0, atol=1e-12)        # rank 8 keeps the rank-8 sum
    assert (fa.truncation_loss > 0).all()                          # rank 4 cannot
    oracle = {m: sp.weighted_sum([e1[m], rand_delta(e1[m].d_out, e1[m].d_in, 2, 7)]) for m in e1}
    sd = sp.span_deficit_table(oracle, {"e1": e1, "e2": e2})
    assert len(sd) == 4 and ((sd.span_deficit > 0) & (sd.span_deficit < 1)).all()
    assert (sd.span_deficit_col <= sd.span_deficit + 1e-12).all()


# ---------------------------------------------------------------- properties


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.integers(0, 10_000))


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_property_spectrum_equals_dense(shape):
    d_out, d_in, r, seed = shape
    d = rand_delta(d_out, d_in, r, seed)
    dense = torch.linalg.svdvals(d.dense())
    k = min(r, d_out, d_in)
    assert torch.allclose(sp.spectrum(d)[:k], dense[:k], rtol=1e-5, atol=1e-10 * float(dense[0]))


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 12))
def test_property_cosine_symmetric_phi_in_unit_interval(shape, r2):
    d_out, d_in, r, seed = shape
    d1, d2 = rand_delta(d_out, d_in, r, seed), rand_delta(d_out, d_in, r2, seed + 1)
    assert sp.task_cosine(d1, d2) == pytest.approx(sp.task_cosine(d2, d1), abs=1e-12)
    assert -1 <= sp.task_cosine(d1, d2) <= 1
    (U1, V1), (U2, V2) = sp.left_right_bases(d1), sp.left_right_bases(d2)
    for a, b in ((U1, U2), (V1, V2)):
        phi = sp.subspace_similarity(a, b)
        assert 0 <= phi <= 1
        th = sp.principal_angles(a, b)
        assert phi == pytest.approx(float((torch.cos(th) ** 2).mean()), abs=1e-9)
