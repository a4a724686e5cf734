"""The `binner` command line: run, once, eval, status, explain, rebin, config, bench, fetch-weights."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperOption

from app import __version__
from app.config import BinnerConfig, ConfigError, dump_config, load_config
from app.logs import configure_logging
from stages.paths import shown

if TYPE_CHECKING:
    from app.store import Ledger

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="binner: sort images into bins A (clean content), B (everything else), C (text-dominant).")
config_cli = typer.Typer(no_args_is_help=True, help="Show or check the effective configuration.")
cli.add_typer(config_cli, name="config")


def _console(stderr: bool) -> Console:
    """A console that wraps at the terminal's width, and not at all when piped (rich would assume 80 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=UNWRAPPED_WIDTH if piped else None)


UNWRAPPED_WIDTH = 10_000
err = _console(stderr=True)
out = _console(stderr=False)


def _flag_without_type(self: TyperOption, ctx: Any) -> str | None:
    """On/off flags take no value, so their help shows no ``<bool>`` placeholder."""
    return None if self.is_flag else _typed_option_display(self, ctx)


_typed_option_display = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_without_type  # type: ignore[method-assign]

ConfigOption = typer.Option(None, "--config", "-c", help="YAML configuration file (BINNER_CONFIG also works)")
StateOption = typer.Option(None, "--state", help="state directory holding the ledger (key state_dir)")
JsonOption = typer.Option(False, "--json", help="print JSON instead of text (one object per line)")


def _print_version(value: bool) -> None:
    if value:
        out.print(f"binner {__version__}", highlight=False)
        raise typer.Exit()


@cli.callback()
def main_options(
    version: bool = typer.Option(False, "--version", help="print the version and exit", is_eager=True,
                                 callback=_print_version),
) -> None:
    """binner: sort images into bins A (clean content), B (everything else), C (text-dominant)."""


def emit_json(value: Any) -> None:
    """One compact JSON line on stdout, whatever the width (for jq and for JSON-only log streams). Every text goes
    through ``shown``: names appear as in the text output (``\\xff``, ``\\x1b``), and the line is valid UTF-8."""
    out.file.write(json.dumps(_json_safe(value), ensure_ascii=False, default=str) + "\n")
    out.file.flush()


def _json_safe(value: Any) -> Any:
    if isinstance(value, str):
        return shown(value, lines=True)
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return shown(value)
    return value


def said(value: Any, *, lines: bool = False) -> str:
    """A name or a value for the terminal: ``shown`` (no raw bytes or control characters, newlines and tabs
    included, so a name cannot forge a line of a table or a summary), and never rich markup. ``lines=True`` keeps
    the newlines of a message that has several lines (a configuration error), each line escaped."""
    return shown(str(value), lines=lines)


def start_logging(cfg: BinnerConfig, level: str, stream_name: str) -> bool:
    """Configure logs and take over fd 1/2 so every line stays JSON (or above the progress bar); True when the
    log lines are JSON (asked for, or ``auto`` off a terminal)."""
    from app.logs import capture_output, real_stream, wants_json

    stream = getattr(sys, stream_name)
    json_lines = wants_json(cfg.log.format, stream)
    if capture_output():
        out.file, err.file = real_stream("stdout"), real_stream("stderr")
    configure_logging(cfg.log.format, level, real_stream(stream_name))
    global _json_errors
    _json_errors = cfg.log.format == "json"  # asked for JSON only: `auto` keeps errors readable in a pipe
    return json_lines


