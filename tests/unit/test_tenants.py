"""Tenants as data (the file, its keys, reloading) and the arithmetic of per-tenant limits (no Ray)."""

import logging
import os

import pytest

from raystack.tenants import (Limits, RateLimiter, TenantBook, TenantsError, TenantsFile, add_key, key_id,
                              parse_tenants, read_tenants, revoke_key)


def test_keys_are_stored_as_salted_hashes_and_identify_their_tenant(tmp_path):
    path = str(tmp_path / "tenants.yaml")
    key_a = add_key(path, "team-a", priority="high", tokens_per_minute=1000)
    key_b = add_key(path, "team-b", requests_per_minute=5)
    key_a2 = add_key(path, "team-a")
    text = open(path).read()
    for key in (key_a, key_b, key_a2):
        assert key.startswith("rsk-") and key not in text and key.split("-", 2)[2] not in text
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    book = TenantBook(read_tenants(path))
    assert book.identify(key_a.encode()).name == "team-a" and book.identify(key_a2.encode()).name == "team-a"
    team_a = book.identify(key_a.encode())
    assert team_a.priority == "high" and team_a.limits == Limits(tokens_per_minute=1000) and len(team_a.keys) == 2
    assert book.identify(key_b.encode()).limits.requests_per_minute == 5
    forged = key_a[:-1] + ("A" if key_a[-1] != "A" else "B")  # right id, wrong secret
    for bad in (forged, "rsk-", "sk-plain", key_id(key_a), "", "rsk-\xff".encode("latin-1").decode("latin-1")):
        assert book.identify(bad.encode("latin-1")) is None
    assert revoke_key(path, key_id(key_a)) == "team-a"
    book = TenantBook(read_tenants(path))
    assert book.identify(key_a.encode()) is None and book.identify(key_a2.encode()).name == "team-a"
    with pytest.raises(TenantsError, match="no key with id"):
        revoke_key(path, key_a)


@pytest.mark.parametrize("key_hex", ["123e45678901", "000000000000", "1e1234567890", "0x1234567890"])
def test_a_key_id_that_yaml_could_read_as_a_number_survives_the_file(tmp_path, monkeypatch, key_hex):
    """``keys add`` draws 12 random hex digits for an id; some of them (``123e45678901``, about 1 in 300) are a float to
    the YAML 1.2 rule that specs are read with, which PyYAML's own dumper does not quote. The file must give every
    id (and tenant name) back as the string written, so ``keys list`` and the server can read it."""
    monkeypatch.setattr("raystack.tenants.secrets.token_hex", lambda n: key_hex)
    path = str(tmp_path / "tenants.yaml")
    key = add_key(path, "2e10", priority="high")
    assert key_id(key) == key_hex
    (tenant,) = read_tenants(path)
    assert tenant.name == "2e10" and [k.id for k in tenant.keys] == [key_hex]
    assert TenantBook([tenant]).identify(key.encode()).name == "2e10"
    assert revoke_key(path, key_hex) == "2e10"


GOOD = """tenants:
  team-a:
    priority: high
    tokens_per_minute: 100
    keys:
      - id: abc
        hash: sha256$%s$%s
""" % ("00" * 16, "11" * 32)


@pytest.mark.parametrize("text, where", [
    ("tenants:\n  a:\n    priority: urgent\n", "line 3: tenants.a.priority: must be one of low, normal, high"),
    ("tenants:\n  a:\n    tokens_per_minute: -1\n", "line 3: tenants.a.tokens_per_minute: must be an integer >= 0"),
    ("tenants:\n  a:\n    tokens_per_minute: lots\n", "line 3: tenants.a.tokens_per_minute"),
    ("tenants:\n  a:\n    tokens_per_min: 5\n", "line 3: tenants.a.tokens_per_min: unknown field"),
    ("tenants:\n  a:\n    keys:\n      - id: x\n", "line 4: tenants.a.keys[0].hash: is required"),
    ("tenants:\n  a:\n    keys:\n      - id: x\n        hash: sk-the-real-key\n",
     "line 4: tenants.a.keys[0].hash: must be sha256"),
    (GOOD + "  team-b:\n    keys:\n      - id: abc\n        hash: sha256$%s$%s\n" % ("00" * 16, "11" * 32),
     "line 10: tenants.team-b.keys[0].id: 'abc' is also a key of tenant 'team-a'"),
    ("tenant:\n  a: {}\n", "line 1: top level.tenant: unknown field"),
    ("tenants: [a, b]\n", "line 1: tenants: must be a mapping"),
    ("tenants:\n  a: {\n", "is not valid YAML"),
    ("", "is empty"),
])
def test_a_bad_tenants_file_is_refused_naming_line_and_field(text, where):
    with pytest.raises(TenantsError) as info:
        parse_tenants(text, "tenants.yaml")
    assert where in str(info.value)


def test_a_tenants_file_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "a-file").write_text("x")
    for path in ("/proc/raystack/tenants.yaml", str(tmp_path / "a-file" / "tenants.yaml")):
        with pytest.raises(TenantsError, match=f"tenants file '{path}' cannot be written .*pass --file"):
            add_key(path, "team-a")


