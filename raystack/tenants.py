"""Tenants of one deployment: who a key belongs to, what that tenant may use, and how much it has (no Ray here).

The tenants file (YAML, ``ServeConfig.tenants_file``; ``raystack keys add|list|revoke`` writes it)::

    tenants:
      team-a:
        priority: high                  # high | normal | low: who gets a KV slot first when slots are scarce
        requests_per_minute: 600        # every limit: 0 or absent = no limit
        tokens_per_minute: 200000       # prompt + completion tokens
        max_concurrent_sequences: 32    # sequences in flight across all replicas
        max_tokens_per_request: 1024    # max_tokens one request may ask for
        keys:
          - id: 3f9a1c2b7d4e
            hash: sha256$<salt hex>$<digest hex>
            created: "2026-11-30T16:00:00Z"

A key is ``rsk-<id>-<secret>``; the file keeps only the id (to find the record, not secret) and an HMAC-SHA256 of
the whole key under a per-key random salt. Checking a key costs one HMAC and one ``hmac.compare_digest``, the same
for an unknown id as for a known one. A 256-bit random secret needs no slow hash: nothing short of the key itself
matches the digest.

``parse_tenants`` refuses a bad file naming the line and field; ``TenantsFile`` re-reads the file when it changes and,
when the new text is bad, logs why and keeps the last good tenants. ``RateLimiter`` is the arithmetic of the limits
(a one-minute sliding window of requests and tokens, plus sequences in flight) and the usage tally; the Serve
deployment runs one in a Ray actor shared by its replicas (``raystack.quota``).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import hmac
import logging
import math
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

logger = logging.getLogger(__name__)

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
"""Priority classes, lowest first; the engine admits (and keeps) a higher class's sequences first."""

KEY_PREFIX = "rsk-"
WINDOW_S = 60.0
"""The window of the per-minute limits: a sliding minute, not a calendar one."""

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_sequences", "max_tokens_per_request")
_TENANT_FIELDS = {"priority", "keys", *LIMIT_FIELDS}
_KEY_FIELDS = {"id", "hash", "created"}


class TenantsError(ValueError):
    """A tenants file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class Limits:
    """Per-tenant limits; 0 = no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent_sequences: int = 0
    max_tokens_per_request: int = 0


@dataclass(frozen=True)
class KeyRecord:
    id: str
    hash: str
    created: str = ""


@dataclass(frozen=True)
class Tenant:
    name: str
    priority: str = "normal"
    limits: Limits = Limits()
    keys: tuple[KeyRecord, ...] = ()

    @property
    def rank(self) -> int:
        return PRIORITIES[self.priority]


# -- keys ---------------------------------------------------------------------------------------------------------

def new_key() -> tuple[str, KeyRecord]:
    """A fresh key (shown once) and the record the file keeps of it."""
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
    salt = secrets.token_bytes(16)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return key, KeyRecord(key_id, f"sha256${salt.hex()}${_digest(salt, key.encode()).hex()}", created)


def _digest(salt: bytes, key: bytes) -> bytes:
    return hmac.new(salt, key, hashlib.sha256).digest()


def key_id(key: str) -> Optional[str]:
    """The id part of a raystack key, or None for anything else."""
    if not key.startswith(KEY_PREFIX):
        return None
    head, sep, _ = key[len(KEY_PREFIX):].partition("-")
    return head if sep and head else None


_DUMMY = KeyRecord("", f"sha256${'00' * 16}${'00' * 32}")


class TenantBook:
    """The tenants of one file, indexed by key id."""

    def __init__(self, tenants: list[Tenant]):
        self.tenants = {t.name: t for t in tenants}
        self._by_id = {record.id: (record, t) for t in tenants for record in t.keys}

    def identify(self, presented: bytes) -> Optional[Tenant]:
        """The tenant whose key this is, or None; one HMAC and a constant-time compare whether the id is known."""
        try:
            text = presented.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        record, tenant = self._by_id.get(key_id(text) or "", (_DUMMY, None))
        _, salt, digest = record.hash.split("$")
        match = hmac.compare_digest(_digest(bytes.fromhex(salt), presented), bytes.fromhex(digest))
        return tenant if match and tenant is not None else None


