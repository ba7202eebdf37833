"""Owns the micro-benchmark: the pure decision per request, in-process, against OPA in-process.

Each figure is the median over ``repeats`` passes of the per-request time over the 1,000 reviews
(one per namespace), after one untimed pass. Rows:

- ``admit()``, all shipped rules: the pure decision on an already-parsed request;
- ``admit()``, pool rule alone: the rule OPA's sample implements;
- decode + admit + encode: body bytes to response bytes, what the handler does around admit();
- OPA, raw input: the body handed to OPA's Go evaluator (it decodes it) and the result back;
- OPA, eval_document(dict): the bindings' public API (stdlib json encodes the input first).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench import engine, inputs, opa


@dataclass
class MicroRow:
    key: str
    label: str
    us: float | None  # microseconds per request; None: not run
    note: str = ""


def per_request_us(fn: Callable[[object], object], items: Sequence[object], repeats: int) -> float:
    for item in items:  # warm caches, allocators, OPA's prepared query
        fn(item)
    samples = []
    gc_was_enabled = gc.isenabled()
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        began = time.perf_counter()
        for item in items:
            fn(item)
        samples.append((time.perf_counter() - began) / len(items) * 1e6)
        if gc_was_enabled:
            gc.enable()
    samples.sort()
    return samples[len(samples) // 2]


def run(namespaces_yaml: Path, repeats: int, count: int = inputs.NAMESPACES) -> list[MicroRow]:
    names = inputs.namespace_names(inputs.NAMESPACES)[:count]
    bodies = inputs.review_bodies(names)
    requests = [engine.parse_review(orjson.loads(b)) for b in bodies]
    rules = engine.shipped_rules()
    pool = engine.pool_rule_only(rules)
    source = engine.file_namespace_source(str(namespaces_yaml))
    lookup = source.labels
    admit, parse, encode = engine.admit, engine.parse_review, engine.encode_review

    def full(req):
        return admit(req, lookup, rules)

    def pool_only(req):
        return admit(req, lookup, pool)

    def handler(body):
        req = parse(orjson.loads(body))
        return encode(req.uid, admit(req, lookup, rules).response)

    def decode(body):
        return orjson.loads(body)

    # The decisions must be the ones the servers give: a patch, for every namespace.
    for req in requests[:5]:
        decision = full(req)
        if not decision.response.allowed or not decision.response.patch:
            raise RuntimeError(f"unexpected decision for {req.namespace}: {decision.response}")

    rows = [
        MicroRow("admit_all", f"poolkeeper admit(), all {len(rules)} shipped rules",
                 per_request_us(full, requests, repeats), ", ".join(engine.rule_names(rules))),
        MicroRow("admit_pool", "poolkeeper admit(), pool rule alone",
                 per_request_us(pool_only, requests, repeats), ", ".join(engine.rule_names(pool))),
        MicroRow("handler", "poolkeeper decode + admit() + encode, all rules",
                 per_request_us(handler, bodies, repeats)),
        MicroRow("decode", "orjson.loads of the 11 KB body alone",
                 per_request_us(decode, bodies, repeats)),
    ]
    missing = opa.available()
    if missing:
        rows += [MicroRow("opa_raw", "OPA eval, body as raw JSON input", None, missing),
                 MicroRow("opa_dict", "OPA eval_document(dict) (public API)", None, missing)]
        return rows
    policy = opa.OpaPolicy(inputs.opa_namespaces_data())
    docs = [orjson.loads(b) for b in bodies]
    check = policy.evaluate_raw(bodies[0])
    if not check["response"].get("patch"):
        raise RuntimeError(f"unexpected OPA decision: {check}")
    rows += [
        MicroRow("opa_raw", "OPA eval, body as raw JSON input",
                 per_request_us(policy.evaluate_raw, bodies, repeats)),
        MicroRow("opa_dict", "OPA eval_document(dict) (public API)",
                 per_request_us(policy.evaluate, docs, repeats)),
    ]
    policy.engine.close()
    return rows
