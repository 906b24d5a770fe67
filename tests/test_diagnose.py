"""`interp diagnose` on tiny models with adapters saved by peft itself (plain, rsLoRA, DoRA; Llama
and Qwen2): tables against independent computations, graceful degradation, CLI errors, and the
report rendered in headless Chromium."""

import json
import math
import re
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from browser import assert_rendered, chromium, render
from interp.cli import app
from interp.diagnose import DiagnoseError, PromptFileError, diagnose, read_prompts

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter(base, out, seed, **kw):
    """A PEFT adapter saved by peft (random non-zero factors, as after training)."""
    from peft import LoraConfig, get_peft_model

    from interp.models import load_hf

    hf, _ = load_hf(base)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False, **kw)
    pm = get_peft_model(hf, cfg)
    if kw.get("use_dora"):  # a trained-looking magnitude, not ‖W₀ + sBA‖ itself
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(out))
    return out


def _prompts(path, n=6):
    rows = [{"prompt": f"The capital of Zorv{i} is", "answer": " Paris", "subject": f"Zorv{i}",
             "bridge": "France", "hop1_prompt": f"Zorv{i} lies in", "hop2_prompt": "The capital of {bridge} is",
             "corrupt_prompt": f"The capital of Qelm{i} is", "expert": "ab" if i % 2 else "bc"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("diag_llama")
    ab = _peft_adapter("tiny-llama", d / "ab", 1)
    bc = _peft_adapter("tiny-llama", d / "bc", 2, use_rslora=True)
    tgt = _peft_adapter("tiny-llama", d / "tgt", 3)
    out = diagnose("tiny-llama", {"ab": str(ab), "bc": str(bc)}, combines=["uniform", "ties", "arrow", "oracle"],
                   prompts=_prompts(d / "p.jsonl"), target=("tgt", str(tgt)), out=d / "run", batch_size=4,
                   options={"ties": {"density": 0.5}})
    return out, {"ab": ab, "bc": bc, "tgt": tgt}, d / "p.jsonl"


def _csv(run, name):
    return pd.read_csv(run / "results" / f"{name}.csv")


def test_accuracy_equals_score_examples_directly(llama_run):
    from interp import load_hooked
    from interp.evaluate import score_examples, wilson_interval

    run, ad, prompts = llama_run
    qs = read_prompts(prompts)
    hm = load_hooked("tiny-llama", {"ab": str(ad["ab"]), "bc": str(ad["bc"])}, combine="uniform")
    direct = score_examples(hm, qs)  # unfolded, batch of all: independent of the run's path
    sc = _csv(run, "scores")
    mine = sc[(sc["variant"] == "uniform") & (sc["hop"] == "query")].sort_values("line")
    assert mine["first_token_correct"].tolist() == direct["first_token_correct"].tolist()
    assert mine["answer_logprob"].to_numpy() == pytest.approx(direct["answer_logprob"].to_numpy(), abs=1e-4)
    acc = _csv(run, "accuracy")
    row = acc[(acc["variant"] == "uniform") & (acc["hop"] == "query") & (acc["metric"] == "first_token")].iloc[0]
    k = int(direct["first_token_correct"].sum())
    assert row["n"] == len(qs) and row["accuracy"] == pytest.approx(k / len(qs))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(k, len(qs)), abs=1e-5)
    assert set(acc["hop"]) == {"query", "hop1", "hop2", "chain"}
    # explicit chaining: the variant's own greedy hop-1 answer, cut at the first . , or newline
    from interp.evaluate import greedy_answers

    preds = greedy_answers(hm, [q.hop1_prompt for q in qs], max_new_tokens=8)
    cut = [re.split(r"[\n.,]", p)[0].strip() for p in preds]
    chain = sc[(sc["variant"] == "uniform") & (sc["hop"] == "chain")].sort_values("line")
    assert chain["bridge_used"].fillna("").astype(str).tolist() == cut
    assert chain["prompt"].tolist() == [q.hop2_prompt.replace("{bridge}", c or "unknown") for q, c in zip(qs, cut)]
    assert set(acc["variant"]) == {"base", "expert_ab", "expert_bc", "uniform", "ties", "arrow", "oracle"}


def test_spectra_equal_svdvals_of_dense_delta(llama_run):
    """rsLoRA scaling s = α/√r computed here by hand from the saved tensors."""
    run, ad, _ = llama_run
    sp = _csv(run, "spectra")
    for name, scale in (("ab", 8 / 4), ("bc", 8 / math.sqrt(4))):
        t = load_file(str(ad[name] / "adapter_model.safetensors"))
        for key in [k for k in t if "lora_A" in k]:
            mod = key.split("base_model.model.")[1].split(".lora_A")[0]
            dw = scale * t[key.replace("lora_A", "lora_B")].double() @ t[key].double()
            ref = torch.linalg.svdvals(dw)[:4].numpy()
            got = sp[(sp["adapter"] == name) & (sp["module"] == mod)].sort_values("index")["sigma"].to_numpy()
            assert got == pytest.approx(ref, rel=1e-5), (name, mod)


def test_faithfulness_equals_the_merge_report(llama_run):
    from interp import load_hooked

    run, ad, _ = llama_run
    hm = load_hooked("tiny-llama", {"ab": str(ad["ab"]), "bc": str(ad["bc"])}, combine="ties", density=0.5)
    ref = hm.info["faithfulness"].set_index("module")["rel_error"]
    f = _csv(run, "faithfulness")
    got = f[f["variant"] == "ties"].set_index("module")["rel_error"]
    assert got.reindex(ref.index).to_numpy() == pytest.approx(ref.to_numpy(), rel=1e-4, abs=1e-8)
    assert f[f["variant"] == "uniform"]["rel_error"].max() < 1e-6  # exact ΔW-space average
    assert (f[f["variant"] == "ties"]["rel_error"] > 1e-3).all()


def test_router_contributions_lens_patching_and_findings(llama_run):
    run, _, _ = llama_run
    r = _csv(run, "router")
    assert set(r["variant"]) == {"arrow", "oracle"}
    assert (r[r["variant"] == "oracle"]["top1_match"] == 1.0).all()  # routed by the JSONL's own labels
    w = r.groupby(["variant", "layer"])["weight"].sum()
    assert w.to_numpy() == pytest.approx(1.0, abs=1e-5)  # softmax / one-hot weights per site
    c = _csv(run, "contributions")
    assert set(c[c["variant"] == "expert_ab"]["adapter"]) == {"ab"}
    assert set(c[c["variant"] == "uniform"]["adapter"]) == {"ab", "bc"} and (c["norm"] > 0).all()
    lens = _csv(run, "lens")
    assert set(lens["target"]) == {"bridge", "answer"} and set(lens["position"]) == {"e1_last", "final"}
    p = _csv(run, "patching")
    assert "expert_ab" not in set(p["variant"]) and {"base", "uniform"} <= set(p["variant"])
    assert (p[p["position_label"] == "final"].groupby(["variant", "example_id"])["layer"].count() > 0).all()
    html = (run / "report.html").read_text()
    order = [html.index(h) for h in ("<h2>Findings", "<h2>Adapter inventory", "<h2>What each merge keeps",
                                     "<h2>Geometry", "<h2>Behaviour on your prompts", "<h2>The bridge")]
    assert order == sorted(order)
    assert "exactly the weighted sum" in html and "results/accuracy.csv" in html
    ko = _csv(run, "key_overlap")
    assert set(ko["adapter"]) == {"ab", "bc"} and ((ko["kappa_composed"] >= 0) & (ko["kappa_composed"] <= 1 + 1e-9)).all()
    assert "results/key_overlap.csv" in html
    ek = _csv(run, "energy_kept")
    tk = ek[ek["expert"] == "target"]
    assert set(tk["variant"]) == {"uniform", "ties"} and "of the target&#x27;s update energy" in html
    # a merge lies inside the library's joint spans: it can hold no more of the target than they do
    sd0 = _csv(run, "span_deficit").set_index("module")["span_deficit"]
    uni = tk[tk["variant"] == "uniform"].set_index("module")["energy_kept"]
    assert (uni <= 1 - sd0.reindex(uni.index) + 1e-6).all()
    sd = _csv(run, "span_deficit")
    assert ((sd["span_deficit"] >= 0) & (sd["span_deficit"] <= 1)).all() and set(sd["target"]) == {"tgt"}


def test_patching_logit_differences_match_the_base_model(llama_run, tiny_llama):
    """The patching table's clean / corrupted logit differences are logit[answer] − logit[contrast]
    of the base model's own forward (contrast: its top prediction on the corrupted prompt)."""
    run, _, prompts = llama_run
    p = _csv(run, "patching")
    p = p[p["variant"] == "base"].drop_duplicates("example_id").set_index("example_id")
    assert len(p) >= 3
    hm = tiny_llama
    for q in read_prompts(prompts):
        with torch.no_grad():
            clean = hm.logits(torch.tensor([hm.encode(q.prompt)]))[0, -1].float()
            corr = hm.logits(torch.tensor([hm.encode(q.corrupt_prompt)]))[0, -1].float()
        a, c = hm.encode(q.answer)[0], int(corr.argmax())
        if a == c:
            assert q.line not in p.index  # no contrast: the pair is dropped
            continue
        assert p.loc[q.line, "clean_logit_diff"] == pytest.approx(float(clean[a] - clean[c]), abs=1e-3)
        assert p.loc[q.line, "corrupted_logit_diff"] == pytest.approx(float(corr[a] - corr[c]), abs=1e-3)


def test_contributions_equal_delta_w_times_module_inputs(llama_run):
    """hook_delta norms of an expert alone = ‖s·B·A·x‖ with x the module's own input (forward
    pre-hooks on the base linear, interp.subspace.module_inputs), per layer in quadrature."""
    from interp import load_hooked
    from interp.adapters.factors import layer_of
    from interp.subspace import module_inputs

    run, ad, prompts = llama_run
    hm = load_hooked("tiny-llama", {"ab": str(ad["ab"])}, combine="none")
    deltas = hm.info["expert_deltas"]["ab"]
    xs = module_inputs(hm, [q.prompt for q in read_prompts(prompts)], list(deltas), "final")
    per_layer: dict[int, torch.Tensor] = {}
    for m, d in deltas.items():
        n2 = d.apply(xs[m].double()).norm(dim=1) ** 2
        per_layer[layer_of(m)] = per_layer.get(layer_of(m), 0) + n2
    c = _csv(run, "contributions")
    c = c[(c["variant"] == "expert_ab")].set_index("layer")["norm"]
    for layer, n2 in per_layer.items():
        assert c.loc[layer] == pytest.approx(float(torch.sqrt(n2).mean()), rel=1e-4)


def test_patchscope_table_equals_the_engine_and_a_hooked_forward(llama_run):
    """Patchscope rows = :func:`interp.mechanisms.patchscope` on the same variant run on all
    prompts at once (the run chunks them by its batch size of 4), and one cell = a full forward
    of the identity prompt with the source state written in by ``run_with_hooks``."""
    from interp import load_hooked
    from interp.mechanisms import patchscope
    from interp.mechanisms.lens import offsets_token_spans
    from interp.mechanisms.patchscope import IDENTITY_PROMPT

    run, ad, prompts = llama_run
    qs = read_prompts(prompts)
    ps = _csv(run, "patchscope")
    assert set(ps["variant"]) == {"base", "expert_ab", "expert_bc", "uniform", "ties", "arrow"}  # not oracle
    hm = load_hooked("tiny-llama", {"ab": str(ad["ab"]), "bc": str(ad["bc"])}, combine="uniform")
    spans = [offsets_token_spans(q, hm) for q in qs]
    ref = patchscope(hm, qs, "e1_last", "identity", targets=("e2",), spans=spans, progress=False)
    ref["line"] = [qs[i].line for i in ref["example_id"]]
    mine = ps[ps["variant"] == "uniform"].set_index(["line", "source_layer"]).sort_index()
    ref = ref.set_index(["line", "source_layer"]).sort_index()
    assert len(mine) == len(qs) * hm.n_layers and mine.index.equals(ref.index)
    assert mine["logprob"].to_numpy() == pytest.approx(ref["logprob"].to_numpy(), abs=1e-4)
    assert (mine["rank"].to_numpy() == ref["rank"].to_numpy()).all()
    # one cell by hand, on the arrow router (per-token routing inside the patched forward)
    hm = load_hooked("tiny-llama", {"ab": str(ad["ab"]), "bc": str(ad["bc"])}, combine="arrow")
    q, layer = qs[1], 2
    name = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        _, cache = hm.bridge.run_with_cache(torch.tensor([hm.encode(q.prompt)]))
        h = cache[name][0, offsets_token_spans(q, hm)["e1"][1] - 1]
        tt = torch.tensor([hm.encode(IDENTITY_PROMPT)])

        def put(x, hook):
            x = x.clone()
            x[0, -1] = h
            return x
        lp = torch.log_softmax(hm.bridge.run_with_hooks(tt, fwd_hooks=[(name, put)])[0, -1].float(), -1)
    row = ps[(ps["variant"] == "arrow") & (ps["line"] == q.line) & (ps["source_layer"] == layer)].iloc[0]
    assert row["logprob"] == pytest.approx(float(lp[hm.encode(" " + q.bridge)[0]]), abs=1e-4)


def test_backpatch_and_knockout_tables_equal_hooked_forwards(llama_run, tiny_llama):
    """A back-patching cell of the ties merge = a full forward with the later final-position state
    written into the earlier layer (``run_with_hooks``); the diagonal reproduces the unpatched
    run; a knockout row of the base = a forward whose attention pattern row to the subject is
    zeroed and renormalised (``hook_pattern``), as in the knockout engine's own test."""
    from interp import load_hooked
    from interp.diagnose.bridge import KNOCKOUT_WINDOW
    from interp.mechanisms.lens import offsets_token_spans

    run, ad, prompts = llama_run
    qs = read_prompts(prompts)
    bp = _csv(run, "backpatch")
    L = tiny_llama.n_layers
    assert set(bp["variant"]) == {"base", "expert_ab", "expert_bc", "uniform", "ties", "arrow"}
    assert (bp.groupby("variant").size() == len(qs) * L * (L + 1) // 2).all()
    diag = bp[bp["source_layer"] == bp["target_layer"]]
    assert diag["delta"].abs().max() < 1e-4 and not diag["fixed"].any()
    assert (bp["delta"] - (bp["logprob"] - bp["base_logprob"])).abs().max() < 1e-4  # 6 significant digits
    hm = load_hooked("tiny-llama", {"ab": str(ad["ab"]), "bc": str(ad["bc"])}, combine="ties", density=0.5)
    q, ls, lt = qs[4], 3, 1
    toks = torch.tensor([hm.encode(q.prompt)])
    with torch.no_grad():
        logits, cache = hm.bridge.run_with_cache(toks)
        src = cache[f"blocks.{ls}.hook_resid_pre"][0, -1].clone()

        def put(x, hook):
            x = x.clone()
            x[0, -1] = src
            return x
        patched = hm.bridge.run_with_hooks(toks, fwd_hooks=[(f"blocks.{lt}.hook_resid_pre", put)])
    a = hm.encode(q.answer)[0]
    row = bp[(bp["variant"] == "ties") & (bp["line"] == q.line) & (bp["source_layer"] == ls)
             & (bp["target_layer"] == lt)].iloc[0]
    assert row["logprob"] == pytest.approx(torch.log_softmax(patched[0, -1].float(), -1)[a].item(), abs=1e-4)
    assert row["base_logprob"] == pytest.approx(torch.log_softmax(logits[0, -1].float(), -1)[a].item(), abs=1e-4)
    ko = _csv(run, "knockout")
    assert set(ko["variant"]) == set(bp["variant"]) and (ko.groupby("variant").size() == len(qs) * L).all()
    hm = tiny_llama
    q, c = qs[2], 1
    row = ko[(ko["variant"] == "base") & (ko["line"] == q.line) & (ko["layer"] == c)].iloc[0]
    lo, hi = max(0, c - (KNOCKOUT_WINDOW - 1) // 2), min(L - 1, c + KNOCKOUT_WINDOW // 2)
    assert (row["first_layer"], row["last_layer"]) == (lo, hi)
    s, e = offsets_token_spans(q, hm)["e1"]
    toks = torch.tensor([hm.encode(q.prompt)])

    def renorm(p, hook):
        p = p.clone()
        p[0, :, -1, s:e] = 0
        p[0, :, -1] = p[0, :, -1] / p[0, :, -1].sum(-1, keepdim=True)
        return p
    with torch.no_grad():
        out = hm.bridge.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", renorm)
                                                        for l in range(lo, hi + 1)])
    assert row["logprob"] == pytest.approx(torch.log_softmax(out[0, -1].float(), -1)[hm.encode(q.answer)[0]].item(),
                                           abs=1e-4)
    html = (run / "report.html").read_text()
    for name in ("patchscope", "backpatch", "knockout"):
        assert f"results/{name}.csv" in html
    assert "Patchscope reads the bridge" in html and "Back-patching" in html and "skip oracle" in html


def test_open_diagnosis_reloads_a_diagnosis(llama_run, tmp_path):
    """``interp.diagnose.open_diagnosis``: its CSVs, its prompts, and each variant reloaded hooked
    exactly as diagnosed (the ties merge's faithfulness equals the table's); ``open_run`` names it."""
    from interp.diagnose import open_diagnosis
    from interp.diagnose.inputs import DiagnoseError
    from interp.errors import InterpError
    from interp.study import open_run

    run, _, prompts = llama_run
    with pytest.raises(InterpError, match="open_diagnosis"):
        open_run(run)
    with pytest.raises(DiagnoseError, match="no run.json"):
        open_diagnosis(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"study": {"model": "tiny-llama"}}}))
    with pytest.raises(DiagnoseError, match="open_run"):
        open_diagnosis(tmp_path)
    r = open_diagnosis(run)
    assert r.variant_names == ["base", "expert_ab", "expert_bc", "uniform", "ties", "arrow", "oracle"]
    assert r.read_csv("backpatch").equals(_csv(run, "backpatch"))
    assert [q.prompt for q in r.queries()] == [q.prompt for q in read_prompts(prompts)]
    hm = r.load_variant("ties")
    assert any(n.endswith("hook_delta") for n in hm.bridge.hook_dict)
    f = _csv(run, "faithfulness")
    want = f[f["variant"] == "ties"].set_index("module")["rel_error"]
    got = hm.info["faithfulness"].set_index("module")["rel_error"].reindex(want.index)
    assert got.to_numpy() == pytest.approx(want.to_numpy(), rel=1e-4, abs=1e-8)  # density 0.5 restored
    assert r.load_variant("base").n_layers == hm.n_layers
    with pytest.raises(DiagnoseError, match="unknown variant"):
        r.load_variant("dare")


