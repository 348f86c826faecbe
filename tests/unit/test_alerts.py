"""The shipped Prometheus alert rules: valid for promtool, built only on metrics the code exports, and firing on
synthetic series exactly where they should (``promtool test rules``)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "raystack" / "observability" / "alerts.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) not installed")


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_queries_metrics_raystack_exports():
    source = (REPO / "raystack" / "serving.py").read_text()
    names = set(re.findall(r"ray_raystack_[a-z_]+", " ".join(rule["expr"] for rule in _rules())))
    assert {r["alert"] for r in _rules()} == {"RaystackHighErrorRate", "RaystackTTFTp99High", "RaystackQueueWaitHigh",
                                              "RaystackReplicasAtMax"}
    for name in names:  # Ray adds the ray_ prefix; histograms their _bucket series
        assert f'"{name.removeprefix("ray_").removesuffix("_bucket")}"' in source, name
    for rule in _rules():
        assert rule["labels"]["severity"] in ("page", "warn") and rule["annotations"]["summary"]


@needs_promtool
def test_promtool_accepts_the_rules():
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS: 4 rules found" in result.stdout, result.stdout + result.stderr


def _histogram(metric: str, model: str, bucket: str, bounds: list[str]) -> list[dict]:
    """Cumulative buckets of a histogram whose observations all fall in ``bucket`` (10 a minute)."""
    hit = bounds.index(bucket)
    return [{"series": f'{metric}_bucket{{model="{model}",le="{le}"}}', "values": "0+10x40" if i >= hit else "0x40"}
            for i, le in enumerate(bounds)]


@needs_promtool
def test_each_alert_fires_for_the_sick_model_and_not_the_healthy_one(tmp_path):
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # promtool would compare the rendered texts; the conditions are what we test
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    ttft = ["0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2", "5", "10", "+Inf"]
    wait = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2", "5", "10", "30", "+Inf"]
    series = [
        {"series": 'ray_raystack_requests_total{model="sick",status="200"}', "values": "0+90x40"},
        {"series": 'ray_raystack_requests_total{model="sick",status="503"}', "values": "0+10x40"},
        {"series": 'ray_raystack_requests_total{model="well",status="200"}', "values": "0+100x40"},
        {"series": 'ray_raystack_requests_total{model="well",status="500"}', "values": "0+1x40"},  # 1%: no alert
        *_histogram("ray_raystack_time_to_first_token_seconds", "sick", "5", ttft),
        *_histogram("ray_raystack_time_to_first_token_seconds", "well", "0.1", ttft),
        *_histogram("ray_raystack_queue_wait_seconds", "sick", "5", wait),
        *_histogram("ray_raystack_queue_wait_seconds", "well", "0.05", wait),
        {"series": 'ray_raystack_replica_up{model="sick",instance="a"}', "values": "1x40"},
        {"series": 'ray_raystack_replica_up{model="sick",instance="b"}', "values": "1x40"},
        {"series": 'ray_raystack_replicas_max{model="sick",instance="a"}', "values": "2x40"},
        {"series": 'ray_raystack_replicas_max{model="sick",instance="b"}', "values": "2x40"},
        {"series": 'ray_raystack_batch_occupancy{model="sick",instance="a"}', "values": "0.95x40"},
        {"series": 'ray_raystack_batch_occupancy{model="sick",instance="b"}', "values": "1x40"},
        {"series": 'ray_raystack_replica_up{model="well",instance="c"}', "values": "1x40"},
        {"series": 'ray_raystack_replicas_max{model="well",instance="c"}', "values": "2x40"},  # room to grow
        {"series": 'ray_raystack_batch_occupancy{model="well",instance="c"}', "values": "1x40"},
    ]

    def fires(alert, severity, at):
        return {"eval_time": at, "alertname": alert,
                "exp_alerts": [{"exp_labels": {"severity": severity, "model": "sick"}}]}

    checks = [fires("RaystackHighErrorRate", "page", "20m"), fires("RaystackTTFTp99High", "warn", "20m"),
              fires("RaystackQueueWaitHigh", "warn", "20m"), fires("RaystackReplicasAtMax", "warn", "25m"),
              {"eval_time": "3m", "alertname": "RaystackHighErrorRate", "exp_alerts": []},  # still pending (for: 5m)
              {"eval_time": "8m", "alertname": "RaystackReplicasAtMax", "exp_alerts": []}]  # pending (for: 15m)
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}]}))
    result = subprocess.run([PROMTOOL, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
