"""Connecting to Ray: the one place jobs call ``ray.init``.

Under ``ray job submit`` (``RAY_ADDRESS`` set) this joins the cluster; on a laptop it starts a local Ray, which in
Ray 2.60 has token authentication on. Token auth is never switched off here.
"""

from __future__ import annotations

import os


def init_ray(**kwargs) -> None:
    """Connect to (or start) Ray once; extra kwargs go to ``ray.init`` for a local start."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        kwargs = {}  # the cluster's shape is the cluster's business
    ray.init(log_to_driver=True, **kwargs)