def test_rerun_is_cached_and_identical(llama_run, tmp_path):
    run, ad, prompts = llama_run
    before = {p.name: p.read_bytes() for p in (run / "results").iterdir()}
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "results")
    for s in ("variants", "report"):
        (copy / "steps" / f"{s}.json").unlink()
    diagnose("tiny-llama", {"ab": str(ad["ab"]), "bc": str(ad["bc"])}, combines=["uniform", "ties", "arrow", "oracle"],
             prompts=prompts, target=("tgt", str(ad["tgt"])), out=copy, batch_size=4, steps=["variants"],
             options={"ties": {"density": 0.5}})
    for name in ("scores", "accuracy", "lens", "patching", "router", "contributions", "faithfulness", "patchscope",
                 "backpatch", "knockout"):
        assert (copy / "results" / f"{name}.csv").read_bytes() == before[f"{name}.csv"], name


def test_summary_json_times_each_step_and_variant(llama_run):
    """summary.json: seconds of every pipeline step (those of run.json) and of every variant, its
    stages adding up to no more than its total."""
    run, _, _ = llama_run
    s = json.loads((run / "summary.json").read_text())
    steps = json.loads((run / "run.json").read_text())["timings"]
    assert {"inventory", "geometry", "keys", "variants", "report"} <= set(s["stage_seconds"])
    assert s["stage_seconds"] == steps
    vs = s["variants"]["variant_seconds"]
    assert set(vs) == {"base", "expert_ab", "expert_bc", "uniform", "ties", "arrow", "oracle"}
    for v, per in s["variants"]["stage_seconds"].items():
        assert per["total"] == vs[v] > 0
        parts = {k: x for k, x in per.items() if k != "total"}
        assert {"load", "scores"} <= set(parts) and all(x >= 0 for x in parts.values())
        assert sum(parts.values()) <= per["total"] + 0.01
    assert "backpatch" in s["variants"]["stage_seconds"]["uniform"]
    assert "backpatch" not in s["variants"]["stage_seconds"]["oracle"]  # not run on the oracle
    assert sum(vs.values()) <= s["stage_seconds"]["variants"] + 0.01


