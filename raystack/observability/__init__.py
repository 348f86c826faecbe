"""Observability assets: ``grafana_dashboard.json`` charts the Serve and training metrics raystack exports through
``ray.util.metrics`` on Ray's Prometheus endpoint (``ray_raystack_*``). Import it in Grafana with a Prometheus data
source that scrapes the cluster (see Ray's ``ray metrics launch-prometheus``)."""

from pathlib import Path

GRAFANA_DASHBOARD = Path(__file__).with_name("grafana_dashboard.json")