def load(config_file: Path | None, **overrides: Any) -> BinnerConfig:
    try:
        return load_config(config_file, overrides)
    except ConfigError as error:
        err.print(f"[red]error:[/red] {escape(said(error, lines=True))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


_json_errors = False  # set under log.format: json: errors then are one JSON line too


def fail(message: str, code: int = 2) -> NoReturn:
    if _json_errors:
        from app.logs import fatal_json_line

        err.file.write(fatal_json_line(message) + "\n")
        err.file.flush()
        raise typer.Exit(code)
    err.print(f"[red]error:[/red] {escape(said(message))}", markup=True, highlight=False, soft_wrap=True)  # one line
    raise typer.Exit(code)


@cli.command()
def once(
    input: Path = typer.Argument(..., help="directory of images to bin", exists=True, file_okay=False),
    output: Path = typer.Option(..., "--output", "-o", help="where the bins A/B/C and _quarantine go"),
    config: Path | None = ConfigOption,
    state: Path | None = StateOption,
    placement: str | None = typer.Option(None, help="move (default), copy or hardlink"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    engine: str = typer.Option("local", help="local (this machine) or ray (a Ray cluster; extra \\[ray])"),
    ray_address: str | None = typer.Option(None, help="with --engine ray: host:port of the cluster (default: local Ray)"),
) -> None:
    """Bin every image under INPUT once (backfills), then print a summary and exit."""
    from app.build import ScanError
    from app.engine import StageSetupError
    from app.once import RunStopped, bin_once
    from app.ray_data import RayEngineError, ray_missing

    if engine not in ("local", "ray"):
        fail(f"--engine {engine}: use local or ray")
    if engine == "ray" and (problem := ray_missing()):
        fail(problem)
    cfg = load(config, input=input, output=output, state_dir=state, placement=placement)
    start_logging(cfg, "warning" if cfg.log.level == "info" else cfg.log.level, "stderr")
    json_lines = cfg.log.format == "json"  # asked for JSON only: the summary is a JSON line, and no bar
    try:
        summary = bin_once(cfg, "ray" if engine == "ray" else "local", ray_address, progress and not json_lines, err)
    except (ConfigError, StageSetupError, RayEngineError) as error:
        fail(str(error))
    except (RunStopped, ScanError) as error:  # what was recorded is in the ledger; the next run resumes
        fail(str(error), 1)
    stats = summary.stats
    if json_lines:
        emit_json({"event": "once finished", "input": str(cfg.input), "output": str(cfg.output),
                   "bins": {name: stats.bins.get(name, 0) for name in ("A", "B", "C")},
                   "quarantined": dict(sorted(stats.quarantined.items())), "vanished": stats.vanished,
                   "refused": dict(sorted(stats.refused.items())),
                   "not_finished": summary.not_finished, "finished": stats.finished,
                   "seconds": round(summary.seconds, 3), "images_per_second": round(summary.images_per_second, 3),
                   "new": summary.intake["new"], "already_done": summary.already_done})
    else:
        out.print(f"binner once: {said(cfg.input)} -> {said(cfg.output)}", highlight=False, markup=False)
        table = Table()
        table.add_column("outcome")
        table.add_column("files", justify="right")
        for name in ("A", "B", "C"):
            table.add_row(f"bin {name}", str(stats.bins.get(name, 0)))
        for reason, count in sorted(stats.quarantined.items()):
            table.add_row(Text(f"quarantined: {said(reason)}"), str(count))
        for reason, count in sorted(stats.refused.items()):
            table.add_row(Text(f"left in the input, the output refused it: {said(reason)}"), str(count))
        if stats.vanished:
            table.add_row("vanished before placement", str(stats.vanished))
        table.add_row("not finished", str(summary.not_finished))
        out.print(table)
        out.print(f"{stats.finished} files in {summary.seconds:.1f} s = {summary.images_per_second:.2f} images/s "
                  f"(new {summary.intake['new']}, already done {summary.already_done})")
    if summary.not_finished:
        fail(f"{summary.not_finished} files are not finished (interrupted); run the same command again to finish them", 1)


@cli.command("eval")
def evaluate(
    images: Path = typer.Option(..., "--images", help="directory of labelled images", exists=True, file_okay=False),
    labels: Path = typer.Option(..., "--labels", help="CSV with columns file,expected_bin (optional: category, "
                                "acceptable_bins such as B|C)", exists=True, dir_okay=False),
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (scores and the misbinned files)"),
    state: Path | None = typer.Option(None, "--state", help="keep the evaluation ledger here (default: temporary)"),
) -> None:
    """Run the pipeline on a labelled set without placing files; print accuracy and every misbinned file."""
    from app.build import ScanError
    from app.engine import StageSetupError
    from app.evaluate import LabelsError, evaluate, read_labels
    from app.once import RunStopped

    try:
        rows = read_labels(labels)
        result = evaluate(images, rows, config, state, not as_json, err,
                          on_config=lambda cfg: start_logging(cfg, "error", "stderr"))
    except (LabelsError, ConfigError, StageSetupError) as error:
        fail(str(error))
    except (RunStopped, ScanError) as error:
        fail(str(error), 1)
    if as_json:
        emit_json(result)
        return
    table = Table(title="binner eval: confusion (rows: category, columns: bin)")
    for column in ("category", "n", "A", "B", "C", "quarantined", "missing", "correct", "accuracy"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category, line in result["per_category"].items():
        c = result["confusion"][category]
        table.add_row(Text(said(category)), str(line["n"]), *(str(c[k]) for k in ("A", "B", "C", "quarantined", "missing")),
                      str(line["correct"]), _accuracy_text(line))
    out.print(table)
    overall = result["overall"]
    out.print(f"overall: {overall['correct']}/{overall['n']} = {overall['accuracy']:.0%} exactly as labelled, "
              f"{overall['acceptable']}/{overall['n']} = {overall['acceptable_accuracy']:.0%} in an acceptable bin "
              f"({result['images_per_second']:.2f} images/s)", highlight=False)
    misbinned = result["misbinned"]
    if not misbinned:
        out.print("misbinned: none")
        return
    wrong = Table(title=f"misbinned files ({len(misbinned)})")
    for column in ("file", "expected", "actual", "rule", "acceptable"):
        wrong.add_column(column)
    for item in misbinned:
        wrong.add_row(*(Text(said(item[key] or "")) for key in ("file", "expected", "actual", "rule")),
                      "yes" if item["acceptable"] else "no")
    out.print(wrong)


def _accuracy_text(line: dict[str, Any]) -> str:
    exact = f"{line['accuracy']:.0%}"
    if set(line["acceptable_bins"]) == {line["expected_bin"]}:
        return exact
    either = " or ".join(line["acceptable_bins"])
    return f"{exact} exactly {line['expected_bin']}, {line['acceptable_accuracy']:.0%} {either}"


@cli.command()
def run(
    config: Path | None = ConfigOption,
    input: Path | None = typer.Option(None, "--input", help="watched input directory (key input)"),
    output: Path | None = typer.Option(None, "--output", help="bins directory (key output)"),
    state: Path | None = StateOption,
) -> None:
    """The daemon: watch INPUT, bin every complete file, serve /metrics, notify systemd."""
    from app.service import serve

    cfg = load(config, input=input, output=output, state_dir=state)
    start_logging(cfg, cfg.log.level, "stdout")
    code = serve(cfg, config)
    raise typer.Exit(code)


def daemon_config(config: Path | None, state: Path | None) -> Path | None:
    """The configuration file a read or maintenance command should use, said on stderr: --config or
    BINNER_CONFIG when given, else the one the state directory's writer (`binner run`) recorded."""
    from app.build import recorded_config_source

    if config is not None or os.environ.get("BINNER_CONFIG"):
        chosen = config or Path(os.environ["BINNER_CONFIG"])
        err.print(f"using the configuration {said(chosen.absolute())} ({'--config' if config else 'BINNER_CONFIG'})",
                  highlight=False, markup=False, soft_wrap=True)
        return config
    state_dir = load(None, state_dir=state).state_dir
    found, recorded, writer = recorded_config_source(state_dir)
    if recorded is not None:
        if not recorded.is_file():
            fail(f"`{writer}` used the configuration {recorded} (recorded in {state_dir}), which no longer exists; "
                 "pass the current one with --config")
        err.print(f"using the configuration {said(recorded)} (recorded by `{writer}` in {said(state_dir)}; --config "
                  "overrides)",
                  highlight=False, markup=False, soft_wrap=True)
        return recorded
    why = (f"as `{writer}` did (recorded in {said(state_dir)})" if found else
           f"no --config given and {said(state_dir)} records none")
    err.print(f"using the built-in defaults and BINNER_* environment: {why}", highlight=False, markup=False,
              soft_wrap=True)
    return None


def open_ledger(config: Path | None, state: Path | None, *, read_only: bool = True,
                command: str = "") -> tuple[BinnerConfig, Ledger]:
    """The configured ledger: read-only (works beside a running daemon), or for writing under the instance lock."""
    from app.build import open_ledger as open_configured_ledger
    from app.store import InstanceLock

    cfg = load(daemon_config(config, state), state_dir=state)
    if not cfg.ledger_path.exists():
        fail(f"no ledger at {cfg.ledger_path}: point --state (or state_dir in --config) at the service's state directory")
    try:
        if not read_only:
            InstanceLock(cfg.state_dir).acquire(command)  # held until this command exits
        return cfg, open_configured_ledger(cfg, read_only=read_only)
    except ConfigError as error:
        fail(str(error))


@cli.command()
def status(config: Path | None = ConfigOption, state: Path | None = StateOption, as_json: bool = JsonOption) -> None:
    """Counts from the ledger: files by status, by bin, quarantined by reason, backlog."""
    cfg, ledger = open_ledger(config, state)
    counts = ledger.counts()
    backlog, oldest = ledger.backlog()
    counts["backlog"] = backlog
    counts["oldest_pending_age_s"] = round(time.time() - oldest, 1) if oldest else 0.0
    if as_json:
        emit_json(counts)
        return
    out.print(f"ledger {said(cfg.ledger_path)}", highlight=False, markup=False)
    for title, key in (("status", "status"), ("bins", "bins"), ("quarantined", "quarantined"),
                       ("left in the input, the output refused them", "refused")):
        values = counts[key]
        if key == "refused" and not values:
            continue
        out.print(f"{title}: " + (", ".join(f"{said(k)}={v}" for k, v in sorted(values.items(), key=lambda kv: str(kv[0])))
                                  or "none"), highlight=False, markup=False)
    out.print(f"backlog: {backlog} (oldest {counts['oldest_pending_age_s']} s)", highlight=False, markup=False)


@cli.command()
def explain(file: str = typer.Argument(..., help="input path, output path, relative path or file name"),
            config: Path | None = ConfigOption, state: Path | None = StateOption, as_json: bool = JsonOption) -> None:
    """Why a file went where it went: bin, rule, the values it compared, and the signals."""
    _, ledger = open_ledger(config, state)
    from app.store import missing_signals
    from stages.rules import criteria_of

    rows = ledger.find(str(Path(file).absolute())) or ledger.find(file)
    if not rows:
        fail(f"{file}: not in the ledger; `binner status` shows what is there")
    for row in rows:
        decision = row.decision
        if decision and "criteria" not in decision and row.rule and row.signals is not None:
            # the ledger keeps the signals, not the criteria compared: measured again from them
            decision = {**decision, "criteria": criteria_of(row.signals, row.rule)}
        record = {
            "input": row.path, "status": row.status, "bin": row.bin, "rule": row.rule,
            "quarantine_reason": row.reason, "output": row.output_path, "attempts": row.attempts,
            "decision": decision, "last_error": row.last_error, "timings": row.timings,
            "signals": _signal_summary(row.signals or {}),
        }
        if as_json:
            record["signals"] = row.signals
            emit_json(record)
            continue
        lines = [f"  bin {row.bin} by rule '{row.rule}': {decision.get('reason')}"] if decision else []
        lines += [f"    {key}: {readable(value)}" for key, value in ((decision or {}).get("criteria") or {}).items()]
        if row.reason:
            what = "left in the input, the output refused it" if row.status == "refused" else "quarantined"
            lines.append(f"  {what}: {row.reason}: {row.last_error}")
        lines += [f"  {key}: {readable(value)}" for key, value in record["signals"].items()]
        lines += [f"  {line}" for line in not_computed_lines(missing_signals(row.signals or {}))]
        if row.timings:
            lines.append("  timings: " + ", ".join(f"{stage} {readable_seconds(seconds)}"
                                                   for stage, seconds in row.timings.items()))
        if row.output_path:
            lines.append(f"  placed at {row.output_path}")
        out.print(Text(said(row.path), style="bold") + Text(f": {said(row.status)}"), highlight=False)
        for line in lines:
            out.print(shown(line), highlight=False, markup=False)


def readable(value: Any) -> str:
    """A value for people: floats to 3 significant digits, mappings as key=value, lists comma-separated."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "none"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{key}={readable(item)}" for key, item in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(item) for item in value) or "none"
    return str(value)


def readable_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return readable(seconds)
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _signal_summary(signals: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    ocr = signals.get("ocr")
    if ocr:
        text = " ".join(ocr.get("text", "").split())
        summary["ocr"] = {k: ocr.get(k) for k in ("char_count", "line_count", "text_area_ratio", "mean_confidence")}
        summary["ocr_text"] = text[:200] + ("…" if len(text) > 200 else "")
    if "detections" in signals:
        best = sorted(signals["detections"], key=lambda d: -d["confidence"])[:5]
        summary["detections"] = [f"{d['label']} {d['confidence']:.2f}" for d in best]
    for key in ("caption", "clip_similarity"):
        if key in signals:
            summary[key] = signals[key]
    return summary


def not_computed_lines(missing: dict[str, str]) -> list[str]:
    """``{"caption": "confident_detection"}`` -> ["caption not computed: a confident detection decided A"]."""
    from stages.rules import not_computed_words

    return [f"{signal} not computed: {not_computed_words(reason)}" for signal, reason in sorted(missing.items())]


@cli.command()
def rebin(config: Path | None = ConfigOption, state: Path | None = StateOption,
          dry_run: bool = typer.Option(False, "--dry-run", help="only show what would move"),
          infer: bool = typer.Option(False, "--infer", help="run the models a decision did not compute where the new "
                                     "thresholds need them (on the placed files, where they are), then move them")) -> None:
    """Re-apply the current thresholds to stored signals and move files between bins (no model runs unless
    --infer)."""
    from app.store import rebin_all

    if dry_run and infer:
        fail("--dry-run and --infer: a dry run computes nothing; run --dry-run to see which files need the models, "
             "then --infer to compute them")
    cfg, ledger = open_ledger(config, state, read_only=dry_run, command="rebin")
    from app.build import check_disjoint

    try:
        check_disjoint(cfg)  # like every command that moves files: never with an input inside the output
    except ConfigError as error:
        fail(str(error))
    configure_logging(cfg.log.format, cfg.log.level, sys.stderr)  # each move is logged too: on stderr (names shown)
    models = None
    if infer:
        from app.infer import MissingSignals

        try:
            models = MissingSignals(cfg)
        except Exception as error:  # a model that cannot load: say which, and stop
            fail(f"rebin --infer cannot load the models: {error}")

    def moved(move: Any) -> None:
        out.print(f"{move.old} -> {move.new} ({move.rule}): {said(move.path)}", highlight=False, markup=False)

    def needs_models(row: Any, missing: dict[str, str]) -> None:
        out.print(f"  needs the models: {said(row.output_path or row.path)} ({'; '.join(not_computed_lines(missing))})",
                  highlight=False, markup=False)

    try:
        report = rebin_all(cfg, ledger, dry_run=dry_run, infer=models, on_move=moved, on_needs_models=needs_models,
                           **({"infer_batch": models.rows_per_call} if models is not None else {}))
    finally:
        if models is not None:
            models.close()
    verb = "would move" if dry_run else "moved"
    line = f"{report.moved} files {verb}, {report.unchanged} unchanged"
    if infer:
        line += f", {report.inferred} decided with the models now"
    if report.need_models:
        line += (f", {report.need_models} need models that did not run (a signal they skipped could change their bin; "
                 f"{'binner rebin --infer computes them' if not infer else 'their files could not be read'})")
    out.print(line, highlight=False, markup=False)


@config_cli.command("show")
def config_show(config: Path | None = ConfigOption, state: Path | None = StateOption) -> None:
    """Print the effective configuration (file < BINNER_* environment < flags; by default the daemon's file)."""
    out.print(dump_config(load(daemon_config(config, state), state_dir=state)), highlight=False, markup=False)


@config_cli.command("check")
def config_check(config: Path | None = ConfigOption) -> None:
    """Validate the configuration, its devices and its model weights."""
    from app.build import build_stages, check_disjoint, preflight_weights

    cfg = load(config)
    try:
        check_disjoint(cfg)
        stages = build_stages(cfg)
        preflight_weights(cfg)
    except ConfigError as error:
        fail(str(error))
    for stage in stages:
        out.print(f"{stage.name}: devices {', '.join(stage.devices)}, batch {stage.batch_policy.max_batch_size or 'auto'}")
    out.print("configuration OK")


@cli.command()
def bench(
    scenario: list[str] | None = typer.Option(
        None, "--scenario", "-s",
        help="engine (default), sequential, ray, framework, stream, models, gpu, scale; repeat the option for several"),
    images: int | None = typer.Option(None, "--images", "--files", min=1,
                                      help="files per scenario (default: each scenario's own size)"),
    large_images: int | None = typer.Option(None, "--large-images", min=0,
                                            help="framework: how many 12-megapixel JPEGs (default 300)"),
    stream_seconds: float | None = typer.Option(None, "--stream-seconds", min=0.5,
                                                help="stream: seconds of arrivals per load level (default 20)"),
    ocr_ms: str = typer.Option("20,10", help="synthetic OCR cost: base ms, ms per item"),
    vision_ms: str = typer.Option("15,6", help="synthetic vision cost: base ms, ms per item"),
    batch: int = typer.Option(16, min=1, help="batch size of both synthetic model stages"),
    queue: int = typer.Option(32, min=1, help="capacity of the model-stage queues"),
    config: Path | None = typer.Option(None, "--config", "-c", help="models and gpu: the configuration to measure"),
    source: Path | None = typer.Option(None, help="models and gpu: directory of images to use"),
    repeat: int = typer.Option(3, min=1, help="models: how many copies of --source"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report (layout: docs/benchmarks.md)"),
    quick: bool = typer.Option(False, "--quick",
                               help="gpu: the short plan, same keys (under 5 minutes on one H100-class GPU)"),
) -> None:
    """Measure binner side by side with its limit, the seeds' loop, Ray Data and more (docs/benchmarks.md)."""
    from app.bench import BenchOptions, BenchUnavailable, parse_ms, render_table, run_benchmarks

    try:
        options = BenchOptions(images=images, large_images=large_images, stream_seconds=stream_seconds,
                               ocr_ms=parse_ms(ocr_ms, "--ocr-ms"), vision_ms=parse_ms(vision_ms, "--vision-ms"),
                               batch=batch, queue=queue, config_file=config, source=source, repeat=repeat,
                               show_progress=not as_json)
    except ValueError as error:
        fail(str(error))
    announce = None if as_json else (lambda name: err.print(f"bench: running scenario {name}", highlight=False))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # model libraries print; keep stdout for the result
            report = run_benchmarks(list(scenario or ["engine"]), options, announce=announce, quick=quick)
    except BenchUnavailable as error:
        fail(str(error))
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(render_table(report))


@cli.command("fetch-weights")
def fetch_weights_command(config: Path | None = ConfigOption) -> None:
    """Download the configured public weights (needs internet), with progress bars."""
    from app.weights import fetch_weights

    cfg = load(config)
    v = cfg.vision
    try:
        fetched = fetch_weights(v.detector.weights if v.detector.enabled else None,
                                v.captioner.model if v.captioner.enabled else None, v.clip.model if v.clip.enabled else None)
    except ConfigError as error:
        fail(str(error))
    out.print(f"{len(fetched)} weights downloaded" if fetched else "every configured weight is already here")


@cli.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
