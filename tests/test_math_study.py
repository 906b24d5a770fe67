"""The shared-template study: the math-skills generator against independent arithmetic, its
tokenisation, the [math] config table, and the study end to end on a random-init tiny Llama."""

import dataclasses
import json
import re

import pandas as pd
import pytest

from interp.config import ConfigError, load_config
from interp.tasks.math_skills import (CONDITIONS, MathTaskError, MathWorld, apply_ops, dax,
                                      make_math_world, solution_spans, zib)


def _zib_closed_form(n: int) -> int:
    return n + 111  # every digit of a 3-digit number with digits <= 8 goes up by one, no carry


def _dax_closed_form(n: int) -> int:
    h, r = divmod(n, 100)
    t, u = divmod(r, 10)
    return 100 * u + 10 * t + h


_STEP = re.compile(r"(zib|dax|cop)\((\d+)\)=(\d+)")
_REF = {"zib": _zib_closed_form, "dax": _dax_closed_form, "cop": lambda n: n}


def _parse(expr: str) -> tuple[list[str], int]:
    """``"dax(cop(365))"`` -> ``(["cop", "dax"], 365)`` (operations innermost first), by peeling
    one ``op(...)`` at a time; written here independently of the generator."""
    ops = []
    while not expr.isdigit():
        m = re.fullmatch(r"([a-z]+)\((.*)\)", expr)
        assert m, expr
        ops.append(m.group(1))
        expr = m.group(2)
    return ops[::-1], int(expr)


def _steps(e) -> list[tuple[str, int, int]]:
    """The written steps ``(op, argument, result)`` of a step-by-step answer."""
    return [(op, int(a), int(b)) for op, a, b in _STEP.findall(e.answer)]


@pytest.mark.parametrize("condition", CONDITIONS)
def test_answers_match_independent_arithmetic(condition):
    w = make_math_world(condition, seed=3, n_train=40, n_test=20, n_composed_train=10)
    ref = _REF
    for e in w.examples:
        v = e.x
        for op in e.ops:
            v = ref[op](v)
        assert e.result == v
        if condition == "separate":
            assert e.answer == str(v)
        else:
            steps = _STEP.findall(e.answer)
            assert [s[0] for s in steps] == e.ops
            cur = e.x
            for op, a, b in steps:  # each written step is a true equation on the previous result
                assert int(a) == cur and int(b) == ref[op](cur)
                cur = int(b)
            assert e.answer.endswith(f"; answer={v}")
    comp = w.get(split="test")
    assert all(e.ops == ["zib", "dax"] and e.prompt.count("zib(") == 1 for e in comp)


@pytest.mark.parametrize("condition", ["shared", "bridged"])
def test_held_out_numbers_and_eval_sets_are_the_test_chains(condition):
    w = make_math_world(condition, seed=1, n_train=60, n_test=30, n_composed_train=20)
    test = w.get(split="test")
    xs, ys = {e.x for e in test}, {_zib_closed_form(e.x) for e in test}
    for e in w.get(split="d1") + w.get(split="d2") + w.get(split="d_ac"):
        inputs = {op: [] for op in ("zib", "dax", "cop")}
        for op, a in zip(e.ops, e.values):
            inputs[op].append(a)
        assert not set(inputs["zib"]) & xs and not set(inputs["dax"]) & ys, e
    assert [e.x for e in w.get(split="eval", kind="skill_a")] == [e.x for e in test]
    assert [e.x for e in w.get(split="eval", kind="skill_b")] == [_zib_closed_form(e.x) for e in test]
    assert {len(e.ops) for e in w.get(split="d1")} == {1, 2}  # the template covers chains of steps
    sets = w.eval_sets()
    assert set(sets) == {"composed", "skill_a", "skill_b"} and all(len(v) == 30 for v in sets.values())


