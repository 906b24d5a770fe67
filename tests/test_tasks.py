"""interp.tasks: two-hop worlds (determinism, disjointness, spans, errors) and math problems."""

import dataclasses
import re

import pytest

from interp.tasks.math_word import MathTaskError, make_math_tasks, math_summary
from interp.tasks.two_hop import (TEMPLATES, Example, World, WorldError, answer_token_ids,
                                  chaining_prompts, fill_template, make_world, token_spans,
                                  validate_names)


@pytest.fixture(scope="module")
def world():
    return make_world(seed=3, n_chains_per_tier=8, n_dac_chains_per_tier=4)


def test_world_deterministic_per_seed():
    a = make_world(seed=1, n_chains_per_tier=6, n_dac_chains_per_tier=2)
    b = make_world(seed=1, n_chains_per_tier=6, n_dac_chains_per_tier=2)
    c = make_world(seed=2, n_chains_per_tier=6, n_dac_chains_per_tier=2)
    assert [e.to_dict() for e in a.examples] == [e.to_dict() for e in b.examples]
    assert a.chains.equals(b.chains)
    assert list(a.chains["e1"]) != list(c.chains["e1"])


def test_splits_disjoint_and_complete(world):
    ch = world.chains
    test_ids = set(ch[ch.role == "test"].chain_id)
    dac_ids = set(ch[ch.role == "d_ac"].chain_id)
    assert len(test_ids) == 3 * 8 and len(dac_ids) == 3 * 4 and not test_ids & dac_ids
    ids = lambda split: {e.chain_id for e in world.get(split=split)}  # noqa: E731
    assert ids("test") == test_ids and ids("d_ac") == dac_ids
    assert not {e.e1 for e in world.get(split="test")} & {e.e1 for e in world.get(split="d_ac")}
    # hops of every test chain are in D1 / D2, via training templates only
    d1 = {(e.e1, e.e2) for e in world.get(split="d1")}
    d2 = {(e.tier, e.e2, e.e3) for e in world.get(split="d2")}
    for e in world.get(split="test"):
        assert (e.e1, e.e2) in d1 and (e.tier, e.e2, e.e3) in d2
    assert not any(e.held_out_template for s in ("d1", "d2", "d_ac") for e in world.get(split=s))
    assert any(e.held_out_template for e in world.get(split="test"))
    # the two-hop answer is determined: one chain (hence one e2) per e1
    assert ch["e1"].is_unique
    # F uses invented names only; H uses real country facts also present in retain
    retain = {(e.e2, e.e3) for e in world.get(split="retain")}
    assert all((e.e2, e.e3) in retain for e in world.get(split="d2", tier="H"))
    assert not {e.e2 for e in world.get(tier="F", split="test")} & {c for c, _ in retain}
    summ = world.summary()
    assert summ["n"].sum() == len(world.examples)
    assert set(summ["split"]) == {"d1", "d2", "d_ac", "test", "eval", "retain"}


