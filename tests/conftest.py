"""Shared fixtures: one local Ray per test session (its own temp dir and auth token), skips for GPU tests."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import TINY_OVERRIDES, free_port, prepare_tools

REPO = Path(__file__).resolve().parent.parent
_SESSION_TMP: Path | None = None  # the session's temp dir, set by pytest_configure


def pytest_configure(config):
    """The session's environment, set once before any test module is imported: every Ray and raystack file of the
    session outside the user's home (~/.ray, ~/raystack_runs), token auth on as we ship it, and the local-Ray
    settings (workers at niceness 0, room for a slow Serve proxy start) for every Ray the session starts."""
    global _SESSION_TMP
    from raystack.cluster import apply_local_ray_env

    _SESSION_TMP = Path(tempfile.mkdtemp(prefix="raystack-tests-"))
    token = _SESSION_TMP / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    apply_local_ray_env()
    # The venv first on PATH, as on a node whose setup installed raystack: a Ray job's `python` entrypoint is it.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_collection_finish(session):
    """Begin installing the client tools the selected tests run (``@pytest.mark.tools``) now, in the background:
    a fresh clone's installs (minutes) then overlap the tests that run before those that need them."""
    if session.config.option.collectonly:
        return
    prepare_tools(dict.fromkeys(name for item in session.items for mark in item.iter_markers("tools")
                                for name in mark.args))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API over HTTP on loopback (moto's threaded server) for the session. The ``AWS_*`` variables point
    pyarrow's S3 filesystem at it, in this process and in every Ray worker (they inherit the environment of the Ray
    that ``ray_session`` starts after this)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY":
                       "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """A local Ray cluster shared by every integration test; stopped (only it) at the end."""
    import ray

    if ray.is_initialized():  # a unit test's Ray Data call auto-started a local Ray in this process (unit tests first)
        ray.shutdown()
    ray.init(
        num_cpus=4,  # 2 cores here; training tests use 2 workers x 1 CPU plus Ray Data and the controller
        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to free the workers
        # of a data-parallel sweep trial that ASHA stops (as on every real cluster); on a free port.
        include_dashboard=True,
        dashboard_port=free_port(),
        object_store_memory=150 * 1024**2,
        _temp_dir=str(_SESSION_TMP / "ray"),
        log_to_driver=True,
        # Workers send their metrics to the node's Prometheus endpoint every second (Ray's default: 10 s), so a
        # test's short run shows its gauges there while it lasts.
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_overrides(tmp_path):
    """``TINY_OVERRIDES`` with storage under this test's tmp_path."""
    return [*TINY_OVERRIDES, f"storage_path={tmp_path / 'runs'}"]


@pytest.fixture(scope="session")
def python():
    return sys.executable
