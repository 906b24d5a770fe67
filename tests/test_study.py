"""The main job end to end on a random-init tiny Llama: every step, resume, determinism, the
notebook, and the report rendered in headless Chromium."""

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from browser import assert_rendered, chromium, render
from interp.config import ConfigError
from interp.study import STEPS, StudyError, open_run, run_study

TINY = "experiments/tiny.toml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    run_study(TINY, out=out)
    return out


def test_every_output_is_written(tiny_run):
    acc = pd.read_csv(tiny_run / "results" / "accuracy.csv")
    assert {"method", "library", "test_set", "hop", "n", "accuracy", "ci_low", "ci_high"} <= set(acc.columns)
    assert {"F", "H", "R"} <= set(acc["test_set"]) and {"two_hop", "hop1", "hop2", "chain"} <= set(acc["hop"])
    assert ((acc["ci_low"] <= acc["accuracy"]) & (acc["accuracy"] <= acc["ci_high"])).all()
    for name in ("lens", "patching", "probes", "subspace_adapters", "subspace_overlap", "subspace_spectra",
                 "subspace_layer_energy", "subspace_span_deficit", "experts", "scores"):
        assert (tiny_run / "results" / f"{name}.csv").stat().st_size > 0, name
    figs = json.loads((tiny_run / "figures" / "index.json").read_text())
    assert len(figs) >= 8
    for name in figs:
        assert (tiny_run / "figures" / f"{name}.html").is_file() and (tiny_run / "figures" / f"{name}.png").is_file()
    run = json.loads((tiny_run / "run.json").read_text())
    assert set(STEPS) <= set(run["timings"]) and run["versions"]["torch"].startswith("2.13")
    assert run["config"]["study"]["model"] == "tiny-llama"
    assert (tiny_run / "report.html").stat().st_size > 1_000_000  # plotly.js inlined: self-contained


def test_rerun_is_cached_and_identical(tiny_run, capsys):
    before = (tiny_run / "results" / "accuracy.csv").read_bytes()
    run_study(TINY, out=tiny_run)
    err = capsys.readouterr().err
    assert err.count("cached") == len(STEPS)
    assert (tiny_run / "results" / "accuracy.csv").read_bytes() == before


def test_steps_subset_reruns_only_those(tiny_run):
    marker = tiny_run / "steps" / "figures.json"
    t0 = json.loads(marker.read_text())["finished"]
    run_study(TINY, out=tiny_run, steps=["figures", "report"])
    assert json.loads(marker.read_text())["finished"] > t0
    with pytest.raises(ConfigError, match="unknown step"):
        run_study(TINY, out=tiny_run, steps=["nope"])


