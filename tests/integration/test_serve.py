"""The Serve app over real HTTP on loopback: OpenAI shapes, streaming, seeds, concurrency, errors, auth, overload."""

from __future__ import annotations

import asyncio
import collections
import json

import httpx
import pytest
import torch

from raystack.checkpoint import save_artifact
from raystack.cluster import start_serve, stop_serve
from raystack.model import GPT, ModelConfig
from raystack.serving import build_app
from tests.helpers import free_port, tool

pytestmark = pytest.mark.slow
KEY = "sk-test-0123456789"
SERVED = {}  # what the module's apps serve: the artifact's location, for in-process comparisons


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    """Four apps on one proxy: open at /, keyed at /secure, a one-slot one-queue app at /tight, two replicas at
    /chaos (for the replica-kill test)."""
    from ray import serve

    torch.manual_seed(0)
    artifact = save_artifact(str(tmp_path_factory.mktemp("artifact") / "model"),
                             ModelConfig.from_preset("tiny"), GPT(ModelConfig.from_preset("tiny")).state_dict())
    SERVED["artifact"] = artifact
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"# one key per line\n{KEY}\n")
    port = free_port()
    _, port = start_serve({"host": "127.0.0.1", "port": port})  # waits out a slow proxy start on a busy machine
    base = {"model": artifact, "num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1}
    serve.run(build_app({**base, "max_batch_size": 16}), name="open", route_prefix="/")
    serve.run(build_app({**base, "api_key_file": str(key_file)}), name="secure", route_prefix="/secure")
    serve.run(build_app({**base, "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                         "max_queued_sequences": 2, "max_body_bytes": 4096}),
              name="tight", route_prefix="/tight")
    serve.run(build_app({**base, "min_replicas": 2, "max_replicas": 2}), name="chaos", route_prefix="/chaos")
    yield f"http://127.0.0.1:{port}"
    stop_serve()


def complete(url, **body):
    return httpx.post(f"{url}/v1/completions", json={"model": "raystack", **body}, timeout=60)


def test_completion_has_the_openai_shape_and_usage(server):
    response = complete(server, prompt="def hello():", max_tokens=8, temperature=0.7, seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "raystack"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert body["usage"]["prompt_tokens"] == len("def hello():".encode())
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_same_seed_same_text_and_streaming_matches(server):
    request = dict(prompt="import ", max_tokens=20, temperature=1.0, top_p=0.95, seed=42)
    first, second = complete(server, **request).json(), complete(server, **request).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    other = [complete(server, **{**request, "seed": s}).json()["choices"][0]["text"] for s in range(43, 47)]
    assert any(text != first["choices"][0]["text"] for text in other)

    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"model": "raystack", **request, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == first["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == \
        first["usage"]["completion_tokens"]
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == first["choices"][0][
        "finish_reason"]


def test_the_official_openai_client_works(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["raystack"]
    assert client.models.retrieve("raystack").id == "raystack"
    for other in ("gpt-4", "org/name"):  # a model id may hold a slash: still this route's 404, not "no such route"
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(other)
        assert missing.value.body["code"] == "model_not_found" and other in missing.value.body["message"]
    completion = client.completions.create(model="raystack", prompt=["a = ", "b = "], max_tokens=5, n=2, seed=1,
                                           logprobs=1)
    assert sorted(c.index for c in completion.choices) == [0, 1, 2, 3]
    assert all(len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) for c in completion.choices)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="raystack", prompt="x", max_tokens=6, seed=9, stream=True) if chunk.choices)
    plain = client.completions.create(model="raystack", prompt="x", max_tokens=6, seed=9).choices[0].text
    assert streamed == plain
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="raystack", prompt="x", temperature=-1)
    assert error.value.body["param"] == "temperature"


def test_32_concurrent_requests_all_complete(server):
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(*(
                client.post(f"{server}/v1/completions",
                            json={"model": "raystack", "prompt": f"item {i}", "max_tokens": 12, "seed": i})
                for i in range(32)))
        return responses

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 32
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)


@pytest.mark.parametrize("body, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 7}, "stop"),
    ({"n": 0}, "n"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": [1, 2, 999]}, "prompt"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"seed": "one"}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": {"999": 5}}, "logit_bias"),
    ({"best_of": 2, "n": 3}, "best_of"),
    ({"bogus": 1}, "bogus"),
    ({"model": 5}, "model"),
])
def test_bad_inputs_get_400_naming_the_parameter(server, body, param):
    request = {"model": "raystack", "prompt": "hi", "max_tokens": 4, **body}
    response = httpx.post(f"{server}/v1/completions", json=request, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_bodies_and_unknown_models_never_500(server):
    for content in (b"{not json", b"\xff\xfe", b"[]", b"null", b'"text"'):
        response = httpx.post(f"{server}/v1/completions", content=content, timeout=30,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, (content, response.text)
        assert "error" in response.json()
    response = complete(server, prompt="x", model="gpt-4")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{server}/nowhere", timeout=30).status_code == 404
    wrong = httpx.get(f"{server}/v1/completions", timeout=30)  # RFC 9110: a 405 names the methods that are allowed
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST", wrong.headers
    assert wrong.json()["error"]["message"] == "GET is not allowed on /v1/completions; use POST"
    assert complete(server, prompt="still alive", max_tokens=2).status_code == 200


def test_api_keys_guard_every_route_but_health(server):
    secure = f"{server}/secure"
    assert httpx.get(f"{secure}/health", timeout=30).status_code == 200
    for route in ("/v1/models", "/v1/models/raystack", "/v1/models/other", "/docs", "/redoc", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.get(f"{secure}{route}", headers=headers, timeout=30)
            assert response.status_code == 401, (route, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    keyed = {"Authorization": f"Bearer {KEY}"}
    schema = httpx.get(f"{secure}/openapi.json", headers=keyed, timeout=30)
    assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    docs = httpx.get(f"{secure}/docs", headers=keyed, timeout=30)
    assert docs.status_code == 200 and "/secure/openapi.json" in docs.text
    assert httpx.get(f"{server}/openapi.json", timeout=30).status_code == 200  # keys off: the docs are open
    body = {"model": "raystack", "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{secure}/v1/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    good = httpx.post(f"{secure}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert good.status_code == 200
    assert KEY not in httpx.get(f"{secure}/health", timeout=30).text


def test_haproxy_holds_the_http_port_and_the_replicas_own_ports_keep_the_keys(server):
    """Serve's throughput mode (raystack.cluster.SERVE_INGRESS): HAProxy listens on the HTTP port, each replica on a
    port of its own; a replica reached there directly still asks the keyed app's key (auth lives in the app)."""
    import os

    import psutil

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        pytest.skip("no HAProxy binary here: Serve's proxy actor serves (raystack.cluster.apply_local_ray_env)")
    port = int(server.rsplit(":", 1)[1])
    listening = {c.laddr.port: c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert psutil.Process(listening[port]).name() == "haproxy"
    replica_ports = [p for p, pid in listening.items()
                     if 30000 <= p < 31000 and "ServeReplica" in " ".join(psutil.Process(pid).cmdline())]
    assert len(replica_ports) >= 5, listening  # open, secure, tight, chaos x 2
    codes = {}
    for replica in replica_ports:
        response = httpx.get(f"http://127.0.0.1:{replica}/secure/v1/models", timeout=30)
        codes[replica] = response.status_code
    assert list(codes.values()).count(401) == 1 and 200 not in codes.values(), codes  # only secure's, and it asks


def test_overload_answers_503_quickly_instead_of_hanging(server):
    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "raystack", "prompt": "x", "max_tokens": 100, "temperature": 0}
            return await asyncio.gather(*(client.post(f"{server}/tight/v1/completions", json=body)
                                          for _ in range(8)))

    codes = [r.status_code for r in asyncio.run(run())]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}


def test_deploy_job_serves_an_artifact_next_to_the_running_apps(server, ray_session, tmp_path):
    """``python jobs/deploy.py`` against a running cluster (as under ray job submit): deploys, exits, keeps serving."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ray

    repo = Path(__file__).resolve().parents[2]
    artifact = save_artifact(str(tmp_path / "model"), ModelConfig.from_preset("tiny"),
                             GPT(ModelConfig.from_preset("tiny")).state_dict())
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    bad = subprocess.run([sys.executable, str(repo / "jobs" / "deploy.py"), "--set", "max_replicas=0"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "raystack: error:" in bad.stderr and "model" in bad.stderr
    # On a cluster a local path the driver's node lacks may be on the replicas' nodes, so the replicas try it; when
    # they cannot start, the deploy says why in one line (serve.run's own error names no cause).
    elsewhere = str(tmp_path / "elsewhere")
    refused = subprocess.run([sys.executable, str(repo / "jobs" / "deploy.py"), "--model", elsewhere, "--name",
                              "refused", "--route-prefix", "/refused", "--set", "num_cpus=0.5",
                              "--set", "constructor_retries=1"], env=env, capture_output=True, text=True, timeout=600)
    from ray import serve

    serve.delete("refused")
    assert refused.returncode == 2, refused.stderr[-2000:]
    # The last line, after the controller's log lines Ray relays to the job (the failed deploy ends that relay).
    assert refused.stderr.splitlines()[-1:] == [
        f"raystack: error: deploying 'refused' failed: raystack.checkpoint.CheckpointError: model artifact: "
        f"{elsewhere!r} holds no committed output (no _SUCCESS manifest): it was never written, or its writer did not "
        "finish; re-run the job that writes it (the Serve controller's log has the replicas' tracebacks)"], (
        refused.stderr[-3000:])
    job = subprocess.run(
        [sys.executable, str(repo / "jobs" / "deploy.py"), "--config", str(repo / "serve_apps" / "llm.yaml"),
         "--model", artifact, "--name", "job", "--route-prefix", "/job", "--set", "num_cpus=0.5",
         "--set", "model_name=from-job", "--set", "sampling.max_tokens=2", "--set", "sampling.temperature=0"],
        env=env, capture_output=True, text=True, timeout=600)  # a busy machine
    assert job.returncode == 0, job.stderr[-2000:]
    response = httpx.post(f"{server}/job/v1/completions", timeout=60,
                          json={"model": "from-job", "prompt": "hi", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["model"] == "from-job"
    # The app's sampling section fills what a request leaves out: 2 tokens, greedy (the same text twice).
    bodies = [httpx.post(f"{server}/job/v1/completions", timeout=60, json={"model": "from-job", "prompt": "hi"}).json()
              for _ in range(2)]
    assert [b["usage"]["completion_tokens"] for b in bodies] == [2, 2], bodies
    assert bodies[0]["choices"][0]["text"] == bodies[1]["choices"][0]["text"]


def test_serve_metrics_reach_rays_prometheus_endpoint(server, ray_session):
    import time

    import ray

    complete(server, prompt="def metrics_are_exported():\n", max_tokens=4)
    again = complete(server, prompt="def metrics_are_exported():\n    pass", max_tokens=4)
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 28  # the first prompt: from the cache
    port = ray._private.worker._global_node.metrics_export_port
    wanted = ["raystack_requests_total", "raystack_generated_tokens_total", "raystack_time_to_first_token_seconds",
              "raystack_queue_depth", "raystack_batch_occupancy", "raystack_prompt_tokens_total",
              "raystack_prompt_tokens_cached_total"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not on Ray's Prometheus endpoint: {missing}"


# -- hostile clients: nothing a client sends is a 5xx, and one request never harms another ----------------------

NAMED_HOSTILE_BODIES = {
    "top_k beyond int64": b'{"model": "raystack", "prompt": "def f(", "top_k": 9223372036854775808}',
    "seed whose per-choice offset overflows": b'{"model": "raystack", "prompt": "def f(", "seed": 9223372036854775807, '
                                              b'"n": 2}',
    "top_p 0 in float32": b'{"model": "raystack", "prompt": "def f(", "top_p": 1e-50}',
    "repetition_penalty subnormal": b'{"model": "raystack", "prompt": "def f(", "repetition_penalty": 1e-40}',
    "repetition_penalty 0 in float32": b'{"model": "raystack", "prompt": "def f(", "repetition_penalty": 1e-50}',
    "lone surrogate in prompt": b'{"model": "raystack", "prompt": "\\ud800"}',
    "lone surrogate in model": b'{"model": "\\ud800", "prompt": "x"}',
    "nested 100000 deep": b"[" * 100_000,
    "integer of 5000 digits": b'{"model": "raystack", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    "temperature of 400 digits": b'{"model": "raystack", "prompt": "x", "temperature": ' + b"9" * 400 + b"}",
    "fan-out of 1.6 M sequences": json.dumps({"model": "raystack", "prompt": ["a"] * 100_000, "n": 16}).encode(),
    "NaN literal": b'{"model": "raystack", "prompt": "x", "temperature": NaN}',
    "invalid UTF-8": b'{"model": "raystack", "prompt": "\xff\xfe"}',
}
WELL_FORMED = {"model": "raystack", "prompt": "def main():", "max_tokens": 6, "seed": 11, "temperature": 0.8}


def _post_raw(url: str, content: bytes, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"},
                      timeout=60, **kwargs)


def _beside(url: str, hostile: bytes) -> tuple[httpx.Response, httpx.Response]:
    """The hostile body and a well-formed request sent at the same time; both responses."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        normal = pool.submit(lambda: httpx.post(f"{url}/v1/completions", json=WELL_FORMED, timeout=60))
        bad = pool.submit(_post_raw, url, hostile)
        return bad.result(), normal.result()


@pytest.mark.parametrize("name", list(NAMED_HOSTILE_BODIES))
def test_each_named_hostile_body_gets_its_own_4xx_and_harms_nobody(server, name):
    expected = complete(server, **{k: v for k, v in WELL_FORMED.items() if k != "model"}).json()["choices"][0]["text"]
    bad, normal = _beside(server, NAMED_HOSTILE_BODIES[name])
    assert 400 <= bad.status_code < 500 or bad.status_code == 200, (name, bad.status_code, bad.text[:300])
    assert "error" in bad.json() or bad.status_code == 200
    assert normal.status_code == 200 and normal.json()["choices"][0]["text"] == expected
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200


def test_hypothesis_generated_bodies_never_get_a_5xx(server):
    """Property-based request bodies from the request schema plus edge values, over real HTTP to the live app."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    edge = st.sampled_from([0, -0.0, 1, -1, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**400,
                            3.4028235e38, 3.5e38, 1.1754943e-38, 1e-40, 1e-45, 5e-324, 1e-308, 1e308,
                            1.7976931348623157e308, float("nan"), float("inf"), float("-inf"), 1e-50, 0.5, 2.0])
    text = st.text(st.characters(blacklist_categories=()), max_size=40)  # surrogates included
    scalar = st.one_of(edge, st.integers(), st.floats(), st.booleans(), st.none(), text)
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=3),
                         max_leaves=8)
    prompt = st.one_of(text, st.lists(text, max_size=3), st.lists(st.integers(-2, 300), max_size=8),
                       st.lists(st.lists(st.integers(0, 256), min_size=1, max_size=4), max_size=3), value)
    fields = {name: value for name in ("temperature", "top_p", "top_k", "min_p", "n", "best_of", "seed", "stop",
                                       "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
                                       "echo", "stream", "stream_options", "logit_bias", "user", "suffix")}
    fields["max_tokens"] = st.one_of(st.integers(1, 8), edge, value)
    body = st.fixed_dictionaries({"model": st.one_of(st.just("raystack"), value), "prompt": prompt},
                                 optional={**fields, "bogus": value})
    raw = st.one_of(body.map(lambda b: json.dumps(b).encode()), st.binary(max_size=64),
                    st.integers(1, 5000).map(lambda depth: b'{"prompt": ' + b"[" * depth))
    seen = []

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw)
    def check(content):
        response = _post_raw(server, content)
        seen.append(response.status_code)
        assert response.status_code < 500, (content[:300], response.status_code, response.text[:300])
        if response.status_code != 200:
            assert "error" in response.json()
        elif response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
        if len(seen) % 10 == 0:  # the engine still serves everyone else
            assert httpx.get(f"{server}/health", timeout=30).status_code == 200
            assert complete(server, prompt="ok", max_tokens=2).status_code == 200

    check()
    assert sum(code == 200 for code in seen) >= 1 and sum(400 <= code < 500 for code in seen) >= 50


def test_an_over_limit_fan_out_is_refused_at_once_without_delaying_others(server):
    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            async def timed(body):
                start = asyncio.get_running_loop().time()
                response = await client.post(f"{server}/v1/completions", json=body)
                return response, asyncio.get_running_loop().time() - start

            normal = dict(WELL_FORMED, max_tokens=24)
            baseline = (await timed(normal))[1]
            (fan_out, refused_in), (ok, ok_in) = await asyncio.gather(
                timed({"model": "raystack", "prompt": ["a"] * 100_000, "n": 16}), timed(normal))
            return fan_out, refused_in, ok, ok_in, baseline

    fan_out, refused_in, ok, ok_in, baseline = asyncio.run(run())
    assert fan_out.status_code == 400 and fan_out.json()["error"]["code"] == "too_many_sequences"
    assert refused_in < 5 and ok.status_code == 200
    assert ok_in < baseline + 5  # not queued behind 1.6 M sequences


def test_queue_and_body_limits_answer_at_once(server):
    queued = complete(f"{server}/tight", prompt="x", max_tokens=4, n=3)  # 3 sequences > max_queued_sequences 2
    assert queued.status_code == 503 and queued.headers["retry-after"] == "1"
    assert queued.json()["error"]["code"] == "overloaded"
    big = complete(f"{server}/tight", prompt="x" * 5000, max_tokens=4)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert complete(f"{server}/tight", prompt="x", max_tokens=2).status_code == 200


def _replica_pids(app: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:LLMServer"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_streams_survive_a_replica_killed_mid_load(server):
    """Streaming load at concurrency 16 for ~30 s on two replicas; one is SIGKILLed a third of the way in. With
    client retries (as the OpenAI SDK does) at least 99.9% of requests succeed; raw 5xx answers are reported."""
    import os
    import signal
    import time

    url = f"{server}/chaos/v1/completions"
    pids = _replica_pids("chaos")
    assert len(pids) == 2
    stats = {"ok": 0, "failed": 0, "raw_5xx": 0, "broken_streams": 0, "retries": 0}
    duration, kill_at = 30.0, 10.0

    async def one_request(client, i) -> bool:
        body = {"model": "raystack", "prompt": f"item {i}", "max_tokens": 16, "stream": True, "seed": i}
        for attempt in range(8):
            if attempt:
                stats["retries"] += 1
                await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
            try:
                async with client.stream("POST", url, json=body) as response:
                    if response.status_code >= 500:
                        stats["raw_5xx"] += 1
                        continue
                    if response.status_code != 200:
                        return False
                    events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
            except httpx.HTTPError:
                stats["broken_streams"] += 1
                continue
            chunks = [json.loads(e) for e in events[:-1]] if events and events[-1] == "[DONE]" else None
            if chunks is None or any("error" in c for c in chunks):
                stats["broken_streams"] += 1
                continue
            if chunks and chunks[-1]["choices"] and chunks[-1]["choices"][0]["finish_reason"]:
                return True
            stats["broken_streams"] += 1
        return False

    async def worker(client, start, w):
        i = 0
        while time.monotonic() - start < duration:
            ok = await one_request(client, w * 10_000 + i)
            stats["ok" if ok else "failed"] += 1
            i += 1

    async def killer(start):
        await asyncio.sleep(kill_at)
        os.kill(pids[0], signal.SIGKILL)

    async def run():
        start = time.monotonic()
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(killer(start), *(worker(client, start, w) for w in range(16)))

    asyncio.run(run())
    total = stats["ok"] + stats["failed"]
    print(f"\nchaos: {total} requests, {stats['ok']} succeeded ({stats['ok'] / total:.4%}), raw 5xx responses "
          f"{stats['raw_5xx']}, broken streams {stats['broken_streams']}, retries {stats['retries']}")
    assert total >= 100 and stats["ok"] / total >= 0.999, stats
    deadline = time.monotonic() + 300  # Serve brings the deployment back to two replicas (slowly on a busy machine)
    while time.monotonic() < deadline and len(set(_replica_pids("chaos")) - {pids[0]}) < 2:
        time.sleep(2)
    assert len(set(_replica_pids("chaos")) - {pids[0]}) == 2


def test_submit_deploy_delivers_api_keys_to_the_replicas(server, ray_session, tmp_path):
    """The documented cluster path: ``RAYSTACK_API_KEYS`` in the submitter's shell, ``raystack submit deploy``
    through the Jobs API, and the replicas it deploys require that key (which no command line or log shows)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ray

    repo = Path(__file__).resolve().parents[2]
    artifact = save_artifact(str(tmp_path / "model"), ModelConfig.from_preset("tiny"),
                             GPT(ModelConfig.from_preset("tiny")).state_dict())
    jobs_api = "http://" + ray._private.worker._global_node.address_info["webui_url"]
    key = "sk-submitted-" + os.urandom(8).hex()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "raystack.cli", "submit", "deploy", "--address", jobs_api, "--wait", "--",
         "--model", artifact, "--name", "keyed-job", "--route-prefix", "/keyedjob", "--set", "num_cpus=0.25",
         "--set", "require_api_key=true"],
        env={**env, "RAYSTACK_API_KEYS": key}, cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert key not in result.stdout + result.stderr
    body = {"model": "raystack", "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{server}/keyedjob/v1/completions", json=body, timeout=60).status_code == 401
    keyed = httpx.post(f"{server}/keyedjob/v1/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {key}"})
    assert keyed.status_code == 200, keyed.text
    from ray import serve

    serve.delete("keyed-job")


# -- the clients people already use ----------------------------------------------------------------------------

def _in_process_logprobs(token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the served model's logits over ``token_ids``, computed here: row i predicts token i + 1."""
    from raystack.checkpoint import load_artifact

    model, _ = load_artifact(SERVED["artifact"])
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids]))[0].float(), -1)


