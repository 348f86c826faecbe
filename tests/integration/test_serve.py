"""The Serve app over real HTTP on loopback: OpenAI shapes, streaming, seeds, concurrency, errors, auth, overload."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import torch

from raystack.checkpoint import save_artifact
from raystack.model import GPT, ModelConfig
from raystack.serving import build_app

pytestmark = pytest.mark.slow
KEY = "sk-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    """Three apps on one proxy: open at /, keyed at /secure, a one-slot one-queue app at /tight."""
    from ray import serve

    torch.manual_seed(0)
    artifact = save_artifact(str(tmp_path_factory.mktemp("artifact") / "model"),
                             ModelConfig.from_preset("tiny"), GPT(ModelConfig.from_preset("tiny")).state_dict())
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"# one key per line\n{KEY}\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"model": artifact, "num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1}
    serve.run(build_app({**base, "max_batch_size": 16}), name="open", route_prefix="/")
    serve.run(build_app({**base, "api_key_file": str(key_file)}), name="secure", route_prefix="/secure")
    serve.run(build_app({**base, "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1}),
              name="tight", route_prefix="/tight")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


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
    ({"prompt": None}, "prompt"),
    ({"prompt": [1, 2, 999]}, "prompt"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"seed": "one"}, "seed"),
    ({"logprobs": 9}, "logprobs"),
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
    assert complete(server, prompt="still alive", max_tokens=2).status_code == 200


def test_api_keys_guard_every_route_but_health(server):
    secure = f"{server}/secure"
    assert httpx.get(f"{secure}/health", timeout=30).status_code == 200
    assert httpx.get(f"{secure}/v1/models", timeout=30).status_code == 401
    body = {"model": "raystack", "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{secure}/v1/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    good = httpx.post(f"{secure}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert good.status_code == 200
    assert KEY not in httpx.get(f"{secure}/health", timeout=30).text


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
    job = subprocess.run(
        [sys.executable, str(repo / "jobs" / "deploy.py"), "--config", str(repo / "serve_apps" / "llm.yaml"),
         "--model", artifact, "--name", "job", "--route-prefix", "/job", "--set", "num_cpus=0.5",
         "--set", "model_name=from-job"], env=env, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stderr[-2000:]
    response = httpx.post(f"{server}/job/v1/completions", timeout=60,
                          json={"model": "from-job", "prompt": "hi", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["model"] == "from-job"


def test_serve_metrics_reach_rays_prometheus_endpoint(server, ray_session):
    import time

    import ray

    complete(server, prompt="metrics", max_tokens=4)
    port = ray._private.worker._global_node.metrics_export_port
    wanted = ["raystack_requests_total", "raystack_generated_tokens_total", "raystack_time_to_first_token_seconds",
              "raystack_queue_depth", "raystack_batch_occupancy"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not on Ray's Prometheus endpoint: {missing}"