def test_resume_after_losing_a_step(tiny_run, tmp_path):
    """A run interrupted after evaluation resumes from the cached units and ends identical."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    for step in ("mechanisms", "subspace", "figures", "report"):
        (copy / "steps" / f"{step}.json").unlink()
    (copy / "results" / "accuracy.csv").unlink()
    (copy / "steps" / "evaluate.json").unlink()
    run_study(TINY, out=copy)
    a = pd.read_csv(tiny_run / "results" / "accuracy.csv")
    b = pd.read_csv(copy / "results" / "accuracy.csv")
    pd.testing.assert_frame_equal(a, b)


def test_bad_out_dir_and_config(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StudyError, match="not writable"):
        run_study(TINY, out=blocker / "sub")
    bad = tmp_path / "bad.toml"
    bad.write_text("[world]\nn_chain = 3\n")
    with pytest.raises(ConfigError, match="world.n_chain"):
        run_study(bad, out=tmp_path / "o")


def test_notebook_runs_top_to_bottom(tiny_run):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read("experiments/explore_run.ipynb", as_version=4)
    os.environ["INTERP_RUN"] = str(tiny_run)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    finally:
        os.environ.pop("INTERP_RUN", None)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("per-adapter hook points" in o.get("text", "") for o in outputs)


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="Debian chromium not installed (make test installs it)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    dom = assert_rendered(tiny_run / "report.html", tmp_path / "profile", min_figures=8)
    assert dom.count('class="main-svg"') >= int(re.search(r'data-figures-total="(\d+)"', dom).group(1))


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="Debian chromium not installed (make test installs it)")
def test_report_tells_the_truth_about_its_evidence(tiny_run, tmp_path):
    """Rendered in Chromium, the tiny run's page warns that the model is random-init and
    familiarity unverified, names the probe estimator of its config, has a finding sentence in
    every section, shows the main two-hop figure before the controls, and titles every axis."""
    run = json.loads((tiny_run / "run.json").read_text())
    est = run["config"]["mechanisms"]["probe_estimator"]
    dom, _ = render(tiny_run / "report.html", tmp_path / "profile")
    assert 'id="evidence-warning"' in dom and "random-init" in dom and "verify_familiarity = false" in dom
    caps = re.findall(r'<p class="cap">(.*?)</p>', dom, flags=re.S)
    probe = [c for c in caps if "probes" in c and "e₂" in c]
    assert probe and all(est in c for c in probe), probe
    other = {"ridge": "logistic", "logistic": "ridge"}[est]
    assert not any(other in c for c in probe)
    sections = re.findall(r"<h2>(.*?)</h2>\s*(<p>.*?</p>)?", dom, flags=re.S)
    for title, text in sections:
        if title not in ("Findings", "Config", "Versions and timings"):
            assert re.sub("<[^>]+>", "", text).strip(), f"section {title!r} has no finding sentence"
    assert dom.index('id="fig-accuracy_two_hop"') < dom.index('id="fig-accuracy_controls"')
    for fig in json.loads((tiny_run / "figures" / "index.json").read_text()):
        layout = json.loads((tiny_run / "figures" / f"{fig}.json").read_text())["layout"]
        for ax in ("xaxis", "yaxis"):
            if ax in layout and fig not in ("overlap_phi_row", "overlap_phi_col", "overlap_cosine"):
                assert layout[ax].get("title", {}).get("text") or fig.startswith("accuracy"), (fig, ax)


def test_kill_9_during_mechanisms_resumes_to_identical_tables(tiny_run, tmp_path):
    """kill -9 the study in the middle of its patching/lens sweeps; the re-run resumes from the
    variants already cached and its tables equal the uninterrupted run's, byte for byte."""
    import signal
    import sys
    import time

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    for step in ("mechanisms", "subspace", "figures", "report"):
        (copy / "steps" / f"{step}.json").unlink()
    shutil.rmtree(copy / "cache" / "mechanisms")
    code = f"from interp.study import run_study; run_study({TINY!r}, out={str(copy)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list((copy / "cache" / "mechanisms").glob("*.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = list((copy / "cache" / "mechanisms").glob("*.json"))
    assert done_before and not (copy / "steps" / "mechanisms.json").exists()  # killed mid-step
    run_study(TINY, out=copy)
    for name in ("lens", "patching", "probes", "backpatch"):
        a = (tiny_run / "results" / f"{name}.csv").read_bytes()
        assert (copy / "results" / f"{name}.csv").read_bytes() == a, name


