"""A process's launch record, written once: one typed dataclass per process (the VMM's
VmmOptions, the guest's GuestOptions), its command line (`to_argv`) and the parser that
builds it back (`from_argv`), both derived from the record's fields, so the launcher
and the process cannot disagree on a flag, a default or a choice.

Each field is declared with `option(default, help=..., choices=..., flag=...)`: the flag
is `--field-name` unless given; a bool is a switch (`--x`, or `--x/--no-x` with
negatable=True); `required=True` makes the parser ask for it; a field marked
`remainder=True` takes every argument after `--`. Checking a value against its choices
is the parser's job, at the process's own boundary: the record itself is plain data.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, ClassVar, Sequence, TypeVar

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, *, help: str | None = None, choices: Sequence[str] | None = None,
           flag: str | None = None, required: bool = False, negatable: bool = False, remainder: bool = False,
           metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line option (see the module's doc)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag,
            "required": required, "negatable": negatable, "remainder": remainder, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option(): a mutable default must be a tuple")
    return dataclasses.field(default=default, metadata={"launch": meta})


def _fields(cls: type) -> list[tuple[dataclasses.Field, dict, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["launch"], hints[f.name]) for f in dataclasses.fields(cls) if "launch" in f.metadata]


def _flag(f: dataclasses.Field, meta: dict) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def _scalar(tp: Any) -> type:
    """int for `int` and `int | None`, and so on."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a launch record's process."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for f, meta, tp in _fields(cls):
        if meta["remainder"]:
            p.add_argument(f.name, nargs=argparse.REMAINDER, help=meta["help"])
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if meta["required"]:
            kw["required"] = True
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        if _scalar(tp) is bool:
            kw["action"] = argparse.BooleanOptionalAction if meta["negatable"] else "store_true"
        else:
            kw["type"] = _scalar(tp)
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]
            if meta["metavar"] is not None:
                kw["metavar"] = meta["metavar"]
        p.add_argument(_flag(f, meta), **kw)
    return p


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    values = {}
    for f, meta, _ in _fields(cls):
        v = getattr(ns, f.name)
        if meta["remainder"]:
            v = tuple(v[1:] if v and v[0] == "--" else v)
        values[f.name] = v
    return cls(**values)


class LaunchRecord:
    """Base of a process's launch record (a dataclass of option() fields): its command
    line and the parser that builds it back. PROG is the process's module."""

    PROG: ClassVar[str]

    def to_argv(self) -> list[str]:
        """The process's command line after `python -m PROG`."""
        return to_argv(self)

    @classmethod
    def parser(cls, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
        return parser(cls, prog or cls.PROG, description)

    @classmethod
    def from_argv(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                  description: str | None = None) -> T:
        """Parse the process's command line (argparse: a bad value exits 2 naming the option)."""
        return from_namespace(cls, cls.parser(prog, description).parse_args(argv))


def to_argv(record: Any) -> list[str]:
    """The record as its process's command line: every option with a value, in field
    order, then `--` and the remainder field (if any)."""
    argv: list[str] = []
    rest: list[str] = []
    for f, meta, tp in _fields(type(record)):
        v = getattr(record, f.name)
        if meta["remainder"]:
            rest = list(v)
        elif _scalar(tp) is bool:
            if v:
                argv.append(_flag(f, meta))
            elif meta["negatable"] and f.default is not False:
                argv.append("--no-" + _flag(f, meta)[2:])
        elif v is not None:
            argv += [_flag(f, meta), str(v)]
    return argv + (["--", *rest] if rest else [])
