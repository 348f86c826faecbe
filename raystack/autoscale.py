"""Autoscaling on what the engine feels: KV-slot occupancy and sequences waiting for a slot (no Ray import at the top).

Serve's default policy scales on ongoing requests per replica. For an LLM that misleads both ways: a few long
generations fill every KV slot and grow the queue while the request count stays under target, and many short ones
look busy while slots are free. Each replica reports its engine's load through Serve's custom-metrics hook
(``record_autoscaling_stats``: ``kv_slots``, ``kv_occupancy``, ``waiting_sequences``); Serve averages each over
``look_back_period_s`` and calls ``EngineLoadPolicy`` on its control loop::

    demand   = sum over replicas of (occupancy x slots + waiting)   sequences that want a slot now
    capacity = target_occupancy x slots                               per replica
    desired  = ceil(demand / capacity)

Serve then applies ``min_replicas``/``max_replicas`` and ``upscale_delay_s``/``downscale_delay_s`` around it (its
wrapper for custom policies). Replicas report every ``RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S`` (Ray's
default 10 s; 2 s on Rays raystack starts and in ``cluster.yaml``), so a decision sees load at most that old. Where
this Ray has no custom policies, ``deployment_autoscaling`` falls back to the request-count policy and says so.
"""

from __future__ import annotations

import math
from typing import Any

METRICS = ("kv_slots", "kv_occupancy", "waiting_sequences")
POLICY_PATH = "raystack.autoscale:EngineLoadPolicy"


class EngineLoadPolicy:
    """A Serve autoscaling policy (class callable: Serve builds it once with ``policy_kwargs``)."""

    def __init__(self, target_occupancy: float = 0.8):
        if not 0 < target_occupancy <= 1:
            raise ValueError(f"target_occupancy must be in (0, 1], got {target_occupancy}")
        self.target_occupancy = target_occupancy

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        slots, occupancy, waiting = (metrics.get(name) or {} for name in METRICS)
        replicas = [r for r in slots if r in occupancy and r in waiting and slots[r] > 0]
        if not replicas:  # nothing reported yet (replicas starting): keep what Serve has
            return ctx.target_num_replicas, {}
        demand = sum(occupancy[r] * slots[r] + waiting[r] for r in replicas)
        capacity = self.target_occupancy * sum(slots[r] for r in replicas) / len(replicas)
        desired = max(1, math.ceil(demand / capacity - 1e-9))
        return desired, {"demand_sequences": round(demand, 3), "capacity_per_replica": capacity}


def custom_policies_supported() -> bool:
    """Whether this Ray's Serve takes a custom autoscaling policy fed by replica metrics."""
    try:
        from ray.serve.config import AutoscalingConfig, AutoscalingContext
    except ImportError:
        return False
    return "policy" in AutoscalingConfig.model_fields and hasattr(AutoscalingContext, "aggregated_metrics")


def deployment_autoscaling(policy: str, min_replicas: int, max_replicas: int, target_ongoing_requests: float,
                           target_occupancy: float, upscale_delay_s: float, downscale_delay_s: float,
                           look_back_period_s: float) -> tuple[dict, str]:
    """Serve's ``autoscaling_config`` for ``policy`` (``engine_load`` or ``requests``), and a line saying which
    policy is in use (engine_load falls back to requests where custom policies are unavailable)."""
    config = {"min_replicas": min_replicas, "max_replicas": max_replicas,
              "target_ongoing_requests": target_ongoing_requests, "upscale_delay_s": upscale_delay_s,
              "downscale_delay_s": downscale_delay_s, "look_back_period_s": look_back_period_s}
    if policy == "engine_load" and custom_policies_supported():
        config["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {"target_occupancy": target_occupancy}}
        return config, (f"autoscaling {min_replicas}..{max_replicas} replicas on engine load (KV occupancy target "
                        f"{target_occupancy:g}, waiting sequences; {POLICY_PATH})")
    fallback = " (this Ray has no custom autoscaling policies: fell back)" if policy == "engine_load" else ""
    return config, (f"autoscaling {min_replicas}..{max_replicas} replicas on ongoing requests (target "
                    f"{target_ongoing_requests:g} per replica){fallback}")