def test_sigint_during_mechanisms_exits_130_and_resumes_to_identical_tables(tiny_run, tmp_path):
    """One Ctrl-C in the middle of the patching/lens sweep of `interp run` ends it within seconds
    with status 130; the same command then resumes and its tables equal the uninterrupted run's."""
    import signal
    import sys
    import time

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    for step in ("mechanisms", "subspace", "figures", "report"):
        (copy / "steps" / f"{step}.json").unlink()
    shutil.rmtree(copy / "cache" / "mechanisms")
    cmd = [sys.executable, "-m", "interp.cli", "run", "-c", TINY, "--out", str(copy)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while time.time() < deadline and not list((copy / "cache" / "mechanisms").glob("*.json")):
        time.sleep(0.1)
    time.sleep(0.5)  # inside the next variant's sweep
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == 130 and time.monotonic() - t0 < 8, (rc, err[-2000:])
    assert "run the same command again" in err and "Traceback" not in err
    assert not (copy / "steps" / "mechanisms.json").exists()  # stopped mid-step
    assert subprocess.run(cmd, capture_output=True, timeout=900).returncode == 0
    for name in ("lens", "patching", "probes", "backpatch"):
        a = (tiny_run / "results" / f"{name}.csv").read_bytes()
        assert (copy / "results" / f"{name}.csv").read_bytes() == a, name


def test_csv_text_round_trips_tokens_with_line_breaks():
    """A decoded token can be a bare carriage return; plain ``to_csv`` would split its row."""
    import io

    from interp.study import csv_text

    df = pd.DataFrame({"pred_first_token": ["\r", "a\nb", ' "q"', None], "ok": [True, False, True, False],
                       "logprob": [-1.23456789, 2.0, float("nan"), 3.5], "n": [1, 2, 3, 4]})
    plain = pd.read_csv(io.StringIO(df.to_csv(index=False)))
    assert plain["pred_first_token"][0] != "\r" or plain.shape != df.shape  # the failure being fixed
    back = pd.read_csv(io.StringIO(csv_text(df, significant=6)))
    assert back["pred_first_token"].tolist()[:3] == ["\r", "a\nb", ' "q"'] and pd.isna(back["pred_first_token"][3])
    assert back["ok"].tolist() == [True, False, True, False] and back["n"].tolist() == [1, 2, 3, 4]
    assert back["logprob"][0] == -1.23457 and pd.isna(back["logprob"][2])


def test_mechanisms_finding_states_the_tables_numbers():
    """The mechanisms section's sentence, on hand-made tables whose answers are known."""
    from types import SimpleNamespace

    from interp.study.steps.report import mechanisms_finding

    rows = []
    for ex in range(4):  # e2 top-1 at layer 2 on 3 of 4 queries for "uniform"; never for "base"
        for layer in range(4):
            rows.append(("uniform", ex, layer, 0 if (layer == 2 and ex < 3) else 5))
            rows.append(("base", ex, layer, 7))
    lens = pd.DataFrame(rows, columns=["method", "example_id", "layer", "rank"]).assign(
        target="e2", position="final", kind="two_hop")
    bp = pd.DataFrame({"method": "uniform", "example_id": [0, 0, 1, 2], "was_correct": [False, False, False, True],
                       "fixed": [False, True, False, False]})
    probes = pd.DataFrame({"method": ["base", "uniform"], "layer": [1, 3], "position": "final",
                           "accuracy": [0.2, 0.9], "control_accuracy": [0.1, 0.3], "selectivity": [0.1, 0.6],
                           "chance": 0.1, "estimator": "ridge"})
    tables = {"lens": lens, "backpatch": bp, "probes": probes}
    text = mechanisms_finding(SimpleNamespace(table=tables.get))
    assert "<b>uniform</b>: e₂ is decodable (top-1) at the final position from layer 2, most often at layer 2 (75%" in text
    assert "<b>base</b>: e₂ is never the top logit-lens token at the final position (best median rank 7)" in text
    assert "fixes 1 of 2 for <b>uniform</b>" in text
    assert "on <b>uniform</b> at layer 3, final position: accuracy 90% against control 30%" in text


def test_expert_below_the_accuracy_floor_is_trained_again(tiny_run, tmp_path, monkeypatch):
    """``[training] min_accuracy``: an expert below it on its own facts is trained as many epochs
    again, continuing from its first attempt; a rerun keeps that expert without training anything."""
    cfg = tmp_path / "floor.toml"
    text = Path(TINY).read_text().replace("min_accuracy = 0.0", "min_accuracy = 1.0")
    # two experts (ab, and ac of the subspace step) keep it short
    text = re.sub(r"(\[methods\]\n)variants = \[[^]]*\]", r'\1variants = ["base", "expert_ab"]', text)
    text = re.sub(r"(\[mechanisms\]\n)variants = \[[^]]*\]", r'\1variants = ["base"]', text)
    cfg.write_text(re.sub(r"patching_variants = \[[^]]*\]", 'patching_variants = ["base"]', text))
    out = tmp_path / "run"
    run_study(cfg, out=out, steps=["world", "experts"])
    plain = pd.read_csv(tiny_run / "results" / "experts.csv").set_index("expert")
    floor = pd.read_csv(out / "results" / "experts.csv").set_index("expert")
    below = [n for n in ("ab", "ac") if plain.loc[n, "train_first_token_acc"] < 1.0]
    assert len(below) >= 1  # the tiny recipe leaves experts short of 100%: the floor must act
    assert list(floor.index) == ["ab", "ac"]
    for name, row in floor.iterrows():
        # the first attempt is the floor-free run's expert exactly (same init, recipe and data)
        assert row["first_attempt_acc"] == pytest.approx(plain.loc[name, "train_first_token_acc"])
        assert bool(row["retrained"]) == (name in below)
        assert row["steps"] == plain.loc[name, "steps"] * (2 if name in below else 1)
        meta = json.loads((out / "adapters" / name / "interp_meta.json").read_text())
        assert meta["config"]["epochs"] == 2 and (meta["start_from"] is not None) == (name in below)
        if name in below:  # continued from the first attempt, which is the floor-free run's expert
            plain_sha = hashlib.sha256((tiny_run / "adapters" / name / "adapter_model.safetensors").read_bytes())
            assert meta["start_from"] == plain_sha.hexdigest()
    from interp.study.steps.report import evidence_warnings

    warned = [w for w in evidence_warnings(open_run(out)) if "as many epochs again" in w]
    assert len(warned) == 1 and all(f"{n} (" in warned[0] for n in below)
    import interp.adapters.train as train_mod

    def refuse(*a, **k):
        raise AssertionError("a finished expert was trained again")

    before = (out / "adapters" / below[0] / "adapter_model.safetensors").read_bytes()
    (out / "steps" / "experts.json").unlink()
    monkeypatch.setattr(train_mod, "load_hf", refuse)  # train_expert loads a model only to train
    run_study(cfg, out=out, steps=["experts"])
    assert (out / "adapters" / below[0] / "adapter_model.safetensors").read_bytes() == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "results" / "experts.csv").set_index("expert"), floor)