def test_qwen2_dora_without_prompts_is_geometry_only(tmp_path):
    """No prompts: inventory and geometry only; the default Arrow is dropped for DoRA (noted);
    the DoRA spectrum is that of peft's own merged weight minus the base."""
    from peft import PeftModel

    from interp.models import load_hf

    a = _peft_adapter("tiny-qwen2", tmp_path / "plain", 1)
    b = _peft_adapter("tiny-qwen2", tmp_path / "dora", 2, use_dora=True)
    run = diagnose("tiny-qwen2", {"plain": str(a), "dora": str(b)}, out=tmp_path / "run")
    res = {p.stem for p in (run / "results").iterdir()}
    assert {"inventory", "adapters", "spectra", "overlap", "layer_energy"} <= res
    assert not res & {"scores", "accuracy", "lens", "patching", "router", "contributions"}
    f = _csv(run, "faithfulness")  # what each merge keeps is geometry: reported without prompts
    assert set(f["variant"]) == {"uniform", "ties"} and f[f["variant"] == "uniform"]["rel_error"].max() < 1e-6
    inv = _csv(run, "inventory").set_index("adapter")
    assert bool(inv.loc["dora", "use_dora"]) and not bool(inv.loc["plain", "use_dora"])
    cfg = json.loads((run / "run.json").read_text())["config"]["diagnose"]
    assert "arrow" not in cfg["combines"] and any("arrow" in n for n in cfg["notes"])
    html = (run / "report.html").read_text()
    assert "No prompts given" in html and "<h2>Behaviour" not in html
    hf0, _ = load_hf("tiny-qwen2")
    W0 = {n: p.detach().clone() for n, p in hf0.named_parameters()}
    merged = PeftModel.from_pretrained(load_hf("tiny-qwen2")[0], str(b)).merge_and_unload()
    sp = _csv(run, "spectra")
    mod = "model.layers.1.self_attn.v_proj"
    dw = (merged.get_submodule(mod).weight.double() - W0[mod + ".weight"].double())
    ref = torch.linalg.svdvals(dw).numpy()
    got = sp[(sp["adapter"] == "dora") & (sp["module"] == mod)].sort_values("index")["sigma"].to_numpy()
    k = min(len(got), 5)
    assert got[:k] == pytest.approx(ref[:k], rel=1e-4, abs=1e-6)


