"""The kernel's own account of each BPF program: runs and nanoseconds (bpf_stats).

With run-time statistics on, the kernel counts for every loaded program how often it
ran (`run_cnt`) and how long its body took (`run_time_ns`, sched_clock around the
program; the hook's own cost is not in it). bpftool shows the same two numbers; here
they are read with the bpf(2) command BPF_OBJ_GET_INFO_BY_FD through ctypes, so the
lab needs no extra tool.

Statistics are off at boot (`kernel.bpf_stats_enabled` = 0) because they cost each
program run two clock reads. `stats_enabled()` turns them on for a block:

- first with BPF_ENABLE_STATS (Linux 5.8+): the kernel keeps them on while the
  returned fd is open and turns them off itself when it closes, even if this process
  is killed; the sysctl is never written (and other users' settings are untouched);
- else by raising the kernel.bpf_stats_enabled sysctl through system/knobs.py, which
  restores it on every exit path (the block's end, the command's way out on Ctrl-C or
  SIGTERM, interpreter exit; after a SIGKILL, the next lab command).
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from system import knobs

NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


class bpf_prog_info(ctypes.Structure):
    """struct bpf_prog_info of include/uapi/linux/bpf.h up to run_cnt (the kernel fills
    at most info_len bytes, so a shorter struct than the kernel's is fine)."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
    ]


assert ctypes.sizeof(bpf_prog_info) == 208 and bpf_prog_info.run_cnt.offset == 200   # the uapi layout


class _info_attr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _id_attr(ctypes.Structure):
    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _stats_attr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(f"bpf(2) syscall number unknown on {os.uname().machine}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret


@dataclass(frozen=True)
class ProgStats:
    """One program's counters as the kernel holds them (cumulative since it was loaded)."""

    prog_id: int
    name: str                 # the kernel's name (15 characters at most)
    run_cnt: int
    run_time_ns: int


def prog_stats(fd: int) -> ProgStats:
    """The kernel's counters of the program behind `fd` (BPF_OBJ_GET_INFO_BY_FD)."""
    info = bpf_prog_info()
    attr = _info_attr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return ProgStats(info.id, info.name.decode(errors="replace"), info.run_cnt, info.run_time_ns)


def all_programs() -> dict[int, ProgStats]:
    """Every BPF program loaded on the machine, by id (what `bpftool prog show` lists):
    the lab's, and any other tool's, whose runs in the lab's processes cost them too."""
    out: dict[int, ProgStats] = {}
    prog_id = 0
    while True:
        a = _id_attr(start_id=prog_id)
        try:
            _bpf(BPF_PROG_GET_NEXT_ID, a)
        except OSError:                  # ENOENT: no program after this id
            return out
        prog_id = a.next_id
        try:
            fd = _bpf(BPF_PROG_GET_FD_BY_ID, _id_attr(start_id=prog_id))
        except OSError:                  # unloaded meanwhile
            continue
        try:
            out[prog_id] = prog_stats(fd)
        finally:
            os.close(fd)


def sysctl_value() -> int | None:
    try:
        return int(knobs.BPF_STATS.read())
    except (OSError, ValueError):
        return None


@contextmanager
def stats_enabled(force_sysctl: bool = False) -> Iterator[str]:
    """Run-time statistics on for the block; yields how ("fd" or "sysctl").
    Raises OSError when neither way works (not root, a kernel without bpf_stats)."""
    if not force_sysctl:
        try:
            fd = _bpf(BPF_ENABLE_STATS, _stats_attr(type=BPF_STATS_RUN_TIME))
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                yield "fd"
            finally:
                os.close(fd)
            return
    try:
        hold = knobs.raise_knob(knobs.BPF_STATS, 1, note="the probes measure their own cost")
    except knobs.KnobError as e:
        raise OSError(str(e)) from None
    try:
        yield "sysctl"
    finally:
        if hold is not None:          # None: the sysctl was 1 already, nothing to restore
            hold.release()