def test_bridged_answers_recomputed_from_the_prompt():
    """Every bridged problem, solved from its prompt alone by an independent parser and closed
    forms: the written steps are the innermost-first chain, each a true equation, ending in the
    answer."""
    w = make_math_world("bridged", seed=5, n_train=60, n_test=24, n_composed_train=12)
    for e in w.examples:
        m = re.fullmatch(r"Solve (.*) step by step:", e.prompt)
        assert m, e.prompt
        ops, x = _parse(m.group(1))
        vals = [x]
        for op in ops:
            vals.append(_REF[op](vals[-1]))
        assert e.answer == " " + ", ".join(f"{op}({a})={b}" for op, a, b in zip(ops, vals, vals[1:])) \
            + f"; answer={vals[-1]}"
        assert _steps(e) == list(zip(ops, vals, vals[1:]))
        assert (e.ops, e.x, e.values) == (ops, x, vals)  # the metadata the mechanisms read
    assert _steps(w.get(split="d1")[0])  # the parser found steps at all


def test_bridged_training_chains_mix_each_skill_with_the_bridge():
    n_train = 61  # not a multiple of 3: the one-step problems take the remainder
    w = make_math_world("bridged", seed=2, n_train=n_train, n_test=30, n_composed_train=20)
    for split, op in (("d1", "zib"), ("d2", "dax")):
        chains = [tuple(o for o, _, _ in _steps(e)) for e in w.get(split=split)]
        assert len(chains) == n_train
        assert {o for c in chains for o in c} == {op, "cop"}  # only its own skill and the bridge
        assert all(c.count(op) == 1 for c in chains)
        counts = {c: chains.count(c) for c in set(chains)}
        assert counts == {(op,): 21, ("cop", op): 20, (op, "cop"): 20}, counts  # both orders mixed
        assert len({e.x for e in w.get(split=split)}) == n_train  # no number drawn twice
    # held out, conservatively: no test x or intermediate y is the input of any step of d1 / d2
    test = w.get(split="test")
    held = {e.x for e in test} | {_zib_closed_form(e.x) for e in test}
    for e in w.get(split="d1") + w.get(split="d2"):
        assert not {a for _, a, _ in _steps(e)} & held, e
    # the composed problems and eval sets are those of "shared", character for character
    sh = make_math_world("shared", seed=2, n_train=n_train, n_test=30, n_composed_train=20)
    for split in ("test", "d_ac", "eval"):
        assert [(e.prompt, e.answer, e.kind) for e in w.get(split=split)] == \
            [(e.prompt, e.answer, e.kind) for e in sh.get(split=split)]
    assert all(e.tier == "bridged" for e in w.examples)
    assert make_math_world("bridged", seed=2, n_train=n_train, n_test=30, n_composed_train=20).examples \
        == w.examples  # deterministic
    assert make_math_world("bridged", seed=3).examples != make_math_world("bridged", seed=4).examples


def test_conditions_share_numbers_and_differ_in_format(tmp_path):
    a, b = make_math_world("separate", seed=0), make_math_world("shared", seed=0)
    assert [e.x for e in a.get(split="test")] == [e.x for e in b.get(split="test")]
    sep = {e.kind: e.prompt for e in a.get(split="eval")} | {"composed": a.get(split="test")[0].prompt}
    assert sep["skill_a"].startswith("zib(") and sep["skill_b"].startswith("The dax of")
    assert sep["composed"].startswith("dax(zib(")  # a format neither skill expert saw
    assert all(e.prompt.startswith("Solve ") for e in b.examples)
    assert make_math_world("shared", seed=0).examples == b.examples  # deterministic
    b.to_json(tmp_path / "w.json")
    assert MathWorld.from_json(tmp_path / "w.json").examples == b.examples
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(MathTaskError, match="not a math-skills world"):
        MathWorld.from_json(tmp_path / "bad.json")


