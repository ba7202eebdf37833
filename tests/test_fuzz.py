"""Fuzz suite: generated bodies through real gunicorn over real TLS (docs/reliability.md).

Every answer to ``POST /mutate...`` must be an AdmissionReview (for errors with status.code equal
to the HTTP status), never a 5xx, and a patch must apply to the object; no worker may die, and no
traceback reach the log. The input classes main still answers wrongly (tests/fuzz.py KNOWN_BAD)
run in test_fuzz_input_class, xfail(strict=True) until fixed; raw framing errors (gunicorn's
parser) in test_fuzz_framing_error.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import time

import pytest

from app.certs import create_certificates

from . import fuzz
from .server import Server, start_server
from .support import TESTDATA

THREADS = 8  # client threads, as many as the server's 2 workers x 4 threads
HYPOTHESIS_EXAMPLES = 500  # x10 with --long


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cert_dir = tmp_path_factory.mktemp("certs")
    create_certificates(cert_dir, "poolkeeper", "poolkeeper-system")
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(cert_dir, log, "--namespaces", str(TESTDATA / "namespaces.yaml"),
                       workers=2, threads=4)
    srv.wait_for_workers(2)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    c = fuzz.Client(server.port, server.tls_context())
    yield c
    c.close()


class LogWindow:
    """What the server logs from now on."""

    def __init__(self, server: Server):
        self.path = server.log_path
        self.offset = self.path.stat().st_size

    def lines(self) -> list[bytes]:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            return log.read().splitlines()


def assert_still_serving(server: Server, client: fuzz.Client, workers: set[int],
                         log: LogWindow) -> None:
    """A correct review is patched as before, by the same workers, nothing logged a traceback,
    and (unless echo-amplification is known bad) no log line is longer than the echo bound."""
    review = (TESTDATA / "reviews/pod-create-deployment.json").read_bytes()
    answer = client.send(fuzz.Case("correct", review, "/mutate/placement"))
    assert answer.status == 200, answer
    ops = json.loads(base64.b64decode(json.loads(answer.body)["response"]["patch"]))
    assert ops == [{"op": "add", "path": "/spec/nodeSelector", "value": {"agentpool": "pool1"}}]
    assert server.worker_pids() == workers, "a worker died (or was restarted)"
    lines = log.lines()
    tracebacks = [line[:300] for line in lines if b"Traceback" in line]
    assert not tracebacks, tracebacks[:3]
    if "echo-amplification" not in fuzz.KNOWN_BAD:
        longest = max((len(line) for line in lines), default=0)
        assert longest <= fuzz.ECHO_BOUND, f"a log line of {longest} bytes"


def check(echo: bool):
    return lambda case, answer: fuzz.problems_of(case, answer, echo_bound=echo)


def report(title: str, tally: fuzz.Tally, client: fuzz.Client, figures) -> None:
    aside = ", ".join(f"{cls}={n}" for cls, n in sorted(tally.by_class.items()))
    figures(f"{title}: {tally.posted} bodies in {tally.seconds:.1f} s: {tally.statuses()}; "
            f"{tally.failure_count} failures; {client.reconnects} retried on a new connection; "
            f"slowest answer {tally.slowest[0]:.2f} s ({tally.slowest[1][:60]}); "
            f"set aside (known bad): {aside or 'none'}")


# With --long on a loaded machine these run for minutes: more than the default 300 s timeout.
LONG_TIMEOUT = pytest.mark.timeout(900)


@LONG_TIMEOUT
def test_fuzz_structured_mutations_of_real_reviews(server, client, long_run, figures):
    """Every node of real reviews replaced by other JSON types or removed, nesting 500-5,000
    deep, MiB-long strings, bytes that are not UTF-8, duplicate keys, odd kinds, operations,
    sub-resources, paths and content types: at least 10,000 bodies."""
    workers, log = server.wait_for_workers(2), LogWindow(server)
    echo = "echo-amplification" not in fuzz.KNOWN_BAD
    tally = fuzz.post_all(client, fuzz.all_structured(long_run), THREADS, check(echo),
                          keep=lambda case: case.cls not in fuzz.KNOWN_BAD)
    report("fuzz structured", tally, client, figures)
    assert not tally.failures, tally.report()
    assert tally.posted >= 10_000
    assert_still_serving(server, client, workers, log)


@LONG_TIMEOUT
def test_fuzz_hypothesis_reviews(server, client, long_run, figures):
    """Reviews drawn by hypothesis: plausible pods, DaemonSets and Namespaces with any JSON in
    any field, odd envelopes, now and then any JSON at all. Derandomized (the same bodies on
    every run) unless --long, which draws 10 times as many, afresh."""
    workers, log = server.wait_for_workers(2), LogWindow(server)
    started = time.monotonic()
    cases = fuzz.hypothesis_cases(HYPOTHESIS_EXAMPLES * (10 if long_run else 1),
                                  derandomize=not long_run)
    drawn_s = time.monotonic() - started
    echo = "echo-amplification" not in fuzz.KNOWN_BAD
    tally = fuzz.post_all(client, cases, THREADS, check(echo),
                          keep=lambda case: case.cls not in fuzz.KNOWN_BAD)
    report(f"fuzz hypothesis (drawn in {drawn_s:.1f} s)", tally, client, figures)
    assert not tally.failures, tally.report()
    assert tally.posted >= HYPOTHESIS_EXAMPLES // 2
    assert_still_serving(server, client, workers, log)


def _scrape(server: Server) -> bytes:
    with server.session() as session:  # the metrics port, plain HTTP
        return session.get(server.metrics_url, timeout=30).content


@pytest.mark.parametrize("cls", [
    pytest.param(cls, marks=pytest.mark.xfail(strict=True, reason=fuzz.KNOWN_BAD[cls]))
    if cls in fuzz.KNOWN_BAD else cls for cls in fuzz.CLASSES])
def test_fuzz_input_class(server, client, cls, long_run, figures):
    """One input class of tests/fuzz.py CLASSES, with the class's own checks."""
    workers, log = server.wait_for_workers(2), LogWindow(server)
    echo = cls == "echo-amplification" or "echo-amplification" not in fuzz.KNOWN_BAD
    before = _scrape(server) if cls == "metric-labels" else b""
    tally = fuzz.post_all(client, fuzz.class_cases(cls, long_run), THREADS, check(echo))
    report(f"fuzz class {cls}", tally, client, figures)
    assert tally.posted > 0
    assert not tally.failures, tally.report()
    if cls == "echo-amplification":  # the log lines too, while the main tests leave them out
        longest = max((len(line) for line in log.lines()), default=0)
        assert longest <= fuzz.ECHO_BOUND, f"a log line of {longest} bytes"
    if cls == "metric-labels":
        grown = len(_scrape(server)) - len(before)
        assert grown < 64 * 1024, f"the scrape grew by {grown} bytes"
    assert_still_serving(server, client, workers, log)


