"""Config loading: unknown keys and bad values name the key, overrides parse as YAML."""

import subprocess
import sys
from pathlib import Path

import pytest

from raystack.config import ConfigError, parse_overrides
from raystack.train import TrainJobConfig, load_train_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_overrides_apply(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: exp\noptimizer:\n  lr: 0.001\nscaling:\n  num_workers: [1, 2]\n")
    config = load_train_config(cfg_file, ["schedule.steps=7", "model.n_layer=3"])
    assert isinstance(config, TrainJobConfig)
    assert (config.name, config.optimizer.lr, config.schedule.steps) == ("exp", 0.001, 7)
    assert config.scaling.num_workers == [1, 2]
    assert config.model.build().n_layer == 3


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """``3e-4`` is a float as people (and YAML 1.2) write it, in files and in --set, not PyYAML 1.1's string."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optimizer:\n  lr: 3e-4\n  weight_decay: 1E-2\n")
    config = load_train_config(cfg_file, ["optimizer.beta2=9.9e-1", "optimizer.grad_clip=2e0"])
    opt = config.optimizer
    assert (opt.lr, opt.weight_decay, opt.beta2, opt.grad_clip) == (
        3e-4, 1e-2, 0.99, 2.0)
    assert parse_overrides(["a=1e5", "b=-2.5e-3", "c=1e", "d=e5", "e=[1e-3, 2]", "f=3"]) == {
        "a": 1e5, "b": -2.5e-3, "c": "1e", "d": "e5", "e": [1e-3, 2], "f": 3}


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", r"unknown config key 'optimizer.lrr' \(did you mean 'lr'\?\)"),
    # The old ``train`` section's keys are refused with their new spelling.
    ("train.lr=1", "config key 'train.lr' is now 'optimizer.lr'; rename it"),
    ("train.eval_every=5", "'train.eval_every' is now 'eval.every'"),
    ("train.threads_per_worker=1", "'train.threads_per_worker' is now 'scaling.threads_per_worker'"),
    ("train.nope=1", "unknown config key 'train.nope': the 'train' section is gone, its keys are now under "
                     "checkpoint, eval, logging, optimizer, precision, scaling, schedule, seed"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("schedule.steps=ten", "schedule.steps: expected an integer, got 'ten'"),
    ("schedule.steps=0", "schedule.steps must be >= 1"),
    ("optimizer.lr=-1", "optimizer.lr must be a positive number"),
    ("scaling.num_workers=[2, 1]", "scaling.num_workers must be an int or \\[min, max\\]"),
    ("model.preset=huge", "model.preset 'huge' is not one of"),
    ("data.block_size=4096", "data.block_size \\(4096\\) exceeds the model's max_seq_len"),
    ("data.val_fraction=1.5", "data.val_fraction must be in"),
    ("precision=fp8", "precision must be auto, fp32 or bf16"),
    # Steps between preemption asks became seconds of training between them.
    ("checkpoint.preemption_check_every=1",
     "config key 'checkpoint.preemption_check_every' is now 'checkpoint.preemption_check_s'"),
    ("checkpoint.preemption_check_s=-1", "checkpoint.preemption_check_s must be a number of seconds >= 0"),
    ("checkpoint.preemption_check_s=.nan", "checkpoint.preemption_check_s must be a number of seconds >= 0"),
    ("checkpoint.preemption_check_s=.inf", "checkpoint.preemption_check_s must be a number of seconds >= 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [override])


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["optimizer.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_train_config(bad)


def test_job_refuses_a_bad_key_before_starting_ray(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--set", "schedule.nope=1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "raystack: error: unknown config key 'schedule.nope'" in result.stderr
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stderr + result.stdout


def test_grafana_dashboard_queries_only_metrics_raystack_exports():
    import json
    import re

    from raystack.observability import GRAFANA_DASHBOARD

    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = set(re.findall(r"ray_raystack_[a-z_]+", " ".join(exprs)))
    exported = {"ray_raystack_requests_total", "ray_raystack_generated_tokens_total", "ray_raystack_queue_depth",
                "ray_raystack_prompt_tokens_total", "ray_raystack_prompt_tokens_cached_total",
                "ray_raystack_batch_occupancy", "ray_raystack_time_to_first_token_seconds_bucket",
                "ray_raystack_train_loss", "ray_raystack_train_val_loss", "ray_raystack_train_tokens_per_s",
                "ray_raystack_train_step", "ray_raystack_train_world_size", "ray_raystack_tenant_requests_total",
                "ray_raystack_tenant_prompt_tokens_total", "ray_raystack_tenant_completion_tokens_total",
                "ray_raystack_tenant_errors_total", "ray_raystack_replica_up", "ray_raystack_replicas_max",
                "ray_raystack_queue_wait_seconds_bucket"}
    assert names and names <= exported, names - exported
    source = (REPO / "raystack" / "serving.py").read_text() + (REPO / "raystack" / "train" / "job.py").read_text()
    for name in names:  # every queried metric is created in the code (Ray adds the ray_ prefix)
        base = name.removeprefix("ray_").removesuffix("_bucket")
        assert f'"{base}"' in source or base.removeprefix("raystack_train_") in source, name


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", ".hidden", "-flag", "a\\b", "x" * 129, "run 1", "é"])
def test_run_and_sweep_names_are_single_path_components(name):
    from raystack.sweep import load_space

    with pytest.raises(ConfigError, match="single path component"):
        load_train_config(None, [f"name={name!r}"] if name else ["name=''"])
    with pytest.raises(ConfigError, match="single path component"):
        load_space(REPO / "tune_spaces" / "gpt_tiny.yaml", [f"name={name!r}"] if name else ["name=''"])


def test_ordinary_names_are_kept():
    for name in ("raystack-tiny", "gpt2_run.3", "A1"):
        assert load_train_config(None, [f"name={name}"]).name == name