def test_generator_errors():
    with pytest.raises(MathTaskError, match="unknown condition"):
        make_math_world("cot")
    with pytest.raises(MathTaskError, match="exceeds"):
        make_math_world("shared", n_test=200, n_composed_train=100)
    with pytest.raises(MathTaskError, match="sizes"):
        make_math_world("shared", n_train=0)
    with pytest.raises(MathTaskError, match="bridged condition needs n_train >= 3"):
        make_math_world("bridged", n_train=2)
    with pytest.raises(MathTaskError, match="undefined"):
        zib(195)
    with pytest.raises(MathTaskError, match="undefined"):
        dax(105)
    with pytest.raises(MathTaskError, match="unknown split"):
        make_math_world("separate").train_pairs("d9")
    assert apply_ops(["zib", "dax"], 365) == [365, 476, 674]


def _check_spans(tok, w):
    for e in w.examples:
        p = tok(e.prompt, add_special_tokens=False)["input_ids"]
        a = tok(e.answer, add_special_tokens=False)["input_ids"]
        assert p + a == tok(e.prompt + e.answer, add_special_tokens=False)["input_ids"], e.prompt
        ids = p + a
        sp = solution_spans(e, tok)
        assert tok.decode(ids[slice(*sp["x"])]).strip() == str(e.x)
        assert tok.decode(ids[slice(*sp["answer"])]).strip() == str(e.result)
        for i, (arg, res) in enumerate(zip(e.values, e.values[1:]), 1):
            if f"step{i}_res" in sp:
                assert tok.decode(ids[slice(*sp[f"step{i}_arg"])]) == str(arg)
                assert tok.decode(ids[slice(*sp[f"step{i}_res"])]) == str(res)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_tokenisation_boundary_and_spans_smollm(smol_tok, condition):
    w = make_math_world(condition, seed=0, n_train=20, n_test=10, n_composed_train=5)
    _check_spans(smol_tok, w)
    for e in w.get(split="test"):  # SmolLM2 writes every digit as its own token
        sp = solution_spans(e, smol_tok)
        assert sp["answer"][1] - sp["answer"][0] == 3


@pytest.mark.parametrize("condition", ["shared", "bridged"])
def test_spans_byte_tokenizer(condition):
    from interp.models import byte_tokenizer

    tok = byte_tokenizer()
    w = make_math_world(condition, seed=0, n_train=12, n_test=5, n_composed_train=3)
    _check_spans(tok, w)
    if condition == "bridged":  # the cop chains' spans too, and the composed spans are shared's
        assert {len(e.ops) for e in w.get(split="d1")} == {1, 2}
        sh = make_math_world("shared", seed=0, n_train=12, n_test=5, n_composed_train=3)
        assert [solution_spans(e, tok) for e in w.get(split="test")] == \
            [solution_spans(e, tok) for e in sh.get(split="test")]


def test_math_config_table():
    cfg = load_config("experiments/math.toml")
    assert cfg.study_kind == "math" and cfg.math.conditions == ["separate", "shared"]
    two = load_config(None)
    assert two.math is None and two.study_kind == "two_hop"
    with pytest.raises(ConfigError, match="unknown config key 'math.n_tests'"):
        load_config(None, {"math.n_tests": 3})
    with pytest.raises(ConfigError, match="math.conditions"):
        load_config(None, {"math.conditions": ["separate", "cot"]})
    with pytest.raises(ConfigError, match="math.n_train"):
        load_config(None, {"math.n_train": 1})
    with pytest.raises(ConfigError, match="math.n_train must be >= 3 with the bridged"):
        load_config(None, {"math.conditions": ["bridged"], "math.n_train": 2})
    assert load_config(None, {"math.conditions": ["separate", "bridged"]}).math.conditions == ["separate", "bridged"]
    # a math config read back from run.json keeps its table; a two-hop one keeps None
    from interp.study.runner import _flatten

    assert load_config(None, _flatten(cfg.to_dict())).math == cfg.math
    assert load_config(None, _flatten(two.to_dict())).math is None
    br = load_config("experiments/math_bridged.toml")  # math.toml with the bridged condition alone
    assert br.math.conditions == ["bridged"]
    assert dataclasses.replace(br.math, conditions=cfg.math.conditions) == cfg.math
    assert {k: v for k, v in br.to_dict().items() if k != "math"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "math"}


