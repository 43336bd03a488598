"""What `gate` and `ab` leave for GitHub Actions when they run there (GITHUB_ACTIONS=true):
a markdown step summary appended to $GITHUB_STEP_SUMMARY, and one `::error` (or
`::warning`) workflow command per regression, which the run's page shows as annotations.

Workflow commands go to stdout, where the runner reads them; with --json on stdout
they go to stderr instead (the runner reads that stream too), so stdout stays JSON.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TextIO


def in_github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _escape(text: str) -> str:
    """A workflow command's message: %, CR and LF escaped as the runner expects."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape(text).replace(":", "%3A").replace(",", "%2C")


def annotate(level: str, title: str, messages: Iterable[str], stream: TextIO) -> int:
    """One `::error title=...::message` (level error/warning/notice) per message."""
    n = 0
    for m in messages:
        stream.write(f"::{level} title={_escape_property(title)}::{_escape(m)}\n")
        n += 1
    stream.flush()
    return n


def write_summary(markdown: str) -> bool:
    """Append to the step summary file, if the runner named one (False if not)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown)
        if not markdown.endswith("\n"):
            f.write("\n")
    return True


def report_to_github(title: str, markdown: str, errors: Iterable[str], warnings: Iterable[str] = (), *,
                     json_on_stdout: bool = False) -> None:
    """Under GitHub Actions: the step summary and one annotation per error and warning.
    Elsewhere: nothing."""
    if not in_github_actions():
        return
    write_summary(markdown)
    stream = sys.stderr if json_on_stdout else sys.stdout
    annotate("error", title, errors, stream)
    annotate("warning", title, warnings, stream)
