"""The lab's one number formatter: `show`, `compare`, `probe`, `gate` and the HTML
report all print numbers through here. One unit per row or axis, chosen from the
data, so arms can be compared by eye; durations in s/ms/µs/ns, byte amounts in
binary units (KiB, MiB, GiB: page and memory sizes are powers of two), rates in SI
units; counts are whole numbers grouped by thousands, never scientific notation.
"""
from __future__ import annotations

import html
import math
from typing import Callable, Iterable

TIME_SCALES = (("s", 1e9), ("ms", 1e6), ("µs", 1e3), ("ns", 1.0))
BYTE_SCALES = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))
SI_SCALES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))
NS_PER = {"ns": 1.0, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}   # metric time units -> ns
THOUSANDS = " "   # grouping separator: "131 072" (SI style; no comma/point ambiguity)


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def sig(v: float | None, digits: int = 3) -> str:
    """A number with about `digits` significant digits, integers kept whole."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if float(v).is_integer():
        return f"{int(v):,}".replace(",", THOUSANDS)
    a = abs(v)
    if a >= 10 ** (digits - 1):
        return f"{v:,.0f}".replace(",", THOUSANDS)
    if a >= 1e-3:            # %g is fixed-point for exponents -4 .. digits-1
        return f"{v:.{digits}g}"
    # fixed point with `digits` significant digits; never scientific notation
    decimals = min(12, digits - 1 - math.floor(math.log10(a)))
    return f"{v:.{decimals}f}"


def fmt_fixed(v: float | None, decimals: int = 1) -> str:
    """Fixed-point with the lab's thousands grouping ("4 126.0"), for columns of one unit."""
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:,.{decimals}f}".replace(",", THOUSANDS)


def plural(n: int | float | None, word: str, many: str | None = None) -> str:
    """"1 trial", "3 trials", "1 warm-up", "0 warm-ups" (the count formatted as a count)."""
    if n is None:
        return f"? {many or word + 's'}"
    return f"{fmt_count(n)} {word if n == 1 else (many or word + 's')}"


def fmt_count(v: float | None) -> str:
    """A count (pages, calls, kicks): the whole number, grouped ("131 072")."""
    if v is None or not math.isfinite(v):
        return "–"
    return f"{round(v):,}".replace(",", THOUSANDS)


def fmt_si(v: float | None, unit: str = "") -> str:
    """Decimal SI prefixes for rates and large dimensionless figures: 10 Gbit/s, 5.33 M."""
    if v is None or not math.isfinite(v):
        return "–"
    for name, scale in SI_SCALES:
        if abs(v) >= scale:
            return f"{sig(v / scale)} {name}{unit}".rstrip()
    return f"{sig(v)} {unit}".rstrip()


def row_formatter(unit: str, values: Iterable[float | None]) -> Callable[[float | None], str]:
    """A formatter for a row of values of one metric (unit as lab.results.metrics.unit names it),
    with one scale for the whole row chosen from its largest value."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    ref = max(finite, default=0.0)
    if unit in NS_PER:
        to_ns = NS_PER[unit]
        name, scale = time_unit([ref * to_ns])
        return lambda v: "–" if v is None else (fmt_ns(v * to_ns) if _tiny(v * to_ns, scale)
                                                 else f"{sig(v * to_ns / scale)} {name}")
    if unit == "bytes":
        for name, scale in BYTE_SCALES:
            if ref >= scale or name == "B":
                return lambda v, n=name, sc=scale: "–" if v is None else (
                    fmt_bytes(v) if _tiny(v, sc) else f"{sig(v / sc)} {n}")
    if unit:                                  # a rate (Gbit/s, MiB/s): the number and its unit
        return lambda v: "–" if v is None else f"{sig(v)} {unit}"
    return _number


def _tiny(v: float, scale: float) -> bool:
    """A value far below its row's unit (96 B in a KiB row) reads better in its own."""
    return v != 0 and abs(v) < 0.1 * scale


def _number(v: float | None) -> str:
    """A dimensionless value: exact when it is a whole or half number (a count, or the
    median of an even number of counts: 131.5), else three significant digits."""
    if v is None or not math.isfinite(v):
        return sig(v)
    if float(v * 2).is_integer() and not float(v).is_integer():
        return f"{v:,.1f}".replace(",", THOUSANDS)
    return sig(v)


def fmt_value(v: float | None, unit: str) -> str:
    """One value in its own best scale (use row_formatter for rows compared by eye)."""
    return row_formatter(unit, [v])(v)


def time_unit(ns_values: list[float]) -> tuple[str, float]:
    """(unit name, ns per unit) for a set of nanosecond values: the largest unit in
    which the biggest value is at least 1."""
    m = max((abs(v) for v in ns_values if v is not None and math.isfinite(v)), default=0.0)
    for name, scale in TIME_SCALES:
        if m >= scale:
            return name, scale
    return "ns", 1.0


def fmt_ns(ns: float | None) -> str:
    if ns is None or not math.isfinite(ns):
        return "–"
    name, scale = time_unit([ns])
    return f"{sig(ns / scale)} {name}"


def fmt_bytes(b: float | None) -> str:
    if b is None or not math.isfinite(b):
        return "–"
    for name, scale in BYTE_SCALES:
        if abs(b) >= scale:
            v = b / scale
            return f"{sig(v)} {name}"
    return f"{sig(b)} B"


def fmt_ns_short(ns: float) -> str:
    """Axis-tick form: 512ns, 4.1µs, 33ms (two significant digits: log2 buckets
    are not round numbers, and the tick only has to say where on the scale it is)."""
    for name, scale in TIME_SCALES:
        if ns >= scale:
            v = ns / scale
            return f"{v:.2g}{name}" if v < 100 else f"{v:.0f}{name}"
    return f"{ns:g}ns"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def fmt_ratio(r: float | None) -> str:
    if r is None or math.isnan(r):
        return "–"
    if math.isinf(r):
        return "∞"
    return f"{sig(r)}×"


def speed_phrase(ratio: float | None, timing: bool = True) -> str:
    """"10.5× faster" / "1.3× slower" for a ratio arm/baseline of medians."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return "–"
    if abs(ratio - 1.0) < 0.005:
        return "the same"
    if timing:
        return f"{sig(1 / ratio)}× faster" if ratio < 1 else f"{sig(ratio)}× slower"
    return f"{sig(ratio)}× as much"


def ratio_phrase(ratio: float | None) -> str:
    """"6.09× lower" / "1.3× higher": a ratio of medians with no claim that it is a real
    difference (what a table says where the verdict found none)."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return "–"
    if abs(ratio - 1.0) < 0.005:
        return "the same"
    return f"{sig(1 / ratio)}× lower" if ratio < 1 else f"{sig(ratio)}× higher"


def pct(x: float | None, digits: int = 1) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{100 * x:.{digits}f} %"
