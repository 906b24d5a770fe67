"""The command line as a new user meets it: one-line errors before any work, fast start, offline."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from interp.cli import STEP_NAMES, app

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, message", [
    (["--config", "nope.toml"], "config file nope.toml does not exist"),
    (["--steps", "world,magic"], "unknown step 'magic'"),
    (["--device", "gpu"], "study.device must be cpu or cuda"),
    (["--threads", "two"], "--threads must be an integer"),
    (["--precision", "fp16"], "training.precision='fp16'"),
    (["--dtype", "fp16"], "evaluation.dtype must be one of auto, fp32, tf32, bf16"),
    (["--dtype", "tf32"], "'tf32' needs study.device cuda"),
    (["--model", "/no/such/model"], "neither a registered name"),
    (["--procs", "many"], "--procs must be an integer"),
    (["--procs", "-1"], "--procs must be a positive integer"),
    (["--procs", "4096"], "--procs 4096: this machine has"),
])
def test_user_errors_are_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--config", "experiments/tiny.toml", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()  # nothing written


def test_unknown_config_key_and_debug_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[world]\nn_chain_per_tier = 3\n")
    res = CliRunner().invoke(app, ["run", "--config", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "world.n_chain_per_tier" in res.output
    res = CliRunner().invoke(app, ["--debug", "run", "--config", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and res.exception is not None and "n_chain_per_tier" in str(res.exception)


def test_model_dir_without_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    res = CliRunner().invoke(app, ["run", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no config.json" in res.output


def test_help_lists_the_steps_and_the_default_run_dir():
    from interp.study import STEPS

    assert STEP_NAMES.split(",") == STEPS
    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and STEP_NAMES in res.output and "runs/demo" in res.output


def test_cli_start_imports_no_torch():
    code = "import sys, interp.cli; bad = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_models_command_imports_no_torch():
    """`interp models` answers from the torch-free registry (it must take well under a second)."""
    code = ("import sys; from typer.testing import CliRunner; from interp.cli import app; "
            "r = CliRunner().invoke(app, ['models']); assert r.exit_code == 0, r.output; "
            "assert 'smollm2-135m' in r.output and 'tiny-llama' in r.output, r.output; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_offline_enforced_without_environment_variables(tmp_path):
    """No HF_*_OFFLINE in the environment and every non-loopback connection refused: the tiny study
    still runs, because interp switches the hub libraries offline itself."""
    script = textwrap.dedent(f"""
        import socket
        attempts = []
        def refuse(self, address, *a, **k):
            attempts.append(address)
            raise OSError(f"network used: {{address}}")
        socket.socket.connect = refuse
        socket.create_connection = lambda *a, **k: refuse(None, a)
        from interp.study import run_study
        run_study("experiments/tiny.toml", out={str(tmp_path / "r")!r}, steps=["world", "experts", "evaluate"],
                  overrides={{"methods.variants": ["base", "expert_ab", "uniform"],
                              "mechanisms.variants": ["base"], "training.epochs": 1}})
        import huggingface_hub.constants as c
        assert c.HF_HUB_OFFLINE and not attempts, attempts
    """)
    env = {k: v for k, v in os.environ.items() if "OFFLINE" not in k}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "r" / "results" / "accuracy.csv").is_file()


def test_targets_the_model_lacks_are_one_line_before_any_step(tmp_path):
    """Checked on the model's meta-device skeleton: refused before the world step writes anything."""
    res = CliRunner().invoke(app, ["run", "--config", "experiments/tiny.toml", "--out", str(tmp_path / "r"),
                                   "--model", "tiny-gpt2"])
    assert res.exit_code == 2 and "training.target_modules" in res.output and "c_attn" in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


def test_training_targets_checked_on_a_local_directory_skeleton(tmp_path):
    from interp.adapters.train import check_training_targets
    from interp.errors import TrainingError
    from interp.models import build_tiny

    hf, tok = build_tiny("qwen2")
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    check_training_targets(str(tmp_path / "m"), ["q_proj", "down_proj"])  # present: no error
    with pytest.raises(TrainingError, match=r"\['c_fc'\] not found.*q_proj"):
        check_training_targets(str(tmp_path / "m"), ["q_proj", "c_fc"])