# -- raw framing errors: gunicorn's HTTP parser, before the app -----------------------------------

HEAD = b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
BODY = b"\r\nContent-Length: 2\r\n\r\n{}"
FRAMING: dict[str, bytes] = {
    "bad-chunk-size": CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n",
    "chunk-size-overflow": CHUNKED + b"f" * 40 + b"\r\n{}\r\n0\r\n\r\n",
    "chunk-without-crlf": CHUNKED + b"2\r\n{}XX0\r\n\r\n",
    "chunked-and-content-length": HEAD + b"Transfer-Encoding: chunked" + BODY,
    "unknown-transfer-encoding": HEAD + b"Transfer-Encoding: gzip" + BODY,
    "bad-request-line": b"GARBAGE\r\n\r\n",
    "binary-request-line": b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n",
    "request-line-without-version": b"POST /mutate\r\n\r\n",
    "bad-http-version": b"POST /mutate HTTP/9.9\r\nHost: localhost" + BODY,
    "lowercase-method": b"post /mutate HTTP/1.1\r\nHost: localhost" + BODY,
    "space-in-path": b"POST /mutate/ x HTTP/1.1\r\nHost: localhost" + BODY,
    "request-line-too-long": b"POST /mutate?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x" + BODY,
    "header-too-long": HEAD + b"X-Pad: " + b"a" * 9000 + BODY,
    "too-many-headers": HEAD + b"".join(b"X-H%d: y\r\n" % i for i in range(120)) + BODY[2:],
    "header-without-colon": HEAD + b"NoColonHere" + BODY,
    "header-name-with-space": HEAD + b"Bad Name: x" + BODY,
    "nul-in-header": HEAD + b"X-A: a\x00b" + BODY,
    "obsolete-line-folding": HEAD + b"X-A: a\r\n b" + BODY,
    "content-length-not-a-number": HEAD + b"Content-Length: abc\r\n\r\n{}",
    "content-length-negative": HEAD + b"Content-Length: -1\r\n\r\n{}",
    "content-length-with-sign": HEAD + b"Content-Length: +2\r\n\r\n{}",
    "content-length-list": HEAD + b"Content-Length: 2, 2\r\n\r\n{}",
    "content-length-twice-different": HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "content-length-shorter-than-body": HEAD + b"Content-Length: 2\r\n\r\n{}GARBAGE\r\n\r\n",
    "content-length-longer-than-body": HEAD + b"Content-Length: 100\r\n\r\n{}",
}
FRAMING_DEADLINE_S = 6.0  # the answer, or the close of a stalled connection, comes before


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP responses in what the server sent (the last one may be cut)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        if not sep or not match:
            out.append((0, {}, data))  # no HTTP response at all
            break
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode(errors="replace")
        length = int(headers.get("content-length", len(rest)))
        out.append((int(match.group(1)), headers, rest[:length]))
        data = rest[length:]
    return out