def _cli(args):
    res = CliRunner().invoke(app, ["diagnose", *args])
    errs = [l for l in res.output.splitlines() if l.startswith("error:")]
    return res, errs


def test_cli_errors_are_one_line_exit_2(tmp_path):
    a = _peft_adapter("tiny-llama", tmp_path / "ab", 1)
    d = _peft_adapter("tiny-llama", tmp_path / "dora", 2, use_dora=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a b", "answer": " c"}\n{"prompt": "x", "answer": " y", "answr": "z"}\n')
    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text('{"prompt": "The capital of Zorv is", "answer": " Paris", '
                      '"corrupt_prompt": "The capital of the far northern land of Qelm is"}\n')
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 5000, "answer": " end"}) + "\n")
    unlabelled = _prompts(tmp_path / "ok.jsonl")
    unlabelled.write_text(unlabelled.read_text().replace(', "expert": "ab"', ''))
    cases = [
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--prompts", str(bad)], "line 2"),
        (["--model", "tiny-llama", "--adapter", f"ab={tmp_path / 'nope'}"], "does not exist"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--adapter", f"d={d}", "--combine", "avg"], "unknown combine"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--adapter", f"d={d}", "--combine", "arrow"], "DoRA"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--adapter", f"d={d}", "--combine", "oracle"], "expert"),
        (["--model", "tiny-qwen2", "--adapter", f"ab={a}"], "made for base model"),
        (["--model", str(tmp_path / "nomodel"), "--adapter", f"ab={a}"], "neither a registered name"),
        (["--model", "tiny-llama", "--adapter", "ab"], "NAME=DIR"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--prompts", str(long)], "line 1: prompt + answer"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--adapter", f"bc={a}", "--combine", "ties",
          "--option", "ties.rank=3"], "do not apply to combine='ties'"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--adapter", f"bc={a}", "--combine", "ties",
          "--option", "arrow.top_k=1"], "not diagnosed"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--option", "density"], "COMBINE.KEY=VALUE"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--adapter", f"bc={a}", "--prompts", str(unlabelled)],
         "line 2: 'expert'"),
        (["--model", "tiny-llama", "--adapter", f"ab={a}", "--prompts", str(uneven)], "equal token lengths"),
    ]
    for args, msg in cases:
        res, errs = _cli([*args, "--out", str(tmp_path / "r")])
        assert res.exit_code == 2, (args, res.output)
        assert len(errs) == 1 and msg in errs[0], (msg, res.output)
    assert not (tmp_path / "r").exists()  # refused before any work


