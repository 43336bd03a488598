"""Guest workloads: what runs in the guest while the balloon works.

    wl = make_workload("idle", {"used_share": 0.1}, seed=1)
    summary = wl.prepare(mem)   # shape memory
    wl.start(mem); ...; stats = wl.stop()   # concurrent activity (background ones)

WORKLOADS maps each name to its class; docs/WORKLOADS.md describes them.
"""
from __future__ import annotations

from typing import Any

from workloads.aged import Aged
from workloads.base import BackgroundWorkload, ParamInfo, Workload, build_params, coerce_strings, param_infos
from workloads.churn import Churn
from workloads.dirty import Dirty
from workloads.fragment import Fragment
from workloads.hog import Hog
from workloads.idle import Idle
from workloads.shapes import run_lengths

WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (Idle, Aged, Hog, Fragment, Churn, Dirty)}

# The guest program that runs these workloads (`python -m workloads.guest`): the
# device's guest with make_workload handed in. Launchers name it as the VMM's guest.
GUEST_MODULE = "workloads.guest"


def _cls(name: str) -> type[Workload]:
    if not isinstance(name, str) or name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def make_workload(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> Workload:
    """Build a workload; ValueError naming the field and what is allowed on bad input."""
    cls = _cls(name)
    return cls(build_params(name, cls.Params, {} if params is None else params), seed)


def parse_params(name: str, items: list[str]) -> dict[str, Any]:
    """CLI helper: ["share=0.5", "stale=false"] -> typed dict for make_workload."""
    cls = _cls(name)
    raw: dict[str, str] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"workload parameter must look like name=value, got {it!r}")
        raw[k.strip()] = v.strip()
    return coerce_strings(cls.Params, raw)


def describe_workloads() -> dict[str, list[ParamInfo]]:
    """Every workload's parameters: name, type, default, allowed values, help."""
    return {n: param_infos(c.Params) for n, c in WORKLOADS.items()}


__all__ = ["WORKLOADS", "GUEST_MODULE", "Workload", "BackgroundWorkload", "ParamInfo", "make_workload", "parse_params",
           "describe_workloads", "run_lengths", "Idle", "Aged", "Hog", "Fragment", "Churn", "Dirty"]
