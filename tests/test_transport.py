"""Component tests of the connection layer under hostile clients, through real gunicorn over real
TLS: slow clients (app/worker.py), raw HTTP framing errors, the connection cap and the TLS 1.2
cipher suites (app/tls.py). Each test prints its figures (``pytest -s``, and the "figures"
section of the run's summary)."""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import statistics
import threading
import time
from dataclasses import dataclass

import pytest

from app.config import MAX_BODY_BYTES

from .server import start_server
from .support import TESTDATA, pod, review_doc

WORKERS, THREADS = 2, 2
SLOW_PER_STYLE = 4 * WORKERS * THREADS
# The webhooks' timeoutSeconds in deploy/base/webhook.yaml: the API server gives up after it.
API_SERVER_TIMEOUT = 3.0
NORMAL_REVIEWS, NORMAL_INTERVAL = 25, 0.1  # normal reviews while the slow clients are connected
TRICKLE_INTERVAL = 0.2  # a slow client sends a little this often
# Generous bound for the server to close a slow connection (the longest limit is the TLS
# handshake's 5 s); never asserted as a figure, only as "closed at all".
CLOSE_BOUND = 20.0
IO_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def server(cert_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(cert_dir, log, "--namespaces", str(TESTDATA / "namespaces.yaml"),
                       workers=WORKERS, threads=THREADS)
    srv.wait_for_workers(WORKERS)
    yield srv
    srv.stop()


REVIEW = json.dumps(review_doc(pod(namespace="team-payments"))).encode()


def normal_request(server, context: ssl.SSLContext,
                   timeout: float = API_SERVER_TIMEOUT) -> tuple[int | None, float]:
    """One review on a new connection (a new TLS handshake, as when the API server dials), with
    the API server's timeout on every socket operation: (status or None, seconds)."""
    started = time.monotonic()
    connection = http.client.HTTPSConnection("localhost", server.port, context=context,
                                             timeout=timeout)
    try:
        connection.request("POST", "/mutate", REVIEW, {"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        status = response.status if json.loads(body)["response"]["allowed"] else None
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        status = None
    finally:
        connection.close()
    return status, time.monotonic() - started


def head(extra: bytes = b"", *, length: int | None = None, chunked: bool = False) -> bytes:
    lines = b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    if length is not None:
        lines += b"Content-Length: %d\r\n" % length
    if chunked:
        lines += b"Transfer-Encoding: chunked\r\n"
    return lines + extra + b"\r\n"


# style: (what the client sends at once after the TLS handshake, what it sends every
# TRICKLE_INTERVAL after that). "hello-byte" sends one byte of a TLS ClientHello and no more.
STYLES = {
    "slow-headers": (b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nX-Pad: ", b"a"),
    "slow-body": (head(length=65536) + b'{"pad": "', b"x" * 8),
    "body-never-sent": (head(length=4096), None),
    "chunk-never-sent": (head(chunked=True) + b"1000\r\n", None),
    "one-byte": (b"P", None),
    "hello-byte": (b"\x16", None),
}


@dataclass
class SlowConnection:
    style: str
    established: bool = False  # the TLS handshake (if any) and the first send worked
    closed_by_server: bool = False
    seconds: float = 0.0  # from the first send to the server closing the connection
    answer: bytes = b""


def slow_connection(server, context: ssl.SSLContext, style: str) -> SlowConnection:
    record = SlowConnection(style)
    first, trickle = STYLES[style]
    try:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
    except OSError:
        return record
    sock: socket.socket = raw
    try:
        if style != "hello-byte":
            sock = context.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(first)
        record.established = True
        started = time.monotonic()
        sock.setblocking(False)
        while time.monotonic() - started < CLOSE_BOUND:
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
            if pending or select.select([sock], [], [], TRICKLE_INTERVAL)[0]:
                try:
                    data = sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue  # a TLS 1.3 session ticket, no application data
                except OSError:
                    data = b""
                if not data:
                    record.closed_by_server = True
                    record.seconds = time.monotonic() - started
                    return record
                record.answer += data
            elif trickle is not None:
                try:
                    sock.send(trickle)
                except (ssl.SSLWantWriteError, BlockingIOError):
                    pass
                except OSError:
                    record.closed_by_server = True
                    record.seconds = time.monotonic() - started
                    return record
        return record
    except OSError:
        return record  # the handshake or first send failed (the server is too busy to answer)
    finally:
        sock.close()


def keep_slow_client_connected(server, context, style, stop, records) -> None:
    """A slow client that reconnects whenever the server closes it, until ``stop``; its last
    connection is left to the server to close (up to CLOSE_BOUND)."""
    while True:
        record = slow_connection(server, context, style)
        records.append(record)
        if stop.is_set():
            return
        if not record.established:
            time.sleep(TRICKLE_INTERVAL)


def seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} s median, {max(values):.2f} s max"


@pytest.mark.parametrize("style", list(STYLES))
def test_slow_clients_do_not_stall_the_server(server, style, figures):
    """4 x (workers x threads) slow clients of one style stay connected (reconnecting whenever
    the server closes them) while normal reviews arrive on new connections: every review is
    answered 200 within the API server's 3 s, every slow connection is closed by the server, and
    no worker dies. Before app/worker.py read whole requests in its poller, a connection held a
    thread from its first byte until its request was complete: 16 such clients held all threads
    of both workers and no review was answered."""
    pids = server.wait_for_workers(WORKERS)
    context = server.tls_context()
    stop = threading.Event()
    records: list[SlowConnection] = []
    clients = [threading.Thread(target=keep_slow_client_connected,
                                args=(server, context, style, stop, records), daemon=True)
               for _ in range(SLOW_PER_STYLE)]
    for client in clients:
        client.start()
    time.sleep(0.5)  # all connected and stalled
    # Reviews arrive at a steady rate whatever the server does, as from the API server.
    normal: list[tuple[int | None, float]] = []
    arrivals = []
    for _ in range(NORMAL_REVIEWS):
        arrivals.append(threading.Thread(
            target=lambda: normal.append(normal_request(server, context))))
        arrivals[-1].start()
        time.sleep(NORMAL_INTERVAL)
    for arrival in arrivals:
        arrival.join(4 * API_SERVER_TIMEOUT)
    stop.set()
    for client in clients:
        client.join(CLOSE_BOUND + 2 * IO_TIMEOUT)
    answered = [t for status, t in normal if status == 200 and t < API_SERVER_TIMEOUT]
    established = [r for r in records if r.established]
    closed = [r for r in established if r.closed_by_server]
    figures(f"slow clients, {SLOW_PER_STYLE} x {style} on {WORKERS} workers x {THREADS} threads: "
            f"reviews answered 200 within {API_SERVER_TIMEOUT:.0f} s: {len(answered)} of "
            f"{len(normal)} (latency {seconds([t for _, t in normal])}); slow connections "
            f"{len(established)} (+{len(records) - len(established)} not established), closed "
            f"by the server: {len(closed)}, after {seconds([r.seconds for r in closed])}")
    assert normal and len(answered) == len(normal), normal
    assert len(established) >= SLOW_PER_STYLE
    assert len(closed) == len(established), [r for r in established if not r.closed_by_server]
    assert not [r for r in closed if r.answer.startswith(b"HTTP/1.1 2")]
    assert server.worker_pids() == pids
    assert "Traceback" not in server.log()


def exchange(server, request: bytes, *, chunks: list[bytes] | None = None) -> bytes:
    """Send ``request`` (then ``chunks``) on a new TLS connection, read until the server closes
    it (or IO_TIMEOUT) and return everything it sent."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
    with server.tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
        try:
            sock.sendall(request)
            for chunk in chunks or ():
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed before taking everything
        answer = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except OSError:  # a timeout included
                break
            if not data:
                break
            answer += data
        return answer


def parse_answer(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


LONG = b"x" * 10000
# (case, what the client sends, the status poolkeeper answers)
FRAMING_ERRORS = [
    ("chunk size not hex", head(chunked=True) + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk not followed by CRLF", head(chunked=True) + b"5\r\nhelloXX0\r\n\r\n", 400),
    ("chunk extension invalid", head(chunked=True) + b"5;a=\"\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk size line too long", head(chunked=True) + b"1" * 9000 + b"\r\n", 400),
    ("chunked body over 7 MiB", head(chunked=True) + b"ffffffff\r\n" + b"x" * 100, 413),
    ("request line garbage", b"GARBAGE\r\n\r\n", 400),
    ("method invalid", b"P@ST /mutate HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    ("HTTP version unknown", b"POST /mutate HTTP/3.7\r\nHost: localhost\r\n\r\n", 400),
    ("bare LF line ends", b"POST /mutate HTTP/1.1\nHost: localhost\n\n", 400),
    ("header without colon", head(b"X-Nothing\r\n", length=2) + b"{}", 400),
    ("header name invalid", head(b"Bad Name: x\r\n", length=2) + b"{}", 400),
    ("header value with NUL", head(b"X-Nul: a\x00b\r\n", length=2) + b"{}", 400),
    ("header folded", head(b"X-Folded: a\r\n b\r\n", length=2) + b"{}", 400),
    ("header too long", head(b"X-Long: " + LONG + b"\r\n", length=2) + b"{}", 413),
    ("request line too long", b"POST /mutate?" + LONG + b" HTTP/1.1\r\n\r\n", 413),
    ("too many headers", head(b"".join(b"X-%d: y\r\n" % i for i in range(120)), length=2)
     + b"{}", 413),
    ("head over 64 KiB", head(b"".join(b"X-%d: %s\r\n" % (i, b"y" * 4000) for i in range(20))),
     413),
    ("Content-Length not a number", head(b"Content-Length: abc\r\n"), 400),
    ("Content-Length negative", head(b"Content-Length: -1\r\n"), 400),
    ("Content-Length twice", head(b"Content-Length: 2\r\nContent-Length: 3\r\n") + b"{}", 400),
    ("Content-Length and chunked", head(b"Content-Length: 2\r\n", chunked=True) + b"{}", 400),
    ("Content-Length over 7 MiB", head(length=MAX_BODY_BYTES + 1), 413),
    ("transfer coding unknown", head(b"Transfer-Encoding: gzip2\r\n"), 400),
    ("transfer coding not chunked", head(b"Transfer-Encoding: identity\r\n"), 400),
    ("Expect unknown", head(b"Expect: tea\r\n", length=2) + b"{}", 400),
]


@pytest.fixture(scope="module")
def framing_answers(server):
    """Every framing error sent once; the worker pids before and after."""
    before = server.wait_for_workers(WORKERS)
    answers = {case: exchange(server, request) for case, request, _ in FRAMING_ERRORS}
    return before, answers


@pytest.mark.parametrize("case,request_bytes,status", FRAMING_ERRORS,
                         ids=[case for case, _, _ in FRAMING_ERRORS])
def test_framing_error_gets_an_admission_review_error(framing_answers, case, request_bytes,
                                                     status):
    """gunicorn's own answers to framing errors are HTML (and a bad chunk, read inside the app,
    was Flask's HTML 500); each is an AdmissionReview error with a 4xx status here."""
    answer = framing_answers[1][case]
    assert answer, "no answer"
    code, headers, body = parse_answer(answer)
    assert (code, headers.get("content-type")) == (status, "application/json"), answer[:300]
    review = json.loads(body)
    assert review["apiVersion"] == "admission.k8s.io/v1" and review["kind"] == "AdmissionReview"
    assert review["response"]["allowed"] is False
    assert review["response"]["status"]["code"] == code and review["response"]["status"]["message"]
    assert headers.get("connection") == "close"
    assert len(review["response"]["status"]["message"]) < 300, "user values are truncated"


def test_framing_errors_leave_the_workers_serving(server, framing_answers, figures):
    before, answers = framing_answers
    statuses: dict[str, int] = {}
    for answer in answers.values():
        key = str(parse_answer(answer)[0]) if answer else "none"
        statuses[key] = statuses.get(key, 0) + 1
    with server.session() as session:
        response = session.post(server.url + "/mutate", data=REVIEW,
                                headers={"Content-Type": "application/json"}, timeout=IO_TIMEOUT)
    assert response.status_code == 200
    figures(f"framing errors: {len(answers)} cases, answers by status "
            f"{dict(sorted(statuses.items()))}; worker pids unchanged: "
            f"{server.worker_pids() == before}; a review afterwards: {response.status_code}")
    assert server.worker_pids() == before
    assert "Traceback" not in server.log()


def test_a_chunked_review_is_served(server):
    """The chunked framing that is valid goes through, with extensions and trailers."""
    body = REVIEW
    chunks = [b"%x;ext=1\r\n%s\r\n" % (len(body[:100]), body[:100]),
              b"%x\r\n%s\r\n" % (len(body[100:]), body[100:]), b"0\r\nX-Trailer: t\r\n\r\n"]
    answer = exchange(server, head(b"Connection: close\r\n", chunked=True), chunks=chunks)
    code, headers, response = parse_answer(answer)
    assert code == 200 and json.loads(response)["response"]["allowed"] is True


def test_pipelined_reviews_are_answered_in_order(server):
    requests = b""
    for i in range(3):
        body = json.dumps(review_doc(pod(namespace="team-payments"), uid=f"pipelined-{i}")).encode()
        requests += head(b"Connection: close\r\n" if i == 2 else b"", length=len(body)) + body
    answer = exchange(server, requests)
    uids = []
    while answer:
        code, headers, rest = parse_answer(answer)
        length = int(headers["content-length"])
        assert code == 200
        uids.append(json.loads(rest[:length])["response"]["uid"])
        answer = rest[length:]
    assert uids == ["pipelined-0", "pipelined-1", "pipelined-2"]


def test_expect_100_continue_gets_its_interim_answer(server):
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
    with server.tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(head(b"Expect: 100-continue\r\n", length=len(REVIEW)))
        interim = sock.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(REVIEW)
        answer = b""
        while b"\r\n\r\n" not in answer or len(parse_answer(answer)[2]) < int(
                parse_answer(answer)[1].get("content-length", "1000000")):
            data = sock.recv(65536)
            assert data, answer
            answer += data
        assert parse_answer(answer)[0] == 200 and b"100 Continue" not in answer


def test_connection_cap_is_logged_and_served_after(tmp_path, cert_dir, figures):
    """A worker holds at most worker_connections connections; at the cap it says so in its log,
    a new connection waits, and it is served once the others close."""
    cap = 6
    srv = start_server(cert_dir, tmp_path / "server.log", "--namespaces",
                       str(TESTDATA / "namespaces.yaml"), workers=1, threads=1,
                       env={"GUNICORN_CMD_ARGS": f"--worker-connections {cap}"})
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
                for _ in range(cap)]
        deadline = time.monotonic() + IO_TIMEOUT
        while "connections, its cap" not in srv.log():
            assert time.monotonic() < deadline, "reaching the cap was not logged"
            time.sleep(0.1)
        waiting = threading.Thread(target=lambda: results.append(
            normal_request(srv, srv.tls_context(), timeout=IO_TIMEOUT)))
        results: list[tuple[int | None, float]] = []
        waiting.start()
        time.sleep(1.0)
        assert not results, "a connection past the cap was served"
        for sock in idle:
            sock.close()
        waiting.join(IO_TIMEOUT)
        figures(f"connection cap {cap}: logged at the cap, a review past it waited, then was "
                f"answered {results[0][0]} once the idle connections closed")
        assert results and results[0][0] == 200
        deadline = time.monotonic() + IO_TIMEOUT
        while "accepting connections again" not in srv.log():
            assert time.monotonic() < deadline, "leaving the cap was not logged"
            time.sleep(0.1)
    finally:
        for sock in idle:
            sock.close()
        srv.stop()


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])


