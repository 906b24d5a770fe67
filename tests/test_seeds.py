"""Claims over seeds: aggregation against hand-computed numbers, disagreement marking, config
parsing, and a tiny two-seed study run from the command line."""

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from interp.adapters.recipe import expert_init_seed
from interp.config import ConfigError, load_config
from interp.errors import StudyError
from interp.evaluate import wilson_interval
from interp.study.seeds import (accuracy_over_seeds, findings_over_seeds, merged_findings, seed_config,
                                seed_dir_name)

ROOT = Path(__file__).resolve().parent.parent


def _acc(rows):
    cols = ["method", "library", "test_set", "hop", "metric", "n", "accuracy", "ci_low", "ci_high"]
    out = []
    for method, library, k, n in rows:
        lo, hi = wilson_interval(k, n)
        out.append([method, library, "F", "two_hop", "first_token", n, k / n, lo, hi])
    return pd.DataFrame(out, columns=cols)


def test_accuracy_over_seeds_hand_computed():
    per_seed = {
        0: _acc([("uniform", "2-comb", 2, 10), ("base", float("nan"), 0, 10)]),
        1: _acc([("uniform", "2-comb", 4, 10), ("base", float("nan"), 10, 10)]),
        2: _acc([("uniform", "2-comb", 9, 10)]),  # base not evaluated on seed 2
    }
    out = accuracy_over_seeds(per_seed).set_index("method")
    u = out.loc["uniform"]
    # mean of 0.2, 0.4, 0.9; sample variance ((-.3)² + (-.1)² + .4²) / 2 = 0.13
    assert u["n_seeds"] == 3 and u["mean"] == pytest.approx(0.5) and u["std"] == pytest.approx(math.sqrt(0.13))
    assert (u["min"], u["max"]) == pytest.approx((0.2, 0.9))
    assert (u["ci_low_seed_1"], u["ci_high_seed_1"]) == pytest.approx(wilson_interval(4, 10))
    assert u["accuracy_seed_2"] == pytest.approx(0.9) and u["n_seed_2"] == 10
    b = out.loc["base"]  # a NaN key (no library) still groups and merges
    assert b["n_seeds"] == 2 and b["mean"] == pytest.approx(0.5) and b["std"] == pytest.approx(math.sqrt(0.5))
    assert pd.isna(b["accuracy_seed_2"]) and b["accuracy_seed_1"] == 1.0
    one = accuracy_over_seeds({0: per_seed[0]}).set_index("method")
    assert pd.isna(one.loc["uniform", "std"]) and one.loc["uniform", "mean"] == pytest.approx(0.2)
    with pytest.raises(StudyError, match="no seed"):
        accuracy_over_seeds({})
    with pytest.raises(StudyError, match="columns"):
        accuracy_over_seeds({0: per_seed[0], 1: per_seed[1].drop(columns="library")})


def test_seeds_figure_draws_each_seed_and_the_mean():
    from interp.errors import FigureError
    from interp.figures import seeds_accuracy_figure

    per_seed = {0: _acc([("uniform", "2-comb", 2, 10), ("base", float("nan"), 0, 10)]),
                1: _acc([("uniform", "2-comb", 4, 10), ("base", float("nan"), 10, 10)]),
                2: _acc([("uniform", "2-comb", 9, 10)])}
    over = accuracy_over_seeds(per_seed)
    fig = seeds_accuracy_figure(over, "first_token", ["two_hop", "hop1"], order=["base", "uniform"])
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 1 and list(bars[0].x) == ["base", "uniform"]  # one facet: two_hop × F
    assert list(bars[0].y) == pytest.approx([0.5, 0.5])
    assert list(bars[0].error_y.array) == pytest.approx([0.5, 0.4])  # max − mean
    assert list(bars[0].error_y.arrayminus) == pytest.approx([0.5, 0.3])  # mean − min
    dots = {t.name: t for t in fig.data if t.type == "scatter"}
    assert sorted(dots) == ["seed 0", "seed 1", "seed 2"]
    assert list(dots["seed 1"].y) == pytest.approx([1.0, 0.4])
    assert math.isnan(dots["seed 2"].y[0]) and dots["seed 2"].y[1] == pytest.approx(0.9)
    got = [float(v) for c in dots["seed 1"].customdata for v in c]
    assert got == pytest.approx([*wilson_interval(10, 10), *wilson_interval(4, 10)])
    with pytest.raises(FigureError, match="no rows"):
        seeds_accuracy_figure(over, "exact", ["two_hop"])
    with pytest.raises(FigureError, match="several rows"):
        seeds_accuracy_figure(pd.concat([over, over]), "first_token", ["two_hop"])
    with pytest.raises(FigureError, match="accuracy_seed_S"):
        seeds_accuracy_figure(over.drop(columns=[c for c in over if c.startswith("accuracy_seed_")]),
                              "first_token", ["two_hop"])


