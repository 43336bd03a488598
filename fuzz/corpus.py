"""Case files: JSON (bytes as hex), loading a corpus, choosing which cases to keep.

tests/fuzz_corpus/ holds the kept cases as JSON lines; tests replay them
(fuzz.engine.replay) as regression tests.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path


def case_to_json(case: dict) -> dict:
    c = copy.deepcopy(case)
    if "mem" in c:
        c["mem"] = [[g, d.hex()] for g, d in c["mem"]]
    if "queues" in c:
        c["queues"] = {str(k): v for k, v in c["queues"].items()}
    if c["t"] == "pfn":
        c["data"] = c["data"].hex()
    if c["t"] == "bitmap":
        c["bufs"] = [b.hex() for b in c["bufs"]]
    return c


def case_from_json(d: dict) -> dict:
    c = copy.deepcopy(d)
    if "mem" in c:
        c["mem"] = [[g, bytes.fromhex(h)] for g, h in c["mem"]]
    if "queues" in c:
        c["queues"] = {int(k): v for k, v in c["queues"].items()}
    if c["t"] == "pfn":
        c["data"] = bytes.fromhex(c["data"])
    if c["t"] == "bitmap":
        c["bufs"] = [bytes.fromhex(h) for h in c["bufs"]]
    return c


def load_corpus(path: str | Path) -> list[dict]:
    """Cases from a .json file (one case or a list) or a .jsonl file, or every such file in a directory."""
    p = Path(path)
    files = sorted(p.rglob("*.json*")) if p.is_dir() else [p]
    out = []
    for f in files:
        text = f.read_text()
        if f.suffix == ".jsonl":
            out += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            obj = json.loads(text)
            out += obj if isinstance(obj, list) else [obj]
    return [case_from_json(c) for c in out]


def select_corpus(cases: list[dict], limit: int) -> list[dict]:
    """At most `limit` cases to keep as regression tests: one per kind of outcome (target
    and the set of refusals, from the signature), the smallest first, then the rest of
    the smallest behaviours until the limit, spread over the targets."""
    def size(c: dict) -> int:
        return len(json.dumps(c))

    def coarse(c: dict) -> tuple:
        sig = c.get("signature", "")
        return (c["t"], sig.split("(", 2)[-1].split(")")[0] if c["t"] == "device" else sig)

    by_group: dict[tuple, dict] = {}
    for c in sorted(cases, key=size):
        by_group.setdefault(coarse(c), c)
    chosen = sorted(by_group.values(), key=size)[:limit]
    picked = {id(c) for c in chosen}
    rest = [c for c in sorted(cases, key=size) if id(c) not in picked]
    chosen += rest[:max(0, limit - len(chosen))]
    return sorted(chosen, key=lambda c: (c["t"], size(c)))

