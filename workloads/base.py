"""The common interface of guest workloads, and their parameter validation.

A workload shapes guest memory before the balloon acts (`prepare`) and may keep
working concurrently in a background thread (`start`/`stop`). Everything is
seeded, so the same (workload, params, seed) leaves the same memory shape.

Parameters are dataclass fields; each field's metadata gives its allowed range
(`lo`/`hi`, with `lo_open`/`hi_open` for open ends) or `choices`, and a `help`
text. make_workload() checks names, types and ranges and names the offending
field with what is allowed, so a typo in a TOML spec fails before any run starts.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from device.guest.page_contents import GuestPageContents
from device.virtio.page_pattern import seed_ok


def param(default, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False, choices=None, help: str = ""):
    """A workload parameter: a dataclass field carrying its allowed values."""
    return dataclasses.field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open,
                                                        "hi_open": hi_open, "choices": choices, "help": help})


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    name: str
    type: type
    default: Any
    allowed: str
    help: str


def _allowed(f: dataclasses.Field, tp: type) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    lo, hi = m.get("lo"), m.get("hi")
    if lo is None and hi is None:
        return f"any {tp.__name__}"
    left = ("(" if m.get("lo_open") else "[") + ("-inf" if lo is None else repr(lo))
    right = ("inf" if hi is None else repr(hi)) + (")" if m.get("hi_open") else "]")
    return f"{tp.__name__} in {left}, {right}"


def param_infos(params_cls: type) -> list[ParamInfo]:
    hints = typing.get_type_hints(params_cls)
    return [ParamInfo(f.name, hints[f.name], f.default, _allowed(f, hints[f.name]), f.metadata.get("help", ""))
            for f in dataclasses.fields(params_cls)]


def _check_value(wname: str, f: dataclasses.Field, tp: type, v: Any) -> Any:
    where = f"workload {wname!r} parameter {f.name!r}"
    allowed = _allowed(f, tp)
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{where} must be a bool (true/false), got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ValueError(f"{where} must be an integer ({allowed}), got {v!r}")
    elif tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where} must be a number ({allowed}), got {v!r}")
        v = float(v)
        if v != v:
            raise ValueError(f"{where} must be a number ({allowed}), got NaN")
    elif tp is str:
        if not isinstance(v, str):
            raise ValueError(f"{where} must be a string ({allowed}), got {v!r}")
    m = f.metadata
    if m.get("choices") and v not in m["choices"]:
        raise ValueError(f"{where} must be {allowed}, got {v!r}")
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (v < lo or (m.get("lo_open") and v == lo)):
        raise ValueError(f"{where} must be {allowed}, got {v!r}")
    if hi is not None and (v > hi or (m.get("hi_open") and v == hi)):
        raise ValueError(f"{where} must be {allowed}, got {v!r}")
    return v


def build_params(wname: str, params_cls: type, given: dict[str, Any]) -> Any:
    if not isinstance(given, dict):
        raise ValueError(f"workload {wname!r} parameters must be a mapping of name -> value, got {type(given).__name__}")
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"workload {wname!r} has no parameter {unknown[0]!r}; its parameters are: "
                         + ", ".join(f"{n} ({_allowed(f, hints[n])})" for n, f in fields.items()))
    vals = {n: _check_value(wname, fields[n], hints[n], v) for n, v in given.items()}
    return params_cls(**vals)


def coerce_strings(params_cls: type, items: dict[str, str]) -> dict[str, Any]:
    """Turn CLI strings (`share=0.5`) into typed values by the field's type, for
    make_workload to validate. Unknown names pass through unchanged (so the error
    comes from make_workload, with the list of parameters)."""
    hints = typing.get_type_hints(params_cls)
    out: dict[str, Any] = {}
    for k, s in items.items():
        tp = hints.get(k)
        if tp is None or not isinstance(s, str):
            out[k] = s
            continue
        try:
            if tp is bool:
                low = s.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                out[k] = low in ("true", "1", "yes")
            elif tp is int:
                out[k] = int(s, 0)
            elif tp is float:
                out[k] = float(s)
            else:
                out[k] = s
        except ValueError:
            out[k] = s  # left ill-typed on purpose: make_workload names field and range
    return out


class Workload(ABC):
    """A guest workload. Subclasses set `name`, `Params` (a dataclass of `param`
    fields) and implement prepare(); background ones implement _step()."""

    name: ClassVar[str]
    Params: ClassVar[type]
    background: ClassVar[bool] = False

    def __init__(self, params: Any, seed: int) -> None:
        self.params = params
        self.seed = seed_ok(seed)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks (ValueError); single fields are checked by make_workload."""

    @abstractmethod
    def prepare(self, mem: GuestPageContents) -> dict:
        """Shape guest memory before balloon operations; return a summary."""

    @classmethod
    def can_retouch(cls) -> bool:
        """True if the workload implements retouch (repeated cycles in one guest)."""
        return cls.retouch is not Workload.retouch

    def retouch(self, mem: GuestPageContents) -> dict:
        """Give the memory a deflate handed back the contents prepare() left there, so the
        next inflate of a repeated cycle (`run --cycles`) frees as much as the first.
        Only workloads whose shape can be restored this way implement it."""
        raise ValueError(f"workload {self.name!r} cannot repeat inflate/deflate cycles in one guest "
                         "(only 'aged' can: it touches every free page again)")

    def start(self, mem: GuestPageContents) -> None:
        """Begin concurrent activity (no-op for static workloads)."""

    def stop(self) -> dict:
        """End concurrent activity; return its counters."""
        return {}

    def touched_share(self) -> float:
        """The share of guest RAM this workload may write, so the share the host may have
        to back with memory (the lab's memory check before a trial, lab/machine/memory.py).
        A workload that writes over time, or into any free page, says 1.0."""
        return 1.0

    def describe(self) -> dict:
        return {"workload": self.name, "seed": self.seed, "params": dataclasses.asdict(self.params)}


