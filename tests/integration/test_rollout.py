"""Model rollouts under steady streaming load over real HTTP, counting every response: a good rollout, an artifact
that fails to load, one that fails the quality gate, and one that passes the gates but fails on real traffic after
the switch (rolled back within the watch window); then a rollback by hand and the history."""

from __future__ import annotations

import asyncio
import collections
import sysconfig
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from raystack import cli
from raystack.checkpoint import save_artifact
from raystack.cluster import start_serve, stop_serve
from raystack.engine import Engine, EngineConfig, GenerationParams, generate_text
from raystack.model import GPT, ModelConfig
from raystack.rollout import RolloutSpec, current_config, read_history, rollout
from raystack.serving import build_app
from tests.helpers import free_port

pytestmark = pytest.mark.slow
APP = "live"
CONFIG = ModelConfig.from_preset("tiny")


def _save(root: Path, name: str, model: GPT) -> str:
    return save_artifact(str(root / name), CONFIG, model.state_dict())


def _model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


def _poisoned(seed: int) -> GPT:
    """Fine on any input without the letter Z; a prompt with a Z drives layer 0's MLP to inf, so its logits are NaN
    and the request fails with a 5xx. The quality gate's held-out text and the smoke prompt have no Z."""
    model = _model(seed)
    z = ord("Z")
    with torch.no_grad():
        model.embed.weight[:, 0] = 0
        model.embed.weight[z] = 0
        model.embed.weight[z, 0] = 1  # only a Z puts anything in dimension 0 of the residual stream
        for block in model.blocks:
            block.attn.proj.weight[0] = 0
            block.fc_proj.weight[0] = 0
        model.blocks[0].fc.weight[:, 0] = 1e38
    return model