def test_report_rules():
    from interp.study.steps.math_report import findings

    def table(shared, separate, skill=0.95):
        rows = []
        for cond, comp in (("shared", shared), ("separate", separate)):
            rows += [{"method": "expert_ab", "condition": cond, "skill_a_acc": skill, "composed_acc": 0.0},
                     {"method": "expert_bc", "condition": cond, "skill_b_acc": skill, "composed_acc": 0.0},
                     {"method": "uniform", "condition": cond, "composed_acc": comp},
                     {"method": "ties", "condition": cond, "composed_acc": comp / 2}]
        return pd.DataFrame(rows)

    f = findings(table(0.8, 0.1), ["separate", "shared"])
    assert [x["verdict"] for x in f] == ["yes", "yes"] and "uniform 80%" in f[1]["evidence"]
    assert findings(table(0.3, 0.1), ["separate", "shared"])[1]["verdict"] == "no"
    assert findings(table(0.8, 0.7), ["separate", "shared"])[1]["verdict"] == "mixed"
    assert findings(table(0.8, 0.1, skill=0.5), ["separate", "shared"])[0]["verdict"] == "no"
    # any list of conditions: one finding per templated condition, against separate when present
    three = pd.concat([table(0.3, 0.1), table(0.9, 0.1).query("condition == 'shared'").assign(condition="bridged"),
                       pd.DataFrame([{"method": "joint_12", "condition": "bridged", "composed_acc": 0.75}])])
    f = findings(three, ["separate", "shared", "bridged"])
    assert [x["verdict"] for x in f] == ["yes", "no", "yes"]
    assert "bridged uniform 90%" in f[2]["evidence"] and "separate uniform 10%" in f[2]["evidence"]
    assert "joint_12 (trained on both skills): bridged 75%" in f[2]["evidence"] and "bridged" in f[2]["claim"]
    alone = findings(three[three["condition"] == "bridged"], ["bridged"])
    assert [x["verdict"] for x in alone] == ["yes", "yes"] and "no separate" in alone[1]["claim"]
    assert findings(table(0.8, 0.1), ["separate"])[1:] == []


def test_report_title_names_the_conditions():
    from interp.study.steps.math_report import report_title

    assert report_title(["separate", "shared"]).endswith("Shared vs separate solution templates")
    assert report_title(["bridged"]).endswith("? Bridged solution template")


def test_mechanism_helpers():
    from interp.study.steps.math_mechanisms import lens_positions, region_of

    assert region_of("step1_res_2") == "step1_res" and region_of("step2_arg_last") == "step2_arg"
    assert region_of("x_0") == "x" and region_of("final") == "final" and region_of("other") == "other"
    sp = {"x": (3, 6), "step1_arg": (10, 13), "step1_res": (14, 17), "step2_arg": (19, 22),
          "step2_res": (23, 26), "answer": (29, 32)}
    assert lens_positions(sp, 8) == {"query_end": 7, "step1_eq": 13, "step2_eq": 22, "answer_eq": 28}
    assert lens_positions({"x": (0, 3), "answer": (5, 8)}, 5) == {"query_end": 4}


TINY = {"study.model": "tiny-llama", "study.threads": 1, "math.n_train": 16, "math.n_test": 8,
        "math.n_composed_train": 8, "math.n_patching_pairs": 2, "training.r": 4, "training.epochs": 1,
        "training.min_steps": 2, "training.precision": "fp32", "training.min_accuracy": 0.0, "mechanisms.n_examples": 3,
        "methods.variants": ["base", "expert_ab", "expert_bc", "uniform", "ties", "arrow", "oracle", "joint_12"],
        "mechanisms.variants": ["expert_ab", "uniform", "arrow"]}


TINY_3 = TINY | {"math.conditions": list(CONDITIONS)}  # math.toml's two conditions and bridged


@pytest.fixture(scope="module")
def math_run(tmp_path_factory):
    from interp.study import run_study

    out = tmp_path_factory.mktemp("math_run")
    run_study("experiments/math.toml", out=out, overrides=TINY_3)
    return out


