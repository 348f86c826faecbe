"""The engine-load autoscaling policy as Serve calls it, and the config that picks it (no Ray)."""

import pytest

from raystack.autoscale import POLICY_PATH, EngineLoadPolicy, deployment_autoscaling


class _Context:
    def __init__(self, metrics, target=1):
        self.aggregated_metrics, self.target_num_replicas = metrics, target


def test_the_policy_counts_sequences_that_want_a_slot():
    policy = EngineLoadPolicy(target_occupancy=0.8)
    full = {"kv_slots": {"a": 4}, "kv_occupancy": {"a": 1.0}, "waiting_sequences": {"a": 4}}
    assert policy(_Context(full))[0] == 3  # 8 sequences / (0.8 x 4)
    idle = {"kv_slots": {"a": 4, "b": 4}, "kv_occupancy": {"a": 0.25, "b": 0.0}, "waiting_sequences": {"a": 0, "b": 0}}
    assert policy(_Context(idle, target=2))[0] == 1
    exact = {"kv_slots": {"a": 10}, "kv_occupancy": {"a": 0.8}, "waiting_sequences": {"a": 0}}
    assert policy(_Context(exact))[0] == 1  # at the target: no more
    assert policy(_Context({}, target=2))[0] == 2  # no reports yet: keep
    with pytest.raises(ValueError):
        EngineLoadPolicy(target_occupancy=0)


def test_the_deployment_says_which_policy_is_in_use(monkeypatch):
    import raystack.autoscale as autoscale

    args = ("engine_load", 1, 4, 16.0, 0.7, 5.0, 60.0, 10.0)
    config, line = deployment_autoscaling(*args)
    assert config["policy"] == {"policy_function": POLICY_PATH, "policy_kwargs": {"target_occupancy": 0.7}}
    assert "engine load" in line and config["upscale_delay_s"] == 5.0 and config["max_replicas"] == 4
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**config)  # Serve takes it as it is
    config, line = deployment_autoscaling("requests", *args[1:])
    assert "policy" not in config and "ongoing requests" in line and "fell back" not in line
    monkeypatch.setattr(autoscale, "custom_policies_supported", lambda: False)
    config, line = deployment_autoscaling(*args)
    assert "policy" not in config and "fell back" in line


@pytest.mark.parametrize("field, value, message", [
    ("autoscaling_policy", "cpu", "engine_load or requests"), ("target_kv_occupancy", 0.0, "(0, 1]"),
    ("autoscaling_look_back_s", 5.0, "metrics interval"), ("upscale_delay_s", -1.0, ">= 0")])
def test_the_serve_spec_refuses_bad_autoscaling_settings(field, value, message):
    from raystack.serving import ServeConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        ServeConfig(model="m", **{field: value})