def test_the_file_reloads_on_change_and_a_broken_version_keeps_the_last_good(tmp_path, caplog):
    path = str(tmp_path / "tenants.yaml")
    key = add_key(path, "team-a")
    now = [0.0]
    tenants = TenantsFile(path, reload_s=5.0, clock=lambda: now[0])
    assert tenants.book().identify(key.encode()).name == "team-a"
    other = add_key(path, "team-b")
    assert tenants.book().identify(other.encode()) is None  # not re-read before reload_s
    now[0] = 5.0
    assert tenants.book().identify(other.encode()).name == "team-b"
    with open(path, "a") as f:
        f.write("  team-c:\n    priority: urgent\n")
    now[0] = 10.0
    with caplog.at_level(logging.WARNING, logger="raystack.tenants"):
        book = tenants.book()
    assert book.identify(key.encode()).name == "team-a" and book.identify(other.encode()).name == "team-b"
    assert "priority: must be one of" in caplog.text and "keeping the last good tenants (2)" in caplog.text
    assert key not in caplog.text
    os.unlink(path)
    now[0] = 15.0
    assert tenants.book().identify(key.encode()).name == "team-a"  # a missing file keeps the last good too
    assert "cannot be read" in tenants.last_error


def test_requests_per_minute_slide_and_refusals_say_when_to_retry():
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limits = Limits(requests_per_minute=3)
    grants = []
    for t in (0, 10, 20):
        now[0] = 1000.0 + t
        grants.append(limiter.acquire("a", limits, 10, 1, 60))
    assert all(g.allowed for g in grants)
    assert grants[-1].headers["x-ratelimit-remaining-requests"] == "0"
    now[0] = 1030.0
    refused = limiter.acquire("a", limits, 10, 1, 60)
    assert not refused.allowed and refused.kind == "requests" and refused.retry_after == pytest.approx(30)
    assert "Limit 3, Used 3" in refused.message and refused.headers["x-ratelimit-limit-requests"] == "3"
    assert limiter.acquire("b", limits, 10, 1, 60).allowed  # another tenant is not affected
    now[0] = 1060.5  # the first request has left the window
    assert limiter.acquire("a", limits, 10, 1, 60).allowed


def test_tokens_per_minute_count_reservations_then_what_was_used():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limits = Limits(tokens_per_minute=100)
    first = limiter.acquire("a", limits, 80, 1, 60)  # prompt + max_tokens reserved
    assert first.allowed and first.headers["x-ratelimit-remaining-tokens"] == "20"
    now[0] = 1.0
    refused = limiter.acquire("a", limits, 30, 1, 60)
    assert not refused.allowed and refused.kind == "tokens" and refused.retry_after == pytest.approx(59)
    limiter.settle(first.lease, 10, 15, ok=True)  # it used 25 of its 80
    second = limiter.acquire("a", limits, 30, 1, 60)
    assert second.allowed and second.headers["x-ratelimit-remaining-tokens"] == "45"
    too_large = limiter.acquire("a", limits, 101, 1, 60)
    assert not too_large.allowed and "Request too large" in too_large.message
    limiter.settle(second.lease, 20, 10, ok=False)
    assert limiter.usage(3600)["a"] == {"requests": 4, "prompt_tokens": 30, "completion_tokens": 25, "errors": 3}


def test_concurrent_sequences_are_held_until_settled_or_the_lease_expires():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limits = Limits(max_concurrent_sequences=4)
    held = limiter.acquire("a", limits, 1, 3, ttl=30)
    assert held.allowed and limiter.in_flight("a") == 3
    refused = limiter.acquire("a", limits, 1, 2, ttl=30)
    assert not refused.allowed and refused.kind == "concurrency" and "In flight 3" in refused.message
    limiter.settle(held.lease, 1, 0, ok=True)
    crashed = limiter.acquire("a", limits, 1, 4, ttl=30)  # its replica dies: never settled
    assert crashed.allowed and not limiter.acquire("a", limits, 1, 1, ttl=30).allowed
    now[0] = 31.0
    assert limiter.acquire("a", limits, 1, 1, ttl=30).allowed and limiter.in_flight("a") == 1


def test_a_replica_finds_a_lost_quota_actor_again_off_its_event_loop(monkeypatch, caplog):
    """The shared actor dies: the replica enforces its own limiter for RETRY_S, then looks the actor up again (a
    blocking GCS call) on a worker thread, so its other requests keep being served meanwhile."""
    import asyncio
    import threading
    from types import SimpleNamespace

    import raystack.quota as quota

    calls = []

    async def dead(*args):
        raise RuntimeError("the actor died")

    async def alive(*args):
        calls.append(args)
        return RateLimiter().acquire(*args)

    # actor handles' shape: ``handle.acquire.remote(...)``
    now, lookups, actors = [0.0], [], [SimpleNamespace(acquire=SimpleNamespace(remote=f)) for f in (dead, alive)]

    def quota_actor(app, create=True):
        lookups.append(threading.current_thread() is threading.main_thread())
        return actors[len(lookups) - 1]

    monkeypatch.setattr(quota, "quota_actor", quota_actor)
    shared = quota.Quota("app", clock=lambda: now[0])
    assert lookups == [True]  # at the replica's start: its constructor, not a request

    limits = Limits(requests_per_minute=100)
    with caplog.at_level(logging.WARNING, logger="raystack.quota"):
        _, where = asyncio.run(shared.acquire("t", limits, 10, 1, 60.0))
    assert where == "local" and "did not answer" in caplog.text  # the dead actor: this replica's own limiter
    now[0] = quota.RETRY_S - 1
    assert asyncio.run(shared.acquire("t", limits, 10, 1, 60.0))[1] == "local" and lookups == [True]
    now[0] = quota.RETRY_S + 1
    grant, where = asyncio.run(shared.acquire("t", limits, 10, 1, 60.0))
    assert where == "actor" and grant.allowed and calls and lookups == [True, False]  # off the loop's thread