def exchange(server: Server, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` on a new TLS connection; what came back until the server closed it (or
    the deadline passed), and how long that took."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=FRAMING_DEADLINE_S)
    started = time.monotonic()
    data = b""
    with server.tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(payload)
        while time.monotonic() - started < FRAMING_DEADLINE_S:
            sock.settimeout(max(0.1, FRAMING_DEADLINE_S - (time.monotonic() - started)))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionError, ssl.SSLError):
                break
            if not chunk:
                return data, time.monotonic() - started
            data += chunk
    return data, float("inf")  # still open at the deadline


@pytest.mark.parametrize("name", FRAMING)
def test_fuzz_framing_error(server, client, name, figures):
    """A request gunicorn cannot parse gets an AdmissionReview with a 4xx status (or, for a body
    never sent, a closed connection) before the deadline, and the workers live on."""
    workers, log = server.wait_for_workers(2), LogWindow(server)
    data, seconds = exchange(server, FRAMING[name])
    responses = _responses(data)
    figures(f"fuzz framing {name}: "
            + (", ".join(f"{status} {headers.get('content-type', '-').split(';')[0]}"
                         for status, headers, _ in responses) or "no answer")
            + (f", closed after {seconds:.1f} s" if seconds != float("inf") else ", left open"))
    assert seconds <= FRAMING_DEADLINE_S, "the connection was still open at the deadline"
    if name != "content-length-longer-than-body":
        assert responses, "closed without an answer"
    for status, headers, body in responses:
        answer = fuzz.Answer(status or None, headers.get("content-type"), body,
                             error="" if status else f"not HTTP: {body[:80]!r}")
        problems = fuzz.problems_of(fuzz.Case(name, FRAMING[name]), answer, echo_bound=True)
        assert 400 <= status < 500 and not problems, (status, problems, body[:200])
    assert_still_serving(server, client, workers, log)
