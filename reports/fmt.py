"""Number formatting shared by the report's tables and charts: one unit per row or
axis, chosen from the data, so arms can be compared by eye."""
from __future__ import annotations

import html
import math

TIME_SCALES = (("s", 1e9), ("ms", 1e6), ("µs", 1e3), ("ns", 1.0))
BYTE_SCALES = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def sig(v: float | None, digits: int = 3) -> str:
    """A number with about `digits` significant digits, integers kept whole."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if float(v).is_integer() and abs(v) < 1e7:
        return f"{int(v):,}".replace(",", " ")
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}".replace(",", " ")
    if a >= 1e-3:
        return f"{v:.{digits}g}"
    return f"{v:.2e}"


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


def fmt_bytes_short(b: float) -> str:
    """Axis-tick form: 4K, 64K, 1M, 2G."""
    for name, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= scale:
            return f"{b / scale:g}{name}"
    return f"{b:g}"


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
    return f"{r:.3g}×"


def speed_phrase(ratio: float | None, timing: bool = True) -> str:
    """"10.5× faster" / "1.3× slower" for a ratio arm/baseline of medians."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return "–"
    if abs(ratio - 1.0) < 0.005:
        return "the same"
    if timing:
        return f"{1 / ratio:.3g}× faster" if ratio < 1 else f"{ratio:.3g}× slower"
    return f"{ratio:.3g}× as much"


def pct(x: float | None, digits: int = 1) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{100 * x:.{digits}f} %"
