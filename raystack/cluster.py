"""Connecting to Ray: the one place jobs call ``ray.init``.

Under ``ray job submit`` (``RAY_ADDRESS`` set) this joins the cluster; on a laptop it starts a local Ray, which in
Ray 2.60 has token authentication on. Token auth is never switched off here.

A local Ray on a busy machine. Ray starts its worker processes at niceness 15 so that its own daemons stay
responsive on a dedicated node; on a machine shared with other work at the normal niceness 0 (a laptop, a CI
runner) that leaves every Ray worker about 3% of a core next to one busy process (CFS weights 36 vs 1024), so a new
worker's start and imports take minutes. Serve then killed its HTTP proxy: the controller gives a proxy 5 s to
become ready, three times, and ``serve.start`` waits a fixed 60 s. So:

- a Ray that raystack starts locally gets ``LOCAL_RAY_ENV``: workers at niceness 0, like every other program of
  the user's, and Serve proxy timeouts with room for a slow start (the raylet and the Serve controller read these
  from the environment they inherit from this process; on a cluster, ``cluster.yaml`` sets the Serve timeouts for
  ``ray start`` and keeps Ray's niceness, since its nodes run nothing else);
- ``start_serve`` waits for the proxy as long as ``ready_timeout_s`` allows instead of Ray's fixed 60 s.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

# Ray is imported inside the functions on purpose: Ray reads settings such as RAY_AUTH_MODE when it is imported,
# and this module is what callers import to set the environment (apply_local_ray_env) before Ray starts.

SERVE_TIMEOUTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # Ray's default 5 s: a proxy started on a busy node is killed
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",  # default 10 s
    # How often replicas report the engine load that autoscaling reads (raystack.autoscale); Ray's default 10 s
    # lets a saturated replica wait that long before the policy sees it.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "2",
}
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0", **SERVE_TIMEOUTS}  # Ray's default niceness is 15


def apply_local_ray_env() -> None:
    """Set ``LOCAL_RAY_ENV`` in this process's environment (where the user has not) before a local Ray starts."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def start_serve(http_options: dict, ready_timeout_s: float = 300.0) -> tuple[str, int]:
    """``serve.start(http_options=...)``, then wait until the HTTP proxy answers HTTP (any status of
    ``/-/healthz``), for up to ``ready_timeout_s`` rather than the 60 s ``serve.start`` allows a starting proxy.

    Returns the proxy's ``(host, port)``: those of the Serve instance already running on the cluster, if there is
    one (Serve then keeps its own HTTP options and ignores ``http_options``)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + ready_timeout_s
    try:
        serve.start(http_options=http_options)
    except TimeoutError:  # the controller is up and its proxy is still starting: keep waiting for it below
        serve.start(http_options=http_options)  # connects to the running controller at once
    config = _get_global_client().http_config
    host, port = config.host, config.port
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{probe}:{port}/-/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10):
                return host, port
        except urllib.error.HTTPError:  # it answers: until an app is deployed /-/healthz says 503 "no routes"
            return host, port
        except (urllib.error.URLError, OSError):  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve's HTTP proxy did not answer {url} within {ready_timeout_s:.0f} s")
        time.sleep(1)


def init_ray(**kwargs) -> None:
    """Connect to (or start) Ray once; extra kwargs go to ``ray.init`` for a local start."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        kwargs = {}  # the cluster's shape is the cluster's business
    else:
        apply_local_ray_env()
    ray.init(log_to_driver=True, **kwargs)
