"""Real two-hop chains: the fact table, the separation metric (AUC, DeLong, bootstrap) and the
study pipeline on a tiny random-init model with a stub verification."""

import itertools

import numpy as np
import pandas as pd
import pytest

from interp.mechanisms.separation import (
    SeparationError,
    auc,
    bootstrap_interval,
    delong_interval,
    separation_table,
)
from interp.tasks.entities import WorldError
from interp.tasks.real_chains import (
    COUNTRIES,
    HOP_TEMPLATES,
    TWO_HOP_TEMPLATES,
    Chain,
    chain_examples,
    make_chains,
    relation_facts,
    verify_chains,
)

# --------------------------------------------------------------------------------------------
# The fact table
# --------------------------------------------------------------------------------------------


def test_chains_are_many_distinct_and_linked():
    chains = make_chains()
    assert len(chains) >= 100
    keys = [(c.e1, c.r1, c.r2) for c in chains]
    assert len(set(keys)) == len(keys)                       # no duplicate chains
    assert [c.chain_id for c in chains] == list(range(len(chains)))
    facts = relation_facts()
    for c in chains:
        assert facts[c.r1][c.e1] == c.e2                      # e₂ is hop 1's answer ...
        assert facts[c.r2][c.e2] == c.e3                      # ... and hop 2's subject
        assert c.e3 != c.e1
        assert HOP_TEMPLATES[c.r1][1] == HOP_TEMPLATES[c.r2][0]


def test_chain_examples_prompts_and_spans():
    for c in make_chains():
        ex = chain_examples(c)
        h1, h2, two = ex["hop1"], ex["hop2"], ex["two_hop"]
        assert h1.answer == " " + c.e2 and h2.answer == " " + c.e3 and two.answer == " " + c.e3
        a, b = h1.char_spans["e1"]
        assert h1.prompt[a:b].lower() == c.e1.lower()         # capitalised "The Eiffel Tower"
        a, b = h2.char_spans["e2"]
        assert h2.prompt[a:b].lower() == c.e2.lower()
        a, b = two.char_spans["e1"]
        assert two.prompt[a:b] == c.e1
        assert b < len(two.prompt)                            # e₁ is not the final token
        for e in ex.values():
            assert e.prompt[0].isupper() or e.prompt[0].isdigit()
            assert not e.prompt.endswith(" ") and e.answer.startswith(" ")
            assert e.chain_id == c.chain_id and (e.e1, e.e2, e.e3) == (c.e1, c.e2, c.e3)


def test_some_known_facts():
    facts = relation_facts()
    assert facts["country_capital"]["France"] == "Paris"
    assert facts["landmark_country"]["the Eiffel Tower"] == "France"
    assert facts["book_author"]["Don Quixote"] == "Miguel de Cervantes"
    assert "Switzerland" not in facts["country_capital"]      # ambiguous facts are left out
    assert all(v[0] is None or isinstance(v[0], str) for v in COUNTRIES.values())
    assert set(TWO_HOP_TEMPLATES) == {(c.r1, c.r2) for c in make_chains()}


def test_make_chains_refuses_mismatched_types(monkeypatch):
    import interp.tasks.real_chains as rc

    monkeypatch.setitem(rc.TWO_HOP_TEMPLATES, ("book_author", "country_capital"), "x {e1} y")
    with pytest.raises(WorldError, match="answers a person"):
        rc.make_chains()


def test_verify_chains_with_stub_verifier(tiny_llama):
    chains = make_chains()[:6]
    answers = {"hop1": [True, True, True, False, True, True],
               "hop2": [True, True, False, True, True, True],
               "two_hop": [True, False, True, True, False, True]}

    def stub(hm, examples):
        return answers[examples[0].kind]

    df = verify_chains(tiny_llama, chains, verifier=stub)
    assert df["known"].tolist() == [True, True, False, False, True, True]
    assert df["outcome"].tolist() == ["composed", "failed", "unknown", "unknown", "failed",
                                      "composed"]
    with pytest.raises(WorldError, match="returned"):
        verify_chains(tiny_llama, chains, verifier=lambda hm, exs: [True])