@pytest.fixture(scope="module")
def live(ray_session, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("artifacts")
    worse = _model(3)
    with torch.no_grad():
        worse.embed.weight.mul_(40)  # confidently wrong: held-out loss far above a random model's ln(257)
    artifacts = {"v1": _save(root, "v1", _model(1)), "v2": _save(root, "v2", _model(2)),
                 "worse": _save(root, "worse", worse), "poisoned": _save(root, "poisoned", _poisoned(4))}
    broken = Path(_save(root, "broken", _model(5)))
    for weights in broken.rglob("model.safetensors"):
        weights.write_bytes(b"\x00" * 64)  # committed, but its weights are garbage
    artifacts["broken"] = str(broken)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    heldout = root / "heldout.txt"
    heldout.write_text((stdlib / "textwrap.py").read_text()[:6000].replace("Z", "z"))
    artifacts["heldout"] = str(heldout)
    artifacts["history"] = str(root / "rollouts.jsonl")
    _, port = start_serve({"host": "127.0.0.1", "port": free_port()})
    serve.run(build_app({"model": artifacts["v1"], "num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1,
                         "max_batch_size": 8, "request_timeout_s": 30}), name=APP, route_prefix="/live")
    yield artifacts, f"http://127.0.0.1:{port}/live"
    stop_serve()


class Load:
    """Clients streaming completions back to back in a thread; every outcome counted: HTTP status, and streams that
    ended without ``[DONE]`` or with an error event (broken)."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.clients = url, clients
        self.codes: collections.Counter = collections.Counter()
        self.broken = 0
        self.samples: list[str] = []  # how the first few broken streams ended, for the failure message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, client, i: int) -> None:
        body = {"model": "raystack", "prompt": f"Zone {i} = ", "max_tokens": 12, "seed": i, "stream": True}
        started = time.monotonic()
        try:
            async with client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                self.codes[response.status_code] += 1
                if response.status_code != 200:
                    await response.aread()
                    return
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            if not lines or lines[-1] != "data: [DONE]" or any('"error"' in line for line in lines):
                self.broken += 1
                self._sample(f"{time.monotonic() - started:.1f} s, ended {lines[-2:]}")
        except httpx.HTTPError as e:
            self.codes["connection error"] += 1
            self._sample(f"{time.monotonic() - started:.1f} s, {e!r}")

    def _sample(self, what: str) -> None:
        if len(self.samples) < 3:
            self.samples.append(what)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            async def loop(k):
                i = k
                while not self._stop.is_set():
                    await self._one(client, i)
                    i += self.clients
            await asyncio.gather(*(loop(k) for k in range(self.clients)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=120)

    def report(self) -> str:
        return f"responses {dict(self.codes)}, broken streams {self.broken}" + "".join(f"; {s}" for s in self.samples)


def _spec(artifacts, name: str, watch_s: float = 8) -> RolloutSpec:
    return RolloutSpec(model=artifacts[name], app=APP, heldout=artifacts["heldout"], max_loss_increase=0.5,
                       watch_s=watch_s, history=artifacts["history"])


def _greedy_http(url: str) -> str:
    response = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"model": "raystack", "prompt": "def f(x):", "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _greedy_local(artifact: str) -> str:
    async def go():
        engine = Engine.from_artifact(artifact, EngineConfig(max_batch_size=1))
        out = await generate_text(engine, "def f(x):", GenerationParams(max_tokens=12, temperature=0))
        await engine.shutdown()
        return out["text"]

    return asyncio.run(go())


@pytest.mark.parametrize("name, gate", [("broken", "load"), ("worse", "quality")])
def test_a_refused_artifact_never_takes_traffic(live, name, gate):
    artifacts, url = live
    with Load(url) as load:
        time.sleep(1)
        entry = rollout(_spec(artifacts, name))
        time.sleep(1)
    print(f"{name}: {entry['outcome']} at {entry.get('gate')}: {entry['reason']}; {load.report()}")
    assert entry["outcome"] == "refused" and entry["gate"] == gate, entry
    assert set(load.codes) == {200} and load.codes[200] > 0 and load.broken == 0, load.report()
    assert current_config(APP)["model"] == artifacts["v1"]
    if gate == "quality":
        assert entry["heldout_loss_new"] > entry["heldout_loss_old"] + 0.5


def _monitor_gone(timeout_s: float = 30.0) -> bool:
    """The rollout's monitor actor has stopped with it (``ray.kill`` takes effect a moment later)."""
    import ray

    from raystack.rollout import NAMESPACE, monitor_name

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(monitor_name(APP), namespace=NAMESPACE)
        except ValueError:
            return True
        time.sleep(0.5)
    return False


def test_a_good_rollout_loses_no_request_and_the_new_model_serves(live):
    artifacts, url = live
    with Load(url) as load:
        time.sleep(1)
        entry = rollout(_spec(artifacts, "v2"))
        time.sleep(2)  # traffic after the switch
    print(f"v2: {entry['outcome']}: {entry['reason']}; {load.report()}; watch {entry['watch_requests']} requests")
    assert entry["outcome"] == "rolled_out", entry
    assert set(load.codes) == {200} and load.broken == 0, load.report()
    assert entry["watch_requests"] > 0 and entry["watch_errors"] == 0
    assert {current_config(APP)["model"] for _ in range(3)} == {artifacts["v2"]}
    assert _greedy_http(url) == _greedy_local(artifacts["v2"])  # the new weights answer, not only the new config
    assert _monitor_gone()


def test_an_artifact_that_fails_on_real_traffic_is_rolled_back_within_the_watch(live):
    artifacts, url = live
    with Load(url) as load:
        time.sleep(1)
        started = time.monotonic()
        entry = rollout(_spec(artifacts, "poisoned", watch_s=30))
        took = time.monotonic() - started
        before_rollback = dict(load.codes)
        time.sleep(3)
    print(f"poisoned: {entry['outcome']}: {entry['reason']}; {load.report()}; rollout took {took:.0f} s")
    assert entry["outcome"] == "rolled_back" and "5xx" in entry["reason"], entry
    assert entry["watch_errors"] >= 1
    assert set(load.codes) <= {200, 500} and load.codes[200] > 0, load.report()  # never a 502/503/connection loss
    assert current_config(APP)["model"] == artifacts["v2"]
    after = [_greedy_http(url) for _ in range(3)]
    assert after == [_greedy_local(artifacts["v2"])] * 3  # the old model serves again
    assert before_rollback  # traffic ran through the whole rollout
    assert _monitor_gone()


def test_rollback_by_hand_and_the_history(live, capsys):
    artifacts, url = live
    with Load(url) as load:
        assert cli.main(["rollback", "--app", APP, "--history-file", artifacts["history"]]) == 0
        time.sleep(1)
    assert set(load.codes) == {200} and load.broken == 0, load.report()
    assert current_config(APP)["model"] == artifacts["v1"]  # undoes the last rollout that went through (v1 -> v2)
    outcomes = [(e["action"], e["outcome"]) for e in read_history(artifacts["history"], APP)]
    assert outcomes == [("rollout", "refused"), ("rollout", "refused"), ("rollout", "rolled_out"),
                        ("rollout", "rolled_back"), ("rollback", "rolled_back_by_hand")]
    capsys.readouterr()
    assert cli.main(["rollout", "--history", "--app", APP, "--history-file", artifacts["history"]]) == 0
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) == 6 and "rolled_back_by_hand" in printed
    assert artifacts["poisoned"] in printed and "5xx" in printed


def test_the_rollout_job_runs_under_ray_job_submit(live, ray_session, capsys):
    """The same rollout as a Ray job (``raystack submit rollout``, i.e. ``ray job submit ... jobs/rollout.py``)."""
    import ray

    artifacts, url = live
    jobs_api = "http://" + ray._private.worker._global_node.address_info["webui_url"]
    with Load(url) as load:
        code = cli.main(["submit", "rollout", "--address", jobs_api, "--wait", "--", "--model", artifacts["v2"],
                         "--app", APP, "--heldout", artifacts["heldout"], "--max-loss-increase", "0.5",
                         "--watch-s", "3", "--history-file", artifacts["history"]])
    assert code == 0, capsys.readouterr()
    assert set(load.codes) == {200} and load.broken == 0, load.report()
    assert current_config(APP)["model"] == artifacts["v2"]
    assert read_history(artifacts["history"], APP)[-1]["outcome"] == "rolled_out"
