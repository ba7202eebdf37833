"""Owns the gunicorn worker class: gthread, where a thread only ever gets a whole request.

gunicorn's gthread worker (27.x) gives a connection to a thread as soon as it has a byte to read;
the thread does the TLS handshake, then reads the request line, headers and body blocking, with
no deadline. A client that sends its request slowly, or announces a body it never sends, holds
that thread until it hangs up: `threads` such clients stop a worker, the API server gives up after
the webhook's `timeoutSeconds: 3`, and `failurePolicy: Fail` turns that into rejected pods.

Here the worker's poller (its main thread) does every read, non-blocking: the TLS handshake, then
the request into a buffer per connection until its head has ended and its body is complete
(Content-Length bytes, or the last chunk and the trailers). Only then does a thread get the
connection, with gunicorn's request parsed over the buffered bytes: it runs the app and writes
the answer. N slow clients cost N sockets and their buffers, not N threads, and each state has a
limit after which the connection is closed:

==========================  =====================================================================
state                       limit
==========================  =====================================================================
before the ClientHello      ``keepalive`` (a TCP check, or a connection dialled ahead)
TLS handshake               HANDSHAKE_TIMEOUT from its first bytes
idle between requests       ``keepalive`` (the API server parks spare connections here)
request line and headers    HEAD_TIMEOUT from the request's first byte; at most HEAD_LIMIT bytes
body                        the whole request within REQUEST_TIMEOUT of its first byte, and from
                            BODY_GRACE after the head on at least MIN_BODY_RATE on average; at
                            most MAX_BODY_BYTES (413)
answer (a thread writes)    RESPONSE_TIMEOUT for each send
closing                     what the client still sends is read and dropped (LINGER_*, DRAIN_*
                            after a 413) so it reads the answer instead of a reset
==========================  =====================================================================

A worker holds at most ``worker_connections`` connections (gunicorn's setting) and logs when it
reaches that cap; new connections then wait for another worker, or for one to close. Requests
not yet complete may buffer buffer_budget() bytes per worker in all (threads x the largest
request); past that, reading pauses on the connections holding more than PAUSE_ABOVE bytes, so
a crowd of large slow bodies cannot exhaust the pod's memory.

Framing errors gunicorn's parser finds (request line, headers, Content-Length, chunks) and bodies
over the limit are answered here as AdmissionReview errors: 413 for what is too large, 400 for
the rest, never gunicorn's HTML pages. Plain HTTP (no certificate) is read the same way, without
the handshake; HTTP/2 is not offered (:mod:`app.tls` sets no ALPN).
"""

from __future__ import annotations

import errno
import heapq
import http
import itertools
import logging
import socket
import ssl
import time
from collections import deque
from concurrent.futures import Future
from functools import partial
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any

from gunicorn import sock as gsock
from gunicorn.http import errors as http_errors
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.message import Request
from gunicorn.http.unreader import Unreader
from gunicorn.workers import gthread

from ..config import MAX_BODY_BYTES
from ..review import encode_review, errored
from ..text import quote

