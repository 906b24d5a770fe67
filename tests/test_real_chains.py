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