class BackgroundWorkload(Workload):
    """A workload with a thread calling _step() at `_rate()` steps per second until
    stop(). Steps are scheduled against a clock (not slept back to back), so the
    average rate holds when a step takes time; a thread that cannot keep up runs
    flat out and the achieved rate is reported."""

    background = True

    def __init__(self, params: Any, seed: int) -> None:
        super().__init__(params, seed)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._mem: GuestPageContents | None = None
        self._t0 = self._t1 = 0.0
        self.steps = 0

    @abstractmethod
    def _rate(self) -> float: ...

    @abstractmethod
    def _step(self, mem: GuestPageContents) -> None: ...

    def _finish(self, mem: GuestPageContents) -> dict:
        """Clean up after the thread stopped; return counters."""
        return {}

    def start(self, mem: GuestPageContents) -> None:
        if self._thread is not None:
            raise RuntimeError(f"workload {self.name!r} already started")
        self._mem = mem
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(mem,), name=f"workload-{self.name}", daemon=True)
        self._t0 = time.monotonic()
        self._thread.start()

    def _loop(self, mem: GuestPageContents) -> None:
        period = 1.0 / self._rate()
        nxt = time.monotonic()
        try:
            while not self._stop.is_set():
                self._step(mem)
                self.steps += 1
                nxt += period
                delay = nxt - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                elif delay < -1.0:
                    nxt = time.monotonic()  # far behind: do not burst to catch up
        except BaseException as e:  # reported by stop(), never lost
            self._error = e

    def stop(self) -> dict:
        if self._thread is None:
            raise RuntimeError(f"workload {self.name!r} was not started")
        self._stop.set()
        self._thread.join()
        self._t1 = time.monotonic()
        self._thread = None
        mem = self._mem
        assert mem is not None
        res = self._finish(mem)
        if self._error is not None:
            raise RuntimeError(f"workload {self.name!r} thread failed: {self._error!r}") from self._error
        res["seconds"] = self._t1 - self._t0
        return res
