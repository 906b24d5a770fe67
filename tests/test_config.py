"""Study config validation: unknown keys and wrong types are named, never silently defaulted."""

import pytest

from interp.config import ConfigError, load_config


def test_defaults_and_shipped_configs_load():
    cfg = load_config(None)
    assert cfg.study.model == "smollm2-135m" and cfg.world.n_chains_per_tier >= 64
    assert load_config("experiments/two_hop.toml").to_dict() == cfg.to_dict()
    assert load_config("experiments/tiny.toml").study.model == "tiny-llama"


@pytest.mark.parametrize("text, match", [
    ("[world]\nn_chain_per_tier = 3\n", "world.n_chain_per_tier"),
    ("[wrold]\nseed = 1\n", "wrold"),
    ("[training]\nr = 'eight'\n", "training.r"),
    ("[training]\nlr = true\n", "training.lr"),
    ("[methods]\nvariants = ['uniform', 'magic']\n", "magic"),
    ("[world]\ntiers = ['F', 'X']\n", "world.tiers"),
    ("[training]\nbatch_size = 0\n", "training.batch_size"),
    ("[training]\ninit = 'random'\n", "training.init='random' .per_expert.shared"),
    ("[study]\ndevice = 'tpu'\n", "study.device"),
    ("[mechanisms]\nprobe_estimator = 'mlp'\n", "mechanisms.probe_estimator"),
    ("[mechanisms]\nprobe_layer_stride = 0\n", "mechanisms.probe_layer_stride"),
    ("[study\n", "not valid TOML"),
])
def test_bad_configs_name_the_problem(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_missing_file_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    cfg = load_config(None, {"world.n_chains_per_tier": 8, "training.lr": 1})
    assert cfg.world.n_chains_per_tier == 8 and cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    assert cfg.section_hash("world") != load_config(None).section_hash("world")
    for bad in ("mechanisms", "mechanisms.", ".probes"):
        with pytest.raises(ConfigError, match="section and a key"):
            load_config(None, {bad: 1})


def test_thread_count_does_not_enter_cache_keys():
    """--threads changes the speed of a run, not its results: a run resumed with another thread
    count reuses its steps; the default thread count keeps the keys runs already have."""
    from interp.config import load_config

    default = load_config(None)
    for n in (1, 2):
        cfg = load_config(None, {"study.threads": n})
        assert cfg.study.threads == n
        assert cfg.section_hash("study", "world") == default.section_hash("study", "world")
    assert load_config(None, {"study.seed": 1}).section_hash("study") != default.section_hash("study")
    auto = load_config(None, {"study.threads": "auto"})  # as --threads and $INTERP_THREADS take it
    assert auto.study.threads == 0 and auto.section_hash("study") == default.section_hash("study")
    with pytest.raises(ConfigError, match="study.threads"):
        load_config(None, {"study.threads": "two"})