# Limits per connection state (module docstring). The API server gives up after the webhook's
# timeoutSeconds (1..30, default 10, admissionregistration/v1; 3 in deploy/base/webhook.yaml):
# a request must be in well before that, and the API server sends each one at once.
HANDSHAKE_TIMEOUT = 5.0  # seconds, from the first bytes of the ClientHello
HEAD_TIMEOUT = 1.0  # seconds, from the request's first byte to the end of its headers
HEAD_LIMIT = 64 * 1024  # bytes of request line and headers (the API server sends < 1 KiB)
REQUEST_TIMEOUT = 2.0  # seconds, from the request's first byte to the end of its body
BODY_GRACE = 0.5  # seconds after the head before MIN_BODY_RATE applies
MIN_BODY_RATE = 256 * 1024  # bytes per second, on average since the head ended
RESPONSE_TIMEOUT = 2.0  # seconds a thread waits on each send of the answer
LINGER_SECONDS, LINGER_BYTES = 2.0, 64 * 1024  # after a closing answer (as gunicorn's)
# After a 413 the client may still be sending its body: drop up to this much (as long as it
# keeps coming) so it reads the answer.
DRAIN_SECONDS, DRAIN_IDLE, DRAIN_BYTES = 10.0, 1.0, 4 * MAX_BODY_BYTES
READ_SIZE = 64 * 1024  # one recv (a TLS record is at most 16 KiB; larger would mean mmap)
READ_BURST = 1024 * 1024  # bytes read from one connection before the poller serves the others
PAUSE_ABOVE = 64 * 1024  # over budget, reading pauses on connections buffering more than this
# After each accept a worker of several steps aside from the listener for this long per
# connection it accepted in the last ACCEPT_WINDOW (at most ACCEPT_STEP_MAX), so the other
# workers take the next ones of a burst; connections it has held for longer (the API server's
# parked spares) do not slow its accepting.
ACCEPT_STEP, ACCEPT_STEP_MAX, ACCEPT_WINDOW = 0.001, 0.02, 1.0  # seconds


def buffer_budget(threads: int) -> int:
    """Bytes of unfinished requests a worker buffers before it pauses reading (module docs)."""
    return max(2, threads) * (MAX_BODY_BYTES + HEAD_LIMIT)


log = logging.getLogger("poolkeeper.server")
admission_log = logging.getLogger("poolkeeper.admission")

_DRAIN = object()  # handle(): answered 413; drop the rest of the body, then close

# Connection states.
_HELLO, _HANDSHAKE, _IDLE, _READING, _BUSY, _LINGER, _CLOSED = range(7)
_SIZE, _DATA, _TRAILERS = range(3)  # where a chunked body's scan is
_HEX = b"0123456789abcdefABCDEF"


class Refusal(http_errors.ParseException):
    """A request answered with an error by the worker itself (status and message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


def too_large(length: int | None) -> Refusal:
    size = f"{length} bytes" if length is not None else "more than that"
    return Refusal(413, f"the body is {size}; poolkeeper accepts at most {MAX_BODY_BYTES} bytes "
                        "(two objects at the API server's 3 MiB limit plus the envelope)")


def quoted(value: object) -> str:
    """A value from the request line or headers, quoted and cut (:func:`app.text.quote`)."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("latin-1")  # as gunicorn decodes the head
    return quote(value if isinstance(value, str) else str(value))


def answer_for(exc: BaseException, cfg: Any) -> tuple[int, str]:
    """The status and message for a request gunicorn's parser (or the worker) refused."""
    e = http_errors
    if isinstance(exc, Refusal):
        return exc.status, exc.message
    if isinstance(exc, e.LimitRequestLine):
        return 413, (f"the request line is longer than {cfg.limit_request_line} bytes: send "
                     "POST /mutate HTTP/1.1")
    if isinstance(exc, e.LimitRequestHeaders):
        return 413, (f"the request headers are too large: at most {cfg.limit_request_fields} "
                     f"fields of at most {cfg.limit_request_field_size} bytes each")
    if isinstance(exc, e.InvalidRequestLine):
        return 400, f"the request line {quoted(exc.req)} is not valid: send POST /mutate HTTP/1.1"
    if isinstance(exc, e.InvalidRequestMethod):
        return 400, f"the method {quoted(exc.method)} is not valid"
    if isinstance(exc, e.InvalidHTTPVersion):
        return 400, f"HTTP version {quoted(exc.version)} is not supported: send HTTP/1.1"
    if isinstance(exc, e.ObsoleteFolding):
        return 400, f"header {quoted(exc.hdr)} is folded onto a second line (RFC 9112 5.2)"
    if isinstance(exc, e.InvalidHeaderName):
        return 400, f"the header name {quoted(exc.hdr)} is not valid"
    if isinstance(exc, e.InvalidHeader):
        if exc.hdr == "CONTENT-LENGTH":
            return 400, ("Content-Length must be one decimal number, and not be sent together "
                         "with Transfer-Encoding")
        if exc.hdr == "TRANSFER-ENCODING":
            return 400, ("Transfer-Encoding must end with chunked, once; send the body with it "
                         "or with Content-Length")
        return 400, f"the header {quoted(exc.hdr)} is not valid"
    if isinstance(exc, e.UnsupportedTransferCoding):
        return 400, (f"transfer coding {quoted(exc.hdr)} is not supported: send the body with "
                     "Content-Length or Transfer-Encoding: chunked")
    if isinstance(exc, e.InvalidChunkSize):
        return 400, f"the chunked body is malformed: chunk size {quoted(exc.data)} is not valid"
    if isinstance(exc, e.ChunkMissingTerminator):
        return 400, "the chunked body is malformed: a chunk is not followed by CRLF"
    if isinstance(exc, e.InvalidChunkExtension):
        return 400, f"the chunked body is malformed: {exc}"
    if isinstance(exc, e.ExpectationFailed):
        return 400, f"Expect: {quoted(exc.expect)} is not supported (only 100-continue)"
    if isinstance(exc, e.NoMoreData):
        return 400, "the request ended before its body was complete"
    if isinstance(exc, e.ParseException):
        return 400, f"the request is malformed: {quoted(str(exc))}"
    return 500, "internal error in poolkeeper; see its logs"


