"""/metrics, /healthz and /readyz on a small HTTP server with a fixed number of threads (loopback by default).

One thread per connection (``ThreadingHTTPServer``) lets idle or slow clients pile up threads without bound,
and its listen backlog of 5 drops scrapes under bursts. Here one I/O thread does all the socket work with a
selector: it accepts connections, reads each request until its headers are complete, and writes each response;
only a complete request reaches one of ``workers`` pool threads, which builds the response in memory. A client
that is slow to send (or to read) therefore holds a file descriptor, never a thread: health checks keep
answering however many clients drip their requests a byte at a time.

Every connection has one deadline, never extended by a read: a connection that sends nothing is closed after
``idle_timeout_s``; once it has started, its request headers must be complete within ``request_timeout_s`` of its
first byte, and its response sent within ``request_timeout_s``; at most ``max_connections`` wait for their request
(the oldest is dropped first) and a request's headers may hold at most ``MAX_HEADER_BYTES``.
"""

from __future__ import annotations

import errno
import io
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from app.config import ConfigError

log = structlog.get_logger("binner.http")

MAX_HEADER_BYTES = 16 * 1024
_HEADERS_END = (b"\r\n\r\n", b"\n\n", b"\n\r\n")


class PortUnavailable(ConfigError):
    """The configured address cannot be listened on; the message names the port and the key that changes it."""


@dataclass(eq=False)
class Exchange:
    """One connection's request and response, buffered in memory; owned by the I/O thread except while a worker
    builds the response."""

    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    response: memoryview = field(default_factory=lambda: memoryview(b""))
    started: bool = False


class BufferedRequestHandler(BaseHTTPRequestHandler):
    """A ``BaseHTTPRequestHandler`` that reads the request the I/O thread already received and writes its response
    into memory for the I/O thread to send: it never touches the socket, so it can never wait on a client."""

    request: Exchange  # type: ignore[assignment]

    def setup(self) -> None:
        self.connection = self.request.sock
        self.rfile = io.BytesIO(bytes(self.request.received))
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        self.request.response = memoryview(self.wfile.getvalue())


class BoundedHTTPServer(HTTPServer):
    """``HTTPServer`` whose sockets are all served by one selector thread and whose requests run on a fixed pool."""

    request_queue_size = 128  # listen backlog: a burst of scrapes waits in the kernel instead of being refused

    def __init__(self, address: tuple[str, int], handler: type[BufferedRequestHandler], *, workers: int = 4,
                 idle_timeout_s: float = 10.0, request_timeout_s: float | None = None,
                 max_connections: int = 512) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = min(5.0, idle_timeout_s) if request_timeout_s is None else request_timeout_s
        self.max_connections = max_connections
        # Daemon threads (like ThreadingHTTPServer's daemon_threads): a request being built never delays exit.
        self._requests: queue.SimpleQueue[Exchange | None] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[Exchange] = queue.SimpleQueue()
        self.workers = [threading.Thread(target=self._work, name=f"http-{index}", daemon=True) for index in range(workers)]
        self._stop = threading.Event()
        self._waker_r, self._waker_w = socket.socketpair()
        self._reading: dict[socket.socket, Exchange] = {}  # insertion order: the oldest first
        self._writing: dict[socket.socket, Exchange] = {}
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
                for key, _ in selector.select(timeout=0.25):
                    if key.data == "listen":
                        self._accept(selector)
                    elif key.data == "wake":
                        self._take_responses(selector)
                    elif key.fileobj in self._reading:
                        self._read(selector, key.data)
                    elif key.fileobj in self._writing:
                        self._write(selector, key.data)
                self._expire(selector, time.monotonic())
            for exchange in [*self._reading.values(), *self._writing.values()]:
                self._drop(selector, exchange)

    # --- the I/O thread ----------------------------------------------------------------------------------------
    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                connection, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE/ENFILE: shed the oldest waiting connection and try again later
                if error.errno in (errno.EMFILE, errno.ENFILE) and self._reading:
                    self._drop(selector, next(iter(self._reading.values())))
                    continue
                log.warning("http: accept failed", error=str(error))
                time.sleep(0.1)  # out of descriptors with nothing to shed: do not spin on the listen socket
                return
            if len(self._reading) >= self.max_connections:
                self._drop(selector, next(iter(self._reading.values())))
            connection.setblocking(False)
            exchange = Exchange(connection, address, time.monotonic() + self.idle_timeout_s)
            self._reading[connection] = exchange
            selector.register(connection, selectors.EVENT_READ, exchange)

    def _read(self, selector: selectors.BaseSelector, exchange: Exchange) -> None:
        try:
            data = exchange.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # closed (or reset) before a whole request arrived
            self._drop(selector, exchange)
            return
        if not exchange.started:  # from the first byte on the whole request has one deadline
            exchange.started = True
            exchange.deadline = time.monotonic() + self.request_timeout_s
        searched_from = max(0, len(exchange.received) - 3)
        exchange.received += data
        if any(exchange.received.find(end, searched_from) >= 0 for end in _HEADERS_END):
            del self._reading[exchange.sock]
            selector.unregister(exchange.sock)
            self._requests.put(exchange)
        elif len(exchange.received) > MAX_HEADER_BYTES:
            self._drop(selector, exchange)

    def _take_responses(self, selector: selectors.BaseSelector) -> None:
        try:
            while self._waker_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                exchange = self._responses.get_nowait()
            except queue.Empty:
                return
            if not exchange.response:
                self._close(exchange.sock)
                continue
            exchange.deadline = time.monotonic() + self.request_timeout_s
            self._writing[exchange.sock] = exchange
            selector.register(exchange.sock, selectors.EVENT_WRITE, exchange)
            self._write(selector, exchange)

    def _write(self, selector: selectors.BaseSelector, exchange: Exchange) -> None:
        try:
            sent = exchange.sock.send(exchange.response)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(selector, exchange)
            return
        exchange.response = exchange.response[sent:]
        if not exchange.response:
            self._writing.pop(exchange.sock, None)
            selector.unregister(exchange.sock)
            self._close(exchange.sock)

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        for waiting in (self._reading, self._writing):
            for exchange in [exchange for exchange in waiting.values() if exchange.deadline <= now]:
                self._drop(selector, exchange)

    def _drop(self, selector: selectors.BaseSelector, exchange: Exchange) -> None:
        self._reading.pop(exchange.sock, None)
        self._writing.pop(exchange.sock, None)
        try:
            selector.unregister(exchange.sock)
        except (KeyError, ValueError):
            pass
        exchange.sock.close()

    def _close(self, connection: socket.socket) -> None:
        try:
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        connection.close()

    # --- the workers --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (exchange := self._requests.get()) is not None:
            try:
                self.finish_request(exchange, exchange.address)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - one client's broken request must not end the server
                exchange.response = memoryview(b"")
            self._responses.put(exchange)
            try:
                self._waker_w.send(b"x")
            except OSError:
                pass

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
                 ready: Callable[[], bool], *, workers: int = 4, idle_timeout_s: float = 10.0,
                 request_timeout_s: float | None = None) -> None:
        registry_ref, healthy_ref, ready_ref = registry, healthy, ready

        class Handler(BufferedRequestHandler):
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
            self.server = BoundedHTTPServer((host, port), Handler, workers=workers, idle_timeout_s=idle_timeout_s,
                                            request_timeout_s=request_timeout_s)
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