def test_large_slow_bodies_pause_reading_instead_of_filling_memory(tmp_path, cert_dir,
                                                                    figures):
    """Requests not yet complete are buffered by the poller, up to a budget per worker (threads x
    the largest request): clients that each send 5 MiB of an announced 7 MiB body and stall make
    the worker pause reading them, a review is still answered, and the stalled ones are closed."""
    srv = start_server(cert_dir, tmp_path / "server.log", "--namespaces",
                       str(TESTDATA / "namespaces.yaml"), workers=1, threads=1)
    (pid,) = srv.wait_for_workers(1)
    before = peak_rss_kib(pid)
    part = b"x" * (5 * 1024 * 1024)
    closed: list[float] = []

    def stall() -> None:
        started = time.monotonic()
        try:
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT)
            with srv.tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(head(length=MAX_BODY_BYTES - 1) + part)
                while sock.recv(65536):
                    pass
        except OSError:
            pass  # the server closed it while the client was still sending
        closed.append(time.monotonic() - started)

    stalled = [threading.Thread(target=stall) for _ in range(6)]
    try:
        for client in stalled:
            client.start()
        deadline = time.monotonic() + IO_TIMEOUT
        while "its budget: reading paused" not in srv.log():
            assert time.monotonic() < deadline, "the worker never paused reading"
            time.sleep(0.05)
        status, seconds_taken = normal_request(srv, srv.tls_context())
        for client in stalled:
            client.join(CLOSE_BOUND)
        after = peak_rss_kib(pid)
    finally:
        srv.stop()
    figures(f"6 stalled bodies of 5 MiB, 1 worker x 1 thread (budget 2 x 7 MiB): reading paused, "
            f"a review answered {status} in {seconds_taken * 1000:.0f} ms, stalled connections "
            f"closed after {seconds(closed)}; worker peak RSS {before // 1024} MiB -> "
            f"{after // 1024} MiB")
    assert status == 200 and seconds_taken < API_SERVER_TIMEOUT
    assert len(closed) == 6
    assert "Traceback" not in srv.log()


