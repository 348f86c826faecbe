"""Observability assets: ``grafana_dashboard.json`` charts the Serve and training metrics raystack exports through
``ray.util.metrics`` on Ray's Prometheus endpoint (``ray_raystack_*``). Import it in Grafana with a Prometheus data
source that scrapes the cluster (see Ray's ``ray metrics launch-prometheus``). ``sweep_dashboard.html`` is the page
``raystack.sweep_report`` fills with a sweep's data (``__TITLE__``, ``__DATA__``): self-contained, no network;
``train_report.html`` is its training twin, filled by ``raystack.train_report``."""

import html
import json
import os
from pathlib import Path

GRAFANA_DASHBOARD = Path(__file__).with_name("grafana_dashboard.json")
SWEEP_DASHBOARD_TEMPLATE = Path(__file__).with_name("sweep_dashboard.html")
TRAIN_REPORT_TEMPLATE = Path(__file__).with_name("train_report.html")


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file that another process may be appending to: blank lines and a torn last line
    are skipped; a missing file is no records."""
    records = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # blank, or a line being written right now
    return records


def write_page(template: Path, title: str, data, path: str) -> str:
    """Fill a page template (``__TITLE__``, ``__DATA__`` as inline JSON) and write it to ``path`` atomically, so a
    reader never sees half a page; returns ``path``."""
    page = template.read_text().replace("__TITLE__", html.escape(title)).replace(
        "__DATA__", json.dumps(data).replace("</", "<\\/"))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