def test_verify_chains_default_is_the_first_token_check(tiny_llama):
    from interp.tasks.entities import first_token_predictions

    chains = make_chains()[:4]
    df = verify_chains(tiny_llama, chains)
    preds = first_token_predictions(tiny_llama, df["hop1_prompt"].tolist())
    want = [p == tiny_llama.encode(" " + c.e2)[0] for p, c in zip(preds, chains)]
    assert df["hop1_correct"].tolist() == want
    assert df["hop1_pred"].tolist() == [tiny_llama.tokenizer.decode([p]) for p in preds]


# --------------------------------------------------------------------------------------------
# Separation metric
# --------------------------------------------------------------------------------------------


def _pairs_auc(scores, labels):
    """AUC by its definition: the share of (positive, negative) pairs ordered right, ties ½."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0
               for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_hand_example():
    # positives 0.9, 0.4, 0.4; negatives 0.1, 0.4: pairs > : 0.9>0.1, 0.9>0.4, 0.4>0.1 (x2) = 4;
    # ties 0.4=0.4 (x2) = 1  -> (4 + 1) / 6
    assert auc([0.9, 0.4, 0.4, 0.1, 0.4], [1, 1, 1, 0, 0]) == pytest.approx(5 / 6)
    assert auc([3, 2, 1], [1, 1, 0]) == 1.0
    assert auc([1, 2, 3], [1, 1, 0]) == 0.0


def test_auc_matches_sklearn_and_pair_count():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for n in (5, 20, 101):
        y = rng.random(n) < 0.4
        y[0], y[1] = True, False
        s = np.round(rng.normal(size=n) + 0.5 * y, 1)        # rounding makes ties
        assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert auc(s, y) == pytest.approx(_pairs_auc(s, y), abs=1e-12)


def test_delong_matches_definition_and_bootstrap():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(60, bool), np.zeros(40, bool)]
    s = np.round(rng.normal(size=100) + 0.8 * y, 1)
    a, lo, hi = delong_interval(s, y)
    # DeLong's variance straight from its definition: structural components by pair loops
    pos, neg = s[y], s[~y]
    psi = (pos[:, None] > neg[None]).astype(float) + 0.5 * (pos[:, None] == neg[None])
    v10, v01 = psi.mean(1), psi.mean(0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    assert a == pytest.approx(psi.mean())
    assert (hi - lo) / 2 == pytest.approx(1.959963985 * np.sqrt(var), rel=1e-6)
    # a stratified bootstrap agrees with DeLong's interval within a few hundredths
    b, blo, bhi = bootstrap_interval(s, y, n_boot=4000, seed=0)
    assert b == pytest.approx(a)
    assert blo == pytest.approx(lo, abs=0.03) and bhi == pytest.approx(hi, abs=0.03)
    assert lo < a < hi


def test_delong_known_value():
    # Hand computation: pos (3, 2), neg (1, 2): psi = [[1, 1], [1, .5]]; AUC = .875;
    # V10 = (1, .75), V01 = (1, .75); s²=.03125 each; Var = .03125/2 + .03125/2 = .03125
    a, lo, hi = delong_interval([3, 2, 1, 2], [1, 1, 0, 0], level=0.95)
    half = 1.959963985 * np.sqrt(0.03125)
    assert a == pytest.approx(0.875)
    assert lo == pytest.approx(0.875 - half) and hi == 1.0     # clipped at 1
    assert np.isnan(delong_interval([1, 2, 0], [1, 0, 0])[1])  # one positive: no variance


def test_separation_errors():
    with pytest.raises(SeparationError, match="both groups"):
        auc([1, 2], [1, 1])
    with pytest.raises(SeparationError, match="NaN"):
        auc([1, np.nan], [1, 0])
    with pytest.raises(SeparationError, match="one label per score"):
        auc([1, 2, 3], [1, 0])
    with pytest.raises(SeparationError, match="level"):
        delong_interval([1, 2], [1, 0], level=1.5)


def test_separation_table():
    rng = np.random.default_rng(2)
    ids = np.arange(30)
    lab = pd.Series(rng.random(30) < 0.5, index=ids)
    lab.iloc[0], lab.iloc[1] = True, False
    rows = []
    for m in ("a", "b"):
        for layer in (0, 1):
            s = rng.normal(size=30) + (lab.to_numpy() if m == "a" else 0)
            s[3] = np.nan if layer == 1 else s[3]
            rows += [{"chain_id": i, "measurement": m, "layer": layer, "score": v}
                     for i, v in zip(ids, s)]
    df = pd.DataFrame(rows)
    tab = separation_table(df, lab, n_boot=200)
    assert list(tab.columns) == ["measurement", "layer", "position", "n_pos", "n_neg", "auc", "lo",
                                 "hi", "boot_lo", "boot_hi"]
    assert len(tab) == 4
    r = tab[(tab.measurement == "a") & (tab.layer == 1)].iloc[0]
    assert r.n_pos + r.n_neg == 29                                   # NaN row dropped
    sub = df[(df.measurement == "a") & (df.layer == 1)].dropna()
    assert r.auc == pytest.approx(auc(sub.score, lab.loc[sub.chain_id]))
    with pytest.raises(SeparationError, match="no label"):
        separation_table(df.assign(chain_id=df.chain_id + 100), lab)


# --------------------------------------------------------------------------------------------
# Swap patching and probe scores
# --------------------------------------------------------------------------------------------


def _ex(prompt, e1, e3, cid, e2="x"):
    from tests.stand_ins import example

    i = prompt.index(e1)
    return example(prompt, " " + e3, e1=e1, e2=e2, e3=e3, char_spans={"e1": (i, i + len(e1))},
                   chain_id=cid)


def test_swap_equals_patch_layer_pos_on_aligned_prompts(tiny_llama):
    """Same token length and position: the swap is activation patching with clean = donor."""
    import torch

    from interp.mechanisms import patch_layer_pos, swap_patching

    hm = tiny_llama
    tg = [_ex("The capital of Abcd is", "Abcd", "Paris", 0), _ex("The capital of Wxyz is", "Wxyz", "Oslo", 1)]
    dn = [_ex("The capital of Qrst is", "Qrst", "Lima", 2), _ex("The capital of Mnop is", "Mnop", "Rome", 3)]
    df = swap_patching(hm, tg, dn, layers=[0, 2, 3], progress=False)
    p = hm.encode(tg[0].prompt).__len__()
    pos = len(hm.encode("The capital of Abcd")) - 1
    ct, _ = hm.tokenize([d.prompt for d in dn])
    xt, lengths = hm.tokenize([t.prompt for t in tg])
    first = lambda e: hm.encode(" " + e)[1] if not hm.tokenizer.decode(hm.encode(" " + e)[:1]).strip() else hm.encode(" " + e)[0]
    ca = torch.tensor([first(d.e3) for d in dn])
    xa = torch.tensor([first(t.e3) for t in tg])
    grid = patch_layer_pos(hm, ct, xt, ca, xa, lengths, "resid_pre", [0, 2, 3], [pos], progress=False)
    got = df.pivot(index="layer", columns="example_id", values="logit_diff").to_numpy()
    assert np.allclose(got, grid.logit_diff[:, 0].cpu().numpy(), atol=1e-4)
    assert np.allclose(df.groupby("example_id")["base_logit_diff"].first(), grid.corrupted.cpu(), atol=1e-4)
    assert np.allclose(df.groupby("example_id")["donor_logit_diff"].first(), grid.clean.cpu(), atol=1e-4)
    assert (df["token_index"] == pos).all() and p > pos


def test_swap_with_itself_changes_nothing_and_refuses_same_answer(tiny_llama):
    from interp.errors import PatchingError
    from interp.mechanisms import swap_patching

    a = _ex("Where Abcd stands the capital is", "Abcd", "Paris", 0)
    b = _ex("Where Abcd stands the capital is", "Abcd", "Oslo", 1)   # same prompt, other answer
    df = swap_patching(tiny_llama, [a], [b], layers=[1, 2], progress=False)
    assert np.allclose(df["shift"], 0, atol=1e-5)
    with pytest.raises(PatchingError, match="first token"):
        swap_patching(tiny_llama, [a], [_ex("The capital of Qrst is", "Qrst", "Pisa", 2)])


def test_probe_scores_are_held_out_and_grouped():
    from interp.mechanisms import probe_scores

    rng = np.random.default_rng(0)
    n, d = 60, 8
    y = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    X = rng.normal(size=(n, d)) + 2.0 * y[:, None]           # separable: held-out scores high
    feats = {"final": X[None].astype(np.float32)}
    groups = np.repeat(np.arange(20), 3)
    df = probe_scores(feats, y, [5], groups, positive=True, progress=False)
    assert list(df.columns) == ["example_id", "layer", "position", "score", "n_classes"]
    assert auc(df["score"], y) > 0.9 and (df["layer"] == 5).all()
    noise = {"final": rng.normal(size=(1, n, d)).astype(np.float32)}
    s = probe_scores(noise, y, None, groups, positive=True, progress=False)["score"]
    assert 0.2 < auc(s, y) < 0.8                                # no signal: near chance
    # own-label scoring drops classes smaller than n_splits
    lab = ["a"] * 25 + ["b"] * 25 + ["c"] * 10
    s = probe_scores(feats, lab, None, None, n_splits=5, progress=False)["score"]
    assert s.notna().all() and ((s >= 0) & (s <= 1)).all()
    lab2 = ["a"] * 28 + ["b"] * 28 + ["c"] * 4
    s2 = probe_scores(feats, lab2, None, None, progress=False)["score"]
    assert s2.isna().sum() == 4
    from interp.errors import ProbeError

    with pytest.raises(ProbeError, match="positive class"):
        probe_scores(feats, y, None, None, positive="maybe", progress=False)


# --------------------------------------------------------------------------------------------
# The study end to end (tiny model, stub verification)
# --------------------------------------------------------------------------------------------


def test_study_end_to_end_on_tiny_model(tiny_llama, tmp_path):
    from interp.study.real_chains import run_real_chains

    # 6 bridges (countries) x 7 cities: every e₂ has >= 5 chains for the bridge probe, and two
    # continents (first letters A, E) give every chain a donor with another answer
    chains = []
    for country in ("France", "Germany", "Italy", "China", "Japan", "India"):
        chains += [c for c in make_chains() if c.pair == "city_country+country_continent"
                   and c.e2 == country][:7]
    rng = np.random.default_rng(0)
    two_hop = rng.random(len(chains)) < 0.5

    def stub(hm, examples):
        if examples[0].kind == "two_hop":
            return list(two_hop)
        return [True] * len(examples)

    res = run_real_chains(tiny_llama, tmp_path, layer_step=2, chains=chains, verifier=stub,
                          n_boot=50, progress=False)
    ch = pd.read_csv(tmp_path / "chains.csv")
    assert len(ch) == len(chains) >= 30 and ch["known"].all()
    assert (ch["outcome"] == "composed").tolist() == list(two_hop)
    sep = pd.read_csv(tmp_path / "separation.csv")
    assert {"entrec", "patchscope", "probe_bridge", "probe_outcome", "swap"} <= set(sep["measurement"])
    assert set(sep.columns) >= {"measurement", "layer", "position", "n_pos", "n_neg", "auc", "lo", "hi"}
    assert (sep["n_pos"] + sep["n_neg"] <= len(chains)).all()
    assert sep["auc"].between(0, 1).all()
    assert set(sep[sep.measurement == "patchscope"]["layer"].astype(str)) == {"0", "2", "3", "max"}
    assert set(sep[sep.measurement == "entrec"]["layer"].astype(str)) >= {str(l) for l in range(5)}
    # scores agree with the separation table (recomputed independently with sklearn)
    from sklearn.metrics import roc_auc_score

    sc = res["scores"]
    s = sc[(sc.measurement == "entrec") & (sc.position == "final") & (sc.layer == "4")]
    lab = ch.set_index("chain_id").loc[s["chain_id"], "outcome"] == "composed"
    row = sep[(sep.measurement == "entrec") & (sep.position == "final") & (sep.layer.astype(str) == "4")
              & (sep.comparison == "pooled")]
    assert row["auc"].iloc[0] == pytest.approx(roc_auc_score(lab, s["score"]))
    assert set(sep["comparison"]) == {"pooled", "within_pair"}
    for f in ("separation_auc_pooled.html", "separation_auc_within_pair.html", "entrec_by_outcome_final.html", "swap.csv", "scores.csv"):
        assert (tmp_path / f).is_file()
    # a second call resumes from the files; another configuration is refused
    again = run_real_chains(tiny_llama, tmp_path, layer_step=2, chains=chains, verifier=stub, n_boot=50,
                            progress=False)
    pd.testing.assert_frame_equal(again["separation"], res["separation"])
    from interp.errors import StudyError

    # a cached table cut short (a full disk, a killed copy) is an error naming it, not fewer rows
    cached = tmp_path / "scores_entrec.csv"
    cached.write_bytes(cached.read_bytes()[: len(cached.read_bytes()) // 2])
    with pytest.raises(StudyError, match="scores_entrec.csv is damaged"):
        run_real_chains(tiny_llama, tmp_path, layer_step=2, chains=chains, verifier=stub, n_boot=50,
                        progress=False)

    with pytest.raises(StudyError, match="another configuration"):
        run_real_chains(tiny_llama, tmp_path, layer_step=1, chains=chains, verifier=stub,
                        progress=False)


def test_stratified_auc_counts_only_same_stratum_pairs():
    from interp.mechanisms.separation import stratified_delong_interval

    rng = np.random.default_rng(3)
    n = 80
    strata = rng.integers(0, 3, n)
    y = rng.random(n) < 0.5
    s = np.round(rng.normal(size=n) + 0.7 * y + 2.0 * strata, 1)
    a, lo, hi, n_pos, n_neg = stratified_delong_interval(s, y, strata)
    good = same = 0.0
    for i in range(n):
        for j in range(n):
            if y[i] and not y[j] and strata[i] == strata[j]:
                same += 1
                good += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    assert a == pytest.approx(good / same)
    assert n_pos == y.sum() and n_neg == (~y).sum()
    assert lo < a < hi
    # one stratum: the plain DeLong interval
    assert stratified_delong_interval(s, y, np.zeros(n))[:3] == pytest.approx(delong_interval(s, y))
    # a confounder: outcome and score both follow the stratum, nothing within -> pooled AUC high,
    # stratified near 0.5
    y2 = strata == 2
    y2[::7] = ~y2[::7]
    s2 = strata + rng.normal(size=n) * 0.01
    assert auc(s2, y2) > 0.75
    assert abs(stratified_delong_interval(s2, y2, strata)[0] - 0.5) < 0.3
    tab = separation_table(pd.DataFrame({"chain_id": range(n), "measurement": "m", "score": s}),
                           pd.Series(y), strata=pd.Series(strata))
    assert tab["auc"].iloc[0] == pytest.approx(a)
