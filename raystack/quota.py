"""Per-tenant limits shared by every replica of a deployment: one ``RateLimiter`` in a named Ray actor.

How exact: every request asks the actor once before it is queued and tells it once when it ends, and the actor
handles calls one at a time, so requests per minute, tokens per minute and sequences in flight are exact across
replicas (a request reserves ``prompt + max_tokens`` per sequence and is settled to what it used).

If the actor is gone or slow (it answers within ``CALL_TIMEOUT_S`` or is treated as gone), the replica keeps serving:
it logs a warning and enforces the same limits with a ``RateLimiter`` of its own for ``RETRY_S`` before asking the
actor again — so for that while, a tenant may get up to its limit from each replica (limit x replicas in all), and
requests already admitted are settled where they were admitted. The actor restarts by itself (``max_restarts``) with
empty windows; Ray's Prometheus counters (``raystack_tenant_*``) keep the usage totals either way.

The actor is detached (it outlives the replica that created it, so usage and windows survive replica restarts) and
named after the Serve application: ``raystack-quota:<app>`` in namespace ``raystack``, created by the first replica
to start; ``raystack usage`` reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from raystack.tenants import Grant, Limits, RateLimiter

logger = logging.getLogger(__name__)

NAMESPACE = "raystack"
CALL_TIMEOUT_S = 2.0
RETRY_S = 30.0


def actor_name(app: str) -> str:
    return f"raystack-quota:{app}"


class QuotaActor:
    """The shared ``RateLimiter`` (wrapped by ``ray.remote`` in ``quota_actor``)."""

    def __init__(self):
        self.limiter = RateLimiter()

    def acquire(self, tenant: str, limits: Limits, tokens: int, sequences: int, ttl: float) -> Grant:
        return self.limiter.acquire(tenant, limits, tokens, sequences, ttl)

    def settle(self, lease: int, prompt_tokens: int, completion_tokens: int, ok: bool) -> None:
        self.limiter.settle(lease, prompt_tokens, completion_tokens, ok)

    def record(self, tenant: str, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.limiter.record(tenant, ok, prompt_tokens, completion_tokens)

    def usage(self, since_s: float) -> dict:
        return self.limiter.usage(since_s)

    def in_flight(self, tenant: str) -> int:
        return self.limiter.in_flight(tenant)


def quota_actor(app: str, create: bool = True):
    """The app's quota actor (created on first use when ``create``)."""
    import ray

    if not create:
        return ray.get_actor(actor_name(app), namespace=NAMESPACE)
    return ray.remote(QuotaActor).options(
        name=actor_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_concurrency=1).remote()


class Quota:
    """A replica's view of the limits: the shared actor, or its own limiter while the actor is unreachable."""

    def __init__(self, app: str, clock=time.monotonic):
        self.app, self._clock = app, clock
        self.local = RateLimiter()
        self._actor = None
        self._local_until = 0.0
        try:
            self._actor = quota_actor(app)  # at start, so `raystack usage` finds it before the first request
        except Exception as e:
            self._fall_back(e)

    def _fall_back(self, error: BaseException) -> None:
        self._actor, self._local_until = None, self._clock() + RETRY_S
        logger.warning("the quota actor %s did not answer (%r): enforcing tenant limits on this replica alone for "
                       "%.0f s (up to each limit per replica meanwhile)", actor_name(self.app), error, RETRY_S)

    async def _call(self, method: str, *args) -> tuple[bool, object]:
        """``(answered, result)``: the actor's answer, or ``(False, None)`` where it failed (the caller falls back)."""
        try:
            if self._clock() < self._local_until:
                return False, None
            actor = self._actor
            if actor is None:  # find or recreate the shared actor: a blocking GCS call, kept off the event loop
                finding = asyncio.to_thread(quota_actor, self.app)
                actor = self._actor = await asyncio.wait_for(finding, CALL_TIMEOUT_S)
            return True, await asyncio.wait_for(getattr(actor, method).remote(*args), CALL_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError, timeouts, a dead node: the server keeps serving
            self._fall_back(e)
            return False, None

    async def acquire(self, tenant: str, limits: Limits, tokens: int, sequences: int, ttl: float) -> tuple:
        """``(grant, where)``; settle it with ``settle(where, ...)``."""
        answered, grant = await self._call("acquire", tenant, limits, tokens, sequences, ttl)
        if answered:
            return grant, "actor"
        return self.local.acquire(tenant, limits, tokens, sequences, ttl), "local"

    async def settle(self, where: str, lease: Optional[int], prompt_tokens: int, completion_tokens: int,
                     ok: bool) -> None:
        """Settle where it was granted; a lease of an actor that has gone since is dropped with its state."""
        if lease is None:
            return
        if where == "local":
            self.local.settle(lease, prompt_tokens, completion_tokens, ok)
        else:
            await self._call("settle", lease, prompt_tokens, completion_tokens, ok)

    async def record(self, tenant: str, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        answered, _ = await self._call("record", tenant, ok, prompt_tokens, completion_tokens)
        if not answered:
            self.local.record(tenant, ok, prompt_tokens, completion_tokens)
