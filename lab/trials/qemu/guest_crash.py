"""What a real guest's kernel said when it crashed, read from its serial console.

A guest that stops answering its agent may have hung, or its kernel may have oopsed
and panicked. When the console holds an oops, the trial's error names it in one line:
the oops header ("BUG: ...", "list_add corruption ...", "general protection fault ..."),
the innermost functions of its first call trace, and the panic reason, so a reader of
`balloon-lab show` sees at once which code path was running, without the raw console.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import groupby

_STAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_HEADER = re.compile(r"(BUG: .*|kernel BUG at .*|Oops: .*|general protection fault.*|list_\w+ corruption\..*"
                     r"|Kernel panic - not syncing: .*)")
_FRAME = re.compile(r"^\s*(\?\s+)?([A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+")


@dataclass(frozen=True)
class GuestCrash:
    """One oops: its first header line, the call trace's functions (innermost first), the panic."""

    header: str
    trace: tuple[str, ...]
    panic: str | None

    def describe(self, inner: int = 4, outer: int = 7) -> str:
        """One line; a long trace keeps its innermost and outermost frames (where it failed,
        and which task or interrupt got there), repeated frames counted once."""
        runs = [(f, len(list(same))) for f, same in groupby(self.trace)]
        t = [f if n == 1 else f"{f} x{n}" for f, n in runs]
        shown = " < ".join(t if len(t) <= inner + outer else t[:inner] + ["..."] + t[-outer:])
        return (f"{self.header}" + (f"; call trace: {shown}" if shown else "")
                + (f"; {self.panic}" if self.panic and self.panic != self.header else ""))


def read_crash(console: str) -> GuestCrash | None:
    """The first oops in a console transcript, or None when the kernel never oopsed."""
    lines = [_STAMP.sub("", ln.rstrip()) for ln in console.replace("\r", "").splitlines()]
    start = next((i for i, ln in enumerate(lines) if _HEADER.search(ln)), None)
    if start is None:
        return None
    header = _HEADER.search(lines[start]).group(1)
    trace: list[str] = []
    in_trace = False
    for ln in lines[start:]:
        if ln.strip() == "Call Trace:":
            in_trace = True
            continue
        if in_trace:
            m = _FRAME.match(ln)
            if m and not m.group(1):            # '? fn' frames are stale stack words, not the path
                trace.append(m.group(2))
            elif ln.strip().startswith(("---[", "Modules linked in")) and trace:
                break
    panic = next((m.group(1) for ln in lines[start:] for m in [re.search(r"(Kernel panic - not syncing: .*)", ln)]
                  if m), None)
    return GuestCrash(header, tuple(trace), panic)