def test_evaluate_caches_the_merges_the_subspace_step_reads(tiny_run):
    """The merged ΔW the evaluate step loaded (``hm.info["deltas"]``) is cached once per config and
    is bit for bit what the subspace step would compute from the experts' factors; a damaged
    file is an error naming it, not a silent recompute."""
    from interp.adapters.factors import read_adapter
    from interp.study.merge_cache import load_merge, merge_path, same_merge
    from interp.study.runner import Run, resolve_config
    from interp.study.variants import LIBRARY, VARIANTS

    cfg = resolve_config(TINY, {})
    run = Run(cfg, tiny_run, timings={})
    pair = [read_adapter(run.expert_dir(e)) for e in LIBRARY]
    checked = []
    for v in ("uniform", "ties"):
        assert v in cfg.methods.variants
        cached = load_merge(run, v)
        assert cached is not None, v
        # written by the evaluate step (from the loaded model), before its marker
        assert merge_path(run, v).stat().st_mtime <= (tiny_run / "steps" / "evaluate.json").stat().st_mtime, v
        assert same_merge(cached, dict(VARIANTS[v].merge_deltas(pair, cfg.methods))), v
        checked.append(v)
    assert checked == ["uniform", "ties"]
    other = Run(resolve_config(TINY, {"methods.ties_density": 0.3}), tiny_run, timings={})
    assert merge_path(other, "ties") != merge_path(run, "ties") and load_merge(other, "ties") is None
    path = merge_path(run, "ties")
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-9] ^= 0x40  # inside the last tensor's data: still a valid safetensors file
    try:
        for bad in (good[:100], bytes(flipped)):
            path.write_bytes(bad)
            with pytest.raises(StudyError, match="damaged"):
                load_merge(run, "ties")
    finally:
        path.write_bytes(good)
    assert same_merge(load_merge(run, "ties"), cached)
    digest = path.with_name(path.name + ".sha256")
    kept = digest.read_bytes()
    digest.unlink()  # a merge without its checksum is not one we can vouch for: not cached
    try:
        assert load_merge(run, "ties") is None
    finally:
        digest.write_bytes(kept)


