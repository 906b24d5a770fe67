"""Probes: separable features decode, the control task does not; features equal the cache."""

import dataclasses

import numpy as np
import pytest
import torch

from interp.mechanisms.lens import offsets_token_spans

from interp.mechanisms.probes import collect_features, probe_features


def _separable_then_noise(seed: int, n_classes: int, per: int, d: int):
    """Labels and a two-layer feature stack: layer 0 separates the classes (Gaussian clusters),
    layer 1 is pure noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat([f"c{k}" for k in range(n_classes)], per)
    means = rng.normal(0, 4, (n_classes, d))
    X = np.stack([means[int(c[1])] + rng.normal(0, 0.5, d) for c in y])
    return y, np.stack([X, rng.normal(0, 1, X.shape)])


def test_probe_separable_vs_control():
    y, F = _separable_then_noise(0, n_classes=4, per=15, d=32)
    df = probe_features({"final": F}, y, layers=[5, 6], progress=False)
    sep, rand = df[df.layer == 5].iloc[0], df[df.layer == 6].iloc[0]
    assert sep.accuracy >= 0.98
    assert sep.control_accuracy < 0.5 and sep.selectivity > 0.5
    assert rand.accuracy < 0.5
    assert (sep.n, sep.n_classes, sep.task) == (60, 4, "identity")


def test_probe_fallbacks():
    rng = np.random.default_rng(1)
    y = ["a"] * 12 + ["b"] * 2 + ["c"] * 2 + ["d"] * 10
    X = rng.normal(0, 1, (1, len(y), 8))
    df = probe_features({"final": X}, y, n_splits=5, progress=False)
    assert (df.n.iloc[0], df.n_classes.iloc[0]) == (22, 2)  # rare classes dropped
    y2 = ["a"] * 10 + ["b", "c", "d", "e", "f", "g"]
    df2 = probe_features({"final": rng.normal(0, 1, (1, 16, 8))}, y2, n_splits=5, progress=False)
    assert df2.task.iloc[0] == "one_vs_rest:a"
    with pytest.raises(ValueError, match="cross-validate"):
        probe_features({"final": X[:, :4]}, ["a", "b", "c", "d"], progress=False)


@dataclasses.dataclass
class Ex:
    prompt: str
    char_spans: dict


def test_collect_features_equal_cache(tiny_qwen2):
    hm = tiny_qwen2
    exs = [Ex("The boss of Zorba is", {"e1": (12, 17)}), Ex("Quinn X", {"e1": (0, 5)})]
    spans = [offsets_token_spans(e, hm) for e in exs]
    f = collect_features(hm, exs, layers=[1, 3], spans=spans, batch_size=1)
    with torch.no_grad():
        _, cache = hm.bridge.run_with_cache(hm.tokenize([exs[1].prompt])[0])
    assert f["e1_last"].shape == (2, 2, hm.d_model)
    last = len(hm.encode(exs[1].prompt)) - 1
    assert np.allclose(f["e1_last"][1, 1], cache["blocks.3.hook_resid_pre"][0, spans[1]["e1"][1] - 1].numpy(),
                       atol=1e-5)
    assert np.allclose(f["final"][0, 1], cache["blocks.1.hook_resid_pre"][0, last].numpy(), atol=1e-5)


def test_grouped_folds_stop_a_probe_from_recognising_e1():
    """Labels fixed by a nuisance identity (e₁) repeated across templates: plain folds let the
    probe recognise it; folds grouped by e₁ do not."""
    rng = np.random.default_rng(0)
    n_e1, reps, d = 30, 3, 16
    e1_code = rng.normal(size=(n_e1, d)) * 3
    labels = [f"city{i % 6}" for i in range(n_e1) for _ in range(reps)]   # e2 is a function of e1
    groups = [i for i in range(n_e1) for _ in range(reps)]
    X = np.stack([e1_code[i] + rng.normal(size=d) * 0.1 for i in range(n_e1) for _ in range(reps)])
    plain = probe_features({"e1_last": X[None]}, labels, n_splits=3, progress=False)
    grouped = probe_features({"e1_last": X[None]}, labels, n_splits=3, progress=False, groups=groups)
    assert plain["accuracy"].iloc[0] > 0.8 and grouped["accuracy"].iloc[0] < 0.5
    assert bool(grouped["grouped"].iloc[0]) and not bool(plain["grouped"].iloc[0])


def test_ridge_and_logistic_probes_agree_on_separable_and_random():
    y, F = _separable_then_noise(3, n_classes=5, per=12, d=24)
    feats = {"final": F}
    out = {e: probe_features(feats, y, layers=[0, 1], progress=False, estimator=e) for e in ("logistic", "ridge")}
    for e, df in out.items():
        assert (df.estimator == e).all()
        assert df.accuracy.iloc[0] >= 0.95 and df.selectivity.iloc[0] > 0.5, e
        assert df.accuracy.iloc[1] < 0.5, e
    with pytest.raises(ValueError, match="unknown probe estimator"):
        probe_features(feats, y, progress=False, estimator="mlp")


def test_one_vs_rest_fallback_with_a_class_named_other_and_clear_input_errors():
    rng = np.random.default_rng(2)
    y = ["other"] * 6 + ["a"] * 3 + ["b"] * 3
    X = rng.normal(0, 1, (1, len(y), 8))
    df = probe_features({"final": X}, y, n_splits=5, progress=False, estimator="ridge")
    assert df.task.iloc[0] == "one_vs_rest:other" and df.n.iloc[0] == 12  # 6 vs 6, not all one class
    for kwargs, msg in [({"C": 0.0}, "C"), ({"n_splits": 1}, "n_splits"), ({"layers": [3, 4]}, "layer numbers"),
                        ({"groups": [0] * 5}, "groups for"), ({"groups": [0] * 6 + [1] * 6}, "distinct groups")]:
        with pytest.raises(ValueError, match=msg):
            probe_features({"final": X}, y, progress=False, **{"n_splits": 5, **kwargs})
    with pytest.raises(ValueError, match="examples"):
        probe_features({"final": X}, y[:8], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        probe_features({"final": np.full_like(X, np.nan)}, y, progress=False)
