"""Model rollouts that roll back by themselves: gates before traffic moves, a watch after, a history of both.

``rollout(RolloutSpec(model=NEW, app="llm"))`` on a running app (``raystack rollout``, or ``jobs/rollout.py`` under
``ray job submit``):

1. **Gates, before any traffic moves.** A canary app (``<app>-canary``, no HTTP route, one replica with the app's own
   settings and the new artifact) must load and pass Serve's health checks; a quality gate scores the held-out texts
   on the canary and on the serving app (mean nats per token under the engine, ``heldout_loss``) and refuses a model
   worse than the serving one by more than ``max_loss_increase``; a smoke generation must succeed. The canary is
   removed either way.
2. **The switch.** The app is redeployed with the new artifact. Its deployment has ``max_surge_percent: 100``: Serve
   starts every new replica while the old ones keep serving, moves traffic once they are healthy, and only then
   stops the old ones, each draining for ``graceful_shutdown_timeout_s`` (= the app's ``request_timeout_s``, the
   longest a request may run), so in-flight requests and streams finish on the replica that started them.
3. **The watch.** For ``watch_s`` seconds the replicas' outcomes (reported to a ``RolloutMonitor`` actor, which
   the rollout starts and stops) are checked: 5xx share over ``max_error_rate``, TTFT p99 over ``max_ttft_p99_s``,
   or the deployment unhealthy rolls back to the previous artifact at once, the same way (surge, drain).

Every rollout, refusal and rollback is appended to the history file (JSON lines: when, who, app, from, to, outcome,
why, gate figures) that ``raystack rollout --history`` prints and ``raystack rollback`` reads to go back.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import getpass
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from raystack.cluster import deployment_message, error_line

logger = logging.getLogger(__name__)

NAMESPACE = "raystack"
DEFAULT_HISTORY = "~/.raystack/rollouts.jsonl"
SMOKE_PROMPT = "def "
DEFAULT_HELDOUT_FILES = ("textwrap.py", "string.py", "bisect.py", "heapq.py")
"""Held-out texts when none are given: modules of the running Python's standard library (the default corpus)."""


class RolloutError(Exception):
    """A rollout that cannot start (no such app, bad held-out file, no history to roll back to)."""


@dataclass
class RolloutSpec:
    model: str
    """The new artifact (path or URI)."""
    app: str = "llm"
    heldout: Optional[str] = None
    """A text file whose blank-line-separated passages are the quality gate's held-out set (default: a few standard
    library modules)."""
    max_loss_increase: float = 0.05
    """Largest increase of held-out loss (nats per token) over the serving model the gate lets through."""
    watch_s: float = 60.0
    max_error_rate: float = 0.05
    max_ttft_p99_s: float = 5.0
    history: str = DEFAULT_HISTORY

    def __post_init__(self):
        if not self.model:
            raise RolloutError("--model: the new artifact is required")
        if self.max_loss_increase < 0 or self.watch_s < 0 or not 0 <= self.max_error_rate <= 1 or \
                self.max_ttft_p99_s <= 0:
            raise RolloutError("need max_loss_increase >= 0, watch_s >= 0, max_error_rate in [0, 1], "
                               "max_ttft_p99_s > 0")


# -- the monitor: what replicas report ---------------------------------------------------------------------------

def monitor_name(app: str) -> str:
    return f"raystack-monitor:{app}"


class RolloutMonitor:
    """Request outcomes and first-token times per artifact, for the last half hour (one actor per app)."""

    KEEP_S = 1800.0

    def __init__(self):
        self.events: collections.deque = collections.deque()  # (time, artifact, status or None, ttft or None)

    def report(self, artifact: str, statuses: list, ttfts: list) -> None:
        cutoff = time.time() - self.KEEP_S
        self.events.extend((t, artifact, status, None) for t, status in statuses if t >= cutoff)
        self.events.extend((t, artifact, None, ttft) for t, ttft in ttfts if t >= cutoff)
        while self.events and self.events[0][0] < cutoff:  # batches arrive about in time order
            self.events.popleft()

    def window(self, artifact: str, since: float) -> dict:
        statuses = [s for t, a, s, _ in self.events if a == artifact and t >= since and s is not None]
        ttfts = sorted(v for t, a, _, v in self.events if a == artifact and t >= since and v is not None)
        errors = sum(1 for s in statuses if s.startswith("5"))
        return {"requests": len(statuses), "errors": errors, "error_rate": errors / len(statuses) if statuses else 0.0,
                "ttft_p99": ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)] if ttfts else None}