def test_read_prompts_refusals(tmp_path):
    p = tmp_path / "p.jsonl"
    for text, msg in [('{"prompt": "a", "answer": " b", "bridge": 3}', "must be a string"),
                      ('{"prompt": "a", "answer": ""}', "'answer' is missing"),
                      ('{"prompt": "a", "answer": " b", "subject": "q"}', "does not occur"),
                      ('{"prompt": "a", "answer": " b", "hop1_prompt": "x", "hop2_prompt": "y"}', "{bridge}"),
                      ('{"prompt": "a", "answer": " b", "expert": "zz"}', "not one of the adapters"),
                      ('{"prompt": "a", "answer": " b", "hop1_prompt": "x", "hop2_prompt": "{bridge} y", '
                       '"hop1_expert": "zz", "hop2_expert": "ab"}', "hop1_expert 'zz' is not one of the adapters"),
                      ('{"prompt": "a", "answer": " b", "hop1_prompt": "x", "hop2_prompt": "{bridge} y", '
                       '"hop1_expert": "ab"}', "hop1_expert and hop2_expert go together"),
                      ('{"prompt": "a", "answer": " b", "hop1_expert": "ab", "hop2_expert": "ab"}',
                       "need hop1_prompt and hop2_prompt"),
                      ('{"prompt": "a", "answer": " b", "hop1_prompt": "x", "hop2_prompt": "{bridge} y", '
                       '"hop1_expert": "ab", "hop2_expert": "ab"}\n'
                       '{"prompt": "a", "answer": " b", "hop1_prompt": "x", "hop2_prompt": "{bridge} y"}',
                       "'hop1_expert' is given on some lines with hop prompts but not this one"),
                      ('[1]', "JSON object"), ('{"prompt": "a",', "not valid JSON"), ("\n", "no queries")]:
        p.write_text(text)
        with pytest.raises(PromptFileError, match=re.escape(msg)):
            read_prompts(p, ["ab"])


