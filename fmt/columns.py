"""Text tables of the lab's output: columns under a header rule that fit LINE_WIDTH, by
layout (a row too wide puts its first cell on a line of its own). In fmt, beside the
line width, so a command that prints a table does not import the statistics (scipy)."""
from __future__ import annotations

from typing import Sequence

from fmt.text_width import LINE_WIDTH


def format_columns(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] = frozenset(),
                   width: int = LINE_WIDTH) -> str:
    """Left-aligned (or, for columns in `right`, right-aligned) text columns under a header
    rule. A table wider than `width` puts its first column on a line of its own above the
    rest of its row (a row whose first cell is empty continues the one above)."""
    def render(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int], indent: str = "") -> list[str]:
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

        def line(r: Sequence[str]) -> str:
            cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
            return (indent + "  ".join(cells)).rstrip()

        return [line(header), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows]

    out = render(header, rows, right)
    if max(map(len, out)) <= width or len(header) < 3:
        return "\n".join(out)
    inner = render(header[1:], [r[1:] for r in rows], {i - 1 for i in right if i}, "  ")
    folded = [str(header[0])] + inner[:2]
    for r, text in zip(rows, inner[2:]):
        folded += ([str(r[0])] if r[0] else []) + [text]
    return "\n".join(folded)