def test_prompts_and_spans_bytes(world, tiny_llama):
    for e in world.examples[:: max(1, len(world.examples) // 60)]:
        assert e.answer.startswith(" ") and not e.prompt.endswith(" ")
        ids = tiny_llama.encode(e.prompt)
        for key, (a, b) in token_spans(e, tiny_llama).items():
            name = {"e1": e.e1, "e2": e.e2}[key]
            assert e.prompt[slice(*e.char_spans[key])] == name
            assert tiny_llama.tokenizer.decode(ids[a:b]).strip() == name
            # byte tokenizer: one token per byte, except a space + letter, merged into one token
            assert b - a == len(name.encode()) - len(re.findall(r" [A-Za-z]", name))
        assert answer_token_ids(e, tiny_llama) == tiny_llama.encode(e.answer)


def test_spans_and_boundary_smollm_tokenizer(smol_tok):
    w = make_world(seed=0, n_chains_per_tier=8, n_dac_chains_per_tier=2, tokenizer=smol_tok)
    assert w.config["first_token_distinct"]
    multi = 0
    for e in w.examples:
        p = smol_tok(e.prompt, add_special_tokens=False)["input_ids"]
        a = smol_tok(e.answer, add_special_tokens=False)["input_ids"]
        assert p + a == smol_tok(e.prompt + e.answer, add_special_tokens=False)["input_ids"]
        for key, (s, t) in token_spans(e, smol_tok).items():
            name = e.e1 if key == "e1" else e.e2
            assert smol_tok.decode(p[s:t]).strip() == name
            multi += (t - s) > 1
    assert multi > 10
    # candidate answers of one query type have distinct first tokens
    for kind in ("hop1", "hop2"):
        answers = {e.answer for e in w.get(kind=kind, tier="F")} | \
            {e.answer for e in w.get(kind=kind, tier="H")}
        firsts = {smol_tok(a, add_special_tokens=False)["input_ids"][0] for a in answers}
        assert len(firsts) == len(answers)
    assert 6 <= max(len(smol_tok(e.prompt)["input_ids"]) for e in w.examples) <= 20


def test_json_roundtrip(world, tmp_path):
    path = tmp_path / "w.json"
    world.to_json(path)
    back = World.from_json(path)
    assert [e.to_dict() for e in back.examples] == [e.to_dict() for e in world.examples]
    assert back.chains.equals(world.chains) and back.config == world.config
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WorldError, match="not valid JSON"):
        World.from_json(tmp_path / "bad.json")
    with pytest.raises(WorldError, match="world file .* does not exist"):
        World.from_json(tmp_path / "missing.json")


def test_chaining_prompts(world):
    hop1 = world.get(split="eval", kind="hop1")
    preds = [" " + e.e2 + ".\nmore" for e in hop1]
    preds[0] = "  "
    out = chaining_prompts(hop1, preds)
    assert len(out) == len(hop1)
    for e, c in zip(hop1[1:], out[1:]):
        assert c.kind == "chain_hop2" and c.answer == " " + e.e3 and c.e2_used == e.e2
        assert c.prompt[slice(*c.char_spans["e2"])] == e.e2
        gold = [x for x in world.get(split="eval", kind="hop2")
                if x.chain_id == e.chain_id and x.template_id == c.template_id][0]
        assert gold.prompt == c.prompt  # right hop-1 answer -> exactly the hop-2 query
    assert out[0].e2_used == "" and "unknown" in out[0].prompt
    assert len(chaining_prompts(world, [e.e2 for e in hop1])) == len(hop1)
    with pytest.raises(WorldError, match="predictions"):
        chaining_prompts(hop1, preds[:-1])
    with pytest.raises(WorldError, match="hop1"):
        chaining_prompts(world.get(split="test")[:1], ["x"])


def test_bad_inputs(tiny_llama):
    with pytest.raises(WorldError, match="duplicate"):
        validate_names(["Paris", "paris"])
    with pytest.raises(WorldError, match="empty"):
        validate_names(["Paris", " "])
    with pytest.raises(WorldError, match="duplicate"):
        make_world(n_chains_per_tier=2, famous_people=("Albert Einstein",) * 10)
    with pytest.raises(WorldError, match="n_chains_per_tier"):
        make_world(n_chains_per_tier=0)
    with pytest.raises(WorldError, match="famous people"):
        make_world(n_chains_per_tier=8, famous_people=("Albert Einstein", "Isaac Newton"))
    with pytest.raises(WorldError, match="held out"):
        make_world(n_chains_per_tier=2, n_train_templates=3)
    with pytest.raises(WorldError, match="empty entity name"):
        fill_template(TEMPLATES["works_in"][0], e1="")
    e = Example("abc", "", "hop1", "F", 0, 0, "a", "b", "c", {"e1": (0, 1)}, "d1")
    with pytest.raises(WorldError, match="tokenises to no tokens"):
        answer_token_ids(e, tiny_llama)

    class Tok:  # a tokenizer that drops a name entirely
        is_fast = True

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            return {"input_ids": [], "offset_mapping": []}

        def decode(self, ids):
            return ""

    with pytest.raises(WorldError, match="tokenises to nothing"):
        validate_names(["Zorbin"], Tok())
    with pytest.raises(WorldError, match="covers no token"):
        token_spans(dataclasses.replace(e, answer=" x"), Tok())


def test_math_tasks():
    a = make_math_tasks(seed=0, n_train=20, n_eval=5, n_test=10)
    assert [x.prompt for x in a] == [x.prompt for x in make_math_tasks(0, 20, 5, 10)]
    trip = lambda split: {(x.a, x.b, x.c) for x in a if x.split == split}  # noqa: E731
    assert not trip("test") & (trip("train_1") | trip("train_2") | trip("eval"))
    for x in a:
        want = x.a * x.b + (x.c if x.kind != "skill1" else 0)
        assert x.final_answer == want and x.answer == f" {want}"
        shown = f"has {x.a * x.b} " if x.kind == "skill2" else f"buys {x.a} "
        assert x.prompt.endswith("Answer:") and shown in x.prompt
    shared = make_math_tasks(seed=0, n_train=20, n_eval=5, n_test=10, variant="shared")
    comp = [x for x in shared if x.kind == "composed"][0]
    assert comp.answer == f" {comp.a}*{comp.b}={comp.a * comp.b}. {comp.a * comp.b}+{comp.c}={comp.final_answer}."
    s1 = [x for x in shared if x.kind == "skill1"][0]
    s2 = [x for x in shared if x.kind == "skill2"][0]
    assert comp.answer.startswith(" " + _eq(comp)) and s1.answer == " " + _eq(s1)
    assert s2.answer == f" {s2.a * s2.b}+{s2.c}={s2.final_answer}."
    summ = math_summary(a)
    assert summ.set_index(["split", "kind"])["n"].to_dict() == {
        ("eval", "skill1"): 5, ("eval", "skill2"): 5, ("test", "composed"): 10,
        ("train_1", "skill1"): 20, ("train_2", "skill2"): 20}
    with pytest.raises(MathTaskError, match="variant"):
        make_math_tasks(variant="cot")
    with pytest.raises(MathTaskError, match="distinct triples"):
        make_math_tasks(n_train=400)


def _eq(x):
    return f"{x.a}*{x.b}={x.a * x.b}."


def test_math_boundary_smollm_tokenizer(smol_tok):
    for variant in ("separate", "shared"):
        for x in make_math_tasks(seed=0, n_train=10, n_eval=2, n_test=10, variant=variant):
            p = smol_tok(x.prompt, add_special_tokens=False)["input_ids"]
            a = smol_tok(x.answer, add_special_tokens=False)["input_ids"]
            assert p + a == smol_tok(x.prompt + x.answer, add_special_tokens=False)["input_ids"]


@pytest.mark.smollm
def test_h_tier_real_facts_known_by_base(smollm2):
    from interp.evaluate import score_examples

    w = make_world(seed=0, n_chains_per_tier=4, n_dac_chains_per_tier=1, base=smollm2,
                   real_city_country=(("Paris", "France"), ("Tokyo", "Japan"), ("Berlin", "Germany"),
                                      ("Rome", "Italy"), ("Atlantis", "Narnia")),
                   famous_people=("Albert Einstein", "Isaac Newton", "Barack Obama", "Taylor Swift",
                                  "Elvis Presley", "Zyqwop Blarfenstein"),
                   animals=("tiger", "elephant", "eagle"), n_invented_countries=2)
    kept = {e.e2 for e in w.get(split="retain")}
    assert "Atlantis" not in kept and len(kept) >= 2
    assert "Zyqwop Blarfenstein" not in set(w.chains["e1"])  # unfamiliar "famous" name dropped
    facts = [e for e in w.get(split="d2", tier="H")]
    scored = score_examples(smollm2, facts)
    assert scored["first_token_correct"].all()
    fam = w.familiarity
    assert fam[fam.etype == "person"].set_index("name").loc["Albert Einstein", "mean_logprob"] > \
        fam[(fam.etype == "person") & (fam.tier == "FH")]["mean_logprob"].max()
    assert set(w.familiarity_summary()["tier"]) >= {"F", "H", "R"}