def test_a_damaged_score_cache_is_an_error_naming_it(tiny_run, tmp_path):
    """A cached score table cut short (whole lines or mid-line) or edited is refused with its
    path, instead of silently giving the accuracy table fewer rows or a parser traceback; a
    deleted one is recomputed to the same bytes."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    path = next((copy / "cache" / "scores").glob("ties.*.csv"))
    assert path.with_name(path.name + ".sha256").is_file()
    good = path.read_bytes()
    lines = good.splitlines(keepends=True)
    assert len(lines) > 20
    for bad in (b"".join(lines[:12]), good[: len(good) // 2], good.replace(b",", b";", 1)):
        path.write_bytes(bad)
        (copy / "steps" / "evaluate.json").unlink(missing_ok=True)  # the step runs again, reading its cache
        with pytest.raises(StudyError, match=f"cached table .*{re.escape(path.name)} is damaged"):
            run_study(TINY, out=copy, steps=["evaluate"])
    for gone in ("table", "checksum"):  # deleted, or cut and its checksum deleted: computed again
        path.write_bytes(b"".join(lines[:12]))
        (path if gone == "table" else path.with_name(path.name + ".sha256")).unlink()
        (copy / "steps" / "evaluate.json").unlink(missing_ok=True)
        run_study(TINY, out=copy, steps=["evaluate"])
        assert path.read_bytes() == good
        assert (copy / "results" / "scores.csv").read_bytes() == (tiny_run / "results" / "scores.csv").read_bytes()


def test_a_cache_file_without_its_checksum_is_computed_again_not_trusted(tmp_path):
    """A cached table whose ``.sha256`` is gone (cut off before it was written, deleted, or from
    before checksums) cannot be vouched for: ``cached_csv`` computes it again (a table cut to
    fewer rows was otherwise read as the whole), and reading it as checked is an error."""
    from interp.study.runner import cached_csv, read_cached_csv

    path = tmp_path / "t.csv"
    make = lambda: pd.DataFrame({"a": [1, 2, 3], "b": ['x "y"', "z", "w"]})  # noqa: E731
    df = cached_csv(path, make)
    good = path.read_bytes()
    path.with_name("t.csv.sha256").unlink()
    path.write_bytes(good[: good.index(b'"z"')])  # a whole row cut off: still parses
    with pytest.raises(StudyError, match="t.csv is damaged"):
        read_cached_csv(path)
    assert cached_csv(path, make).equals(df) and path.read_bytes() == good


def test_unit_tables_are_recomputed_without_checksums_and_refused_when_edited(tmp_path):
    """The per-variant mechanism tables: a marker edited to list fewer tables (which silently
    dropped that variant's rows from the others) is an error naming it; a marker or table
    without its checksum makes the unit count as not finished."""
    from interp.study.runner import read_unit_tables, write_unit_tables

    parts = {"lens": pd.DataFrame({"x": [1, 2]}), "patching": pd.DataFrame({"y": [3.5]})}
    write_unit_tables(tmp_path, "base", "k", parts)
    got = read_unit_tables(tmp_path, "base", "k")
    assert sorted(got) == ["lens", "patching"] and got["patching"]["y"].tolist() == [3.5]
    assert got["lens"]["method"].tolist() == ["base", "base"]
    marker = tmp_path / "base.k.json"
    good = marker.read_bytes()
    for bad in (b'["lens"]', b"garbage", b"[1]"):
        marker.write_bytes(bad)
        with pytest.raises(StudyError, match="base.k.json is damaged"):
            read_unit_tables(tmp_path, "base", "k")
    marker.write_bytes(good)
    (tmp_path / "base.patching.k.csv.sha256").unlink()
    assert read_unit_tables(tmp_path, "base", "k") is None
    write_unit_tables(tmp_path, "base", "k", parts)
    (tmp_path / "base.k.json.sha256").unlink()
    assert read_unit_tables(tmp_path, "base", "k") is None


def test_run_json_and_step_markers_that_are_not_objects_are_set_aside(tiny_run, tmp_path):
    """A run.json or step marker edited into valid JSON of another shape (``[]``, ``null``, a list
    where a table of timings goes) reads as absent instead of a traceback: the step whose marker
    it was runs again, and run.json is written anew."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    (copy / "steps" / "report.json").write_text("[1]")
    (copy / "run.json").write_text('{"timings": [1, 2], "stages": 5}')
    run_study(TINY, out=copy)
    assert isinstance(json.loads((copy / "steps" / "report.json").read_text()), dict)
    run = json.loads((copy / "run.json").read_text())
    assert isinstance(run["timings"], dict) and "report" in run["timings"]
    (copy / "run.json").write_bytes(b"\xff\xfe{")
    run_study(TINY, out=copy)
    assert isinstance(json.loads((copy / "run.json").read_text()), dict)