# -- the file -----------------------------------------------------------------------------------------------------

def parse_tenants(text: str, path: str = "tenants file") -> list[Tenant]:
    """The tenants in ``text``; a ``TenantsError`` naming ``path``, the line and the field for anything wrong."""
    from raystack.config import _Loader

    def fail(node, where: str, message: str):
        raise TenantsError(f"{path}, line {node.start_mark.line + 1}: {where}: {message}")

    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise TenantsError(f"{path} is not valid YAML: {e}") from None

    def scalar(node, where):
        if not isinstance(node, yaml.ScalarNode):
            fail(node, where, "must be a single value")
        return loader.construct_object(node, deep=True)

    def mapping(node, where, allowed=None) -> dict:
        if not isinstance(node, yaml.MappingNode):
            fail(node, where, "must be a mapping of keys to values")
        out = {}
        for key_node, value_node in node.value:
            key = scalar(key_node, where)
            if not isinstance(key, str) or not key:
                fail(key_node, where, f"keys must be non-empty strings, got {key!r}")
            if key in out:
                fail(key_node, f"{where}.{key}", "appears twice")
            if allowed is not None and key not in allowed:
                fail(key_node, f"{where}.{key}", f"unknown field; the fields are {', '.join(sorted(allowed))}")
            out[key] = (key_node, value_node)
        return out

    if root is None:
        raise TenantsError(f"{path} is empty; it needs a 'tenants:' mapping (raystack keys add TENANT writes one)")
    top = mapping(root, "top level", {"tenants"})
    if "tenants" not in top:
        fail(root, "top level", "needs a 'tenants:' mapping")
    tenants, seen_ids = [], {}
    tenant_nodes = top["tenants"][1]
    if isinstance(tenant_nodes, yaml.ScalarNode) and scalar(tenant_nodes, "tenants") is None:
        return []
    for name, (name_node, body) in mapping(tenant_nodes, "tenants").items():
        where = f"tenants.{name}"
        fields = mapping(body, where, _TENANT_FIELDS) if not _is_null(body) else {}
        limits = {}
        for limit in LIMIT_FIELDS:
            if limit in fields:
                value = scalar(fields[limit][1], f"{where}.{limit}")
                if value is None:
                    value = 0
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    fail(fields[limit][1], f"{where}.{limit}", f"must be an integer >= 0 (0 = no limit), "
                                                              f"got {value!r}")
                limits[limit] = value
        priority = "normal"
        if "priority" in fields:
            priority = scalar(fields["priority"][1], f"{where}.priority")
            if priority not in PRIORITIES:
                fail(fields["priority"][1], f"{where}.priority", f"must be one of {', '.join(PRIORITIES)}, "
                                                                 f"got {priority!r}")
        keys = []
        if "keys" in fields and not _is_null(fields["keys"][1]):
            key_list = fields["keys"][1]
            if not isinstance(key_list, yaml.SequenceNode):
                fail(key_list, f"{where}.keys", "must be a list of key records")
            for i, item in enumerate(key_list.value):
                at = f"{where}.keys[{i}]"
                record = {k: scalar(v, f"{at}.{k}") for k, (_, v) in mapping(item, at, _KEY_FIELDS).items()}
                for required in ("id", "hash"):
                    if not isinstance(record.get(required), str) or not record[required]:
                        fail(item, f"{at}.{required}", "is required (a string); `raystack keys add` writes it")
                if not _valid_hash(record["hash"]):
                    fail(item, f"{at}.hash", "must be sha256$<32 hex salt>$<64 hex digest> as `raystack keys "
                                             "add` writes it (the file never holds a key itself)")
                if record["id"] in seen_ids:
                    fail(item, f"{at}.id", f"{record['id']!r} is also a key of tenant {seen_ids[record['id']]!r}")
                seen_ids[record["id"]] = name
                keys.append(KeyRecord(record["id"], record["hash"], str(record.get("created") or "")))
        tenants.append(Tenant(name, priority, Limits(**limits), tuple(keys)))
    return tenants


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _valid_hash(text: str) -> bool:
    parts = text.split("$")
    try:
        return (len(parts) == 3 and parts[0] == "sha256" and len(bytes.fromhex(parts[1])) == 16
                and len(bytes.fromhex(parts[2])) == 32)
    except ValueError:
        return False