def test_oracle_routes_each_hop_to_its_labelled_expert(llama_run, tmp_path):
    """Per-hop oracle routing (``hop1_expert`` / ``hop2_expert``) = each adapter loaded alone:
    hop 1 scored by expert ab, hop 2 by expert bc, the chain = ab's own greedy hop-1 answer put
    into the hop-2 prompt and scored by bc; the two-hop prompt by its ``expert``, when given."""
    from interp import load_hooked
    from interp.evaluate import greedy_answers, score_examples

    _, ad, prompts = llama_run
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    for r in rows:
        r.update(hop1_expert="ab", hop2_expert="bc")
    with_q = tmp_path / "q.jsonl"
    with_q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    without_q = tmp_path / "h.jsonl"  # hop labels only: the oracle scores the hops, not the query
    without_q.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "expert"}) + "\n" for r in rows))
    adapters = {"ab": str(ad["ab"]), "bc": str(ad["bc"])}
    qs = read_prompts(with_q)
    alone = {a: load_hooked("tiny-llama", {a: adapters[a]}, combine="none") for a in adapters}
    ref: dict[str, pd.DataFrame] = {}
    ref["hop1"] = score_examples(alone["ab"], [type("E", (), dict(prompt=q.hop1_prompt, answer=" " + q.bridge))
                                               for q in qs])
    ref["hop2"] = score_examples(alone["bc"], [type("E", (), dict(prompt=q.hop2_prompt.replace("{bridge}", q.bridge),
                                                                  answer=q.answer)) for q in qs])
    cut = [re.split(r"[\n.,]", p)[0].strip() for p in greedy_answers(alone["ab"], [q.hop1_prompt for q in qs],
                                                                          max_new_tokens=8)]
    ref["chain"] = score_examples(alone["bc"], [type("E", (), dict(prompt=q.hop2_prompt.replace("{bridge}", c or "unknown"),
                                                                   answer=q.answer)) for q, c in zip(qs, cut)])
    ref["query"] = pd.concat([score_examples(alone[q.expert], [q]) for q in qs], ignore_index=True)
    for prompts_file, sets in ((with_q, ("query", "hop1", "hop2", "chain")), (without_q, ("hop1", "hop2", "chain"))):
        out = diagnose("tiny-llama", adapters, combines=["oracle"], prompts=prompts_file, out=tmp_path / prompts_file.stem,
                       batch_size=4)
        sc = _csv(out, "scores")
        sc = sc[sc["variant"] == "oracle"]
        assert set(sc["hop"]) == set(sets)
        for hop in sets:
            mine = sc[sc["hop"] == hop].sort_values("line")
            assert mine["prompt"].tolist() == ref[hop]["prompt"].tolist()
            assert mine["first_token_correct"].tolist() == ref[hop]["first_token_correct"].tolist()
            assert mine["answer_logprob"].to_numpy() == pytest.approx(ref[hop]["answer_logprob"].to_numpy(), abs=1e-4)
    with pytest.raises(DiagnoseError, match="hop1_expert"):  # no label at all: refused up front
        diagnose("tiny-llama", adapters, combines=["oracle"], prompts=_unlabelled(tmp_path / "none.jsonl"),
                 out=tmp_path / "none")


