"""The node's HTTP server: bounded threads, bounded time, bounded sizes, short JSON errors.

``BoundedHTTPServer`` gives no thread to a connection until its whole request head has arrived:
one watcher thread holds every waiting connection (idle keep-alive ones included) in a selector
and closes it when its head is not complete within ``IDLE_TIMEOUT_S``. A complete head goes to a
pool of at most ``MAX_HANDLERS`` threads, which answers that one request and hands a keep-alive
connection back to the watcher. So idle or slow connections cost a file descriptor, never a
thread, and a client with the token is answered while hundreds of idle connections wait.

``JSONRequestHandler`` is the handler base: subclasses implement ``respond(method)``, check the
token from the headers, and only then call ``read_body``, which refuses a missing (where a body is
needed), repeated, negative, non-numeric or oversize ``Content-Length`` and any
``Transfer-Encoding``. An error reply closes the connection when the request's body was not read.
Unexpected exceptions give a short 500 sentence; the traceback goes to the node's log only.
"""

from __future__ import annotations

import collections
import json
import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_HANDLERS = 32  # threads answering requests; long calls (/join, /probe, benchmarks) hold one each
MAX_QUEUED = 96  # complete requests waiting for a handler thread; beyond: 503
MAX_WAITING = 512  # connections waiting for (the rest of) a request head; beyond: the oldest is closed
IDLE_TIMEOUT_S = 30.0  # a request head must arrive within this; also each read of a body
MAX_HEAD_BYTES = 64 << 10
# The largest bodies the server sends: a TrainJob with an inline dataset (FLOW_NEXUS_MAX_INLINE_BYTES,
# 4 MiB by default, which JSON escaping can grow severalfold) and predict/benchmark inputs (bounded
# by the MCP transport's size limits). 32 MiB holds both with room; bigger data goes to the sandbox
# through neural_node_upload.
MAX_BODY_BYTES = 32 << 20


class RequestError(Exception):
    """An error reply: HTTP status plus a sentence for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Stream:
    """A handler's ``rfile`` and ``wfile``: the head the watcher read, then the socket itself."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        self.sock = sock
        self.buf = bytearray(head)
        self.out = bytearray()  # a reply being written: sent by flush, headers and body together

    def readline(self, limit: int = -1) -> bytes:
        # The whole head is in the buffer, so header lines never wait on the socket.
        end = self.buf.find(b"\n")
        n = len(self.buf) if end < 0 else end + 1
        if limit >= 0:
            n = min(n, limit)
        line = bytes(self.buf[:n])
        del self.buf[:n]
        return line

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(min(n - len(self.buf), 1 << 20))  # times out after IDLE_TIMEOUT_S
            if not chunk:
                raise ConnectionError("the client closed the connection in the middle of the body")
            self.buf += chunk
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def write(self, data: bytes) -> int:
        self.out += data
        return len(data)

    def flush(self) -> None:
        # Small request/reply pairs: one send, not one for the head and one for the body.
        if self.out:
            data, self.out = bytes(self.out), bytearray()
            self.sock.sendall(data)

    def leftover(self) -> bytes:
        """Bytes already received beyond this request (the start of the next one)."""
        return bytes(self.buf)


def _head_complete(buf: bytes | bytearray) -> bool:
    return b"\r\n\r\n" in buf or b"\n\n" in buf


