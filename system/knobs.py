"""Kernel knobs a lab process raises for a while, restored on every exit path.

The lab raises machine-wide knobs for what it measures: the hugetlb pool
(vm.nr_hugepages) for `--backing hugetlb`, shmem THP (shmem_enabled) for `--backing
thp`, the kernel's BPF statistics (kernel.bpf_stats_enabled) for the probes' own
cost. They are global and the machine is shared: two lab processes may raise the same
knob, either may end first, either may be killed. So:

- every raise is recorded in a holders file, /run/balloon-lab/knobs/<knob>.json (under
  flock): the value the knob had before the first holder, and each holder's pid, start
  time and share. Whenever a holder comes or goes, the knob is set for the holders
  still alive; when the last goes, it gets its original value back;
- a process's holds are released by `release()`, by `restore_all()` (which the lab's
  command line calls on its way out, SIGINT and SIGTERM included) and, as a backstop,
  at interpreter exit (atexit);
- a holder killed with SIGKILL cannot restore anything: the next lab process that
  touches the knob, or calls `restore_left_behind()` (every `balloon-lab` command does
  at start), finds its pid gone and restores for it. When raising, the holder's change
  sentence also gives the exact command that takes this holder's share back by hand
  (the value the knob had without it: other lab processes may hold it too);
- a restore the kernel refuses (not root any more, a pool still in use) is reported
  with that exact command, never silently dropped.

Two kinds of knob: additive (vm.nr_hugepages: each holder adds the pages it needs, the
knob is the original plus the live holders' shares) and settings (shmem_enabled,
bpf_stats_enabled: the holders' value while any holds it).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REGISTRY = Path(os.environ.get("BALLOON_LAB_KNOBS_DIR", "/run/balloon-lab/knobs"))


@dataclass(frozen=True)
class Knob:
    """One kernel knob: its file, the name a user types (sysctl name or path), and
    whether holders add to it (a pool) or set it (a switch)."""

    path: str
    name: str
    additive: bool = False

    @property
    def key(self) -> str:
        return self.name.replace("/", "_").strip("_")

    def read(self) -> str:
        """The current value; for a sysfs choice list (`always [advise] never`) the chosen one."""
        with open(self.path) as f:
            raw = f.read().strip()
        chosen = [w for w in raw.split() if w.startswith("[")]
        return chosen[0].strip("[]") if chosen else raw

    def write(self, value: str) -> None:
        with open(self.path, "w") as f:
            f.write(str(value))

    def restore_command(self, value: str) -> str:
        """The shell command that sets the knob to `value` by hand."""
        if self.path.startswith("/proc/sys/"):
            return f"sysctl -w {self.name}={value}"
        return f"echo {value} > {self.path}"


HUGETLB_POOL = Knob("/proc/sys/vm/nr_hugepages", "vm.nr_hugepages", additive=True)
THP_SHMEM = Knob("/sys/kernel/mm/transparent_hugepage/shmem_enabled",
                 "/sys/kernel/mm/transparent_hugepage/shmem_enabled")
BPF_STATS = Knob("/proc/sys/kernel/bpf_stats_enabled", "kernel.bpf_stats_enabled")
KNOBS = {k.key: k for k in (HUGETLB_POOL, THP_SHMEM, BPF_STATS)}


class KnobError(RuntimeError):
    """A knob could not be raised or restored; the message gives the command that fixes it."""


def _start_time(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _alive(holder: dict) -> bool:
    return _start_time(holder["pid"]) == holder["start"]


@contextlib.contextmanager
def _registry(knob: Knob) -> Iterator[dict]:
    """The knob's holders file, locked, as a dict {original, holders}; written back on
    exit (deleted when no holder is left). Without a writable registry (not root) the
    state lives only in this call: nothing can be raised there anyway."""
    try:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        lock = open(REGISTRY / ".lock", "a")
    except OSError:
        yield {"original": None, "holders": []}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = REGISTRY / f"{knob.key}.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {"original": None, "holders": []}
        yield state
        if state["holders"]:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _target(knob: Knob, state: dict) -> str:
    """The value the knob must have for the holders in `state` (the original if none)."""
    if not state["holders"]:
        return state["original"]
    if knob.additive:
        return str(int(state["original"]) + sum(int(h["share"]) for h in state["holders"]))
    return state["holders"][-1]["share"]


def _settle(knob: Knob, state: dict) -> str | None:
    """Drop dead holders and set the knob for the living; the sentence of what changed."""
    dead = [h for h in state["holders"] if not _alive(h)]
    state["holders"] = [h for h in state["holders"] if _alive(h)]
    if state["original"] is None:
        return None
    want = _target(knob, state)
    now = knob.read()
    if now == want:
        return None
    try:
        knob.write(want)
    except OSError as e:
        raise KnobError(f"could not set {knob.name} back to {want} ({e.strerror}): restore it with "
                        f"`{knob.restore_command(want)}`") from None
    why = f" (left raised by balloon-lab pid {', '.join(str(h['pid']) for h in dead)}, which is gone)" if dead else ""
    return f"set {knob.name} from {now} back to {want}{why}"


class KnobHold:
    """This process's share of a raised knob; release() gives it back."""

    def __init__(self, knob: Knob, share: str, original: str) -> None:
        self.knob, self.share = knob, share
        self.original_seen = original     # what to restore if there is no holders file (not root)
        self.change = ""
        self.pid = os.getpid()
        self.released = False

    def release(self) -> str | None:
        """Give the share back: the knob is set for the holders left, or restored. The
        sentence of what changed (None: nothing to do); KnobError with the command if
        the kernel refuses."""
        if self.released or self.pid != os.getpid():      # a forked child never releases its parent's holds
            return None
        self.released = True
        with contextlib.suppress(ValueError):
            _HELD.remove(self)
        with _registry(self.knob) as state:
            if state["original"] is None:                  # no registry: restore what this hold saw
                state["original"] = self.original_seen
            state["holders"] = [h for h in state["holders"]
                                if not (h["pid"] == self.pid and h["id"] == id(self))]
            return _settle(self.knob, state)

    def __enter__(self) -> "KnobHold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: list[KnobHold] = []


