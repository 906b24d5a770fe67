"""Fast checks of the benchmark harness (no benchmark is run: those are measurements, not tests)."""

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_power_law_fit_recovers_exponents():
    from gpu.bench_patching_gpu import fit

    rows = [{"layers": L, "positions": T, "prompts": B, "seconds": 0.003 * L ** 1.9 * T ** 1.1 * B ** 0.8}
            for L, T, B in [(6, 16, 8), (12, 16, 8), (24, 16, 8), (24, 8, 8), (24, 64, 8), (24, 16, 128)]]
    f = fit(rows, "seconds")
    assert f["a_layers"] == pytest.approx(1.9, abs=1e-6)
    assert f["b_positions"] == pytest.approx(1.1, abs=1e-6)
    assert f["c_prompts"] == pytest.approx(0.8, abs=1e-6)
    assert f["k"] == pytest.approx(0.003, rel=1e-6)


def test_throughput_counts_only_steps_after_warmup():
    from bench_training import throughput

    ends = [1.0, 3.0, 4.0, 5.0]          # step 1 (warm-up) ends at 1.0, then 2 s, 1 s, 1 s
    tps, med = throughput(ends, [100, 10, 20, 30], warmup=1)
    assert tps == pytest.approx(60 / 4.0)
    assert med == pytest.approx(1.0)


def test_random_pairs_answers_differ_and_one_position_corrupted():
    from gpu.arch import random_pairs

    clean, corr, ca, xa = random_pairs(50, 64, 7, seed=3, corrupt_pos=2)
    assert bool((ca != xa).all()) and int(xa.min()) >= 1 and int(xa.max()) < 50
    diff = (clean != corr)
    assert not bool(diff[:, [0, 1, 3, 4, 5, 6]].any())


def test_merge_check_agrees_with_peft_svd():
    from run_all import merge_check

    c = merge_check("cpu", d=96, r=4)
    assert c["max_abs_diff_top_r_sigma"] < 1e-4 * max(1.0, c["sigma_max"])


def test_markdown_table_renders_rows_and_missing_values():
    from run_all import row, to_markdown

    res = {"device": "cpu", "when": "now", "torch": "x", "host": "h", "quick": True, "note": "n", "errors": {"b": "boom"},
           "rows": [row("patching", "case A", 0.5, 10.0, "s", 20.0, 1e-6, 100.0, 200.0, "≥ 5×"),
                    row("merge", "case B", 0.1, 1.0, "s", 10.0, None, float("nan"), float("nan"))]}
    md = to_markdown(res)
    lines = [l for l in md.splitlines() if l.startswith("| patching") or l.startswith("| merge")]
    assert len(lines) == 2 and "20.0×" in lines[0] and "100 / 200" in lines[0]
    assert "–" in lines[1] and "boom" in md and math.isnan(res["rows"][1]["peak_mib_ours"])


def test_machine_rows_name_the_processor_and_flag_a_wrong_auto_choice():
    from run_all import rows_machine

    j = {"cpu": {"model": "AMD EPYC", "capability": "AVX2", "avx512_bf16": False},
         "rows": [{"benchmark": "training step", "model": "m", "case": "c", "fp32_s": 1.0, "bf16_s": 5.0,
                   "bf16_speedup": 0.2, "auto_choice": "bf16", "auto_reason": "r", "auto_is_faster": False},
                  {"benchmark": "forward threads", "model": "m", "case": "beside one busy process",
                   "threads1_s": 2.0, "threads2_s": 10.0, "two_over_one": 5.0}]}
    prec, thr = rows_machine(j)
    assert "AMD EPYC" in prec["case"] and "AVX2" in prec["case"] and "AVX512-BF16 no" in prec["case"]
    assert prec["speedup"] == 0.2 and "NOT the faster" in prec["note"]
    assert thr["speedup"] == 5.0
