"""Search spaces as data: the shipped files load, and bad ones fail before any trial, naming the field."""

from pathlib import Path

import pytest

from raystack.config import ConfigError
from raystack.sweep import load_space

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"


@pytest.mark.parametrize("name", ["gpt_tiny.yaml", "gpt_gpu.yaml"])
def test_shipped_spaces_load(name):
    space = load_space(SPACES / name)
    assert space.parameters and space.optuna_space().keys() == space.parameters.keys()
    assert space.base_config().schedule.steps == space.steps


@pytest.mark.parametrize("text, message", [
    ("bogus: 1", "unknown config key 'bogus'"),
    ("space: {optimizer.lr: {distribution: gaussian, low: 0.1, high: 1}}", "space.optimizer.lr.distribution: unknown"),
    ("space: {optimizer.lr: {distribution: uniform, low: 0.5, high: 0.1}}", "space.optimizer.lr: empty bounds"),
    ("space: {optimizer.lr: {distribution: loguniform, low: 0, high: 0.1}}", "loguniform needs low > 0"),
    ("space: {model.n_layer: {distribution: choice, values: []}}", "space.model.n_layer.values: a choice needs"),
    ("space: {optimizer.lr: {distribution: uniform, low: 0.1}}", "uniform needs low and high"),
    ("space: {optimizer.lr: {distribution: uniform, lo: 0.1, high: 1}}", "unknown config key 'space.optimizer.lr.lo'"),
    ("space: {optimizer.nope: {distribution: uniform, low: 0.1, high: 1}}", "unknown config key 'optimizer.nope'"),
    ("space: {train.lr: {distribution: uniform, low: 0.1, high: 1}}", "'train.lr' is now 'optimizer.lr'"),
    ("space: {data.block_size: {distribution: int, low: 8, high: 16}}", "data.\\* and storage keys cannot be searched"),
    ("space: {}", "name at least one parameter"),
    ("mode: up\nspace: {optimizer.lr: {distribution: uniform, low: 0.1, high: 1}}", "mode must be min or max"),
    ("workers_per_trial: 0\nspace: {optimizer.lr: {distribution: uniform, low: 0.1, high: 1}}",
     "workers_per_trial must be >= 1, got 0"),
    ("workers_per_trial: 2\ngpus_per_trial: 1\nspace: {optimizer.lr: {distribution: uniform, low: 0.1, high: 1}}",
     "gpus_per_trial \\(1\\) must be a multiple of workers_per_trial \\(2\\)"),
    ("cpus_per_trial: 0\nspace: {optimizer.lr: {distribution: uniform, low: 0.1, high: 1}}", "cpus_per_trial must be > 0"),
    ("name: a/b\nspace: {optimizer.lr: {distribution: uniform, low: 0.1, high: 1}}", "name must be a single path component"),
])
def test_bad_space_files_name_the_field(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_space(path)


def test_trials_report_exactly_at_evaluations(tmp_path):
    """Every report must carry the metric (Tune's strict check, ASHA) and a checkpoint (resume)."""
    space = load_space(SPACES / "gpt_tiny.yaml", ["base.eval.every=5"])
    config = space.base_config()
    assert config.logging.every == config.checkpoint.every == config.eval.every == 5
    agreeing = load_space(SPACES / "gpt_tiny.yaml", ["base.eval.every=5", "base.checkpoint.every=5"])
    assert agreeing.base_config().checkpoint.every == 5
    # An explicit setting is never silently overwritten: a different one is refused, naming the fix.
    with pytest.raises(ConfigError, match=r"base.logging.every is 3, .* follows base.eval.every \(5\); "
                                          r"remove base.logging.every or set it to 5"):
        load_space(SPACES / "gpt_tiny.yaml", ["base.logging.every=3", "base.eval.every=5"])
    with pytest.raises(ConfigError, match="base.checkpoint.every is 7"):
        load_space(SPACES / "gpt_tiny.yaml", ["base.checkpoint.every=7", "base.eval.every=5"])
    with pytest.raises(ConfigError, match="base.eval.every must be >= 1"):
        load_space(SPACES / "gpt_tiny.yaml", ["base.eval.every=0"])


def test_data_parallel_trials_split_the_trial_resources_between_workers():
    space = load_space(SPACES / "gpt_gpu.yaml", ["workers_per_trial=2", "gpus_per_trial=2", "cpus_per_trial=8"])
    scaling = space.base_config().scaling
    assert scaling.num_workers == 2 and scaling.cpus_per_worker == 4


def test_sampled_values_reach_the_training_config_as_sampled():
    """Values go into the config as Python values (1e-05 stays a float, a string choice stays a string)."""
    space = load_space(SPACES / "gpt_tiny.yaml")
    sample = {key: p.values[0] if p.distribution == "choice" else int(p.low) if p.distribution == "int" else p.low
              for key, p in space.parameters.items()}
    config = space.base_config({**sample, "optimizer.lr": 1e-05})
    assert config.optimizer.lr == 1e-05 and config.model.n_embd == space.parameters["model.n_embd"].values[0]


def test_data_parallel_sweeps_refuse_a_ray_without_the_state_api(monkeypatch):
    """Without the State API Ray Train cannot free a stopped trial's workers: say so up front, never hang."""
    import ray.util.state

    from raystack.sweep import run as sweep

    def unreachable(**kwargs):
        raise ConnectionError("Failed to connect to API server")

    monkeypatch.setattr(ray.util.state, "list_actors", unreachable)
    with pytest.raises(ConfigError, match="workers_per_trial > 1: data-parallel trials need Ray's State API .*"
                                          "Failed to connect.*set workers_per_trial: 1"):
        sweep._require_state_api(timeout_s=0)


def test_dashboard_curves_keep_the_last_report_of_a_re_reported_step(tmp_path):
    """A trial restored after its driver died re-reports the steps after its last checkpoint; the curve shows each
    step once, with the value of the run that continued."""
    import json

    from raystack.sweep_report import collect

    space = load_space(SPACES / "gpt_tiny.yaml")
    trial = tmp_path / "run_trial_a_1"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"optimizer.lr": 0.01}))
    rows = [(10, 3.0), (20, 2.5), (20, 2.4), (30, 2.2)]
    (trial / "result.json").write_text("".join(json.dumps({"step": s, "val_loss": v, "trial_id": "a"}) + "\n"
                                               for s, v in rows))
    [t] = collect(str(tmp_path), space)["trials"]
    assert t["curve"] == [[10, 3.0], [20, 2.4], [30, 2.2]] and t["best"] == 2.2