def monitor_actor(app: str, create: bool):
    import ray

    if not create:
        return ray.get_actor(monitor_name(app), namespace=NAMESPACE)
    return ray.remote(RolloutMonitor).options(
        name=monitor_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0).remote()


class OutcomeReporter:
    """A replica's side: outcomes batched and sent to the app's monitor at most once a second (at once for a 5xx),
    only while a monitor exists (a rollout creates it); never on the request's path, never failing a request. The
    monitor is looked up (a GCS round trip that blocks) at most every ``LOOKUP_EVERY_S``, on a worker thread inside
    ``send``: the replica's event loop never waits for it."""

    LOOKUP_EVERY_S = 5.0

    def __init__(self, app: str, artifact: str):
        self.app, self.artifact = app, artifact
        self.statuses: list = []
        self.ttfts: list = []
        self._sent = self._looked_up = 0.0
        self._actor = None

    def ttft(self, seconds: float) -> None:
        self.ttfts.append((time.time(), seconds))

    def outcome(self, status: str) -> Optional[tuple]:
        """Record one request's status; returns the batch ``(artifact, statuses, ttfts)`` for ``send`` when one is
        due and a monitor is known or due for a lookup, else None (without a monitor the batch is dropped)."""
        now = time.time()
        self.statuses.append((now, status))
        if now - self._sent < 1.0 and not status.startswith("5"):
            return None
        batch = (self.artifact, self.statuses, self.ttfts)
        self.statuses, self.ttfts, self._sent = [], [], now
        if self._actor is None:
            if now - self._looked_up < self.LOOKUP_EVERY_S:
                return None  # no rollout under way when last looked: nobody is watching
            self._looked_up = now
        return batch

    async def send(self, batch) -> None:
        import ray

        actor = self._actor
        if actor is None:
            if not ray.is_initialized():  # a server outside Ray (unit tests): no monitor, and no Ray to start
                return
            try:
                actor = self._actor = await asyncio.to_thread(monitor_actor, self.app, False)
            except Exception:  # no rollout under way: nobody is watching
                return
        try:
            await actor.report.remote(*batch)
        except Exception as e:  # the monitor went away (rollout over): look it up again later
            logger.debug("rollout monitor unreachable: %r", e)
            self._actor = None


# -- history -----------------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record(path: str, entry: dict) -> dict:
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    entry = {"time": _now(), "user": getpass.getuser(), **entry}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def check_history(path: str) -> None:
    """``RolloutError`` unless the history file can be appended to; checked before anything changes, since a
    rollout's entry is written once it has ended."""
    path = os.path.expanduser(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise RolloutError(f"rollout history {path!r} cannot be written ({e.strerror or e}); pass --history-file "
                           "naming a file you can write") from None


def read_history(path: str, app: Optional[str] = None) -> list[dict]:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return []
    entries = []
    try:
        with open(path) as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RolloutError(f"rollout history {path!r} cannot be read ({getattr(e, 'strerror', None) or e}); pass "
                           "--history-file naming the history file") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s, line %d: not JSON; skipped", path, number)
    return [e for e in entries if app is None or e.get("app") == app]


def format_history(entries: list[dict]) -> str:
    rows = [("time", "user", "app", "action", "outcome", "from", "to", "why")]
    for e in entries:
        rows.append((e.get("time", ""), e.get("user", ""), e.get("app", ""), e.get("action", ""), e.get("outcome", ""),
                     e.get("from", ""), e.get("to", ""), e.get("reason", "")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1]) for r in rows)


# -- the rollout -------------------------------------------------------------------------------------------------