class _Waiting:
    __slots__ = ("addr", "buf", "deadline")

    def __init__(self, addr: Any, buf: bytes) -> None:
        self.addr = addr
        self.buf = bytearray(buf)
        self.deadline = time.monotonic() + IDLE_TIMEOUT_S


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer (accepting in ``serve_forever``) with a watcher thread and a bounded pool."""

    request_queue_size = 128  # listen backlog: a burst of connections is accepted, not dropped

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_handlers: int = MAX_HANDLERS) -> None:
        super().__init__(address, handler)
        self.max_handlers = max_handlers
        self.pool = ThreadPoolExecutor(max_handlers, thread_name_prefix="http")
        self._busy = 0  # requests queued or running in the pool
        self._busy_lock = threading.Lock()
        self._arrivals: collections.deque[tuple[socket.socket, Any, bytes]] = collections.deque()
        self._waiting: dict[socket.socket, _Waiting] = {}  # insertion order: oldest first
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._watcher = threading.Thread(target=self._watch, name="http-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------ accepting and waiting
    def process_request(self, request: Any, client_address: Any) -> None:
        """Called by ``serve_forever`` for each accepted connection: it waits for its head."""
        try:
            # Small request/reply pairs: without this, Nagle + delayed ACK add ~40 ms per call.
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the client is already gone
            self.shutdown_request(request)
            return
        self._park(request, client_address, b"")

    def _park(self, sock: socket.socket, addr: Any, data: bytes) -> None:
        self._arrivals.append((sock, addr, data))
        try:
            self._wake_w.send(b"x")
        except OSError:  # closed: the server is stopping
            self.shutdown_request(sock)

    def _watch(self) -> None:
        while not self._closed:
            try:
                self._watch_once()
            except Exception:  # the watcher must outlive any one connection's trouble
                log.exception("the HTTP connection watcher hit an error; it goes on")
                time.sleep(0.1)
        for sock in list(self._waiting):
            self._drop(sock)

    def _watch_once(self) -> None:
        for key, _ in self._selector.select(timeout=1.0):
            if key.fileobj is self._wake_r:
                self._take_arrivals()
            else:
                self._receive(key.fileobj)  # type: ignore[arg-type]
        now = time.monotonic()
        for sock in [s for s, w in self._waiting.items() if w.deadline < now]:
            self._drop(sock)  # no complete request head in time (idle keep-alive, slow client)

    def _take_arrivals(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._arrivals:
            sock, addr, data = self._arrivals.popleft()
            if _head_complete(data):  # a pipelined request already in hand
                self._dispatch(sock, addr, data)
                continue
            if len(self._waiting) >= MAX_WAITING:
                self._drop(next(iter(self._waiting)))
            sock.setblocking(False)
            self._waiting[sock] = _Waiting(addr, data)
            self._selector.register(sock, selectors.EVENT_READ)

    def _receive(self, sock: socket.socket) -> None:
        waiting = self._waiting[sock]
        try:
            chunk = sock.recv(MAX_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(sock)
            return
        waiting.buf += chunk
        if _head_complete(waiting.buf):
            self._selector.unregister(sock)
            del self._waiting[sock]
            self._dispatch(sock, waiting.addr, bytes(waiting.buf))
        elif len(waiting.buf) > MAX_HEAD_BYTES:
            self._refuse(sock, 431, f"request head over {MAX_HEAD_BYTES >> 10} KiB")

    def _drop(self, sock: socket.socket) -> None:
        if self._waiting.pop(sock, None) is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        self.shutdown_request(sock)

    def _refuse(self, sock: socket.socket, status: int, message: str) -> None:
        """A short JSON error written by the watcher itself (best effort), then the connection ends."""
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.send(head + body)
        except OSError:
            pass
        self._drop(sock)

    # ------------------------------------------------------------ handling
    def _dispatch(self, sock: socket.socket, addr: Any, head: bytes) -> None:
        with self._busy_lock:
            full = self._busy >= self.max_handlers + MAX_QUEUED
            if not full:
                self._busy += 1
        if full:
            self._refuse(sock, 503, "this node is busy with other requests; try again shortly")
            return
        sock.settimeout(IDLE_TIMEOUT_S)  # blocking again, for the body and the reply; not the handler's work
        try:
            self.pool.submit(self._handle, sock, addr, head)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._done()
            self.shutdown_request(sock)

    def _handle(self, sock: socket.socket, addr: Any, head: bytes) -> None:
        keep, leftover = False, b""
        try:
            handler = self.RequestHandlerClass((sock, head), addr, self)  # type: ignore[arg-type]
            keep = not handler.close_connection and not self._closed
            leftover = handler.rfile.leftover() if keep else b""
        except Exception:
            log.exception("a connection from %s failed", addr)
        finally:
            self._done()
        if keep:
            self._park(sock, addr, leftover)  # keep-alive: wait for the next request without a thread
        else:
            self.shutdown_request(sock)

    def _done(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    def server_close(self) -> None:
        if not hasattr(self, "_watcher"):  # binding failed inside __init__: only the socket exists
            super().server_close()
            return
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._watcher.join(5)
        self._wake_w.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().server_close()


class JSONRequestHandler(BaseHTTPRequestHandler):
    """Handler base for ``BoundedHTTPServer``: one request per hand-off, JSON replies."""

    protocol_version = "HTTP/1.1"
    node_id = "?"  # names the node in the 500 sentence
    max_body_bytes = MAX_BODY_BYTES  # a server with smaller requests sets a smaller limit

    def setup(self) -> None:
        sock, head = self.request  # BoundedHTTPServer passes (socket, the request head it read)
        self.connection = sock
        self.rfile = self.wfile = _Stream(sock, head)  # type: ignore[assignment]

    def handle(self) -> None:
        self.close_connection = True
        self.body_read = False
        try:
            self.handle_one_request()
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client stopped reading its reply, or left

    def finish(self) -> None:
        pass  # nothing buffered; the server closes or keeps the socket

    def handle_expect_100(self) -> bool:
        return True  # "100 Continue" is sent by read_body, after the token and size checks

    def do_GET(self) -> None:
        self._run("GET")

    def do_POST(self) -> None:
        self._run("POST")

    def respond(self, method: str) -> None:
        raise NotImplementedError

    def _run(self, method: str) -> None:
        try:
            self.respond(method)
        except RequestError as exc:
            self.reply_json(exc.status, {"error": str(exc)})
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client stalled or left in the middle of its body
        except Exception:
            path = urlsplit(self.path).path
            log.exception("request %s %s failed", method, path)
            self.reply_json(500, {"error": f"internal error on node {self.node_id} while handling {method} {path}; "
                                           "see the node's log (neural_node_logs)"})

    def read_body(self, required: bool) -> bytes:
        """The request body, after checking its framing; ``required``: the route takes a JSON body."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "chunked or other transfer encodings are not supported; send the body with "
                                    "a Content-Length header")
        values = self.headers.get_all("Content-Length") or []
        if len(values) > 1:
            raise RequestError(400, "the request has more than one Content-Length header")
        if not values:
            if required:
                raise RequestError(411, "this endpoint takes a JSON body: send it with a Content-Length header")
            self.body_read = True
            return b""
        text = values[0].strip()
        if not (text.isascii() and text.isdigit()):
            raise RequestError(400, "Content-Length must be a non-negative whole number of bytes")
        length = int(text)
        if length > self.max_body_bytes:
            raise RequestError(413, f"the request body of {length} bytes is over this server's limit of "
                                    f"{self.max_body_bytes >> 20} MiB")
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        body = self.rfile.read(length) if length else b""
        self.body_read = True
        return body

    def reply_json(self, status: int, payload: Any) -> None:
        """Headers and body in one write; an error reply ends a connection whose body was not read."""
        data = json.dumps(payload).encode()
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # garbage (or HTTP/0.9) still gets a status line and headers
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400 and not self.body_read:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()  # one send for head and body (http.server's error paths never flush)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, too many headers, unknown method) as JSON."""
        try:
            short = HTTPStatus(code).phrase
        except ValueError:
            short = "error"
        self.close_connection = True
        self.reply_json(code, {"error": message or short})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)
