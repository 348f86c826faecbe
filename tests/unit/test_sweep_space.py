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
    assert space.base_config().train.steps == space.steps


@pytest.mark.parametrize("text, message", [
    ("bogus: 1", "unknown config key 'bogus'"),
    ("space: {train.lr: {distribution: gaussian, low: 0.1, high: 1}}", "space.train.lr.distribution: unknown"),
    ("space: {train.lr: {distribution: uniform, low: 0.5, high: 0.1}}", "space.train.lr: empty bounds"),
    ("space: {train.lr: {distribution: loguniform, low: 0, high: 0.1}}", "loguniform needs low > 0"),
    ("space: {model.n_layer: {distribution: choice, values: []}}", "space.model.n_layer.values: a choice needs"),
    ("space: {train.lr: {distribution: uniform, low: 0.1}}", "uniform needs low and high"),
    ("space: {train.lr: {distribution: uniform, lo: 0.1, high: 1}}", "unknown config key 'space.train.lr.lo'"),
    ("space: {train.nope: {distribution: uniform, low: 0.1, high: 1}}", "unknown config key 'train.nope'"),
    ("space: {data.block_size: {distribution: int, low: 8, high: 16}}", "only model.\\*, train.\\* and scaling"),
    ("space: {}", "name at least one parameter"),
    ("mode: up\nspace: {train.lr: {distribution: uniform, low: 0.1, high: 1}}", "mode must be min or max"),
    ("workers_per_trial: 2\nspace: {train.lr: {distribution: uniform, low: 0.1, high: 1}}",
     "workers_per_trial must be 1 \\(got 2\\)"),
])
def test_bad_space_files_name_the_field(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_space(path)


def test_trials_report_exactly_at_evaluations(tmp_path):
    """Every report must carry the metric (Tune's strict check, ASHA) and a checkpoint (resume)."""
    space = load_space(SPACES / "gpt_tiny.yaml", ["base.train.log_every=3", "base.train.checkpoint_every=7",
                                                  "base.train.eval_every=5"])
    train = space.base_config().train
    assert train.log_every == train.checkpoint_every == train.eval_every == 5
    with pytest.raises(ConfigError, match="eval_every must be >= 1"):
        load_space(SPACES / "gpt_tiny.yaml", ["base.train.eval_every=0"])
