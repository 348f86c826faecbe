"""Jobs on a real two-node Ray cluster started on this machine, with token authentication on.

Two `ray start` nodes (a head with the Jobs API, a worker with its own resources and temp dir) form the cluster;
`raystack submit` sends the training job with its 2 workers forced onto different nodes, and the artifact lands in
storage both nodes share. A client without the token is refused. Only the processes started here are stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from raystack.commit import read_manifest
from tests.helpers import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def raystack(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "raystack.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or os.environ, cwd=REPO)


def stop_processes_under(root: Path) -> None:
    """Stop the Ray processes started with temp dirs under ``root`` — never `ray stop`, which stops every Ray here."""
    ours = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(root) in " ".join(process.info["cmdline"] or []):
                ours.append(process)
        except psutil.Error:
            pass
    for process in ours:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(ours, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's AF_UNIX socket paths under the temp dir must stay within 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rs2n-", dir="/tmp"))
    try:
        yield start_cluster(root)
    finally:  # also when start-up failed half-way
        stop_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


def start_cluster(root: Path) -> dict:
    gcs, dashboard = free_port(), free_port()
    # The session's token file (conftest) is this cluster's token; the venv comes first on PATH, as on a node whose
    # setup commands installed raystack, so a job's `python` is the one with raystack's dependencies. Ray Train
    # waits 15 s for a worker group's resources (its default: 60 s) before it retries, an elastic run with fewer
    # workers: no node joins this fixed cluster, so the preemption test's restart need not wait a minute for one.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    common = ["--num-cpus=2", "--object-store-memory=120000000", "--disable-usage-stats"]

    def own_ports():
        # Every node's agents default to fixed ports (52365, ...), which another Ray on this machine may hold.
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    head = subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--include-dashboard=true",
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                           f"--temp-dir={root / 'head'}", "--resources={\"head_node\": 1}", *common, *own_ports()],
                          capture_output=True, text=True, env=env, timeout=180)
    assert head.returncode == 0, head.stderr[-3000:]
    worker = subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={root / 'worker'}",
                             "--resources={\"worker_node\": 1}", *common, *own_ports()],
                            capture_output=True, text=True, env=env, timeout=180)
    assert worker.returncode == 0, worker.stderr[-3000:]
    url = f"http://127.0.0.1:{dashboard}"
    # A cluster that just started accepts jobs once its job agent registered: wait for that with a trivial job.
    from ray.job_submission import JobStatus, JobSubmissionClient

    os.environ["RAY_AUTH_MODE"] = "token"
    deadline = time.monotonic() + 300
    while True:
        try:
            client = JobSubmissionClient(url)
            warm = client.submit_job(entrypoint="python -c pass")
            break
        except (RuntimeError, ConnectionError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"the two-node cluster's Jobs API never accepted a job: {e}") from None
            time.sleep(2)
    while client.get_job_status(warm) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
    return {"url": url, "root": root, "env": {**env, "RAY_ADDRESS": url}, "gcs": f"127.0.0.1:{gcs}"}


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no training
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert all(t["max_workers"] > t["min_workers"] for t in workers)
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in workers)
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    assert config["file_mounts"]["/home/ubuntu/.raystack/api_keys"] == "~/.raystack/api_keys"  # serving keys
    from raystack.cluster import SERVE_TIMEOUTS

    for name, value in SERVE_TIMEOUTS.items():  # every node's Serve proxy survives a busy start
        assert start.count(f"{name}={value}") == 2, name
    with pytest.raises(Exception):
        validate_config(prepare_config({**config, "max_workers": "many"}))


def test_submit_builds_a_lean_runtime_environment():
    from raystack.cli import submission

    spec = submission("batch", ["--", "--model", "m", "--input", "a b.parquet"], str(REPO))
    assert spec["entrypoint"] == "python jobs/batch_infer.py --model m --input 'a b.parquet'"
    assert spec["runtime_env"]["working_dir"] == str(REPO)
    assert {".git", ".venv", "runs", "**/__pycache__"} <= set(spec["runtime_env"]["excludes"])
    assert "env_vars" not in spec["runtime_env"]
    keys = {"RAYSTACK_API_KEYS": "sk-a,sk-b"}
    assert "env_vars" not in submission("train", [], str(REPO), environ=keys)["runtime_env"]  # only serving jobs
    assert submission("rollout", ["--model", "m"], str(REPO), environ=keys)["runtime_env"]["env_vars"] == keys
    deploy = submission("deploy", ["--", "--model", "m"], str(REPO), environ=keys)
    assert deploy["runtime_env"]["env_vars"] == keys and "sk-a" not in deploy["entrypoint"]


def test_cli_argument_errors_are_clear():
    result = raystack("submit", "fly")
    assert result.returncode == 2 and "invalid choice: 'fly'" in result.stderr
    result = raystack("status", "raysubmit_x", "--address", "http://127.0.0.1:1")
    assert result.returncode == 2 and "cannot reach the Ray Jobs API at http://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_training_job_spreads_over_two_nodes_and_exports_to_shared_storage(cluster):
    shared = cluster["root"] / "shared"
    submitted = raystack("submit", "train", "--address", cluster["url"], "--",
                         "--set", "name=two-nodes", "--set", f"storage_path={shared}",
                         "--set", "scaling.num_workers=2", "--set", "scaling.placement_strategy=STRICT_SPREAD",
                         "--set", "schedule.steps=8", "--set", "checkpoint.every=4", "--set", "logging.every=4",
                         "--set", "data.max_documents=20", "--set", "data.block_size=64",
                         "--set", "schedule.batch_size=8", env=cluster["env"])
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    followed = raystack("logs", job_id, "--follow", env=cluster["env"])
    assert followed.returncode == 0, followed.stdout[-4000:]
    import re

    nodes = dict(re.findall(r"\[raystack\] worker rank (\d)/2 on node ([0-9a-f]+)", followed.stdout))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], followed.stdout[-3000:]  # one worker per node
    status = raystack("status", job_id, env=cluster["env"])
    assert "SUCCEEDED" in status.stdout
    unknown = raystack("status", "raysubmit_nope", env=cluster["env"])  # what the Jobs API refuses: one line
    assert unknown.returncode == 2 and "refused:" in unknown.stderr and "Traceback" not in unknown.stderr
    artifact = shared / "two-nodes" / "model"
    manifest = read_manifest(str(artifact))
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = artifact / manifest["files"]["config.json"]["path"]
    assert json.loads(config.read_text())["format"] == "raystack-gpt"


def test_plain_ray_job_submit_runs_the_jobs_unchanged(cluster):
    result = subprocess.run([RAY, "job", "submit", "--address", cluster["url"], "--working-dir", str(REPO),
                             "--", "python", "jobs/train.py", "--print-config", "--set", "name=plain"],
                            capture_output=True, text=True, timeout=300, env=cluster["env"], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"name": "plain"' in result.stdout and "succeeded" in result.stdout.lower()


def test_a_client_without_the_token_is_refused(cluster):
    assert httpx.get(f"{cluster['url']}/api/jobs/", timeout=10).status_code in (401, 403)
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    authorized = httpx.get(f"{cluster['url']}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert authorized.status_code == 200
    home = cluster["root"] / "no-token-home"
    home.mkdir()
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH")}
    refused = raystack("submit", "train", "--address", cluster["url"], "--", "--print-config",
                       env={**env, "HOME": str(home), "RAY_AUTH_MODE": "token"})
    assert refused.returncode != 0 and "submitted" not in refused.stdout


def test_a_preempted_node_costs_no_steps(cluster):
    """A spot-style preemption through Ray's own drain API: the worker node is drained with a 20 s deadline while
    an elastic run (one 2-CPU worker per node) trains, and stopped when the deadline has passed (the reclaim). Ray Train
    tells the workers, the loop checkpoints at once and holds, and the run resumes from that checkpoint on the node
    that is left (the last test of the module: the cluster has one node after it). Steps lost: the last step
    reported before the restart minus the step resumed from, 0 here (``checkpoint.every`` is past the run's end, so a
    run without the notice would lose every step)."""
    import re

    shared = cluster["root"] / "shared"
    # Long enough that the drain lands mid-run (its notice reached the loop near step 180 here, ~20 steps/s with
    # two workers, ~15 s after the first metrics line), short enough that the one-worker run after the restart
    # stays small (~50 steps/s). The restart waits out one or two worker-group start timeouts (15 s on this
    # cluster): Ray Train tries 2 workers while its resource view still counts the lost node, then 1.
    steps = 1000
    submitted = raystack("submit", "train", "--address", cluster["url"], "--",
                         "--set", "name=preempted", "--set", f"storage_path={shared}",
                         "--set", "scaling.num_workers=[1,2]", "--set", "scaling.placement_strategy=STRICT_SPREAD",
                         "--set", "scaling.cpus_per_worker=2", "--set", f"schedule.steps={steps}",
                         "--set", "checkpoint.every=5000", "--set", "logging.every=10",
                         "--set", "eval.every=0", "--set", "data.max_documents=20", "--set", "data.block_size=64",
                         "--set", "schedule.batch_size=4", "--set", "schedule.micro_batch_size=2", env=cluster["env"])
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    metrics_file = shared / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.exists() and metrics_file.read_text().splitlines()):
        assert time.monotonic() < deadline, raystack("logs", job_id, env=cluster["env"]).stdout[-3000:]
        time.sleep(1)
    nodes = json.loads(subprocess.run([RAY, "list", "nodes", "--address", cluster["url"], "--format", "json"],
                                      capture_output=True, text=True, env=cluster["env"], timeout=60).stdout)
    worker_node = next(n["node_id"] for n in nodes if not n["is_head_node"] and n["state"] == "ALIVE")
    drained = subprocess.run([RAY, "drain-node", "--address", cluster["gcs"], "--node-id", worker_node,
                              "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                              "--deadline-remaining-seconds", "20"],
                             capture_output=True, text=True, env=cluster["env"], timeout=60)
    assert drained.returncode == 0, drained.stderr[-2000:]
    time.sleep(22)  # the deadline passes: the cloud reclaims the node, which takes its processes with it
    stop_processes_under(cluster["root"] / "worker")
    followed = raystack("logs", job_id, "--follow", env=cluster["env"], timeout=600)
    assert "SUCCEEDED" in raystack("status", job_id, env=cluster["env"]).stdout, followed.stdout[-4000:]
    assert re.search(r"preemption notice for node\(s\) [0-9a-f]+ \(deadline in \d+ s\): checkpointed step \d+",
                     followed.stdout), followed.stdout[-4000:]
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    restart = next((i for i in range(1, len(rows)) if rows[i]["resumed_from_step"] != rows[i - 1]["resumed_from_step"]),
                   None)
    assert restart is not None, f"the run never restarted (did it end before the drain?): {rows[-3:]}"
    before, after = rows[restart - 1], rows[restart]
    assert before["checkpoint"] and before["world_size"] == 2 and after["world_size"] == 1  # resized onto the head
    assert before["step"] - after["resumed_from_step"] == 0  # steps lost
    assert rows[-1]["step"] == steps