def test_findings_disagreement_is_marked():
    f = lambda claim, verdict: {"claim": claim, "verdict": verdict, "evidence": f"{claim}={verdict}"}  # noqa: E731
    per_seed = {0: [f("A", "yes"), f("B", "no")], 1: [f("A", "yes"), f("B", "mixed")], 2: [f("A", "yes")]}
    t = findings_over_seeds(per_seed)
    assert list(t.columns) == ["claim", "seed", "verdict", "evidence", "agree"] and len(t) == 6
    assert t[t["claim"] == "A"]["agree"].all() and not t[t["claim"] == "B"]["agree"].any()
    assert t[(t["claim"] == "B") & (t["seed"] == 2)]["verdict"].item() == "n/a"  # not stated on seed 2
    merged = {m["claim"]: m for m in merged_findings(t)}
    assert merged["A"]["verdict"] == "yes" and "All 3 seeds agree" in merged["A"]["evidence"]
    assert merged["B"]["verdict"] == "disagree" and "0 → no, 1 → mixed, 2 → n/a" in merged["B"]["evidence"]
    assert "B=mixed" in merged["B"]["evidence"]  # each seed's own evidence is shown


@pytest.mark.parametrize("text, match", [
    ("[study]\nseeds = [0, 0]\n", "study.seeds must be distinct"),
    ("[study]\nseeds = [-1]\n", "study.seeds must be distinct non-negative"),
    ("[study]\nseeds = 3\n", "study.seeds' must be a list"),
    ("[study]\nseeds = [0.5]\n", r"study.seeds\[0\]"),
    ("[training]\ninit = 'both'\n", "training.init='both'"),
])
def test_bad_seed_configs_are_refused(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_seed_config_is_an_ordinary_one_seed_run():
    cfg = load_config(None, {"study.seeds": [0, 1, 2]})
    assert cfg.study.seeds == [0, 1, 2] and cfg.training.init == "per_expert"
    sub = seed_config(cfg, 2)
    assert (sub.study.seeds, sub.study.seed, sub.training.seed) == ([], 2, 2)
    assert cfg.study.seeds == [0, 1, 2] and cfg.study.seed == 0  # not modified
    plain = load_config(None, {"study.seed": 2, "training.seed": 2})
    for secs in (("study",), ("training",), ("study", "world"), ("methods", "evaluation")):
        assert sub.section_hash(*secs) == plain.section_hash(*secs)  # the cache keys of a one-seed run
    assert load_config(None).section_hash("study") == load_config(None, {"study.seeds": []}).section_hash("study")
    assert seed_dir_name(3) == "seed-3"


def _tiny_seeds_config(tmp_path: Path) -> Path:
    text = (ROOT / "experiments" / "tiny.toml").read_text()
    text = text.replace("[study]\n", "[study]\nseeds = [0, 1]\n", 1)
    text = re.sub(r"\[methods\]\nvariants = \[[^\]]*\]", '[methods]\nvariants = ["base", "expert_ab", "expert_bc", '
                  '"uniform", "expert_ac"]', text)
    text = re.sub(r'\[mechanisms\]\nvariants = \[[^\]]*\]', '[mechanisms]\nvariants = ["base", "uniform"]', text)
    text = text.replace('patching_variants = ["base", "uniform"]', 'patching_variants = ["base"]\nprobes = false\n'
                        'patchscope = false\nbackpatch = false')
    p = tmp_path / "tiny_seeds.toml"
    p.write_text(text)
    assert load_config(p).study.seeds == [0, 1]
    return p


def test_tiny_two_seed_study_from_the_command_line(tmp_path):
    from interp.cli import app

    cfg, out = _tiny_seeds_config(tmp_path), tmp_path / "run"
    args = ["run", "--config", str(cfg), "--out", str(out), "--steps", "world,experts,evaluate,mechanisms,report"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    per_acc = {}
    for s in (0, 1):
        d = out / seed_dir_name(s)
        assert (d / "report.html").is_file() and (d / "run.json").is_file()
        run = json.loads((d / "run.json").read_text())
        assert run["seeds"] == {"study": s, "world": 0, "training": s} and run["config"]["study"]["seeds"] == []
        ex = pd.read_csv(d / "results" / "experts.csv")
        assert (ex["init_seed"] == [expert_init_seed(s, e) for e in ex["expert"]]).all()
        per_acc[s] = pd.read_csv(d / "results" / "accuracy.csv")
    # the same queries on both seeds (the world does not change with the seed)
    assert per_acc[0]["n"].tolist() == per_acc[1]["n"].tolist()
    over = pd.read_csv(out / "results" / "accuracy_seeds.csv")
    keys = ["method", "library", "test_set", "hop", "metric"]
    both = per_acc[0].merge(per_acc[1], on=keys, suffixes=("_0", "_1")).merge(over, on=keys)
    assert len(both) == len(over) == len(per_acc[0]) and (both["n_seeds"] == 2).all()
    pairs = both[["accuracy_0", "accuracy_1"]]
    assert both["mean"].tolist() == pytest.approx(pairs.mean(axis=1).tolist(), abs=1e-5)
    assert both["std"].tolist() == pytest.approx(pairs.std(axis=1, ddof=1).tolist(), abs=1e-5)
    assert both["min"].tolist() == pytest.approx(pairs.min(axis=1).tolist(), abs=1e-6)
    assert both["ci_low_seed_1"].tolist() == pytest.approx(both["ci_low_1"].tolist(), abs=1e-6)
    fs = pd.read_csv(out / "results" / "findings_seeds.csv")
    assert set(fs["seed"]) == {0, 1} and len(fs) == 2 * fs["claim"].nunique() >= 2
    for claim, g in fs.groupby("claim"):
        assert g["agree"].all() == (g["verdict"].nunique() == 1), claim
    page = (out / "report.html").read_text()
    assert "over seeds 0, 1" in page and 'href="seed-1/report.html"' in page
    assert ("seeds disagree" in page) == (not fs["agree"].all())
    # the figure over seeds: in the report, as HTML, and as a PNG where Chromium is installed
    from interp.figures import png_export_possible

    assert 'id="fig-accuracy_seeds"' in page and (out / "figures" / "accuracy_seeds.html").is_file()
    assert (out / "figures" / "accuracy_seeds.png").is_file() == png_export_possible()
    # a second invocation: every seed's steps cached, the tables over seeds unchanged
    before = (out / "results" / "accuracy_seeds.csv").read_text()
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--steps", "report"])
    assert res.exit_code == 0, res.output
    assert (out / "results" / "accuracy_seeds.csv").read_text() == before


def test_tiny_math_study_over_seeds_keeps_its_conditions(tmp_path):
    """The shared-template study over two seeds: cells per condition, its own findings."""
    from interp.study import run_study

    tiny = {"study.model": "tiny-llama", "study.threads": 1, "study.seeds": [0, 1], "math.n_train": 16,
            "math.n_test": 8, "math.n_composed_train": 8, "training.r": 4, "training.epochs": 1,
            "training.min_steps": 2, "training.precision": "fp32", "training.min_accuracy": 0.0,
            "methods.variants": ["base", "expert_ab", "expert_bc", "uniform"]}
    out = run_study("experiments/math.toml", out=tmp_path / "m", overrides=tiny,
                    steps=["world", "experts", "evaluate", "report"])
    over = pd.read_csv(out / "results" / "accuracy_seeds.csv")
    assert set(over["condition"]) == {"separate", "shared"} and (over["n_seeds"] == 2).all()
    for s in (0, 1):
        acc = pd.read_csv(out / seed_dir_name(s) / "results" / "accuracy.csv")
        m = acc.merge(over, on=["condition", "method", "library", "test_set", "hop", "metric"])
        assert len(m) == len(acc) and m["accuracy"].tolist() == pytest.approx(m[f"accuracy_seed_{s}"].tolist())
    fs = pd.read_csv(out / "results" / "findings_seeds.csv")
    assert fs["claim"].str.contains("skill").any() and set(fs["seed"]) == {0, 1}
    assert "Shared vs separate" in (out / "report.html").read_text()


def _fake_seeds_run(path: Path, config: str | None) -> Path:
    """A run directory over seeds 0, 1 holding only what figures/make_figures.py reads."""
    overrides = {"study.seeds": [0, 1]}
    cfg = load_config(ROOT / config if config else None, overrides)
    (path / "results").mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"config": cfg.to_dict()}))
    per = {s: _acc([("uniform", "2-comb", 1 + 3 * s, 10), ("expert_ab", "none", 5, 10)]) for s in (0, 1)}
    if cfg.study_kind == "math":
        per = {s: df.assign(condition="shared", test_set="shared", hop="composed", metric="exact")
               for s, df in per.items()}
    accuracy_over_seeds(per).to_csv(path / "results" / "accuracy_seeds.csv", index=False)
    return path