def test_math_study_end_to_end(math_run, capsys):
    from interp.study import run_study
    from interp.study.math import STEPS
    from interp.study.tables import TABLES

    res = math_run / "results"
    acc = pd.read_csv(res / "accuracy.csv")
    assert set(acc["condition"]) == set(CONDITIONS) and (acc["test_set"] == acc["condition"]).all()
    assert set(acc["hop"]) == {"composed", "skill_a", "skill_b"}
    assert set(acc["method"]) == set(TINY["methods.variants"])
    assert ((acc["ci_low"] <= acc["accuracy"]) & (acc["accuracy"] <= acc["ci_high"])).all()
    assert (acc[acc["hop"] == "composed"]["n"] == 8).all()
    for name in ("dataset_summary", "experts", "scores", "math_lens", "math_patching", "math_contributions",
                 "math_summary", "subspace_overlap", "subspace_span_deficit", "subspace_key_overlap"):
        df = pd.read_csv(res / f"{name}.csv")
        assert len(df) and set(TABLES[name].columns) <= set(df.columns), name
        if name != "math_summary":
            assert set(df["condition"]) == set(CONDITIONS), name
    ex = pd.read_csv(res / "experts.csv")
    assert set(ex["expert"]) == {"ab", "bc", "ac", "joint_12"}  # ac: the span-deficit oracle
    lens = pd.read_csv(res / "math_lens.csv")
    assert set(lens[lens["condition"] == "separate"]["position"]) == {"query_end"}
    for cond in ("shared", "bridged"):
        assert set(lens[lens["condition"] == cond]["position"]) == {"query_end", "step1_eq", "step2_eq", "answer_eq"}
    assert set(lens["target"]) == {"y", "z"} and lens["layer"].max() == 4  # tiny Llama: 4 blocks
    pat = pd.read_csv(res / "math_patching.csv")
    assert set(pat["method"]) == {"uniform"}
    for cond in ("shared", "bridged"):
        assert {"x", "step1_res", "step2_arg"} <= set(pat[pat["condition"] == cond]["region"])
    con = pd.read_csv(res / "math_contributions.csv")
    assert set(con["method"]) == {"uniform", "arrow"} and set(con["adapter"]) == {"ab", "bc"}
    for cond in ("shared", "bridged"):
        assert set(con[con["condition"] == cond]["segment"]) == {"prompt", "step1", "step2", "answer"}
    assert set(con[con["condition"] == "separate"]["segment"]) == {"prompt", "answer"}
    assert (con["norm"] > 0).all()
    world = json.loads((math_run / "shared" / "world.json").read_text())
    assert world["condition"] == "shared"
    bridged = json.loads((math_run / "bridged" / "world.json").read_text())
    assert {tuple(e["ops"]) for e in bridged["examples"] if e["split"] == "d1"} == \
        {("zib",), ("cop", "zib"), ("zib", "cop")}
    summ = pd.read_csv(res / "dataset_summary.csv")
    assert set(summ[(summ["condition"] == "bridged") & (summ["split"] == "d2")]["n_ops"]) == {1, 2}
    page = (math_run / "report.html").read_text()
    assert len(page) > 100_000 and "Shared vs bridged vs separate solution templates" in page
    assert page.count("Reuse of separately trained skill experts composes") == 2  # shared, bridged
    for fig in ("fig-acc-composed", "fig-acc-skill_a", "fig-acc-skill_b", "fig-lens-y"):
        assert f'id="{fig}"' in page, fig
    run = json.loads((math_run / "run.json").read_text())
    assert set(STEPS) <= set(run["timings"]) and run["config"]["math"]["n_test"] == 8
    capsys.readouterr()
    before = (res / "accuracy.csv").read_bytes()
    run_study("experiments/math.toml", out=math_run, overrides=TINY_3)
    assert capsys.readouterr().err.count("cached") == len(STEPS)
    assert (res / "accuracy.csv").read_bytes() == before