def read_tenants(path: str) -> list[Tenant]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise TenantsError(f"tenants file {path!r} cannot be read ({e.strerror}); create it with `raystack keys add "
                           "TENANT --file PATH` on every node") from None
    return parse_tenants(text, f"tenants file {path!r}")


class TenantsFile:
    """A tenants file read at start (a bad one is an error then) and re-read when it changes, at most every
    ``reload_s`` seconds, when ``book()`` is asked; a bad new version is logged and the last good one kept."""

    def __init__(self, path: str, reload_s: float = 5.0, clock=time.monotonic):
        self.path, self.reload_s, self._clock = os.path.expanduser(path), reload_s, clock
        self._stamp = self._stat()
        self._book = TenantBook(read_tenants(self.path))
        self._checked = clock()
        self.last_error: Optional[str] = None

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def book(self) -> TenantBook:
        now = self._clock()
        if now - self._checked >= self.reload_s:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._book = TenantBook(read_tenants(self.path))
                    self.last_error = None
                    logger.info("tenants file %s reloaded: %d tenants", self.path, len(self._book.tenants))
                except TenantsError as e:
                    self.last_error = str(e)
                    logger.warning("%s; keeping the last good tenants (%d) until the file is fixed", e,
                                   len(self._book.tenants))
        return self._book


# -- editing the file (raystack keys) ----------------------------------------------------------------------------

HEADER = ("# raystack tenants: API keys (as salted hashes, never the keys), limits and priorities.\n"
          "# Managed by `raystack keys add|list|revoke`; replicas re-read it when it changes.\n")


def _load_for_edit(path: str) -> list[Tenant]:
    return read_tenants(path) if os.path.exists(path) else []


def write_tenants(path: str, tenants: list[Tenant]) -> None:
    """Write atomically (a temporary file renamed over the old one), readable by its owner only."""
    from raystack.config import dump_yaml

    tree = {"tenants": {}}
    for t in tenants:
        body: dict[str, Any] = {"priority": t.priority}
        body.update({k: v for k, v in dataclasses.asdict(t.limits).items() if v})
        body["keys"] = [{"id": k.id, "hash": k.hash, "created": k.created} for k in t.keys]
        tree["tenants"][t.name] = body
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tenants-", suffix=".yaml")
    except OSError as e:
        raise TenantsError(f"tenants file {path!r} cannot be written ({e.strerror or e}); pass --file in a "
                           "directory you can write") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(HEADER + dump_yaml(tree))  # an id such as 123e45678901 quoted: YAML 1.2 reads a float
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def add_key(path: str, tenant: str, priority: Optional[str] = None, **limits: Optional[int]) -> str:
    """Add a key to ``tenant`` (created if new; ``priority`` and limits given here update it); returns the key."""
    if not tenant or any(c.isspace() for c in tenant):
        raise TenantsError(f"a tenant name must be non-empty with no spaces, got {tenant!r}")
    if priority is not None and priority not in PRIORITIES:
        raise TenantsError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    for name, value in limits.items():
        if value is not None and value < 0:
            raise TenantsError(f"{name} must be >= 0 (0 = no limit), got {value}")
    tenants = _load_for_edit(path)
    key, record = new_key()
    current = next((t for t in tenants if t.name == tenant), Tenant(tenant))
    updated = dataclasses.replace(
        current, priority=priority or current.priority, keys=(*current.keys, record),
        limits=dataclasses.replace(current.limits, **{k: v for k, v in limits.items() if v is not None}))
    tenants = [updated if t.name == tenant else t for t in tenants] + ([] if current in tenants else [updated])
    write_tenants(path, tenants)
    return key


