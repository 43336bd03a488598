"""Experiment specs: what to run, from CLI flags or a TOML file.

One table (FIELDS) names every field with its CLI flag, so the parser, the click
options and `command_line()` cannot drift apart: a stored run always carries the
exact command that reproduces it. Every malformed value raises SpecError naming the
field and what is allowed; nothing is silently defaulted.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from device.api import ALLOC_POLICIES
from device.api import PARTIAL_TRACKING
from device.api import BACKINGS
from device.api import DISCARD_METHOD_NAMES
from device.api import HINT_DESIGNS
from device.api import PROTOCOL_NAMES, PROTOCOLS, max_batch_of
from lab.trials.backends import QEMU_BALLOON_ARMS, QEMU_MIGRATE_ARMS, check_qemu_spec
from probes.session import OPT_IN

KINDS = ("balloon", "migrate")
BALLOON_ARMS = PROTOCOL_NAMES
MIGRATE_ARMS = HINT_DESIGNS
ARMS_BY_KIND = {"balloon": BALLOON_ARMS + QEMU_BALLOON_ARMS, "migrate": MIGRATE_ARMS + QEMU_MIGRATE_ARMS}
DEFAULT_ARMS = {"balloon": BALLOON_ARMS, "migrate": MIGRATE_ARMS}  # the real stack only when asked for
NO_PROBES_SUFFIX = "/no-probes"
GUEST_MIB_RANGE = (64, 65536)
DEFAULT_BANDWIDTH = "10gbit"


class SpecError(ValueError):
    """A malformed spec; the message names the field and the allowed values."""

    def __init__(self, field_name: str, message: str, allowed: Any = None) -> None:
        self.field = field_name
        self.detail = message
        if allowed is not None:
            if isinstance(allowed, (list, tuple)):
                allowed = ", ".join(str(a) for a in allowed)
            self.detail += f" (allowed: {allowed})"
        super().__init__(f"{field_name}: {self.detail}")

    def for_cli(self, flags: Mapping[str, str] | None = None) -> str:
        """The message naming the command-line option (--guest-mib) instead of the spec
        field (guest_mib); `flags` maps fields a command spells differently (run: arms -> --protocol)."""
        flag = (flags or {}).get(self.field) or next((f.flag for f in FIELDS if f.name == self.field), None)
        return f"{flag or self.field}: {self.detail}"


# --- bandwidth --------------------------------------------------------------------
_BW_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps|b)?(/s)?\s*$", re.IGNORECASE)
_BW_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
BANDWIDTH_FORMS = "a number of bits/s or e.g. 800mbit, 10gbit, 2.5gbit/s, 1gbps"


def parse_bandwidth(value: Any) -> int:
    """Bits per second from 10gbit / 10gbps / 10gbit/s / 800mbit / 1000000 (decimal SI).

    Byte units are refused rather than guessed: "10gb" could mean bits or bytes.
    """
    if isinstance(value, bool):
        raise SpecError("bandwidth", f"{value!r} is not a bandwidth", BANDWIDTH_FORMS)
    if isinstance(value, int):
        bits = value
    elif isinstance(value, str):
        m = _BW_RE.match(value)
        if not m or (m.group(3) or "").lower() == "b" or (m.group(3) is None and m.group(4)):
            raise SpecError("bandwidth", f"cannot parse {value!r}", BANDWIDTH_FORMS)
        bits = int(round(float(m.group(1)) * _BW_SCALE[m.group(2).lower()]))
    else:
        raise SpecError("bandwidth", f"{value!r} is not a bandwidth", BANDWIDTH_FORMS)
    if bits <= 0:
        raise SpecError("bandwidth", f"must be positive, got {value!r}", BANDWIDTH_FORMS)
    return bits


def format_bandwidth(bits: int) -> str:
    """Shortest exact text form: 10000000000 -> "10gbit"."""
    for unit, scale in (("t", 10**12), ("g", 10**9), ("m", 10**6), ("k", 10**3)):
        if bits % scale == 0:
            return f"{bits // scale}{unit}bit"
    return f"{bits}bit"


# --- TOML literals (workload params on the command line and in to_toml) -----------
def toml_value(v: Any) -> str:
    """A TOML literal for a scalar, list or inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"{v!r} has no TOML form")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def parse_param(text: str) -> tuple[str, Any]:
    """"key=value" from --workload-param: the value is read as a TOML literal
    (42, 0.5, true, [1, 2], "x"), else kept as a bare string (pattern=random)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError("workload_params", f"{text!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


# --- the spec -----------------------------------------------------------------------
@dataclass
class ArmPlan:
    """One arm as scheduled: `label` is what the store records, `arm` what the runner runs."""

    label: str
    arm: str
    probes: bool


@dataclass
class ExperimentSpec:
    name: str = ""  # empty -> derived from kind, sizes and workload
    kind: str = "balloon"
    guest_mib: int = 1024
    inflate_mib: int | float = 512  # float: a whole number of 4 KiB pages, e.g. 100.5
    arms: list[str] = field(default_factory=list)  # empty -> every arm of the kind
    workload: str = "aged"
    workload_params: dict[str, Any] = field(default_factory=dict)
    trials: int = 10
    warmups: int = 1
    seed: int = 0
    probes: bool = True
    batch_pages: int | None = None  # None: as Linux, 256 for pfn/pfn-ranges, else the protocol's own
    bitmap_pages_per_request: int | None = None  # None: the bitmap protocol's own default
    discard: str = "madvise"
    bandwidth: int = 10**10  # bits/s; strings like "10gbit" are parsed
    probe_overhead: bool = False  # also run arms[0] without probes to measure their cost
    backing: str = "4k"
    partial_tracking: str = "full"
    alloc_policy: str = "linux"
    guest_init_on_alloc: bool = False  # the lab's guest zeroes balloon pages (docs/REAL_STACK.md)
    twins: bool = True  # with probes: timings from unprobed twin trials, counts from probed ones (lab.trials.twins)
    extra_probes: list[str] = field(default_factory=list)  # opt-in probes (probes.session.OPT_IN)

    def __post_init__(self) -> None:
        self.bandwidth = parse_bandwidth(self.bandwidth)
        if isinstance(self.extra_probes, str):   # from the command line: "pagefree,syscall-time"
            self.extra_probes = [p.strip() for p in self.extra_probes.split(",") if p.strip()]
        if isinstance(self.arms, str):       # from the command line: given, so it must name arms
            text = self.arms
            self.arms = [a.strip() for a in text.split(",") if a.strip()]
            if not self.arms:
                raise SpecError("arms", f"{text!r} names no arm", ARMS_BY_KIND.get(self.kind, BALLOON_ARMS))
        self._validate()

    # validation -------------------------------------------------------------------
    def _validate(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        allowed_arms = ARMS_BY_KIND[self.kind]
        if not self.arms:
            self.arms = list(DEFAULT_ARMS[self.kind])
        if not isinstance(self.arms, list) or not all(isinstance(a, str) for a in self.arms):
            raise SpecError("arms", f"must be a list of arm names, got {self.arms!r}", allowed_arms)
        for a in self.arms:
            if a not in allowed_arms:
                raise SpecError("arms", f"unknown {self.kind} arm {a!r}", allowed_arms)
        if len(set(self.arms)) != len(self.arms):
            raise SpecError("arms", f"arm listed twice in {self.arms}")
        g = _check_int("guest_mib", self.guest_mib, *GUEST_MIB_RANGE)
        if g % 4:
            raise SpecError("guest_mib", f"{g} is not a multiple of 4", "multiples of 4 from 64 to 65536")
        low = 1 if self.kind == "balloon" else 0
        self.inflate_mib = check_mib("inflate_mib", self.inflate_mib, low, g - 1)
        if not isinstance(self.workload, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.workload):
            raise SpecError("workload", f"{self.workload!r} is not a workload name", "letters, digits, _ . -")
        if not isinstance(self.workload_params, dict):
            raise SpecError("workload_params", f"must be a table of KEY = VALUE, got {self.workload_params!r}")
        for k, v in self.workload_params.items():
            try:
                toml_value(v)
            except TypeError:
                raise SpecError("workload_params", f"{k} = {v!r} is not a plain value",
                                "strings, numbers, booleans, lists, tables") from None
        _check_int("trials", self.trials, 1, None)
        _check_int("warmups", self.warmups, 0, None)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_bool("probes", self.probes)
        _check_bool("probe_overhead", self.probe_overhead)
        _check_bool("guest_init_on_alloc", self.guest_init_on_alloc)
        _check_bool("twins", self.twins)
        if self.probe_overhead and not self.probes:
            raise SpecError("probe_overhead", "measuring probe overhead needs probes = true")
        if not isinstance(self.extra_probes, list):
            raise SpecError("extra_probes", f"must be a list of probe names, got {self.extra_probes!r}", OPT_IN)
        for name in self.extra_probes:
            if name not in OPT_IN:
                raise SpecError("extra_probes", f"{name!r} is not an opt-in probe", OPT_IN)
        if self.batch_pages is not None:
            limit = max_batch_of(self.arms)     # the pfn wire format's 256, if an arm uses it
            _check_int("batch_pages", self.batch_pages, 1, limit)
        if self.bitmap_pages_per_request is not None:
            n = _check_int("bitmap_pages_per_request", self.bitmap_pages_per_request, 8, None)
            if n % 8:
                raise SpecError("bitmap_pages_per_request", f"{n} is not a multiple of 8 (whole bitmap bytes)")
        _check_choice("discard", self.discard, DISCARD_METHOD_NAMES)
        _check_choice("backing", self.backing, BACKINGS)
        _check_choice("partial_tracking", self.partial_tracking, PARTIAL_TRACKING)
        _check_choice("alloc_policy", self.alloc_policy, ALLOC_POLICIES)
        if not isinstance(self.name, str) or len(self.name) > 200 or not self.name.isprintable():
            raise SpecError("name", f"{self.name!r} is not a printable name of at most 200 characters")
        if not self.name.strip():
            self.name = f"{self.kind}-{self.guest_mib}m-{self.workload}"

    # derived ------------------------------------------------------------------------
    def schedule(self) -> list[ArmPlan]:
        """Arms in trial order; with probe_overhead, arms[0] again without probes."""
        plans = [ArmPlan(a, a, self.probes) for a in self.arms]
        if self.probe_overhead:
            plans.append(ArmPlan(self.arms[0] + NO_PROBES_SUFFIX, self.arms[0], False))
        return plans

    def batch_pages_for(self, arm: str) -> int | None:
        """Driver request size for an arm: bitmap_pages_per_request on the bitmap wire format,
        else the explicit value, else the pfn format's max_batch (256) or None (the protocol's own)."""
        if self.bitmap_pages_per_request is not None and PROTOCOLS[arm].wire_format == "bitmap":
            return self.bitmap_pages_per_request
        return self.batch_pages if self.batch_pages is not None else max_batch_of([arm])

    # serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arms"] = list(self.arms)
        d["workload_params"] = dict(self.workload_params)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "spec") -> "ExperimentSpec":
        if not isinstance(data, Mapping):
            raise SpecError("spec", f"{source} is not a table of fields")
        _reject_unknown(data, source)
        return cls(**dict(data))

    def to_toml(self) -> str:
        """A spec file that load_spec() reads back to an equal spec."""
        lines = []
        for f in FIELDS:
            v = getattr(self, f.name)
            if f.name == "workload_params" or v is None:
                continue
            if f.name == "bandwidth":
                v = format_bandwidth(v)
            lines.append(f"{f.name} = {toml_value(v)}")
        if self.workload_params:
            lines.append("\n[workload_params]")
            lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in self.workload_params.items()]
        return "\n".join(lines) + "\n"

    def command_line(self, command: str = "compare") -> str:
        """The `balloon-lab <command> ...` line that reproduces this spec, with every
        field explicit so later changes of defaults do not change its meaning."""
        argv = ["balloon-lab", command]
        for f in FIELDS:
            argv += f.to_argv(getattr(self, f.name))
        return shlex.join(argv)


def _check_int(name: str, v: Any, lo: int | None, hi: int | None) -> int:
    rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(name, f"must be an integer, got {v!r}", f"integers {rng}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SpecError(name, f"{v} is out of range", f"integers {rng}")
    return v


PAGES_PER_MIB = 256


def check_mib(name: str, v: Any, lo: int, hi: int) -> int | float:
    """An integer, or a float that is a whole number of 4 KiB pages (so the last request
    of an inflate can be partial); integral floats come back as int."""
    allowed = f"{lo}..{hi}; fractions too, in whole 4 KiB pages: multiples of 1/256 such as 100.5"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(name, f"must be a number of MiB, got {v!r}", allowed)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, float) and not (v * PAGES_PER_MIB).is_integer():
        raise SpecError(name, f"{v} MiB is not a whole number of 4 KiB pages", allowed)
    if not lo <= v <= hi:
        raise SpecError(name, f"{v} is out of range", allowed)
    return v


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise SpecError(name, f"must be true or false, got {v!r}", "true, false")


def _check_choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise SpecError(name, f"unknown value {v!r}", choices)


def _reject_unknown(data: Mapping[str, Any], source: str) -> None:
    names = [f.name for f in FIELDS]
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise SpecError(str(key), f"unknown key in {source}{more}", names)


# --- the field table: TOML key <-> CLI flag ------------------------------------------
@dataclass(frozen=True)
class Field:
    name: str
    flag: str
    help: str
    click_type: Any = None
    is_flag_pair: bool = False  # --x/--no-x
    to_text: Callable[[Any], list[str]] | None = None
    aliases: tuple[str, ...] = ()   # other spellings every command accepts (--param)

    def to_argv(self, value: Any) -> list[str]:
        if value is None:
            return []
        if self.is_flag_pair:
            return [self.flag if value else "--no-" + self.flag[2:]]
        if self.to_text:
            out: list[str] = []
            for text in self.to_text(value):
                out += [self.flag, text]
            return out
        return [self.flag, str(value)]


FIELDS: tuple[Field, ...] = (
    Field("name", "--name", "Name of the experiment."),
    Field("kind", "--kind", "balloon (inflate/deflate) or migrate.", click.Choice(KINDS)),
    Field("guest_mib", "--guest-mib", "Guest RAM in MiB (multiple of 4, 64..65536).", int),
    Field("inflate_mib", "--inflate-mib", "MiB to inflate the balloon by (< guest; fractions of whole 4 KiB "
          "pages allowed, e.g. 100.5).", float),
    Field("arms", "--arms", "Comma-separated arms: balloon " + ",".join(BALLOON_ARMS)
          + "; migrate " + ",".join(MIGRATE_ARMS) + " (the first is the baseline).",
          to_text=lambda v: [",".join(v)]),
    Field("workload", "--workload", "Guest workload name."),
    Field("workload_params", "--workload-param", "Workload parameter KEY=VALUE (repeatable).",
          to_text=lambda v: [f"{k}={toml_value(x)}" for k, x in v.items()], aliases=("--param",)),
    Field("trials", "--trials", "Measured trials per arm (>= 1).", int),
    Field("warmups", "--warmups", "Warm-up trials per arm, not in the statistics (>= 0).", int),
    Field("seed", "--seed", "Random seed of the workload layout (round r uses seed + r).", int),
    Field("probes", "--probes", "Attach eBPF probes.", is_flag_pair=True),
    Field("batch_pages", "--batch-pages", "Pages per driver request.", int),
    Field("bitmap_pages_per_request", "--bitmap-pages-per-request",
          "Pages one bitmap request covers (multiple of 8).", int),
    Field("discard", "--discard", "How the device frees memory.", click.Choice(DISCARD_METHOD_NAMES)),
    Field("bandwidth", "--bandwidth", "Migration link rate, e.g. 10gbit.",
          to_text=lambda v: [format_bandwidth(v)]),
    Field("probe_overhead", "--probe-overhead", "Also run the first arm without probes.",
          is_flag_pair=True),
    Field("backing", "--backing", "Host pages under guest RAM: 4k, thp (MADV_HUGEPAGE), hugetlb.",
          click.Choice(BACKINGS)),
    Field("partial_tracking", "--partial-tracking", "Huge backings: track every partially ballooned host "
          "page (full) or one per request as QEMU (qemu).", click.Choice(PARTIAL_TRACKING)),
    Field("alloc_policy", "--alloc-policy", "Pages the balloon takes: linux (order-0) or hugepage-aware "
          "(whole 2 MiB blocks first).", click.Choice(ALLOC_POLICIES)),
    Field("guest_init_on_alloc", "--guest-init-on-alloc",
          "The lab's guest zeroes each page it allocates for the balloon, as Linux's init_on_alloc.",
          is_flag_pair=True),
    Field("extra_probes", "--extra-probes", "Opt-in probes beside the default set, comma-separated: pagefree "
          "(kmem page frees, one event per freed page in every arm), syscall-time (kernel time of each "
          "madvise/fallocate: a program at every syscall's entry). Each costs the probed trials more "
          "(docs/PROBES.md).", to_text=lambda v: [",".join(v)] if v else []),
    Field("twins", "--twins", "With probes on, run every trial twice: timings from the twin with the probes "
          "detached, counts and kernel shares from the probed twin (default on; --no-twins times the probed "
          "trials, which the probes slow).", is_flag_pair=True),
)


def default_text(name: str, defaults: Mapping[str, Any] | None = None) -> str:
    """How --help shows a field's default: the value `ExperimentSpec()` (or the command's
    own `defaults`) would use, in command-line form."""
    if defaults and name in defaults:
        v = defaults[name]
    else:
        f = next(f for f in dataclasses.fields(ExperimentSpec) if f.name == name)
        v = f.default if f.default is not dataclasses.MISSING else f.default_factory()   # type: ignore[misc]
    if v in (None, "", [], {}):
        return _DEFAULT_WORDS.get(name, "none")
    if name == "bandwidth":
        return format_bandwidth(parse_bandwidth(v))
    if isinstance(v, bool):
        return str(v).lower()
    return ",".join(v) if isinstance(v, list) else str(v)


_DEFAULT_WORDS = {"name": "derived", "arms": "all arms of the kind", "batch_pages": "as Linux (256 for pfn arms)",
                  "bitmap_pages_per_request": "the protocol's own"}


def spec_options(fn: Callable | None = None, *, only: tuple[str, ...] | None = None,
                 spec_file: bool = True, defaults: Mapping[str, Any] | None = None) -> Callable:
    """click decorator adding --spec FILE and one option per spec field (or the fields in
    `only`), with the same names, aliases, help and shown defaults in every command. The
    command then calls `spec_from_cli(kwargs)` (which pops these options)."""
    def decorate(fn: Callable) -> Callable:
        for f in reversed(FIELDS):
            if only is not None and f.name not in only:
                continue
            dest = "opt_" + f.name
            # the option's own default stays None so a spec file's value is not overridden
            text = f"{f.help}  [default: {default_text(f.name, defaults)}]"
            if f.is_flag_pair:
                opt = click.option(f"{f.flag}/--no-{f.flag[2:]}", dest, default=None, help=text)
            elif f.name == "workload_params":
                opt = click.option(f.flag, *f.aliases, dest, multiple=True, metavar="KEY=VALUE", help=text)
            else:
                opt = click.option(f.flag, *f.aliases, dest, type=f.click_type, default=None, help=text)
            fn = opt(fn)
        if not spec_file:
            return fn
        return click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path),
                            default=None, help="TOML spec file; flags override its values.")(fn)
    return decorate(fn) if fn is not None else decorate


def spec_from_cli(kwargs: dict[str, Any], fixed: Mapping[str, Any] | None = None) -> "ExperimentSpec":
    """Build the spec from the options spec_options() added (removing them from kwargs),
    with `fixed` values on top (what the command itself decides, e.g. run's one trial)."""
    overrides: dict[str, Any] = dict(fixed or {})
    for f in FIELDS:
        if "opt_" + f.name not in kwargs:
            continue
        v = kwargs.pop("opt_" + f.name, None)
        if f.name == "workload_params":
            if v:
                overrides[f.name] = dict(parse_param(p) for p in v)
        elif v is not None:
            overrides[f.name] = v
    try:
        return load_spec(kwargs.pop("spec_path", None), overrides)
    except SpecError:
        raise
    except ValueError as e:      # a parse_param-style failure has already named its field
        raise SpecError("spec", str(e)) from None


def load_spec(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ExperimentSpec:
    """Spec from a TOML file (or defaults when path is None) with overrides on top.
    workload_params overrides merge into the file's table; everything else replaces."""
    data: dict[str, Any] = {}
    source = "spec"
    if path is not None:
        p = Path(path)
        source = f"spec file {p}"
        try:
            with open(p, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise SpecError("spec", f"{p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise SpecError("spec", f"{p} is not valid TOML: {e}") from None
        except OSError as e:
            raise SpecError("spec", f"cannot read {p}: {e.strerror}") from None
        _reject_unknown(data, source)
    overrides = dict(overrides or {})
    _reject_unknown(overrides, "overrides")
    if "workload_params" in overrides and isinstance(data.get("workload_params"), dict):
        overrides["workload_params"] = {**data["workload_params"], **overrides["workload_params"]}
    data.update(overrides)
    spec = ExperimentSpec.from_dict(data, source=source)
    validate_workload(spec)
    return spec


def validate_workload(spec: ExperimentSpec) -> None:
    """Let the workloads package refuse a bad workload name or parameters now, before
    any trial runs (building a workload only validates; it touches no memory)."""
    try:
        from workloads import WORKLOADS, make_workload
    except ImportError:
        return
    if spec.workload not in WORKLOADS:
        raise SpecError("workload", f"unknown workload {spec.workload!r}", list(WORKLOADS))
    try:
        check_qemu_spec(spec)
    except ValueError as e:
        field_name = "batch_pages" if str(e).startswith("batch_pages") else "workload"
        raise SpecError(field_name, str(e).removeprefix("batch_pages: ")) from None
    try:
        make_workload(spec.workload, dict(spec.workload_params), seed=spec.seed)
    except (ValueError, TypeError) as e:
        raise SpecError("workload_params", str(e)) from None
