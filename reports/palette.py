"""One colour per arm, the same in every chart and table of a report.

A reader who learnt "green is chunks" in the verdict chart must not have to re-learn
it in the histograms. Colours are fixed per protocol name (not per position), so two
reports of different runs also agree. The Okabe-Ito palette: distinguishable with
the common colour-vision deficiencies. Stage colours are greys and browns, a family
no arm uses, so a stacked stage bar is never mistaken for an arm.
"""
from __future__ import annotations

from typing import Sequence

ARM_COLORS: dict[str, str] = {
    # balloon arms
    "pfn": "#D55E00",         # vermillion: the upstream baseline
    "pfn-ranges": "#CC79A7",  # reddish purple
    "bitmap": "#0072B2",      # blue: the 2016 seed (also its migration hinting arm)
    "chunks": "#009E73",      # bluish green: the 2017 SG series
    # migration arms
    "none": "#6E6E6E",        # grey: no hints
    "upstream": "#E69F00",    # orange: FREE_PAGE_HINT
}
_SPARE = ("#56B4E9", "#F0E442", "#000000", "#882255", "#44AA99", "#999933")

STAGE_COLORS: dict[str, str] = {
    "alloc": "#D9D9D9",
    "encode": "#A3A3A3",
    "transmit": "#6B6B6B",
    "translate": "#D8BE8A",
    "discard": "#8C6A2F",
}
PUBLISHED_COLOR = "#222222"


def _lighten(hex_color: str, amount: float = 0.5) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    mix = lambda c: round(c + (255 - c) * amount)
    return f"#{mix(r):02X}{mix(g):02X}{mix(b):02X}"


def arm_colors(arms: Sequence[str], no_probes_suffix: str) -> dict[str, str]:
    """{arm: colour} for the arms of one report. Known protocols keep their colour;
    "<arm>/no-probes" is a lighter shade of its arm; anything else takes a spare colour
    (in order, never one already used in this report). `no_probes_suffix` is the lab's
    (ReportData.NO_PROBES_SUFFIX)."""
    out: dict[str, str] = {}
    used = set()
    for a in arms:
        base = a[: -len(no_probes_suffix)] if a.endswith(no_probes_suffix) else None
        if a in ARM_COLORS:
            out[a] = ARM_COLORS[a]
        elif base is not None and base in ARM_COLORS:
            out[a] = _lighten(ARM_COLORS[base])
        used.add(out.get(a))
    spare = (c for c in _SPARE if c not in used)
    for a in arms:
        if a not in out:
            out[a] = next(spare, "#777777")
    return out