@pytest.mark.browser
@pytest.mark.skipif(__import__("browser").chromium() is None, reason="Debian chromium not installed")
def test_make_figures_keeps_one_group_per_run_kind(tmp_path, monkeypatch):
    """figures/make_figures.py on runs over seeds: each study's group replaces only itself."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "figures" / "make_figures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    here = tmp_path / "figures"
    here.mkdir()
    monkeypatch.setattr(mf, "HERE", here)
    monkeypatch.setattr(mf, "MANIFEST", here / "index.json")
    two = _fake_seeds_run(tmp_path / "two", None)
    math_run = _fake_seeds_run(tmp_path / "math", "experiments/math.toml")
    assert mf.main(str(two)) == 0 and mf.main(str(math_run)) == 0
    man = json.loads((here / "index.json").read_text())
    assert set(man) == {"two_hop over seeds", "math over seeds"}
    assert str(math_run) in man["math over seeds"]["run"]
    pngs = {"seeds_two_hop_accuracy.png", "seeds_math_accuracy.png"}
    assert {p.name for p in here.glob("*.png")} == pngs
    assert all((here / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (here / "index.html").read_text()
    assert all(f'src="{p}"' in page for p in pngs) and str(two) in page
    assert mf.main(str(two)) == 0  # regenerating one group keeps the other
    assert set(json.loads((here / "index.json").read_text())) == set(man)
    assert {p.name for p in here.glob("*.png")} == pngs