def heldout_texts(path: Optional[str]) -> list[str]:
    """Passages of at most 2,000 characters: the file's blank-line-separated blocks, or the default modules."""
    if path:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise RolloutError(f"--heldout {path!r} cannot be read as UTF-8 text: {e}") from None
        passages = [p.strip() for p in text.split("\n\n") if p.strip()]
    else:
        import sysconfig

        stdlib = sysconfig.get_paths()["stdlib"]
        passages = []
        for name in DEFAULT_HELDOUT_FILES:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                source = f.read()
            passages += [source[i:i + 2000] for i in range(0, min(len(source), 8000), 2000)]
    passages = [p[:2000] for p in passages][:64]
    if not passages:
        raise RolloutError(f"--heldout {path!r} holds no text")
    return passages


def _app_details(app: str) -> dict:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details().get("applications", {})
    if app not in details:
        raise RolloutError(f"no Serve application {app!r} is running (running: {', '.join(sorted(details)) or 'none'}); "
                           "deploy one first (raystack deploy) or pass --app")
    return details[app]


def _healthy(app: str) -> Optional[str]:
    """None while the app's deployment is healthy, else what is wrong."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return "the application is gone"
    deployment = status.deployments.get("LLMServer")
    if deployment is not None and deployment.status == "UNHEALTHY":
        return f"deployment unhealthy: {deployment.message}"
    if status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
        return f"application {status.status}: {status.message}"
    return None


def _deploy(app: str, route_prefix: Optional[str], args: dict) -> None:
    from ray import serve

    from raystack.serving import build_app

    serve.run(build_app(args), name=app, route_prefix=route_prefix)


def _gates(spec: RolloutSpec, current: dict, say) -> dict:
    """Load + health, quality and smoke on a canary; raises ``_Refused`` naming the gate that failed."""
    from ray import serve

    canary = f"{spec.app}-canary"
    texts = heldout_texts(spec.heldout)
    args = {**current, "model": spec.model, "min_replicas": 1, "max_replicas": 1, "tenants_file": None}
    say(f"gate 1/3: loading {spec.model} on a canary replica ({canary}, no route)")
    try:
        _deploy(canary, None, {**args, "constructor_retries": 1})
    except Exception as e:
        why = deployment_message(canary) or str(e)
        serve.delete(canary)
        raise _Refused("load", f"the new artifact did not load or pass health checks: {error_line(why)}") from None
    try:
        new = serve.get_app_handle(canary).heldout_loss.remote(texts).result(timeout_s=600)
        old = serve.get_app_handle(spec.app).heldout_loss.remote(texts).result(timeout_s=600)
        figures = {"heldout_loss_new": round(new["nats_per_token"], 4), "heldout_loss_old": round(old["nats_per_token"], 4),
                   "heldout_tokens": new["tokens"]}
        say(f"gate 2/3: held-out loss {new['nats_per_token']:.4f} nats/token vs serving {old['nats_per_token']:.4f} "
            f"(allowed increase {spec.max_loss_increase})")
        if not new["nats_per_token"] <= old["nats_per_token"] + spec.max_loss_increase:  # NaN fails too
            raise _Refused("quality", f"held-out loss {new['nats_per_token']:.4f} nats/token is worse than the serving "
                                      f"model's {old['nats_per_token']:.4f} by more than {spec.max_loss_increase}",
                           figures)
        try:
            text = serve.get_app_handle(canary).smoke.remote().result(timeout_s=120)
        except Exception as e:
            raise _Refused("smoke", f"the smoke generation failed: {error_line(e)}", figures) from None
        say(f"gate 3/3: smoke generation {text!r}")
        return figures
    finally:
        serve.delete(canary)


class _Refused(Exception):
    def __init__(self, gate: str, reason: str, figures: Optional[dict] = None):
        super().__init__(reason)
        self.gate, self.reason, self.figures = gate, reason, figures or {}


def current_config(app: str) -> dict:
    """The serving replicas' spec; where they hold API keys (``api_key_env``/``api_key_file``), with
    ``require_api_key`` on, so a new replica that would find none (a rollout from a shell without the keys) refuses to
    start instead of serving openly: the load gate then says so."""
    from ray import serve

    info = serve.get_app_handle(app).rollout_info.remote().result(timeout_s=60)
    config = info["config"]
    if info.get("api_keys"):
        config = {**config, "require_api_key": True}
    return config


def rollout(spec: RolloutSpec, say=print) -> dict:
    """Gate, switch, watch; returns the history entry written (``outcome``: rolled_out, refused, rolled_back)."""
    check_history(spec.history)
    route = _app_details(spec.app).get("route_prefix")
    current = current_config(spec.app)
    base = {"app": spec.app, "action": "rollout", "from": current["model"], "to": spec.model}
    try:
        figures = _gates(spec, current, say)
    except _Refused as refused:
        say(f"refused at the {refused.gate} gate: {refused.reason}; {current['model']} keeps serving")
        return record(spec.history, {**base, "outcome": "refused", "gate": refused.gate, "reason": refused.reason,
                                     **refused.figures})
    import ray

    monitor = monitor_actor(spec.app, create=True)
    try:
        say(f"switching {spec.app} to {spec.model} (new replicas start beside the old, which drain when they are up)")
        _deploy(spec.app, route, {**current, "model": spec.model})
        switched = time.time()
        breach = _watch(spec, monitor, switched, say)
        if breach is None:
            say(f"{spec.model} is serving {spec.app}; the watch saw no breach in {spec.watch_s:.0f} s")
            return record(spec.history, {**base, "outcome": "rolled_out", "reason": "gates passed, watch clean",
                                         **figures, **_stats(monitor, spec.model, switched)})
        say(f"rolling back to {current['model']}: {breach}")
        _deploy(spec.app, route, current)
        return record(spec.history, {**base, "outcome": "rolled_back", "reason": breach, **figures,
                                     **_stats(monitor, spec.model, switched)})
    finally:
        # Nobody watches once the rollout ends: the detached monitor (a process of its own) would otherwise outlive
        # it for good, and every replica would keep reporting to it. The replicas stop when it is gone.
        ray.kill(monitor)


def _stats(monitor, artifact: str, since: float) -> dict:
    import ray

    window = ray.get(monitor.window.remote(artifact, since), timeout=30)
    return {"watch_requests": window["requests"], "watch_errors": window["errors"],
            "watch_ttft_p99_s": window["ttft_p99"]}


def _watch(spec: RolloutSpec, monitor, since: float, say) -> Optional[str]:
    """The first breach in the watch window, or None."""
    import ray

    deadline = since + spec.watch_s
    while time.time() < deadline:
        time.sleep(1.0)
        unhealthy = _healthy(spec.app)
        if unhealthy:
            return unhealthy
        window = ray.get(monitor.window.remote(spec.model, since), timeout=30)
        if window["requests"] and window["error_rate"] > spec.max_error_rate:
            return (f"{window['errors']} of {window['requests']} requests ended in a 5xx since the switch "
                    f"({window['error_rate']:.1%} > max_error_rate {spec.max_error_rate:.1%})")
        if window["ttft_p99"] is not None and window["ttft_p99"] > spec.max_ttft_p99_s:
            return f"TTFT p99 {window['ttft_p99']:.2f} s > max_ttft_p99_s {spec.max_ttft_p99_s} s since the switch"
    return None


def rollback(app: str, history: str = DEFAULT_HISTORY, say=print) -> dict:
    """Back to the artifact the app served before its last successful rollout (no gates: it served before)."""
    check_history(history)
    done = [e for e in read_history(history, app) if e.get("outcome") in ("rolled_out", "rolled_back_by_hand")]
    if not done:
        raise RolloutError(f"no rollout of {app!r} in {history} to roll back (raystack rollout --history)")
    last = done[-1]
    route = _app_details(app).get("route_prefix")
    current = current_config(app)
    target = last["from"]
    say(f"rolling {app} back from {current['model']} to {target}")
    _deploy(app, route, {**current, "model": target})
    return record(history, {"app": app, "action": "rollback", "from": current["model"], "to": target,
                            "outcome": "rolled_back_by_hand", "reason": f"raystack rollback (undoes {last['time']})"})


__all__ = ["RolloutError", "RolloutMonitor", "RolloutSpec", "OutcomeReporter", "current_config", "format_history",
           "heldout_texts", "read_history", "rollback", "rollout"]
