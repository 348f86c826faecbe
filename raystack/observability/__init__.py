"""Observability assets: ``grafana_dashboard.json`` charts the Serve and training metrics raystack exports through
``ray.util.metrics`` on Ray's Prometheus endpoint (``ray_raystack_*``). Import it in Grafana with a Prometheus data
source that scrapes the cluster (see Ray's ``ray metrics launch-prometheus``). ``sweep_dashboard.html`` is the page
``raystack.sweep_report`` fills with a sweep's data (``__TITLE__``, ``__DATA__``): self-contained, no network;
``train_report.html`` is its training twin, filled by ``raystack.train_report``."""

from pathlib import Path

GRAFANA_DASHBOARD = Path(__file__).with_name("grafana_dashboard.json")
SWEEP_DASHBOARD_TEMPLATE = Path(__file__).with_name("sweep_dashboard.html")
TRAIN_REPORT_TEMPLATE = Path(__file__).with_name("train_report.html")
