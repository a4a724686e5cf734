#!/usr/bin/env python3
"""The binner Grafana dashboard as code: plain dicts in, ``grafana/binner.json`` out.

    python grafana/build_dashboard.py            # rewrite grafana/binner.json
    python grafana/build_dashboard.py --check    # exit 1 when binner.json is not what this file generates

Import binner.json in Grafana (Dashboards -> New -> Import) or provision it; pick the Prometheus data source in
the ``datasource`` variable. Every query filters on ``instance=~"$instance"`` so one dashboard serves a fleet.
tests/test_grafana.py checks every expression with promtool and runs it against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "binner.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The data source that grafana/provisioning/datasources/binner.yaml creates; the dashboard's data source
# variable starts on it, and any other Prometheus can be picked in the variable's menu.
PROVISIONED_DATASOURCE_UID = "binner-prometheus"
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"


def _target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}
    if instant:
        target["instant"] = True
        target["range"] = False
    return target


def _targets(*queries: tuple[str, str]) -> list[dict[str, Any]]:
    return [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def timeseries(title: str, description: str, queries: list[tuple[str, str]], unit: str = "short",
               w: int = 12, h: int = 8, stack: bool = False, max_value: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0, "showPoints": "never",
                   "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
    }
    if max_value is not None:
        defaults["max"] = max_value
        defaults["min"] = 0
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": w, "h": h}, "targets": _targets(*queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title: str, description: str, expr: str, unit: str = "short", legend: str = "",
         mappings: list[dict[str, Any]] | None = None, thresholds: list[tuple[float | None, str]] | None = None,
         text_mode: str = "value", w: int = 4, h: int = 4) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    return {
        "type": "stat", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"w": w, "h": h}, "targets": [_target(expr, legend, instant=True)],
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                     "thresholds": {"mode": "absolute", "steps": steps}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "textMode": text_mode, "justifyMode": "auto"},
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def _quantiles(metric: str, by: str, quantiles: tuple[float, ...], legend: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
         f"{legend} p{round(q * 100)}")
        for q in quantiles
    ]


def panels() -> list[dict[str, Any]]:
    """Every panel in display order; rows start a new line."""
    return [
        row("Overview"),
        stat("Throughput", "Files placed per second, all bins.",
             f"sum(rate(binner_binned_total{{{SEL}}}[{RATE}]))", unit="ops"),
        stat("Backlog", "Files known to the ledger and not finished (pending or processing).",
             f"sum(binner_backlog_files{{{SEL}}})", thresholds=[(None, "green"), (1000, "orange"), (10000, "red")]),
        stat("Oldest pending", "Age of the oldest unfinished file: how far behind the service is.",
             f"max(binner_oldest_pending_age_seconds{{{SEL}}})", unit="s",
             thresholds=[(None, "green"), (600, "orange"), (3600, "red")]),
        stat("Placement", "PAUSED while the output disk is full or unwritable; intake waits, nothing is lost.",
             f"max(binner_placement_paused{{{SEL}}})",
             mappings=[{"type": "value", "options": {"0": {"text": "placing", "color": "green"},
                                                     "1": {"text": "PAUSED", "color": "red"}}}],
             thresholds=[(None, "green"), (1, "red")]),
        stat("Watch", "DEGRADED while watching the input has stopped (the watcher failed or the input directory is "
             "gone): new files are then found only by the periodic rescan (rescan_interval_s), and /healthz says "
             "why. The daemon re-arms the watch by itself.",
             f"max(binner_watch_degraded{{{SEL}}})",
             mappings=[{"type": "value", "options": {"0": {"text": "watching", "color": "green"},
                                                     "1": {"text": "DEGRADED", "color": "orange"}}}],
             thresholds=[(None, "green"), (1, "orange")], w=3),
        stat("Targets up", "Scraped binner instances that answered the last scrape.",
             f'sum(up{{job="binner", {SEL}}})', thresholds=[(None, "red"), (1, "green")], w=3),
        stat("Version", "binner_build_info: the running build(s).",
             f"count by (version) (binner_build_info{{{SEL}}})", legend="{{version}}", text_mode="name", w=2),

        row("Flow"),
        timeseries("Throughput by bin", "Files placed per second in each bin (A, B, C).",
                   [(f"sum by (bin) (rate(binner_binned_total{{{SEL}}}[{RATE}]))", "{{bin}}")], unit="ops",
                   stack=True),
        timeseries("Items by stage and outcome", "Items leaving each stage per second, by outcome.",
                   [(f"sum by (stage, outcome) (rate(binner_items_total{{{SEL}}}[{RATE}]))", "{{stage}} {{outcome}}")],
                   unit="ops"),
        timeseries("Stage utilisation (bottleneck finder)",
                   "Share of wall time each stage worker spends in model calls. The stage near 100% is the "
                   "bottleneck; add a device to it (devices list) or raise its batch size.",
                   [(f"sum by (stage, device) (rate(binner_stage_busy_seconds_total{{{SEL}}}[{RATE}]))",
                     "{{stage}} {{device}}")], unit="percentunit", max_value=1),
        timeseries("Host vs device time per stage",
                   "Seconds per second each stage replica spends on host work around its device calls (prepare: "
                   "decoding to arrays and uploading; finish: copying results back and making signals), beside its "
                   "device time. Host time near or above device time means the stage is bound by the host, not the "
                   "GPU: give it more CPU, or move pre-processing onto the device.",
                   [(f"sum by (stage, device, phase) (rate(binner_stage_host_seconds_total{{{SEL}}}[{RATE}]))",
                     "{{stage}} {{device}} host {{phase}}"),
                    (f"sum by (stage, device) (rate(binner_stage_busy_seconds_total{{{SEL}}}[{RATE}]))",
                     "{{stage}} {{device}} device")], unit="percentunit"),
        timeseries("Signals skipped (compute only what the decision needs)",
                   "Model runs saved per second, by model and by the rule that had already decided the bin: text "
                   "that decided C or B skips the detector, captioner and CLIP; a confident detection that decided A "
                   "skips the captioner and CLIP (rules.signals: needed).",
                   [(f"sum by (model, reason) (rate(binner_signals_skipped_total{{{SEL}}}[{RATE}]))",
                     "{{model}} ({{reason}})")], unit="ops"),
        timeseries("Queue depth vs capacity",
                   "Items waiting in each bounded queue (solid) against its capacity. A queue at capacity "
                   "blocks its producer: the stage after it is the bottleneck.",
                   [(f"sum by (queue) (binner_queue_depth{{{SEL}}})", "{{queue}} depth"),
                    (f"sum by (queue) (binner_queue_capacity{{{SEL}}})", "{{queue}} capacity")]),
        timeseries("Backpressure", "Share of time producers spent blocked on a full queue, per queue.",
                   [(f"sum by (queue) (rate(binner_backpressure_seconds_total{{{SEL}}}[{RATE}]))", "{{queue}}")],
                   unit="percentunit"),
        timeseries("Queue wait p95", "Time an item waits in each queue before a stage takes it.",
                   _quantiles("binner_queue_wait_seconds", "queue", (0.95,), "{{queue}}"), unit="s"),

        row("Latency and batching"),
        timeseries("End-to-end latency", "File seen -> file placed.",
                   _quantiles("binner_end_to_end_seconds", "instance", (0.5, 0.95, 0.99), "{{instance}}"), unit="s"),
        timeseries("Batch size p50/p95", "Items per micro-batch by stage: low values under load mean the "
                   "batcher times out (max_wait_ms) before batches fill.",
                   _quantiles("binner_stage_batch_size", "stage", (0.5, 0.95), "{{stage}}")),
        timeseries("Batch seconds p95", "Time of one model call on a micro-batch, by stage and device.",
                   _quantiles("binner_stage_batch_seconds", "stage, device", (0.95,), "{{stage}} {{device}}"),
                   unit="s"),
        timeseries("Backlog over time", "Unfinished files in the ledger.",
                   [(f"sum by (instance) (binner_backlog_files{{{SEL}}})", "{{instance}}")]),
        timeseries("Oldest pending age", "Age of the oldest unfinished file.",
                   [(f"max by (instance) (binner_oldest_pending_age_seconds{{{SEL}}})", "{{instance}}")], unit="s"),

        row("Failures and memory"),
        timeseries("Quarantined by reason", "Files moved to _quarantine per second, by reason.",
                   [(f"sum by (reason) (rate(binner_quarantined_total{{{SEL}}}[{RATE}]))", "{{reason}}")],
                   unit="ops", stack=True),
        timeseries("Placement errors", "Failed placement attempts per second, by errno.",
                   [(f"sum by (error) (rate(binner_placement_errors_total{{{SEL}}}[{RATE}]))", "{{error}}")],
                   unit="ops"),
        timeseries("OOM events and batch size limit",
                   "Out-of-memory events per stage and device (each halves that worker's batch cap) and the "
                   "current cap.",
                   [(f"sum by (stage, device) (increase(binner_oom_total{{{SEL}}}[{RATE}]))", "OOM {{stage}} {{device}}"),
                    (f"max by (stage, device) (binner_batch_size_limit{{{SEL}}})", "limit {{stage}} {{device}}")]),
        timeseries("Worker restarts", "Stage worker processes replaced (process isolation), per stage, device and "
                   "cause (crashed, stuck).",
                   [(f"sum by (stage, device, cause) (increase(binner_worker_restarts_total{{{SEL}}}[{RATE}]))",
                     "{{stage}} {{device}} {{cause}}")]),
        timeseries("Paused: output or state disk", "1 while placement waits for the output disk, or intake and "
                   "placement wait for space on the state disk (the ledger cannot be written).",
                   [(f"max by (instance) (binner_placement_paused{{{SEL}}})", "output {{instance}}"),
                    (f"max by (instance) (binner_state_paused{{{SEL}}})", "state {{instance}}")], max_value=1),

        row("Process"),
        timeseries("Resident memory", "RSS of the binner process.",
                   [(f"max by (instance) (process_resident_memory_bytes{{job=\"binner\", {SEL}}})", "{{instance}}")],
                   unit="bytes"),
        timeseries("CPU", "CPU seconds per second used by the binner process (1 = one core).",
                   [(f"sum by (instance) (rate(process_cpu_seconds_total{{job=\"binner\", {SEL}}}[{RATE}]))",
                     "{{instance}}")]),
        timeseries("Open file descriptors", "Open fds against the process limit.",
                   [(f"max by (instance) (process_open_fds{{job=\"binner\", {SEL}}})", "open {{instance}}"),
                    (f"max by (instance) (process_max_fds{{job=\"binner\", {SEL}}})", "limit {{instance}}")]),

        row("GPUs (NVML)"),
        timeseries("GPU utilisation", "NVML busy ratio per GPU (absent without an NVIDIA GPU).",
                   [(f"max by (instance, gpu) (binner_gpu_utilization_ratio{{{SEL}}})", "{{instance}} gpu{{gpu}}")],
                   unit="percentunit", max_value=1),
        timeseries("GPU memory", "NVML memory in use against the device's total.",
                   [(f"max by (instance, gpu) (binner_gpu_memory_used_bytes{{{SEL}}})", "{{instance}} gpu{{gpu}} used"),
                    (f"max by (instance, gpu) (binner_gpu_memory_total_bytes{{{SEL}}})",
                     "{{instance}} gpu{{gpu}} total")], unit="bytes"),
    ]


def _layout(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assign ids and grid positions: left to right, wrapping at 24 columns, rows on their own line."""
    x = y = line_height = 0
    for panel_id, panel in enumerate(items, start=1):
        pos = panel["gridPos"]
        if panel["type"] == "row" or x + pos["w"] > 24:
            y += line_height
            x = line_height = 0
        pos.update(x=x, y=y)
        panel["id"] = panel_id
        x += pos["w"]
        line_height = max(line_height, pos["h"])
        if panel["type"] == "row":
            y += pos["h"]
            x = line_height = 0
    return items


def build_dashboard() -> dict[str, Any]:
    return {
        "title": "binner",
        "uid": "binner-pipeline",
        "description": "binner: throughput, bottlenecks, backpressure, latency, failures and GPUs",
        "tags": ["binner"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {"text": PROVISIONED_DATASOURCE_UID, "value": PROVISIONED_DATASOURCE_UID},
             "hide": 0, "refresh": 1, "regex": "", "options": []},
            {"name": "instance", "label": "Instance", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(binner_build_info, instance)", "refId": "instance"},
             "definition": "label_values(binner_build_info, instance)", "refresh": 2, "multi": True,
             "includeAll": True, "allValue": ".+", "current": {}, "sort": 1, "hide": 0, "options": []},
        ]},
        "panels": _layout(panels()),
    }


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    return [(panel["title"], target["expr"])
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when grafana/binner.json is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render(build_dashboard())
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