def _unlabelled(path):
    rows = [{"prompt": "The capital of Zorv1 is", "answer": " Paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="Debian chromium not installed (make test installs it)")
def test_diagnose_report_renders_in_headless_chromium(llama_run, tmp_path):
    run, _, _ = llama_run
    assert_rendered(run / "report.html", tmp_path / "profile", min_figures=8)


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="Debian chromium not installed (make test installs it)")
def test_browser_wall_time_limit_is_a_clear_error(llama_run, tmp_path):
    """Running past the wall-clock limit is a TimeoutError saying so (not a hang, not a parse
    failure of a half-written DOM)."""
    run, _, _ = llama_run
    with pytest.raises(TimeoutError, match="INTERP_BROWSER_TIMEOUT"):
        render(run / "report.html", tmp_path / "profile", timeout_s=0.2)


def test_findings_state_their_numbers():
    """Synthetic tables with known answers: each sentence carries the numbers that decide it."""
    from interp.diagnose.findings import findings
    from interp.evaluate import wilson_interval

    def acc_row(v, role, hop, k, n):
        lo, hi = wilson_interval(k, n)
        return dict(variant=v, role=role, hop=hop, metric="first_token", n=n, accuracy=k / n, ci_low=lo, ci_high=hi)

    acc = pd.DataFrame([acc_row("base", "base", "query", 0, 40), acc_row("expert_ab", "expert", "query", 2, 40),
                        acc_row("uniform", "combine", "query", 30, 40), acc_row("ties", "combine", "query", 1, 40),
                        acc_row("ties", "combine", "chain", 35, 40)])
    faith = pd.DataFrame(dict(variant=["uniform", "uniform", "ties"], module=["m0", "m1", "m0"],
                              rel_error=[1e-9, 2e-9, 0.25]))
    ek = pd.DataFrame(dict(variant=["ties"] * 4, module=["m0", "m1", "m0", "m1"], expert=["ab", "ab", "bc", "bc"],
                           energy_kept=[1.0, 0.5, 0.9, 0.9], energy=[1.0, 3.0, 1.0, 1.0]))
    text = " | ".join(f["text"] + " " + f["evidence"] for f in findings(
        {"accuracy": acc, "faithfulness": faith, "energy_kept": ek}))
    assert "uniform is exactly the weighted sum" in text
    assert "ties departs" in text and "0.25" in text and "m0" in text
    assert "ties keeps 62% of expert ab's" in text  # (1·1 + 0.5·3) / 4 = 0.625
    assert "uniform answers 30/40 (75%" in text and "beats the best single expert, expert_ab 2/40" in text
    assert "ties answers 1/40" in text and "is within the intervals of" in text
    assert "ties answers when chained explicitly (35/40" in text
    assert not findings({})


def test_one_adapter_without_prompts_and_help(tmp_path):
    a = _peft_adapter("tiny-llama", tmp_path / "only", 4)
    res = CliRunner().invoke(app, ["diagnose", "--model", "tiny-llama", "--adapter", f"only={a}",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    assert {p.stem for p in (run / "results").iterdir()} == {"inventory", "adapters", "spectra", "layer_energy"}
    html = (run / "report.html").read_text()
    assert "one adapter: no combine" in html and "No prompts given" in html
    res = CliRunner().invoke(app, ["diagnose", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--adapter" in res.output and "--prompts" in res.output


def test_worked_example_script_runs_end_to_end_on_a_tiny_model(tmp_path):
    """experiments/diagnose_example.py (the README's worked example) on tiny-llama, 2 steps: its
    files are valid diagnose inputs, the corrupted prompts align, and it prints findings."""
    import importlib.util
    from pathlib import Path

    from interp.diagnose import check_tokens
    from interp.models import load_hf

    path = Path(__file__).resolve().parents[1] / "experiments" / "diagnose_example.py"
    spec = importlib.util.spec_from_file_location("diagnose_example", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    argv = ["--model", "tiny-llama", "--chains", "4", "--steps", "2", "--retrain-steps", "3", "--out", str(tmp_path / "ex")]
    s = ex.main(argv)
    qs = read_prompts(tmp_path / "ex" / "queries.jsonl", ["ab", "bc"])
    assert len(qs) == 4 and all(q.subject and q.bridge and q.hop1_prompt for q in qs)
    assert all((q.hop1_expert, q.hop2_expert) == ("ab", "bc") for q in qs)
    for name, m in s["experts"].items():  # below 90% after 2 steps (a random tiny model): retrained at 3
        first = m["attempts"][0]
        assert first["steps"] == 2
        if first["train_first_token_acc"] < ex.GOOD_ENOUGH:
            assert [t["steps"] for t in m["attempts"]] == [2, 3] and m["steps"] == 3
    assert {"train_ab", "train_bc", "diagnose_variants", "diagnose_report"} <= set(s["stage_seconds"])
    assert set(s["variant_seconds"]) == {"base", "expert_ab", "expert_bc", "uniform", "ties", "arrow", "oracle"}
    again = ex.main(argv)  # a second call reuses the kept experts (the retrained ones included)
    assert {k: v["steps"] for k, v in again["experts"].items()} == {k: v["steps"] for k, v in s["experts"].items()}
    assert all(len(v["attempts"]) == 1 for v in again["experts"].values())
    check_tokens(qs, load_hf("tiny-llama")[1])  # equal-length corrupted prompts, nothing empty
    assert any(q.corrupt_prompt for q in qs)
    assert s["findings"]
    assert any("Back-patching" in f for f in s["findings"])
    res = {p.stem for p in (tmp_path / "ex" / "diagnosis" / "results").iterdir()}
    assert {"patchscope", "backpatch", "knockout", "accuracy", "lens"} <= res
