"""The long-running service: the daemon, its HTTP endpoints, systemd notification, and the event loop and stop
signals that `once` and `eval` share with it."""

from app.service.daemon import Daemon, report_error, serve
from app.service.lifecycle import DRAIN_REPORT_EVERY_S, drain_message, run_async, stop_on_signals
from app.service.notify import SystemdNotifier, start_timeout_extended

__all__ = ["DRAIN_REPORT_EVERY_S", "Daemon", "SystemdNotifier", "drain_message", "report_error", "run_async", "serve",
           "start_timeout_extended", "stop_on_signals"]