class _Buffered(Unreader):
    """gunicorn's parser input over bytes already received: it never touches the socket."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__()
        self.buf.write(data)

    def chunk(self, size_hint: int | None = None) -> bytes:
        return b""


class _Connection(gthread.TConn):
    """A client connection and what the poller knows of the request it is sending."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)  # non-blocking from here on
        self.state = _HELLO
        self.until = 0.0  # limit of the handshake, the idle wait or the linger
        self.timer_at: float | None = None  # when its one live timer fires
        self.events = 0  # what the poller watches for
        self.callback: Any = None  # the poller's callback for it
        self.inbuf = bytearray()  # received, not yet handed to a thread
        self.inflight = 0  # bytes of the request a thread has
        self.served = 0
        self.paused = False
        self.linger_left = 0
        self.linger_idle = 0.0
        self.last_data = 0.0
        self.new_request()

    def new_request(self) -> None:
        self.started = 0.0  # the request's first byte
        self.scanned = 0  # inbuf[:scanned] searched for the end of the head
        self.line_seen = False  # the request line has ended
        self.request: Any = None  # gunicorn's Request, once the head is parsed
        self.head_done = 0.0
        self.body_start = 0
        self.length = 0  # Content-Length
        self.chunked = False
        self.chunk_phase, self.chunk_pos, self.chunk_left, self.chunk_total = _SIZE, 0, 0, 0
        self.failure: BaseException | None = None  # what the thread answers instead
        self.drain = False