def revoke_key(path: str, key: str) -> str:
    """Remove a key (given as its id or the whole key); returns its tenant's name."""
    wanted = key_id(key) or key
    tenants = _load_for_edit(path)
    for t in tenants:
        if any(k.id == wanted for k in t.keys):
            kept = dataclasses.replace(t, keys=tuple(k for k in t.keys if k.id != wanted))
            write_tenants(path, [kept if x is t else x for x in tenants])
            return t.name
    raise TenantsError(f"no key with id {wanted!r} in {path!r}; `raystack keys list --file {path}` shows the ids")


# -- limits and usage ---------------------------------------------------------------------------------------------

@dataclass
class Grant:
    """The answer to one ``acquire``: allowed (with a lease to settle) or refused (429 or, for a request larger
    than a whole minute's tokens, never possible); ``headers`` are OpenAI's ``x-ratelimit-*`` either way."""

    allowed: bool
    lease: Optional[int] = None
    kind: str = ""
    """What ran out: ``requests``, ``tokens`` or ``concurrency`` (OpenAI's error ``type``)."""
    message: str = ""
    retry_after: float = 0.0
    headers: dict = field(default_factory=dict)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``250ms``, ``6s``, ``1m30s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{rest}" if minutes else rest


@dataclass
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0


class RateLimiter:
    """Per tenant: a sliding minute of (time, tokens) entries, sequences in flight, and usage in minute buckets.

    A request reserves ``prompt + max_tokens`` per sequence when admitted and is settled to what it really used when
    it ends, so the token window holds exactly the tokens served (and, while a request runs, its reservation).
    Leases not settled within their ``ttl`` (a replica that died mid-request) are settled as they stand."""

    def __init__(self, clock=time.time, keep_usage_s: float = 7 * 86400):
        self._clock, self._keep = clock, keep_usage_s
        self._window: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._in_flight: dict[str, int] = collections.defaultdict(int)
        self._leases: dict[int, tuple] = {}
        self._ids = 0
        self._usage: dict[str, dict[int, _Usage]] = collections.defaultdict(dict)

    def acquire(self, tenant: str, limits: Limits, tokens: int, sequences: int, ttl: float) -> Grant:
        now = self._clock()
        self._expire(now)
        window = self._window[tenant]
        while window and window[0][0] <= now - WINDOW_S:
            window.popleft()
        used_tokens = sum(entry[1] for entry in window)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        headers = self._headers(limits, window, used_tokens, now)
        refusal = None
        if tpm and tokens > tpm:
            refusal = Grant(False, kind="tokens", retry_after=0.0, message=(
                f"Request too large for tenant {tenant!r} on tokens per min (TPM): Limit {tpm}, Requested {tokens} "
                "(prompt + max_tokens per sequence). Reduce the prompt or max_tokens."))
        elif limits.max_concurrent_sequences and self._in_flight[tenant] + sequences > \
                limits.max_concurrent_sequences:
            held = self._in_flight[tenant]
            refusal = Grant(False, kind="concurrency", retry_after=1.0, message=(
                f"Rate limit reached for tenant {tenant!r} on concurrent sequences: Limit "
                f"{limits.max_concurrent_sequences}, In flight {held}, Requested {sequences}. Retry when one ends."))
        elif rpm and len(window) + 1 > rpm:
            wait = window[len(window) - rpm][0] + WINDOW_S - now
            refusal = Grant(False, kind="requests", retry_after=wait, message=(
                f"Rate limit reached for tenant {tenant!r} on requests per min (RPM): Limit {rpm}, Used "
                f"{len(window)}, Requested 1. Please try again in {_duration(wait)}."))
        elif tpm and used_tokens + tokens > tpm:
            freed, wait = 0, WINDOW_S
            for entry in window:
                freed += entry[1]
                if used_tokens - freed + tokens <= tpm:
                    wait = entry[0] + WINDOW_S - now
                    break
            refusal = Grant(False, kind="tokens", retry_after=wait, message=(
                f"Rate limit reached for tenant {tenant!r} on tokens per min (TPM): Limit {tpm}, Used {used_tokens}, "
                f"Requested {tokens}. Please try again in {_duration(wait)}."))
        if refusal is not None:
            refusal.headers = headers
            self._bucket(tenant, now).requests += 1
            self._bucket(tenant, now).errors += 1
            return refusal
        entry = [now, tokens]
        window.append(entry)
        self._in_flight[tenant] += sequences
        self._ids += 1
        self._leases[self._ids] = (tenant, sequences, entry, now + ttl)
        return Grant(True, lease=self._ids, headers=self._headers(limits, window, used_tokens + tokens, now))

    def settle(self, lease: int, prompt_tokens: int, completion_tokens: int, ok: bool) -> None:
        """A request ended: its entry now counts what it used, its sequences are no longer in flight."""
        held = self._leases.pop(lease, None)
        if held is None:
            return  # expired already (counted as reserved)
        tenant, sequences, entry, _ = held
        entry[1] = prompt_tokens + completion_tokens
        self._in_flight[tenant] -= sequences
        self.record(tenant, ok, prompt_tokens, completion_tokens)

    def record(self, tenant: str, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Usage of a request that ended without a lease (refused before any limit was asked)."""
        usage = self._bucket(tenant, self._clock())
        usage.requests += 1
        usage.errors += 0 if ok else 1
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens

    def usage(self, since_s: float) -> dict[str, dict]:
        """Per tenant, the sum over the minute buckets of the last ``since_s`` seconds."""
        start = int((self._clock() - since_s) // 60)
        out = {}
        for tenant, buckets in self._usage.items():
            total = _Usage()
            for minute, u in buckets.items():
                if minute >= start:
                    for name in ("requests", "prompt_tokens", "completion_tokens", "errors"):
                        setattr(total, name, getattr(total, name) + getattr(u, name))
            out[tenant] = dataclasses.asdict(total)
        return out

    def in_flight(self, tenant: str) -> int:
        return self._in_flight[tenant]

    def _bucket(self, tenant: str, now: float) -> _Usage:
        buckets = self._usage[tenant]
        minute = int(now // 60)
        if minute not in buckets:
            for old in [m for m in buckets if m < minute - self._keep // 60]:
                del buckets[old]
            buckets[minute] = _Usage()
        return buckets[minute]

    def _expire(self, now: float) -> None:
        for lease in [k for k, (_, _, _, deadline) in self._leases.items() if deadline < now]:
            tenant, sequences, _, _ = self._leases.pop(lease)
            self._in_flight[tenant] -= sequences
            logger.warning("lease %d of tenant %r expired unsettled (its replica died?); its reservation stands",
                           lease, tenant)

    @staticmethod
    def _headers(limits: Limits, window, used_tokens: int, now: float) -> dict:
        headers = {}
        if limits.requests_per_minute:
            reset = window[-1][0] + WINDOW_S - now if window else 0.0  # when the whole window has emptied
            headers.update({"x-ratelimit-limit-requests": str(limits.requests_per_minute),
                            "x-ratelimit-remaining-requests": str(max(0, limits.requests_per_minute - len(window))),
                            "x-ratelimit-reset-requests": _duration(reset)})
        if limits.tokens_per_minute:
            reset = window[-1][0] + WINDOW_S - now if window else 0.0  # when the whole window has emptied
            headers.update({"x-ratelimit-limit-tokens": str(limits.tokens_per_minute),
                            "x-ratelimit-remaining-tokens": str(max(0, limits.tokens_per_minute - used_tokens)),
                            "x-ratelimit-reset-tokens": _duration(reset)})
        return headers
