"""How wide the lab's text output may be: 120 columns, as a terminal beside an editor shows
without wrapping. Tables fit by layout (fmt/columns.py); this module folds the
prose lines around them, and command lines so they still paste into a shell."""
from __future__ import annotations

import shlex
import textwrap

LINE_WIDTH = 120


def fold_command(command: str, indent: str = "    ", width: int = LINE_WIDTH, first: int = 0) -> str:
    """A shell command over several lines, each ending in " \\" (pastes as one command);
    words are never split. `first`: columns already taken on the first line (a prefix)."""
    lines: list[str] = []
    line = ""
    for word in (shlex.quote(w) for w in shlex.split(command)):
        room = width - 2 - (len(indent) if lines else first)
        if line and len(line) + 1 + len(word) > room:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return " \\\n".join(lines[:1] + [indent + ln for ln in lines[1:]])


def fold(text: str, width: int = LINE_WIDTH, hang: str | None = None) -> str:
    """Every line of `text` at most `width` columns: a longer line is broken at spaces and
    continued under its own indentation plus four (or under `hang`, e.g. a table's last
    column). A single word longer than the width (a path) stays whole."""
    out: list[str] = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        lead = line[:len(line) - len(line.lstrip())]
        out += textwrap.wrap(line.strip(), width=width, initial_indent=lead,
                             subsequent_indent=lead + "    " if hang is None else hang,
                             break_long_words=False, break_on_hyphens=False)
    return "\n".join(out)