def test_cuda_refused_before_the_run_directory_exists(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = CliRunner().invoke(app, ["run", "--config", "experiments/tiny.toml", "--out", str(tmp_path / "r"),
                                   "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA GPU" in res.output and not (tmp_path / "r").exists()


def test_known_library_warnings_quiet_unless_debug(recwarn):
    """The two warnings peft triggers on every run are filtered inside commands, other warnings
    pass, `--debug` shows all, and the filters do not leak out of the command."""
    import warnings

    from interp import cli

    def body():
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Could not find a config file in tiny-llama - will assume ...", UserWarning)
        warnings.warn("something else", UserWarning)

    cli._guarded(body)
    assert [str(w.message) for w in recwarn] == ["something else"]
    recwarn.clear()
    cli._state["debug"] = True
    try:
        cli._guarded(body)
    finally:
        cli._state["debug"] = False
    assert len(recwarn) == 3
    recwarn.clear()
    body()
    assert len(recwarn) == 3


def test_procs_relaunches_the_same_run_under_torchrun(tmp_path, monkeypatch):
    """``--procs N`` runs the checked command as N torchrun processes (``--procs auto``: one per
    free core on a CPU); the relaunched command carries every option, and really runs."""
    import interp.cli as cli
    import interp.hardware as hardware
    from interp.study.distributed import resolve_procs

    monkeypatch.setattr(hardware, "free_cores", lambda: 64)
    assert resolve_procs(0, "cpu") == 4  # auto: at most 4 processes on a CPU
    monkeypatch.setattr(hardware, "free_cores", lambda: 2)
    assert resolve_procs(0, "cpu") == 2 and resolve_procs(1, "cpu") == 1
    seen = []

    class Fake:
        def __init__(self, cmd, **kwargs):
            from interp.study.distributed import terminate_with_parent

            # torchrun must die with the launcher (tests/test_distributed.py stops it for real)
            assert kwargs == {"preexec_fn": terminate_with_parent}, kwargs
            seen.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", Fake)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["--debug", "run", "-c", "experiments/tiny.toml", "-o", str(out), "--procs", "auto",
                                   "--steps", "world", "--threads", "1", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert seen == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "-m", "interp.cli", "--debug", "run", "--config", "experiments/tiny.toml", "--out", str(out),
                     "--steps", "world", "--threads", "1", "--precision", "fp32"]]
    monkeypatch.undo()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "interp.cli", "run", "-c", "experiments/tiny.toml", "-o", str(out),
                           "--procs", "2", "--steps", "world"], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and (out / "world.json").is_file()


@pytest.mark.parametrize("procs", ["1", "2"])
def test_a_bad_interp_threads_is_one_line_before_the_directory_or_the_ranks(tmp_path, procs):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--config", "experiments/tiny.toml", "--out", str(out), "--threads", "0",
                                   "--procs", procs], env={"INTERP_THREADS": "bad"})
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "$INTERP_THREADS must be a positive integer or 'auto', got 'bad'" in lines[0], res.output
    assert not out.exists()


def test_procs_on_a_busy_directory_is_one_line_from_the_launcher(tmp_path, monkeypatch):
    """Checked before torchrun starts: from the ranks it came twice, inside torchrun's traceback."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    hold = "import sys, time\nfrom interp.files import directory_lock\nwith directory_lock(sys.argv[1]):\n" \
           "    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    try:
        assert holder.stdout.readline().strip() == "held"
        res = CliRunner().invoke(app, ["run", "--config", "experiments/tiny.toml", "--out", str(out), "--procs", "2"])
    finally:
        holder.kill()
        holder.wait()
    assert res.exit_code == 2 and started == [], res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and f"in use by another interp run (process {holder.pid})" in lines[0], res.output