# TLS 1.2 suites that are not ECDHE with an AEAD cipher; the serving key is ECDSA, so only the
# ECDSA ones could be negotiated at all.
REFUSED_SUITES = ["AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256",
                  "ECDHE-RSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA"]
ACCEPTED_SUITES = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                   "ECDHE-ECDSA-CHACHA20-POLY1305"]


def tls12_handshake(server, suite: str) -> str | None:
    """The suite negotiated over TLS 1.2 offering only ``suite``, or None when refused."""
    context = server.tls_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            return sock.cipher()[0]
    except ssl.SSLError:
        return None
    finally:
        raw.close()


def test_tls12_offers_only_ecdhe_aead_suites(server, figures):
    refused = {suite: tls12_handshake(server, suite) for suite in REFUSED_SUITES}
    accepted = {suite: tls12_handshake(server, suite) for suite in ACCEPTED_SUITES}
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT) as raw:
        with server.tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
            tls13 = (sock.version(), sock.cipher()[0])
    figures(f"TLS 1.2 suites: refused {sorted(s for s, got in refused.items() if got is None)}, "
            f"accepted {sorted(s for s, got in accepted.items() if got)}; default: {tls13}")
    assert refused == dict.fromkeys(REFUSED_SUITES)
    assert accepted == {suite: suite for suite in ACCEPTED_SUITES}
    assert tls13[0] == "TLSv1.3"
