"""/metrics, /healthz and /readyz on a small threaded HTTP server (loopback by default)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class StatusServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, healthy: Callable[[], tuple[bool, str]],
                 ready: Callable[[], bool]) -> None:
        registry_ref, healthy_ref, ready_ref = registry, healthy, ready

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry_ref), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, detail = healthy_ref()
                    self._send(200 if ok else 503, (detail + "\n").encode())
                elif path == "/readyz":
                    ok = ready_ref()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"loading models\n")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes would flood the log
                pass

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as error:
            raise OSError(error.errno, f"cannot listen on http.host={host} http.port={port}: {error.strerror}; "
                                       "pick another port (http.port / BINNER_HTTP__PORT) or stop the other process")
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
