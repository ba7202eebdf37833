"""Owns the printed results: the tables, the ratios of one run and the targets read from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("floor", "decode", "poolkeeper", "opa")
CONCURRENCY = (1, 8, 32)


@dataclass
class HttpRow:
    variant: str
    concurrency: int
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    cpu_ms: float | None = None  # server CPU (master + workers) per request
    client_cpu_ms: float | None = None
    errors: int | None = None
    requests: int = 0
    note: str = ""


@dataclass
class Results:
    header: list[str] = field(default_factory=list)
    http: list[HttpRow] = field(default_factory=list)
    http_note: str = ""
    micro: list[Any] = field(default_factory=list)
    micro_note: str = ""
    apiserver: dict[int, list[Any]] = field(default_factory=dict)  # creators -> cases
    apiserver_note: str = ""
    scale: list[Any] = field(default_factory=list)
    scale_note: str = ""
    notes: list[str] = field(default_factory=list)

    def http_row(self, variant: str, concurrency: int) -> HttpRow | None:
        return next((r for r in self.http if r.variant == variant and
                     r.concurrency == concurrency), None)


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    right = [i > 0 for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if right[i] and i > 0 else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if right[i] else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return [line(headers), sep, *(line(r) for r in rows)]


def render(results: Results) -> str:
    out: list[str] = []
    out += results.header
    out.append("")
    out += _render_http(results)
    out += _render_micro(results)
    out += _render_apiserver(results)
    out += _render_scale(results)
    out += _render_targets(results)
    if results.notes:
        out.append("")
        out += [f"- {n}" for n in results.notes]
    return "\n".join(out) + "\n"


def _render_http(results: Results) -> list[str]:
    out = ["### Served over TLS: same load against each server", ""]
    if results.http_note:
        out += [results.http_note, ""]
    rows = []
    for c in CONCURRENCY:
        for variant in VARIANTS:
            r = results.http_row(variant, c)
            if r is None:
                continue
            rows.append([variant, str(c), fmt(r.rps, 0), fmt(r.p50_ms), fmt(r.p99_ms),
                         fmt(r.max_ms), fmt(r.cpu_ms, 3), fmt(r.errors)])
    out += table(["server", "c", "req/s", "p50 ms", "p99 ms", "max ms", "CPU ms/req", "errors"],
                 rows)
    out.append("")
    ratio_rows = []
    for other in ("floor", "decode", "opa"):
        for what, attr in (("req/s", "rps"), ("p99", "p99_ms"), ("CPU/req", "cpu_ms")):
            cells = [f"poolkeeper/{other} {what}"]
            for c in CONCURRENCY:
                mine, theirs = results.http_row("poolkeeper", c), results.http_row(other, c)
                cells.append(fmt(ratio(getattr(mine, attr, None) if mine else None,
                                       getattr(theirs, attr, None) if theirs else None)))
            ratio_rows.append(cells)
    out += table(["ratio (same run)", *(f"c={c}" for c in CONCURRENCY)], ratio_rows)
    out.append("")
    return out


def _render_micro(results: Results) -> list[str]:
    out = ["### Pure decision, in-process (no HTTP)", ""]
    if results.micro_note:
        out += [results.micro_note, ""]
    by_key = {r.key: r for r in results.micro}
    out += table(["what", "µs/request"], [[r.label, fmt(r.us, 1)] for r in results.micro])
    out.append("")
    opa = by_key.get("opa_raw")
    rows = []
    for key, label in (("admit_all", "admit(), all rules / OPA eval"),
                       ("admit_pool", "admit(), pool rule / OPA eval"),
                       ("handler", "decode+admit+encode / OPA eval")):
        mine = by_key.get(key)
        rows.append([label, fmt(ratio(mine.us if mine else None, opa.us if opa else None), 3)])
    out += table(["ratio (same run)", "value"], rows)
    out.append("")
    return out


def _render_apiserver(results: Results) -> list[str]:
    out = ["### Through a real API server (miniapiserver): pod creations", ""]
    if results.apiserver_note:
        out += [results.apiserver_note, ""]
    rows = []
    for creators, cases in sorted(results.apiserver.items(), reverse=True):
        base = next((c for c in cases if c.key == "none"), None)
        for case in cases:
            added50 = added99 = None
            if base is not None and case is not base:
                added50 = _minus(case.p50_ms, base.p50_ms)
                added99 = _minus(case.p99_ms, base.p99_ms)
            calls = getattr(case, "calls_per_pod", None)
            rows.append([case.label, str(creators), fmt(case.count), fmt(case.p50_ms),
                         fmt(case.p99_ms), "-" if case is base else fmt(added50),
                         "-" if case is base else fmt(added99), fmt(case.cpu_ms, 2),
                         "-" if calls is None else fmt(calls), fmt(case.errors)])
    out += table(["admission", "creators", "pods", "p50 ms", "p99 ms", "added p50 ms",
                  "added p99 ms", "CPU ms/pod", "webhook calls/pod", "errors"], rows)
    out.append("")
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _render_scale(results: Results) -> list[str]:
    out = ["### Scale: namespaces in the cache", ""]
    if results.scale_note:
        out += [results.scale_note, ""]
    rows = [[f"{r.count:,}", fmt(r.decision_us, 1), fmt(r.warm_ms, 1), fmt(r.rss_mib, 1),
             fmt(r.cache_mib, 1)] for r in results.scale]
    out += table(["namespaces", "decision µs", "warm-up ms", "RSS MiB", "cache MiB"], rows)
    out.append("")
    return out


def _case(results: Results, creators: int, key: str) -> Any:
    return next((c for c in results.apiserver.get(creators) or [] if c.key == key), None)


def _added_p50(results: Results, creators: int, key: str) -> float | None:
    base, case = _case(results, creators, "none"), _case(results, creators, key)
    return _minus(case.p50_ms if case else None, base.p50_ms if base else None)


def targets(results: Results) -> list[tuple[str, str, float | None, str, bool | None]]:
    """(issue, target, value, shown as, met?) for each target: issue 13's, then those of
    issue 5 that still stand (its served and API-server targets are issue 13's now)."""
    found: list[tuple[str, str, float | None, str, bool | None]] = []

    def add(issue: str, label: str, value: float | None, shown: str, met: bool | None) -> None:
        found.append((issue, label, value, shown, met))

    calls = [c.calls_per_pod for n in sorted(results.apiserver, reverse=True)
             if (c := _case(results, n, "webhook")) is not None and c.calls_per_pod is not None]
    value = max(calls) if calls else None
    add("13", "webhook calls per pod with deploy/'s configuration: 1", value, fmt(value),
        None if value is None else value <= 1.0)
    hook, policy = _added_p50(results, 1, "webhook"), _added_p50(results, 1, "policy")
    value = ratio(hook, policy) if policy is not None and policy > 0 else None
    shown = fmt(value) if value is not None else (
        "n/a" if policy is None else f"n/a (policy adds {policy:.2f} ms)")
    add("13", "API server, 1 creator: added p50 <= 1.5 x the in-tree policy's", value, shown,
        None if value is None else value <= 1.5)
    hook_case, policy_case = _case(results, 8, "webhook"), _case(results, 8, "policy")
    value = ratio(hook_case.p99_ms if hook_case else None,
                  policy_case.p99_ms if policy_case else None)
    add("13", "API server, 8 creators: p99 <= 2 x the in-tree policy's", value, fmt(value),
        None if value is None else value <= 2.0)
    pk, floor = results.http_row("poolkeeper", 32), results.http_row("floor", 32)
    value = ratio(pk.p99_ms if pk else None, floor.p99_ms if floor else None)
    add("13", "served p99 at c=32 <= 2 x the no-op floor's", value, fmt(value),
        None if value is None else value <= 2.0)
    pk, decode = results.http_row("poolkeeper", 8), results.http_row("decode", 8)
    value = ratio(pk.cpu_ms if pk else None, decode.cpu_ms if decode else None)
    add("13", "served CPU per request at c=8 <= 1.3 x the decode floor's", value, fmt(value),
        None if value is None else value <= 1.3)
    by_key = {r.key: r for r in results.micro}
    mine, opa = by_key.get("admit_all"), by_key.get("opa_raw")
    value = ratio(mine.us if mine else None, opa.us if opa else None)
    add("5", "pure decision (all rules) <= 1/10 of OPA's", value, fmt(value, 3),
        None if value is None else value <= 0.1)
    value = None
    if len(results.scale) >= 2 and results.scale[0].decision_us:
        first = results.scale[0].decision_us
        value = max(abs(r.decision_us / first - 1) for r in results.scale[1:])
        label = (f"decision time flat within 20% from {results.scale[0].count:,} to "
                 f"{results.scale[-1].count:,} namespaces")
    else:
        label = "decision time flat within 20% across cache sizes"
    add("5", label, value, "n/a" if value is None else f"{value * 100:.1f}% max change",
        None if value is None else value <= 0.2)
    return found


def _render_targets(results: Results) -> list[str]:
    out = ["### Targets (ratios of this run)", ""]
    rows = [[name, shown, "n/a" if met is None else ("yes" if met else "NO"), issue]
            for issue, name, _, shown, met in targets(results)]
    out += table(["target", "value", "met", "issue"], rows)
    return out