def _token_id(name: str) -> int:
    return 256 if name == "<|endoftext|>" else (int(name[-2:], 16) if name.startswith("bytes:") else ord(name))


def test_logprobs_top_logprobs_and_echo_scores_equal_the_models_own(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    prompt = "def fib(n):\n    return"
    completion = client.completions.create(model="raystack", prompt=prompt, max_tokens=6, temperature=0.8, seed=5,
                                           logprobs=5, echo=True)
    (choice,) = completion.choices
    lp = choice.logprobs
    ids = [_token_id(t) for t in lp.tokens]
    assert ids[:len(prompt)] == list(prompt.encode()) and choice.text.startswith(prompt)
    expected = _in_process_logprobs(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - expected[i - 1, ids[i]].item()) < 1e-4, i
        top = expected[i - 1].topk(5)
        alternatives = {_token_id(t): v for t, v in lp.top_logprobs[i].items()}
        assert set(top.indices.tolist()) <= set(alternatives) and len(alternatives) <= 6
        assert all(abs(v - expected[i - 1, t].item()) < 1e-4 for t, v in alternatives.items())
    assert lp.text_offset == list(range(len(ids)))  # ASCII here: one character per token
    assert completion.usage.prompt_tokens == len(prompt) and completion.usage.completion_tokens == 6

    scored = client.completions.create(model="raystack", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    total = sum(scored.choices[0].logprobs.token_logprobs[1:])
    assert abs(total - sum(expected[i - 1, ids[i]].item() for i in range(1, len(prompt)))) < 1e-3


def test_logit_bias_forces_and_forbids_and_best_of_returns_the_most_likely(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    forced = client.completions.create(model="raystack", prompt="x = ", max_tokens=5, seed=1,
                                       logit_bias={str(ord("Q")): 100})
    assert forced.choices[0].text == "QQQQQ"
    greedy = client.completions.create(model="raystack", prompt="x = ", max_tokens=5, temperature=0).choices[0].text
    banned = client.completions.create(model="raystack", prompt="x = ", max_tokens=5, temperature=0,
                                       logit_bias={str(b): -100 for b in set(greedy.encode())}).choices[0].text
    assert not set(banned.encode()) & set(greedy.encode())

    request = dict(model="raystack", prompt="import ", max_tokens=8, temperature=1.0, seed=11)
    candidates = client.completions.create(**request, n=4, logprobs=0).choices  # the best_of draws: seeds 11..14
    best = max(candidates, key=lambda c: sum(c.logprobs.token_logprobs))
    chosen = client.completions.create(**request, n=1, best_of=4)
    assert [c.text for c in chosen.choices] == [best.text] and chosen.choices[0].index == 0
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(**request, best_of=4, stream=True)
    assert error.value.body["param"] == "best_of"


def test_chat_completions_streamed_and_not_with_the_models_logprobs(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
    reply = client.chat.completions.create(model="raystack", messages=messages, max_completion_tokens=8, seed=3,
                                           logprobs=True, top_logprobs=3, n=2)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and len(reply.choices) == 2
    rendered = "system: You write Python.\nuser: a loop\nassistant:"
    assert reply.usage.prompt_tokens == len(rendered)
    first = reply.choices[0]
    assert first.message.role == "assistant" and first.finish_reason in ("stop", "length")
    tokens = [_token_id(t.token) for t in first.logprobs.content]
    expected = _in_process_logprobs(list(rendered.encode()) + tokens)
    for i, entry in enumerate(first.logprobs.content):
        row = expected[len(rendered) - 1 + i]
        assert abs(entry.logprob - row[tokens[i]].item()) < 1e-4 and entry.bytes == ([tokens[i]] if tokens[i] < 256
                                                                                        else [])
        assert [_token_id(t.token) for t in entry.top_logprobs] == row.topk(3).indices.tolist()
    chunks = list(client.chat.completions.create(model="raystack", messages=messages, max_completion_tokens=8,
                                                 seed=3, n=2, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and chunks[-1].usage.completion_tokens == \
        reply.usage.completion_tokens
    for index, choice in enumerate(reply.choices):
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == index]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == choice.message.content
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="raystack", messages=[{"role": "user"}])
    assert error.value.body["param"] == "messages[0].content"
    # A chat loop hands the reply's message object back as it is (the SDK sends its refusal: null with it).
    history = [*messages, first.message, {"role": "user", "content": "again"}]
    again = client.chat.completions.create(model="raystack", messages=history, max_completion_tokens=2, seed=3)
    assert again.usage.prompt_tokens == len(f"{rendered} {first.message.content}\nuser: again\nassistant:".encode())
    # The conversation so far was in the replica's KV cache: only what follows it was prefilled (prefix caching).
    assert len(rendered) <= again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_tokenize_detokenize_and_the_typed_openapi_document(server):
    tokens = httpx.post(f"{server}/tokenize", json={"model": "raystack", "prompt": "héllo"}, timeout=30).json()
    assert tokens["tokens"] == list("héllo".encode()) and tokens["count"] == 6 and tokens["max_model_len"] > 0
    chat = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.json()["tokens"] == list(b"user: hi\nassistant:")
    assert httpx.post(f"{server}/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json() == \
        {"prompt": "héllo"}
    bad = httpx.post(f"{server}/detokenize", json={"tokens": [1, 999]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    document = httpx.get(f"{server}/openapi.json", timeout=30).json()
    request = document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "logprobs", "echo", "logit_bias", "best_of"} <= set(request)
    assert request["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert request["logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 20}
    chat_request = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_completion_tokens", "top_logprobs"} <= set(chat_request)
    assert request["model"]["enum"] == chat_request["model"]["enum"] == ["raystack"]  # the one served


@pytest.mark.tools("schemathesis")
def test_schemathesis_fuzzing_the_served_openapi_document_finds_nothing(server, tmp_path):
    """The standard OpenAPI fuzzer, from the document a replica serves, with every check but one: no 5xx, every
    status, header and body as documented, every schema-invalid body refused, every unsupported method a 405 with
    ``Allow``. Left out: ``positive_data_acceptance``, since a schema cannot say that prompt + ``max_tokens`` must fit
    the context (test_api_schema holds the parser and the document to each other at every other edge)."""
    import subprocess

    schemathesis = tool("schemathesis")
    run = subprocess.run([schemathesis, "run", f"{server}/openapi.json", "--checks", "all", "--exclude-checks",
                          "positive_data_acceptance", "--max-examples", "30", "--seed", "1", "--generation-database",
                          "none", "--request-timeout", "60", "--workers", "1", "--no-color",
                          "--suppress-health-check", "too_slow"],  # a busy machine is slow, not wrong
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0 and "No issues found" in run.stdout, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested: 7" in run.stdout  # every route: the two model routes, completions, chat, (de)tokenize, health


@pytest.mark.tools("lm-eval")
def test_lm_evaluation_harness_scores_and_generates_as_the_model_does_in_process(server, tmp_path):
    """lm-eval's local-completions model, with the artifact's own tokenizer through transformers.AutoTokenizer, runs
    a log-likelihood multiple-choice task and a generate_until task against the live server. The answers are set
    from the model's in-process results (some right, some wrong), so each accuracy is a known figure that any
    difference in scores or generations would change; every per-choice log-likelihood must also match to 1e-4."""
    import glob
    import subprocess

    from raystack.engine import Engine, EngineConfig, GenerationParams, generate_text
    from raystack.checkpoint import load_artifact

    model, tokenizer = load_artifact(SERVED["artifact"])

    def loglikelihood(context: str, continuation: str) -> tuple[float, bool]:
        spaces = len(context) - len(context.rstrip())  # lm-eval moves a context's trailing spaces to the
        if spaces:                                      # continuation before scoring (its _encode_pair)
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ctx + cont]))[0, :-1].float(), -1)
        rows = logprobs[len(ctx) - 1:]
        return (sum(rows[i, t].item() for i, t in enumerate(cont)),
                all(rows[i].argmax().item() == t for i, t in enumerate(cont)))

    questions = [("def f(x):\n    return", ["x", "y", "None"]), ("import", ["os", "sys", "re"]),
                 ("for i in", ["range(3):", "items:", "x"]), ("class ", ["A:", "Base(object):", "B"])]
    scores = {q: [loglikelihood(q, " " + c) for c in choices] for q, choices in questions}
    best = {q: max(range(len(c)), key=lambda i: scores[q][i][0]) for q, c in questions}
    answers = [best[q] if k % 2 == 0 else (best[q] + 1) % len(c) for k, (q, c) in enumerate(questions)]
    prompts = ["def main(", "class A", "x = [", "import o"]

    async def generations():
        engine = Engine(model, tokenizer, EngineConfig(max_batch_size=4))
        out = [await generate_text(engine, p, GenerationParams(max_tokens=8, temperature=0.0, stop=["\n"]))
               for p in prompts]
        await engine.shutdown()
        return [o["text"] for o in out]

    greedy = asyncio.run(generations())
    targets = [text if k % 2 == 0 else text + "#" for k, text in enumerate(greedy)]
    with open(tmp_path / "mc.jsonl", "w") as f:
        for (q, choices), answer in zip(questions, answers):
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(tmp_path / "gen.jsonl", "w") as f:
        for p, target in zip(prompts, targets):
            f.write(json.dumps({"question": p, "answer": target}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
    (tasks / "mc.yaml").write_text(
        f"task: raystack_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(
        f"task: raystack_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
        "  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n")

    tokenizer_dir = tmp_path / "tokenizer"  # what the CLI exports, loaded by lm-eval with AutoTokenizer
    from raystack.cli import main as raystack_cli
    assert raystack_cli(["tokenizer", SERVED["artifact"], "--out", str(tokenizer_dir)]) == 0
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [tool("lm-eval"), "run", "--model", "local-completions", "--model_args",
         f"model=raystack,base_url={server}/v1/completions,tokenizer={tokenizer_dir},tokenizer_backend=huggingface,"
         "num_concurrent=1,max_retries=1", "--tasks", "raystack_mc,raystack_gen", "--include_path", str(tasks),
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    results = json.load(open(results_file))["results"]
    assert results["raystack_mc"]["acc,none"] == pytest.approx(0.5)
    assert results["raystack_gen"]["exact_match,none"] == pytest.approx(0.5)
    (samples_file,) = glob.glob(str(tmp_path / "out" / "*" / "samples_raystack_mc_*.jsonl"))
    for line in open(samples_file):
        sample = json.loads(line)
        q = sample["doc"]["question"]
        for (loglik, greedy_flag), (expected, expected_greedy) in zip(sample["filtered_resps"], scores[q]):
            assert abs(float(loglik) - expected) < 1e-4 and (greedy_flag == "True") == expected_greedy


def test_hypothesis_chat_and_tokenize_bodies_never_get_a_5xx(server):
    """Property-based bodies for the routes real clients added: chat completions (every documented field, edge
    values, malformed messages), /tokenize and /detokenize; never a 5xx, and the engine keeps serving."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from raystack.openai_api import CHAT_FIELDS

    edge = st.sampled_from([0, -1, 1, 2, 20, 21, 2**63, -(2**63) - 1, 10**400, 1e-50, float("nan"), float("inf"),
                            0.5, 100, -101, True, None, "", "x", [], {}])
    text = st.text(st.characters(blacklist_categories=()), max_size=30)
    value = st.recursive(st.one_of(edge, st.integers(), st.floats(), text),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                         max_leaves=6)
    role = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"]), value)
    part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": text}), value)
    message = st.one_of(st.fixed_dictionaries({"role": role, "content": st.one_of(text, st.lists(part, max_size=3),
                                                                                  value)},
                                              optional={"name": value, "extra": value}), value)
    fields = {name: value for name in sorted(CHAT_FIELDS - {"model", "messages"})}
    fields["max_tokens"] = st.one_of(st.integers(1, 6), edge)
    fields["logit_bias"] = st.one_of(st.dictionaries(st.integers(-5, 300).map(str), st.floats(-200, 200),
                                                     max_size=3), value)
    chat = st.fixed_dictionaries({"model": st.one_of(st.just("raystack"), value),
                                  "messages": st.one_of(st.lists(message, min_size=1, max_size=3), value)},
                                 optional=fields)
    tokenize = st.fixed_dictionaries({}, optional={"prompt": value, "messages": st.lists(message, max_size=2),
                                                   "return_token_strs": value, "model": value})
    detokenize = st.fixed_dictionaries({"tokens": st.one_of(st.lists(st.integers(-3, 300), max_size=6), value)},
                                       optional={"model": value})
    well_formed = st.fixed_dictionaries(  # so that valid bodies are drawn often, not only by luck
        {"model": st.just("raystack"), "messages": st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": text}), min_size=1, max_size=2)},
        optional={"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "n": st.integers(1, 2)})
    body = st.one_of(chat.map(lambda b: ("/v1/chat/completions", b)), tokenize.map(lambda b: ("/tokenize", b)),
                     detokenize.map(lambda b: ("/detokenize", b)),
                     well_formed.map(lambda b: ("/v1/chat/completions", b)))
    seen = []

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body)
    def check(route_body):
        route, content = route_body
        response = httpx.post(f"{server}{route}", content=json.dumps(content).encode(), timeout=60,
                              headers={"content-type": "application/json"})
        seen.append(response.status_code)
        assert response.status_code < 500, (route, str(content)[:300], response.status_code, response.text[:300])
        if response.status_code != 200:
            assert "error" in response.json()
        if len(seen) % 20 == 0:
            assert complete(server, prompt="ok", max_tokens=2).status_code == 200

    check()
    assert sum(code == 200 for code in seen) >= 5 and sum(400 <= code < 500 for code in seen) >= 40, \
        collections.Counter(seen)