class ThreadWorker(gthread.ThreadWorker):

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live: set[_Connection] = set()
        # Timers: a heap of (when, n, connection), at most one live entry per connection (the
        # one at its timer_at); a timer that fires early for the state since entered is set again.
        self._timers: list = []
        self._tick = itertools.count()
        self._ready: deque[_Connection] = deque()  # to read again without waiting for the poller
        self._paused: deque[_Connection] = deque()
        self._buffered = 0
        self._budget = buffer_budget(self.cfg.threads)
        self._over_budget = False
        self._at_cap = False
        self._accept_after = 0.0  # stepping aside from the listener until then (monotonic)
        self._accepted: deque[float] = deque()  # when it accepted, within ACCEPT_WINDOW

    # -- the poller's loop (gthread's run() calls these) ------------------------------------

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._ready:
            timeout = 0
        else:
            now = time.monotonic()
            if self._timers:
                timeout = max(0.0, min(timeout, self._timers[0][0] - now))
            if not self._accepting and self._accept_after > now:
                timeout = min(timeout, self._accept_after - now)
        super().wait_for_and_dispatch_events(timeout)
        for _ in range(len(self._ready)):
            self._advance(self._ready.popleft())
        self._expire(time.monotonic())

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and not self._accepting and time.monotonic() < self._accept_after:
            return  # stepping aside after an accept (accept())
        if not enabled and self.alive and self.nr_conns >= self.worker_connections:
            if not self._at_cap:
                self._at_cap = True
                log.warning("worker %s holds %d connections, its cap (worker_connections): new "
                            "connections wait for another worker or for one to close",
                            self.pid, self.nr_conns)
        elif enabled and self._at_cap:
            self._at_cap = False
            log.info("worker %s is below its cap of %d connections, accepting connections "
                     "again", self.pid, self.worker_connections)
        super().set_accept_enabled(enabled)

    def accept(self, listener: socket.socket) -> None:
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        if self.cfg.workers > 1:
            # Left alone, the worker awake in its poller takes nearly every connection of a
            # burst before the others wake (32 of 32 in a test), and serves them on one core.
            now = time.monotonic()
            self._accepted.append(now)
            while self._accepted[0] < now - ACCEPT_WINDOW:
                self._accepted.popleft()
            self._accept_after = now + min(ACCEPT_STEP * len(self._accepted), ACCEPT_STEP_MAX)
            self.set_accept_enabled(False)
        conn = _Connection(self.cfg, sock, client, listener.getsockname())
        conn.callback = partial(self._on_event, conn)
        self._live.add(conn)
        if self.cfg.is_ssl:
            self._enter(conn, _HELLO, self._idle_limit())
            self._watch(conn, EVENT_READ)
        else:
            self._idle(conn)

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        if force:
            for conn in list(self._live):
                self._close(conn)

    def _cap_keepalive(self, deadline: float) -> None:
        # On stop, connections that wait for a request (the API server's idle spares) get a
        # short linger instead of their keepalive time, as gunicorn does with kept-alive ones.
        super()._cap_keepalive(deadline)
        for conn in self._live:
            if conn.state in (_HELLO, _IDLE) and conn.until > deadline:
                conn.until = deadline
                self._schedule(conn)

    # -- connection states --------------------------------------------------------------------

    def _idle_limit(self) -> float:
        now = time.monotonic()
        limit = now + float(self.cfg.keepalive)
        return limit if self.alive else min(limit, now + gthread.STOP_KEEPALIVE_LINGER)

    def _enter(self, conn: _Connection, state: int, until: float | None = None) -> None:
        conn.state = state
        if until is not None:
            conn.until = until
        self._schedule(conn)

    def _limit(self, conn: _Connection) -> float | None:
        """When the connection's current state runs out of time (None: no limit)."""
        if conn.state == _READING:
            return self._reading_limit(conn)
        if conn.state == _LINGER:
            return min(conn.until, conn.last_data + conn.linger_idle)
        if conn.state in (_HELLO, _HANDSHAKE, _IDLE):
            return conn.until
        return None  # a thread has it, or it is closed

    def _schedule(self, conn: _Connection) -> None:
        limit = self._limit(conn)
        if limit is not None and (conn.timer_at is None or limit < conn.timer_at):
            conn.timer_at = limit
            heapq.heappush(self._timers, (limit, next(self._tick), conn))

    def _expire(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            when, _, conn = heapq.heappop(self._timers)
            if when != conn.timer_at:
                continue  # superseded by an earlier one
            conn.timer_at = None
            limit = self._limit(conn)
            if limit is None:
                continue
            if now < limit:
                self._schedule(conn)
                continue
            try:
                self._time_out(conn)
            except Exception:  # a bug: lose the connection, not the worker
                log.exception("error on the connection from %s", _peer(conn))
                self._close(conn)

    def _time_out(self, conn: _Connection) -> None:
        if conn.state == _READING:
            if conn.request is None:
                what = f"its request line and headers within {HEAD_TIMEOUT:g} s"
            else:
                what = (f"its body ({len(conn.inbuf) - conn.body_start} bytes so far) within "
                        f"{REQUEST_TIMEOUT:g} s, or at {MIN_BODY_RATE // 1024} KiB/s")
            log.info("closed the connection from %s: it did not send %s", _peer(conn), what)
        elif conn.state == _HANDSHAKE:
            log.info("closed the connection from %s: its TLS handshake did not finish within "
                     "%g s", _peer(conn), HANDSHAKE_TIMEOUT)
        self._close(conn)

    def _reading_limit(self, conn: _Connection) -> float:
        if conn.request is None:
            return conn.started + HEAD_TIMEOUT
        received = len(conn.inbuf) - conn.body_start
        return min(conn.started + REQUEST_TIMEOUT,
                   conn.head_done + BODY_GRACE + received / MIN_BODY_RATE)

    def _watch(self, conn: _Connection, events: int) -> None:
        if events == conn.events:
            return
        if not conn.events:
            self.poller.register(conn.sock, events, conn.callback)
        elif not events:
            self.poller.unregister(conn.sock)
        else:
            self.poller.modify(conn.sock, events, conn.callback)
        conn.events = events

    def _on_event(self, conn: _Connection, _fileobj: object) -> None:
        self._advance(conn)

    def _advance(self, conn: _Connection) -> None:
        try:
            if conn.state == _HELLO:
                self._start_tls(conn)
            elif conn.state == _HANDSHAKE:
                self._handshake(conn)
            elif conn.state in (_IDLE, _READING):
                self._read(conn)
            elif conn.state == _LINGER:
                self._discard(conn)
        except Exception:  # a bug: lose the connection, not the worker
            log.exception("error on the connection from %s", _peer(conn))
            self._close(conn)

    def _start_tls(self, conn: _Connection) -> None:
        self._watch(conn, 0)  # the SSLSocket that takes over the descriptor registers anew
        try:
            conn.sock = gsock.ssl_context(self.cfg).wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False,
                suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
        except (OSError, ValueError) as e:
            log.debug("TLS with %s failed: %s", _peer(conn), e)
            self._close(conn)
            return
        self._enter(conn, _HANDSHAKE, time.monotonic() + HANDSHAKE_TIMEOUT)
        self._handshake(conn)

    def _handshake(self, conn: _Connection) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, EVENT_WRITE)
            return
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            # A client that hung up (a TCP probe, a scanner) is routine; a refused protocol or
            # an unknown CA (a caBundle that does not match) is worth a line at INFO.
            quiet = isinstance(e, (ssl.SSLEOFError, ConnectionError))
            (log.debug if quiet else log.info)("TLS handshake with %s failed: %s",
                                               _peer(conn), e)
            self._close(conn)
            return
        self._idle(conn)
        self._read(conn)  # the request may have come with the client's Finished

    def _idle(self, conn: _Connection) -> None:
        self._enter(conn, _IDLE, self._idle_limit())
        self._watch(conn, EVENT_READ)

    def _read(self, conn: _Connection) -> None:
        burst = 0
        while True:
            if (self._buffered > self._budget and len(conn.inbuf) > PAUSE_ABOVE
                    and conn.state == _READING):
                self._pause(conn)
                return
            try:
                data = conn.sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError,
                    InterruptedError):
                break
            except (OSError, ValueError) as e:
                log.debug("connection from %s lost: %s", _peer(conn), e)
                self._close(conn)
                return
            if not data:
                if conn.state == _READING:
                    log.debug("the client %s hung up before its request was complete",
                              _peer(conn))
                self._close(conn)
                return
            if conn.state == _IDLE:
                conn.started = time.monotonic()
                self._enter(conn, _READING, conn.started + HEAD_TIMEOUT)
            conn.inbuf += data
            self._buffered += len(data)
            if self._frame(conn):
                return
            burst += len(data)
            if burst >= READ_BURST:
                self._ready.append(conn)
                break
        self._watch(conn, EVENT_READ)

    def _pause(self, conn: _Connection) -> None:
        self._watch(conn, 0)
        conn.paused = True
        self._paused.append(conn)
        if not self._over_budget:
            self._over_budget = True
            log.warning("worker %s buffers %d bytes of requests not yet complete, its budget: "
                        "reading paused on connections holding more than %d bytes",
                        self.pid, self._buffered, PAUSE_ABOVE)

    def _release(self, nbytes: int) -> None:
        self._buffered -= nbytes
        if self._buffered <= self._budget:
            self._over_budget = False
            while self._paused and self._buffered <= self._budget:
                conn = self._paused.popleft()
                if conn.paused:
                    conn.paused = False
                    if conn.state == _READING:
                        self._ready.append(conn)

    # -- framing: is the request in conn.inbuf complete? -------------------------------------

    def _frame(self, conn: _Connection) -> bool:
        """Hand the request to a thread once it is complete (or refused); True if it was."""
        if conn.request is None and not self._parse_head(conn):
            return False
        if conn.failure is None:
            if conn.chunked:
                end = self._scan_chunks(conn)
            else:
                end = conn.body_start + conn.length
                if len(conn.inbuf) < end:
                    end = None
            if end is None:
                return False  # the timer set for the head follows the body's progress
        else:
            end = len(conn.inbuf)
        self._dispatch(conn, end)
        return True

    def _parse_head(self, conn: _Connection) -> bool:
        """Parse the head once it has ended (or cannot be valid); True once it is parsed or
        refused."""
        buf = conn.inbuf
        start, conn.scanned = conn.scanned, len(buf)
        end = buf.find(b"\r\n\r\n", max(0, start - 3))
        if end >= 0:
            data = bytes(buf[:end + 4])
        else:
            # Not ended: parse now only if gunicorn would refuse it already, so the client gets
            # its 400 or 413 instead of waiting for the deadline.
            suspect = len(buf) > HEAD_LIMIT
            lf = buf.find(b"\n", start)
            while lf >= 0 and not suspect:
                suspect = lf == 0 or buf[lf - 1] != 13  # a bare LF
                lf = buf.find(b"\n", lf + 1)
            if not conn.line_seen:
                conn.line_seen = buf.find(b"\r\n", max(0, start - 1)) >= 0
                line_limit = self.cfg.limit_request_line
                suspect = suspect or (not conn.line_seen and 0 < line_limit < len(buf) - 2)
            if not suspect:
                return False
            data = bytes(buf)
        unreader = _Buffered(data)
        try:
            request = Request(self.cfg, unreader, conn.client, conn.served + 1)
        except (http_errors.NoMoreData, StopIteration):
            if end < 0 and len(buf) <= HEAD_LIMIT:
                return False  # not wrong yet: wait for the rest of the head
            conn.failure = (Refusal(400, "the request line and headers are malformed")
                            if end >= 0 else
                            Refusal(413, f"the request line and headers are longer than "
                                         f"{HEAD_LIMIT} bytes"))
            return True
        except http_errors.ParseException as e:
            conn.failure = e
            return True
        conn.body_start = len(data) - len(unreader.take_buffered())
        if conn.body_start > HEAD_LIMIT:
            conn.failure = Refusal(413, f"the request line and headers are longer than "
                                        f"{HEAD_LIMIT} bytes")
            return True
        conn.request = request
        conn.head_done = time.monotonic()
        reader = request.body.reader
        if isinstance(reader, LengthReader):
            conn.length = reader.length
            if conn.length > MAX_BODY_BYTES:
                conn.failure, conn.drain = too_large(conn.length), True
                return True
        else:  # ChunkedReader: the only other reader gunicorn gives a request
            conn.chunked = True
            conn.chunk_pos = conn.body_start
        if request._expected_100_continue:
            # The client waits for this before it sends the body; the thread must not send it
            # again once the body is here.
            request._expected_100_continue = False
            if len(conn.inbuf) == conn.body_start and (conn.chunked or conn.length):
                try:
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except (ssl.SSLWantWriteError, BlockingIOError):
                    pass  # a full send buffer: the client sends the body after its own timeout
        self._schedule(conn)  # the body's limit may come before the head's
        return True

    def _scan_chunks(self, conn: _Connection) -> int | None:
        """Where the chunked body in conn.inbuf ends, None while it is incomplete. Sets
        conn.failure (and returns the buffer's end) when it is malformed or too large."""
        buf = conn.inbuf
        line_limit = conn.request.limit_request_field_size or 8190  # as gunicorn's reader
        while True:
            pos = conn.chunk_pos
            if conn.chunk_phase == _SIZE:
                end = buf.find(b"\r\n", pos, pos + line_limit + 2)
                if end < 0:
                    if len(buf) - pos <= line_limit + 1:
                        return None
                    conn.failure = Refusal(400, "the chunked body is malformed: a chunk size "
                                                f"line is longer than {line_limit} bytes")
                    return len(buf)
                size = bytes(buf[pos:end]).split(b";", 1)[0].rstrip(b" \t")
                if not size or size.translate(None, _HEX):
                    conn.failure = http_errors.InvalidChunkSize(size)
                    return len(buf)
                conn.chunk_pos, conn.chunk_left = end + 2, int(size, 16)
                if not conn.chunk_left:
                    conn.chunk_phase, conn.chunk_left = _TRAILERS, conn.chunk_pos
                    continue
                conn.chunk_total += conn.chunk_left
                if conn.chunk_total > MAX_BODY_BYTES:
                    conn.failure, conn.drain = too_large(None), True
                    return len(buf)
                conn.chunk_phase = _DATA
            elif conn.chunk_phase == _DATA:
                end = pos + conn.chunk_left
                if len(buf) < end + 2:
                    return None
                if buf[end:end + 2] != b"\r\n":
                    conn.failure = http_errors.ChunkMissingTerminator(bytes(buf[end:end + 2]))
                    return len(buf)
                conn.chunk_pos, conn.chunk_phase = end + 2, _SIZE
            else:
                if len(buf) - pos < 2:
                    return None
                if buf[pos:pos + 2] == b"\r\n":
                    return pos + 2
                # chunk_left: how far the trailers were searched for their end
                end = buf.find(b"\r\n\r\n", max(pos, conn.chunk_left - 3))
                if end >= 0:
                    return end + 4
                conn.chunk_left = len(buf)
                if len(buf) - pos > HEAD_LIMIT:
                    conn.failure = Refusal(413, f"the trailers are longer than {HEAD_LIMIT} "
                                                "bytes")
                    return len(buf)
                return None

    def _dispatch(self, conn: _Connection, end: int) -> None:
        request = conn.request
        if conn.failure is None:
            with memoryview(conn.inbuf) as view:
                request.unreader.unread(bytes(view[conn.body_start:end]))
        del conn.inbuf[:end]
        conn.inflight = end
        self._enter(conn, _BUSY)
        self._watch(conn, 0)
        self.enqueue_req(conn)

    def finish_request(self, conn: _Connection, fs: Future[Any]) -> None:
        self._release(conn.inflight)
        conn.inflight = 0
        try:
            result = fs.result() if not fs.cancelled() else False
        except BaseException:
            result = False
        if conn.state == _CLOSED:  # closed by a stop meanwhile
            return
        try:
            conn.sock.setblocking(False)
        except OSError:
            result = False
        if result is True:
            conn.served += 1
            conn.new_request()
            if conn.inbuf:  # the client sent its next request already (pipelining)
                conn.started = time.monotonic()
                self._enter(conn, _READING, conn.started + HEAD_TIMEOUT)
                if self._frame(conn):
                    return
                self._watch(conn, EVENT_READ)
            else:
                self._idle(conn)
            if getattr(conn.sock, "pending", None) and conn.sock.pending():
                self._ready.append(conn)  # decrypted bytes the poller cannot see
        elif result is _DRAIN:
            self._linger(conn, DRAIN_BYTES, DRAIN_SECONDS, DRAIN_IDLE)
        else:
            self._linger(conn, LINGER_BYTES, LINGER_SECONDS, LINGER_SECONDS)

    def _linger(self, conn: _Connection, max_bytes: int, seconds: float,
                idle: float) -> None:
        """Close after an answer: FIN first, then read and drop what the client still sends
        (bounded), so its last bytes do not turn into a reset that loses the answer."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)  # an SSLSocket drops its TLS state here
        except OSError:
            self._close(conn)
            return
        now = time.monotonic()
        self._buffered -= len(conn.inbuf)
        conn.inbuf = bytearray()
        conn.linger_left, conn.linger_idle, conn.last_data = max_bytes, idle, now
        self._enter(conn, _LINGER, now + seconds)
        self._watch(conn, EVENT_READ)
        self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        burst = 0
        while conn.linger_left > 0:
            try:
                data = conn.sock.recv(min(READ_SIZE, conn.linger_left))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except OSError:
                break
            if not data:
                break
            conn.linger_left -= len(data)
            conn.last_data = time.monotonic()
            burst += len(data)
            if burst >= READ_BURST:
                self._ready.append(conn)
                return
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.state == _CLOSED:
            return
        try:
            self._watch(conn, 0)
        except (OSError, KeyError, ValueError):
            pass
        self._enter(conn, _CLOSED)
        self._buffered -= len(conn.inbuf)
        conn.inbuf = bytearray()
        self._live.discard(conn)
        self.nr_conns -= 1
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- a thread: the request is complete ----------------------------------------------------

    def handle(self, conn: _Connection) -> Any:
        request = conn.request
        try:
            conn.sock.settimeout(RESPONSE_TIMEOUT)
            if conn.failure is not None:
                self._refuse(conn, conn.failure)
                return _DRAIN if conn.drain else False
            if conn.chunked:
                try:
                    body = request.body.read()
                except (http_errors.ParseException, http_errors.NoMoreData) as e:
                    self._refuse(conn, e)
                    return False
                request.body = Body(LengthReader(_Buffered(body), len(body)))
            return self.handle_request(request, conn)
        except StopIteration:  # the app failed after its answer had started
            return False
        except OSError as e:  # the client is gone, or too slow to take the answer
            log.debug("answering %s failed: %s", _peer(conn), e)
            return False
        except Exception as e:
            self.handle_error(request, conn.sock, conn.client, e)
            return False

    def _refuse(self, conn: _Connection, exc: BaseException) -> None:
        status, message = answer_for(exc, self.cfg)
        _log_refusal(conn.client, status, message)
        _send_error(conn.sock, status, message)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        # gunicorn's answer is an HTML page; here it is an AdmissionReview like every other.
        status, message = answer_for(exc, self.cfg)
        if status >= 500:
            self.log.exception("Error handling request")
        _log_refusal(addr, status, message)
        try:
            _send_error(client, status, message)
        except OSError:
            self.log.debug("Failed to send error message.")


def _send_error(sock: socket.socket, status: int, message: str) -> None:
    body = encode_review("", errored(status, message))
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    sock.sendall(head.encode("latin-1") + body)


def _log_refusal(client: Any, status: int, message: str) -> None:
    """Counted and logged as a review answered with an error, as the app does."""
    from .. import metrics  # after gunicorn's configuration set up the metrics directory

    metrics.ADMISSION_REQUESTS.labels("unknown", "unknown", "error").inc()
    if admission_log.isEnabledFor(logging.WARNING):
        admission_log.warning("review", extra={"fields": {
            "uid": "", "kind": "unknown", "operation": "unknown", "decision": "error",
            "status": status, "error": message, "client": _address(client)}})


def _address(client: Any) -> str:
    return client[0] if isinstance(client, tuple) and client else str(client or "")


def _peer(conn: _Connection) -> str:
    return _address(conn.client)