def raise_knob(knob: Knob, value: int | str, note: str = "") -> KnobHold | None:
    """Raise `knob` for this process: additive knobs by `value`, settings to `value`.
    None when nothing needed raising (a setting already there, a share of 0). The
    hold's `change` says what was done (with `note`) and how to undo it by hand.
    KnobError (with the command) when the kernel refuses."""
    value = str(value)
    if knob.additive and int(value) <= 0:
        return None
    with _registry(knob) as state:
        _settle(knob, state)                            # a killed holder's share goes first
        current = knob.read()
        if state["original"] is None or not state["holders"]:
            if not knob.additive and current == value:
                return None
            state["original"] = current
        hold = KnobHold(knob, value, state["original"])
        undo = _target(knob, state)                     # the value without this hold (others may hold it too)
        state["holders"].append({"pid": hold.pid, "start": _start_time(hold.pid), "id": id(hold), "share": value})
        want = _target(knob, state)
        try:
            knob.write(want)
        except OSError as e:
            state["holders"].pop()
            raise KnobError(f"cannot set {knob.name} to {want} ({e.strerror}"
                            + (": run as root" if e.errno in (errno.EACCES, errno.EPERM) else "") + ")") from None
    if not _HELD:
        atexit.register(restore_all)
    _HELD.append(hold)
    hold.change = (f"set {knob.name} from {current} to {want}{f' ({note})' if note else ''} until this command "
                   f"ends; if it is killed: `{knob.restore_command(undo)}`")
    return hold


def restore_all() -> list[str]:
    """Release every hold of this process; one sentence per change, and per failure
    the command that restores the knob by hand (never raises: it runs on the way out)."""
    out = []
    for hold in list(_HELD):
        try:
            change = hold.release()
        except KnobError as e:
            change = str(e)
        if change:
            out.append(change)
    return out


def restore_left_behind() -> list[str]:
    """Restore every knob whose holders are all gone (a lab process killed with
    SIGKILL); one sentence per knob restored or per failure (never raises)."""
    if not REGISTRY.is_dir():
        return []
    out = []
    for f in sorted(REGISTRY.glob("*.json")):
        knob = KNOBS.get(f.stem)
        if knob is None:
            continue
        try:
            with _registry(knob) as state:
                change = _settle(knob, state)
        except (KnobError, OSError) as e:
            change = str(e)
        if change:
            out.append(change)
    return out


def holds() -> list[KnobHold]:
    """This process's current holds."""
    return [h for h in _HELD if h.pid == os.getpid()]
