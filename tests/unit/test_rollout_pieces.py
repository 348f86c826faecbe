"""The pieces of a rollout that need no cluster: the monitor's window, a replica's outcome batching, the held-out
texts, the spec's checks and the history file."""

from types import SimpleNamespace

import pytest

from raystack.rollout import (OutcomeReporter, RolloutError, RolloutMonitor, RolloutSpec, format_history,
                              heldout_texts, read_history, record)


def test_the_monitor_counts_5xx_and_ttft_per_artifact_since_a_time():
    import time

    t = time.time()
    monitor = RolloutMonitor()
    monitor.report("old", [(t, "200"), (t + 1, "500")], [(t, 0.1)])
    monitor.report("new", [(t + 2, "200")] * 8 + [(t + 3, "503"), (t + 4, "499"), (t - 1, "500")],
                   [(t + 2, 0.05 * i) for i in range(1, 101)])
    window = monitor.window("new", since=t)
    assert window["requests"] == 10 and window["errors"] == 1 and window["error_rate"] == pytest.approx(0.1)
    assert window["ttft_p99"] == pytest.approx(4.95)  # the 99th of 100 samples
    assert monitor.window("new", since=t + 100) == {"requests": 0, "errors": 0, "error_rate": 0.0, "ttft_p99": None}
    monitor.report("new", [(t - 3600, "500")], [])  # older than the half hour kept: dropped
    assert monitor.window("new", since=0)["requests"] == 11


def test_a_replica_batches_outcomes_and_sends_a_5xx_at_once(monkeypatch):
    import asyncio
    import threading

    import raystack.rollout as rollout

    reports, lookups = [], []

    async def report(*batch):
        reports.append(batch)

    monitor = SimpleNamespace(report=SimpleNamespace(remote=report))  # an actor handle's shape

    def lookup(app, create):  # a GCS round trip: it must not run on the replica's event loop
        lookups.append(threading.current_thread() is threading.main_thread())
        return monitor

    monkeypatch.setattr(rollout, "monitor_actor", lookup)
    monkeypatch.setattr("ray.is_initialized", lambda: True)  # a replica's process
    reporter = OutcomeReporter("llm", "model-v2")
    first = reporter.outcome("200")  # nothing sent yet: the first is due
    assert first is not None and [s for _, s in first[1]] == ["200"] and lookups == []
    asyncio.run(reporter.send(first))
    assert lookups == [False] and reports == [first]  # looked up once, off the loop's thread
    assert reporter.outcome("200") is None and reporter.outcome("200") is None  # within the second: batched
    reporter.ttft(0.2)
    due = reporter.outcome("500")
    assert due is not None and [s for _, s in due[1]] == ["200", "200", "500"] and due[0] == "model-v2"
    assert [v for _, v in due[2]] == [0.2]
    asyncio.run(reporter.send(due))
    assert lookups == [False] and reports == [first, due]  # the monitor found is kept


def test_without_a_monitor_nothing_is_sent_or_kept(monkeypatch):
    import asyncio

    import raystack.rollout as rollout

    lookups = []

    def missing(app, create):
        lookups.append(app)
        raise ValueError("Failed to look up actor")

    monkeypatch.setattr(rollout, "monitor_actor", missing)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    reporter = OutcomeReporter("llm", "m")
    due = reporter.outcome("500")
    assert due is not None and reporter.statuses == []  # handed to send, which looks the monitor up
    asyncio.run(reporter.send(due))  # no monitor: dropped, no error
    assert lookups == ["llm"]
    assert reporter.outcome("500") is None and reporter.statuses == []  # looked up within 5 s: not again
    assert lookups == ["llm"]
    monkeypatch.setattr("ray.is_initialized", lambda: False)  # a server outside Ray: no lookup (it would start one)
    reporter._looked_up = 0.0
    asyncio.run(reporter.send(reporter.outcome("500")))
    assert lookups == ["llm"]


def test_heldout_texts_and_the_specs_checks(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("first passage\nline two\n\n\nsecond passage\n\n" + "x" * 5000)
    passages = heldout_texts(str(path))
    assert passages[:2] == ["first passage\nline two", "second passage"] and len(passages[2]) == 2000
    assert len(heldout_texts(None)) >= 4  # the default: standard-library modules
    for bad in (tmp_path / "missing.txt", tmp_path / "empty.txt"):
        if bad.name == "empty.txt":
            bad.write_text("\n\n")
        with pytest.raises(RolloutError, match="--heldout"):
            heldout_texts(str(bad))
    with pytest.raises(RolloutError, match="--model"):
        RolloutSpec(model="")
    with pytest.raises(RolloutError, match="max_error_rate"):
        RolloutSpec(model="m", max_error_rate=2)


def test_the_history_is_appended_and_read_per_app(tmp_path):
    path = str(tmp_path / "deep" / "rollouts.jsonl")
    record(path, {"app": "llm", "action": "rollout", "from": "a", "to": "b", "outcome": "rolled_out", "reason": "ok"})
    record(path, {"app": "other", "action": "rollout", "from": "x", "to": "y", "outcome": "refused", "reason": "no"})
    with open(path, "a") as f:
        f.write("not json\n")
    entries = read_history(path, "llm")
    assert [e["to"] for e in entries] == ["b"] and entries[0]["user"] and entries[0]["time"].endswith("Z")
    table = format_history(read_history(path))
    assert len(table.splitlines()) == 3 and "refused" in table and "rolled_out" in table
    assert read_history(str(tmp_path / "none.jsonl")) == []


def test_a_history_file_that_cannot_be_written_stops_a_rollout_before_anything_changes(tmp_path, monkeypatch):
    from raystack import rollout

    monkeypatch.setattr(rollout, "_app_details", lambda app: pytest.fail("the rollout went on to the app"))
    (tmp_path / "a-file").write_text("x")
    for path in ("/proc/raystack/rollouts.jsonl", str(tmp_path / "a-file" / "rollouts.jsonl")):
        with pytest.raises(RolloutError, match=f"rollout history '{path}' cannot be written"):
            rollout.rollout(RolloutSpec(model="m", history=path))
        with pytest.raises(RolloutError, match=f"rollout history '{path}' cannot be written"):
            rollout.rollback("llm", path)
    with pytest.raises(RolloutError, match="cannot be read .*Is a directory"):
        read_history(str(tmp_path))


def test_a_rollout_of_a_keyed_app_requires_keys_of_its_new_replicas(monkeypatch):
    from ray import serve

    import raystack.rollout as rollout

    def handle(keys):  # serve.get_app_handle(app).rollout_info.remote().result(timeout_s=...)
        info = {"config": {"model": "a", "require_api_key": False}, "api_keys": keys}
        return SimpleNamespace(rollout_info=SimpleNamespace(
            remote=lambda: SimpleNamespace(result=lambda timeout_s: info)))

    monkeypatch.setattr(serve, "get_app_handle", lambda app: handle(2))
    assert rollout.current_config("llm") == {"model": "a", "require_api_key": True}  # fail closed, never open
    monkeypatch.setattr(serve, "get_app_handle", lambda app: handle(0))
    assert rollout.current_config("llm") == {"model": "a", "require_api_key": False}
