"""/metrics, /healthz and /readyz on a small HTTP server with a fixed number of threads (loopback by default).

One thread per connection (``ThreadingHTTPServer``) lets idle or slow clients pile up threads without bound,
and its listen backlog of 5 drops scrapes under bursts. Here one I/O thread accepts connections and waits,
with a selector, until a request has started to arrive; only then does one of ``workers`` pool threads handle
it. Idle connections therefore cost a file descriptor and no thread, are closed after ``idle_timeout_s``, and
at most ``max_connections`` are kept (the oldest idle one is dropped first).
"""

from __future__ import annotations

import errno
import queue
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.config import ConfigError

log = structlog.get_logger("binner.http")


class PortUnavailable(ConfigError):
    """The configured address cannot be listened on; the message names the port and the key that changes it."""


class BoundedHTTPServer(HTTPServer):
    """``HTTPServer`` whose requests run on a fixed pool, with idle connections parked in a selector."""

    request_queue_size = 128  # listen backlog: a burst of scrapes waits in the kernel instead of being refused

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, workers: int = 4,
                 idle_timeout_s: float = 10.0, max_connections: int = 512) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        # Daemon threads (like ThreadingHTTPServer's daemon_threads): a client stalled mid-request never delays exit.
        self._requests: queue.SimpleQueue[tuple[socket.socket, tuple[str, int]] | None] = queue.SimpleQueue()
        self.workers = [threading.Thread(target=self._work, name=f"http-{index}", daemon=True) for index in range(workers)]
        self._stop = threading.Event()
        self._waker_r, self._waker_w = socket.socketpair()
        self._idle: OrderedDict[socket.socket, tuple[tuple[str, int], float]] = OrderedDict()
        super().__init__(address, handler)  # binds and listens; on failure it calls server_close()

    def serve_forever(self, poll_interval: float = 0.5) -> None:  # noqa: ARG002 - the selector wakes itself
        for worker in self.workers:
            worker.start()
        self.socket.setblocking(False)
        self._waker_r.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ, "listen")
            selector.register(self._waker_r, selectors.EVENT_READ, "wake")
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=min(1.0, self.idle_timeout_s / 2)):
                    if key.data == "listen":
                        self._accept(selector)
                    elif key.data == "wake":
                        self._waker_r.recv(64)
                    else:
                        self._dispatch(selector, key.fileobj)  # type: ignore[arg-type]
                self._expire(selector, time.monotonic())
            for connection in list(self._idle):
                self._drop(selector, connection)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                connection, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE/ENFILE: shed idle connections and try again later
                if error.errno in (errno.EMFILE, errno.ENFILE) and self._idle:
                    self._drop(selector, next(iter(self._idle)))
                    continue
                log.warning("http: accept failed", error=str(error))
                time.sleep(0.1)  # out of descriptors with nothing idle to shed: do not spin on the listen socket
                return
            if len(self._idle) >= self.max_connections:
                self._drop(selector, next(iter(self._idle)))
            connection.setblocking(False)
            self._idle[connection] = (address, time.monotonic() + self.idle_timeout_s)
            selector.register(connection, selectors.EVENT_READ, "client")

    def _dispatch(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        address, _ = self._idle.pop(connection)
        selector.unregister(connection)
        connection.setblocking(True)
        connection.settimeout(self.idle_timeout_s)  # a client that stalls mid-request frees its worker in time
        self._requests.put((connection, address))

    def _work(self) -> None:
        while (request := self._requests.get()) is not None:
            connection, address = request
            try:
                self.finish_request(connection, address)
            except Exception:  # noqa: BLE001 - one client's broken request must not end the server
                pass
            finally:
                self.shutdown_request(connection)

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        while self._idle:
            connection, (_, deadline) = next(iter(self._idle.items()))
            if deadline > now:
                return
            self._drop(selector, connection)

    def _drop(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        self._idle.pop(connection, None)
        try:
            selector.unregister(connection)
        except (KeyError, ValueError):
            pass
        connection.close()

    def shutdown(self) -> None:
        self._stop.set()
        try:
            self._waker_w.send(b"x")
        except OSError:
            pass

    def server_close(self) -> None:
        super().server_close()
        for _ in self.workers:
            self._requests.put(None)
        self._waker_r.close()
        self._waker_w.close()


class StatusServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, healthy: Callable[[], tuple[bool, str]],
                 ready: Callable[[], bool], *, workers: int = 4, idle_timeout_s: float = 10.0) -> None:
        registry_ref, healthy_ref, ready_ref = registry, healthy, ready

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout_s

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
            self.server = BoundedHTTPServer((host, port), Handler, workers=workers, idle_timeout_s=idle_timeout_s)
        except OSError as error:
            why = "it is already in use" if error.errno == errno.EADDRINUSE else error.strerror
            raise PortUnavailable(
                f"http.port: cannot listen on {host}:{port}: {why}; set another port (http.port in the config, "
                "BINNER_HTTP__PORT in the environment) or stop the process using it"
            ) from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()
