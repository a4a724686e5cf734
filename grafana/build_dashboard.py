#!/usr/bin/env python3
"""The binner Grafana dashboard as code: grafana-foundation-sdk's typed builders in, ``grafana/binner.json`` out.

    python grafana/build_dashboard.py            # rewrite grafana/binner.json
    python grafana/build_dashboard.py --check    # exit 1 when binner.json is not what this file generates

The SDK (Grafana Labs' builders, kept in step with Grafana's dashboard schema) is a build-time dependency only, in
the ``test`` extra: binner's runtime never imports it (nor this file). Its JSON encoder writes the file; the little it
cannot express is merged in by hand in ``_hand_built`` (each case says why).

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

try:
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.builders.common import (
        ReduceDataOptions,
        StackingConfig,
        VizLegendOptions,
        VizTooltipOptions,
    )
    from grafana_foundation_sdk.builders.dashboard import (
        Dashboard,
        DatasourceVariable,
        QueryVariable,
        Row,
        ThresholdsConfig,
    )
    from grafana_foundation_sdk.cog.builder import Builder
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.variants import Dataquery
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as model
except ImportError as exc:  # a build-time tool: say where the SDK comes from rather than a bare traceback
    raise ImportError(
        "grafana/build_dashboard.py needs grafana-foundation-sdk (extra `test`): "
        "pip install -c constraints.txt -e '.[test]'"
    ) from exc

OUTPUT = Path(__file__).resolve().parent / "binner.json"
# The data source that grafana/provisioning/datasources/binner.yaml creates; the dashboard's data source
# variable starts on it, and any other Prometheus can be picked in the variable's menu.
PROVISIONED_DATASOURCE_UID = "binner-prometheus"
# Grafana's dashboard schema version the JSON is written for. The SDK's Dashboard builder has no setter for it and
# its model defaults to 36 (the CUE schema's default); 39 is what the file has always declared, so Grafana runs
# no migrations on it (37-39 would not change these panels either: explicit showLegend, no table panels).
SCHEMA_VERSION = 39
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"
INSTANCE_QUERY = "label_values(binner_build_info, instance)"


def _datasource() -> model.DataSourceRef:
    return model.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    query = (prometheus.Dataquery().datasource(_datasource()).expr(expr).legend_format(legend or "__auto")
             .ref_id(ref))
    return query.instant() if instant else query


def _queries(*queries: tuple[str, str]) -> list[Builder[Dataquery]]:
    return [_query(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def timeseries_panel(title: str, description: str, queries: list[tuple[str, str]], unit: str = "short",
                     w: int = 12, h: int = 8, stack: bool = False, max_value: float | None = None) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).description(description).datasource(_datasource()).span(w).height(h)
        .targets(_queries(*queries)).unit(unit)
        .draw_style(common.GraphDrawStyle.LINE).line_width(1).fill_opacity(10 if stack else 0)
        .show_points(common.VisibilityMode.NEVER)
        .stacking(StackingConfig().mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE).group("A"))
        # show_legend: the SDK's model defaults it to false, which hides the legend (Grafana reads it literally).
        .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"]))
        .tooltip(VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if max_value is not None:
        panel = panel.min(0).max(max_value)
    return panel


def stat_panel(title: str, description: str, expr: str, unit: str = "short", legend: str = "",
               mappings: dict[str, tuple[str, str]] | None = None,
               thresholds: list[tuple[float | None, str]] | None = None,
               text_mode: common.BigValueTextMode = common.BigValueTextMode.VALUE,
               w: int = 4, h: int = 4) -> stat.Panel:
    """``mappings``: value -> (text, colour), one value mapping; ``thresholds``: (from value, colour), base first."""
    results = {value: model.ValueMappingResult(text=text, color=color) for value, (text, color) in (mappings or {}).items()}
    value_map: list[model.ValueMapping] = [model.ValueMap(options=results)] if results else []
    steps = [model.Threshold(value=value, color=color) for value, color in (thresholds or [(None, "green")])]
    return (
        stat.Panel().title(title).description(description).datasource(_datasource()).span(w).height(h)
        .with_target(_query(expr, legend, instant=True)).unit(unit).mappings(value_map)
        .thresholds(ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(text_mode).justify_mode(common.BigValueJustifyMode.AUTO)
    )


def _quantiles(metric: str, by: str, quantiles: tuple[float, ...], legend: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
         f"{legend} p{round(q * 100)}")
        for q in quantiles
    ]


def panels() -> list[Row | timeseries.Panel | stat.Panel]:
    """Every panel in display order; a row starts a new line and the panels after it belong to it."""
    return [
        Row("Overview"),
        stat_panel("Throughput", "Files placed per second, all bins.",
                   f"sum(rate(binner_binned_total{{{SEL}}}[{RATE}]))", unit="ops"),
        stat_panel("Backlog", "Files known to the ledger and not finished (pending or processing).",
                   f"sum(binner_backlog_files{{{SEL}}})",
                   thresholds=[(None, "green"), (1000, "orange"), (10000, "red")]),
        stat_panel("Oldest pending", "Age of the oldest unfinished file: how far behind the service is.",
                   f"max(binner_oldest_pending_age_seconds{{{SEL}}})", unit="s",
                   thresholds=[(None, "green"), (600, "orange"), (3600, "red")]),
        stat_panel("Placement", "PAUSED while the output disk is full or unwritable; intake waits, nothing is lost.",
                   f"max(binner_placement_paused{{{SEL}}})",
                   mappings={"0": ("placing", "green"), "1": ("PAUSED", "red")},
                   thresholds=[(None, "green"), (1, "red")]),
        stat_panel("Watch", "DEGRADED while watching the input has stopped (the watcher failed or the input directory "
                   "is gone): new files are then found only by the periodic rescan (rescan_interval_s), and /healthz "
                   "says why. The daemon re-arms the watch by itself.",
                   f"max(binner_watch_degraded{{{SEL}}})",
                   mappings={"0": ("watching", "green"), "1": ("DEGRADED", "orange")},
                   thresholds=[(None, "green"), (1, "orange")], w=3),
        stat_panel("Targets up", "Scraped binner instances that answered the last scrape.",
                   f'sum(up{{job="binner", {SEL}}})', thresholds=[(None, "red"), (1, "green")], w=3),
        stat_panel("Version", "binner_build_info: the running build(s).",
                   f"count by (version) (binner_build_info{{{SEL}}})", legend="{{version}}",
                   text_mode=common.BigValueTextMode.NAME, w=2),

        Row("Flow"),
        timeseries_panel("Throughput by bin", "Files placed per second in each bin (A, B, C).",
                         [(f"sum by (bin) (rate(binner_binned_total{{{SEL}}}[{RATE}]))", "{{bin}}")], unit="ops",
                         stack=True),
        timeseries_panel("Items by stage and outcome", "Items leaving each stage per second, by outcome.",
                         [(f"sum by (stage, outcome) (rate(binner_items_total{{{SEL}}}[{RATE}]))",
                           "{{stage}} {{outcome}}")], unit="ops"),
        timeseries_panel("Stage utilisation (bottleneck finder)",
                         "Share of wall time each stage worker spends in model calls. The stage near 100% is the "
                         "bottleneck; add a device to it (devices list) or raise its batch size.",
                         [(f"sum by (stage, device) (rate(binner_stage_busy_seconds_total{{{SEL}}}[{RATE}]))",
                           "{{stage}} {{device}}")], unit="percentunit", max_value=1),
        timeseries_panel("Host vs device time per stage",
                         "Seconds per second each stage replica spends on host work around its device calls (prepare: "
                         "decoding to arrays and uploading; finish: copying results back and making signals), beside "
                         "its device time. Host time near or above device time means the stage is bound by the host, "
                         "not the GPU: give it more CPU, or move pre-processing onto the device.",
                         [(f"sum by (stage, device, phase) (rate(binner_stage_host_seconds_total{{{SEL}}}[{RATE}]))",
                           "{{stage}} {{device}} host {{phase}}"),
                          (f"sum by (stage, device) (rate(binner_stage_busy_seconds_total{{{SEL}}}[{RATE}]))",
                           "{{stage}} {{device}} device")], unit="percentunit"),
        timeseries_panel("Signals skipped (compute only what the decision needs)",
                         "Model runs saved per second, by model and by the rule that had already decided the bin: "
                         "text that decided C or B skips the detector, captioner and CLIP; a confident detection that "
                         "decided A skips the captioner and CLIP (rules.signals: needed).",
                         [(f"sum by (model, reason) (rate(binner_signals_skipped_total{{{SEL}}}[{RATE}]))",
                           "{{model}} ({{reason}})")], unit="ops"),
        timeseries_panel("Queue depth vs capacity",
                         "Items waiting in each bounded queue (solid) against its capacity. A queue at capacity "
                         "blocks its producer: the stage after it is the bottleneck.",
                         [(f"sum by (queue) (binner_queue_depth{{{SEL}}})", "{{queue}} depth"),
                          (f"sum by (queue) (binner_queue_capacity{{{SEL}}})", "{{queue}} capacity")]),
        timeseries_panel("Backpressure", "Share of time producers spent blocked on a full queue, per queue.",
                         [(f"sum by (queue) (rate(binner_backpressure_seconds_total{{{SEL}}}[{RATE}]))",
                           "{{queue}}")], unit="percentunit"),
        timeseries_panel("Queue wait p95", "Time an item waits in each queue before a stage takes it.",
                         _quantiles("binner_queue_wait_seconds", "queue", (0.95,), "{{queue}}"), unit="s"),

        Row("Latency and batching"),
        timeseries_panel("End-to-end latency", "File seen -> file placed.",
                         _quantiles("binner_end_to_end_seconds", "instance", (0.5, 0.95, 0.99), "{{instance}}"),
                         unit="s"),
        timeseries_panel("Batch size p50/p95", "Items per micro-batch by stage: low values under load mean the "
                         "batcher times out (max_wait_ms) before batches fill.",
                         _quantiles("binner_stage_batch_size", "stage", (0.5, 0.95), "{{stage}}")),
        timeseries_panel("Batch seconds p95", "Time of one model call on a micro-batch, by stage and device.",
                         _quantiles("binner_stage_batch_seconds", "stage, device", (0.95,), "{{stage}} {{device}}"),
                         unit="s"),
        timeseries_panel("Backlog over time", "Unfinished files in the ledger.",
                         [(f"sum by (instance) (binner_backlog_files{{{SEL}}})", "{{instance}}")]),
        timeseries_panel("Oldest pending age", "Age of the oldest unfinished file.",
                         [(f"max by (instance) (binner_oldest_pending_age_seconds{{{SEL}}})", "{{instance}}")],
                         unit="s"),

        Row("Failures and memory"),
        timeseries_panel("Quarantined by reason", "Files moved to _quarantine per second, by reason.",
                         [(f"sum by (reason) (rate(binner_quarantined_total{{{SEL}}}[{RATE}]))", "{{reason}}")],
                         unit="ops", stack=True),
        timeseries_panel("Placement errors", "Failed placement attempts per second, by errno.",
                         [(f"sum by (error) (rate(binner_placement_errors_total{{{SEL}}}[{RATE}]))", "{{error}}")],
                         unit="ops"),
        timeseries_panel("OOM events and batch size limit",
                         "Out-of-memory events per stage and device (each halves that worker's batch cap) and the "
                         "current cap.",
                         [(f"sum by (stage, device) (increase(binner_oom_total{{{SEL}}}[{RATE}]))",
                           "OOM {{stage}} {{device}}"),
                          (f"max by (stage, device) (binner_batch_size_limit{{{SEL}}})", "limit {{stage}} {{device}}")]),
        timeseries_panel("Worker restarts", "Stage worker processes replaced (process isolation), per stage, device "
                         "and cause (crashed, stuck).",
                         [(f"sum by (stage, device, cause) (increase(binner_worker_restarts_total{{{SEL}}}[{RATE}]))",
                           "{{stage}} {{device}} {{cause}}")]),
        timeseries_panel("Paused: output or state disk", "1 while placement waits for the output disk, or intake and "
                         "placement wait for space on the state disk (the ledger cannot be written).",
                         [(f"max by (instance) (binner_placement_paused{{{SEL}}})", "output {{instance}}"),
                          (f"max by (instance) (binner_state_paused{{{SEL}}})", "state {{instance}}")], max_value=1),

        Row("Process"),
        timeseries_panel("Resident memory", "RSS of the binner process.",
                         [(f"max by (instance) (process_resident_memory_bytes{{job=\"binner\", {SEL}}})",
                           "{{instance}}")], unit="bytes"),
        timeseries_panel("CPU", "CPU seconds per second used by the binner process (1 = one core).",
                         [(f"sum by (instance) (rate(process_cpu_seconds_total{{job=\"binner\", {SEL}}}[{RATE}]))",
                           "{{instance}}")]),
        timeseries_panel("Open file descriptors", "Open fds against the process limit.",
                         [(f"max by (instance) (process_open_fds{{job=\"binner\", {SEL}}})", "open {{instance}}"),
                          (f"max by (instance) (process_max_fds{{job=\"binner\", {SEL}}})", "limit {{instance}}")]),

        Row("GPUs (NVML)"),
        timeseries_panel("GPU utilisation", "NVML busy ratio per GPU (absent without an NVIDIA GPU).",
                         [(f"max by (instance, gpu) (binner_gpu_utilization_ratio{{{SEL}}})",
                           "{{instance}} gpu{{gpu}}")], unit="percentunit", max_value=1),
        timeseries_panel("GPU memory", "NVML memory in use against the device's total.",
                         [(f"max by (instance, gpu) (binner_gpu_memory_used_bytes{{{SEL}}})",
                           "{{instance}} gpu{{gpu}} used"),
                          (f"max by (instance, gpu) (binner_gpu_memory_total_bytes{{{SEL}}})",
                           "{{instance}} gpu{{gpu}} total")], unit="bytes"),
    ]


def variables() -> list[Builder[model.VariableModel]]:
    return [
        DatasourceVariable("datasource").label("Data source").type("prometheus").regex("")
        .current(model.VariableOption(text=PROVISIONED_DATASOURCE_UID, value=PROVISIONED_DATASOURCE_UID)),
        # Starts on "All" (Grafana's $__all, which allValue turns into .+ in the queries) on every instance.
        QueryVariable("instance").label("Instance").datasource(_datasource())
        .query({"query": INSTANCE_QUERY, "refId": "instance"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".+")
        .current(model.VariableOption(text=["All"], value=["$__all"])),
    ]


def build_model() -> model.Dashboard:
    """The dashboard as the SDK's typed model; ids follow display order (links such as ?viewPanel=N stay stable)."""
    builder = (
        Dashboard("binner").uid("binner-pipeline")
        .description("binner: throughput, bottlenecks, backpressure, latency, failures and GPUs")
        .tags(["binner"]).timezone("browser").editable().tooltip(model.DashboardCursorSync.CROSSHAIR)
        .version(1).refresh("30s").time("now-6h", "now").annotations([]).links([])
        .variables(variables())
    )
    for panel_id, item in enumerate(panels(), start=1):
        # The SDK lays the grid out: left to right, wrapping at 24 columns, a row on its own line.
        if isinstance(item, Row):
            builder.with_row(item.id(panel_id))
        else:
            builder.with_panel(item.id(panel_id))
    dashboard = builder.build()
    dashboard.schema_version = SCHEMA_VERSION
    return dashboard


def _hand_built(document: dict[str, Any]) -> dict[str, Any]:
    """What the SDK's model cannot hold, merged into its JSON by hand."""
    for variable in document["templating"]["list"]:
        if variable["name"] == "instance":
            # `definition` is the text Grafana shows for a query variable in the dashboard's variable list (it
            # writes it on save); the SDK's VariableModel has no such field.
            variable["definition"] = INSTANCE_QUERY
    return document


def build_dashboard() -> dict[str, Any]:
    """The JSON document: the SDK's encoder on the typed model, plus ``_hand_built``."""
    return _hand_built(json.loads(json.dumps(build_model(), cls=JSONEncoder)))


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    return [(panel["title"], target["expr"])
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, cls=JSONEncoder, indent=2) + "\n"


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
