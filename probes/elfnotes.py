"""USDT (SystemTap SDT) markers listed in an ELF file's .note.stapsdt section.

Used to know, without BCC and without a running process, whether an interpreter
carries `python:audit` (Debian's /usr/bin/python3.11 does; other builds on PATH may
not): the doctor reports it, and the session only loads the stage probe for targets
that have it. Reads the section headers and the notes, nothing else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

NT_STAPSDT = 3


@dataclass(frozen=True)
class UsdtNote:
    provider: str
    name: str
    pc: int
    base: int
    semaphore: int
    args: str


class NotElf(ValueError):
    """The file is not a 64-bit little-endian ELF (the only kind the lab runs on)."""


def usdt_notes(path: str) -> list[UsdtNote]:
    """All stapsdt notes of the ELF file at `path` (empty if it has none)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF":
            raise NotElf(f"{path}: not an ELF file")
        if ident[4] != 2 or ident[5] != 1:
            raise NotElf(f"{path}: not a 64-bit little-endian ELF")
        e_shoff, = struct.unpack_from("<Q", ident, 0x28)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", ident, 0x3A)
        if e_shoff == 0 or e_shnum == 0:
            return []
        f.seek(e_shoff)
        table = f.read(e_shentsize * e_shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * e_shentsize) for i in range(e_shnum)]
        strtab = sections[e_shstrndx]
        f.seek(strtab[4])
        names = f.read(strtab[5])
        notes: list[UsdtNote] = []
        for sh in sections:
            name = names[sh[0]:names.index(b"\0", sh[0])]
            if name != b".note.stapsdt":
                continue
            f.seek(sh[4])
            notes.extend(_parse_notes(f.read(sh[5])))
        return notes


def _parse_notes(data: bytes) -> list[UsdtNote]:
    out: list[UsdtNote] = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        owner = data[pos:pos + namesz]
        pos += (namesz + 3) & ~3
        desc = data[pos:pos + descsz]
        pos += (descsz + 3) & ~3
        if ntype != NT_STAPSDT or owner.rstrip(b"\0") != b"stapsdt" or len(desc) < 24:
            continue
        pc, base, sem = struct.unpack_from("<QQQ", desc, 0)
        provider, name, args = (desc[24:].split(b"\0") + [b"", b"", b""])[:3]
        out.append(UsdtNote(provider.decode(errors="replace"), name.decode(errors="replace"),
                            pc, base, sem, args.decode(errors="replace")))
    return out


ET_EXEC = 2


def elf_type(path: str) -> int:
    """e_type of the ELF file (2 = ET_EXEC: fixed addresses; 3 = ET_DYN: PIE or shared object)."""
    with open(path, "rb") as f:
        head = f.read(18)
    if len(head) < 18 or head[:4] != b"\x7fELF":
        raise NotElf(f"{path}: not an ELF file")
    return struct.unpack_from("<H", head, 16)[0]


def has_marker(path: str, provider: str, name: str) -> bool:
    """True when `path` is an ELF file carrying the USDT marker provider:name."""
    try:
        return any(n.provider == provider and n.name == name for n in usdt_notes(path))
    except (OSError, NotElf, struct.error):
        return False
