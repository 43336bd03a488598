"""ExperimentSpec: TOML and flags, validation messages, round trips, reproduction command."""
from __future__ import annotations

import shlex

import click
import pytest
from click.testing import CliRunner

from lab.trials.spec import (BALLOON_ARMS, ExperimentSpec, SpecError, format_bandwidth, load_spec, parse_bandwidth,
                      spec_from_cli, spec_options)

GOOD_TOML = """
name = "inflate-7g"
kind = "balloon"
guest_mib = 8192
inflate_mib = 7168
arms = ["pfn", "bitmap", "chunks"]
workload = "fragment"
trials = 12
warmups = 2
seed = 42
probes = false
batch_pages = 128
bitmap_pages_per_request = 32768
discard = "punch-hole"
bandwidth = "10gbit"

[workload_params]
share = 0.25
degree = 0.75
"""


def write(tmp_path, text, name="spec.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_toml_file_loads_every_field(tmp_path):
    s = load_spec(write(tmp_path, GOOD_TOML))
    assert s.name == "inflate-7g" and s.guest_mib == 8192 and s.inflate_mib == 7168
    assert s.arms == ["pfn", "bitmap", "chunks"]
    assert s.workload_params == {"share": 0.25, "degree": 0.75}
    assert (s.trials, s.warmups, s.seed, s.probes) == (12, 2, 42, False)
    assert s.batch_pages == 128 and s.bitmap_pages_per_request == 32768
    assert s.discard == "punch-hole" and s.bandwidth == 10_000_000_000


def test_defaults_fill_arms_and_name():
    s = load_spec(None)
    assert s.arms == list(BALLOON_ARMS)
    assert s.name == "balloon-1024m-aged"
    m = load_spec(None, {"kind": "migrate", "inflate_mib": 0})
    assert m.arms == ["none", "upstream", "bitmap"]


@pytest.mark.parametrize("text, field, fragment", [
    ("trails = 3", "trails", "did you mean 'trials'"),
    ("guest_mib = 60", "guest_mib", "60 is out of range"),
    ("guest_mib = 1026", "guest_mib", "multiple of 4"),
    ("guest_mib = \"1024\"", "guest_mib", "must be an integer"),
    ("inflate_mib = 1024", "inflate_mib", "out of range"),
    ("arms = [\"pfn\", \"sg\"]", "arms", "unknown balloon arm 'sg'"),
    ("arms = [\"pfn\", \"pfn\"]", "arms", "listed twice"),
    ("kind = \"migrate\"\ninflate_mib = 0\narms = [\"pfn\"]", "arms", "unknown migrate arm 'pfn'"),
    ("trials = 0", "trials", "out of range"),
    ("warmups = -1", "warmups", "out of range"),
    ("probes = 1", "probes", "true or false"),
    ("discard = \"dontneed\"", "discard", "unknown value"),
    ("bandwidth = \"10gb\"", "bandwidth", "cannot parse"),
    ("batch_pages = 512", "batch_pages", "out of range"),
    ("bitmap_pages_per_request = 100", "bitmap_pages_per_request", "multiple of 8"),
    ("probe_overhead = true\nprobes = false", "probe_overhead", "needs probes"),
    ("workload = \"a b\"", "workload", "not a workload name"),
])
def test_malformed_spec_names_field_and_allowed_values(tmp_path, text, field, fragment):
    with pytest.raises(SpecError) as ei:
        load_spec(write(tmp_path, text))
    assert ei.value.field == field
    assert fragment in str(ei.value)
    assert str(ei.value).startswith(field + ":")


def test_unknown_arm_lists_allowed_arms(tmp_path):
    with pytest.raises(SpecError, match=r"allowed: pfn, pfn-ranges, bitmap, chunks"):
        load_spec(None, {"arms": ["bitmapp"]})


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(tmp_path, "guest_mib = = 4"))
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")


def test_overrides_replace_fields_and_merge_workload_params(tmp_path):
    s = load_spec(write(tmp_path, GOOD_TOML), {"trials": 3, "workload_params": {"share": 0.5, "stale": False}})
    assert s.trials == 3
    assert s.workload_params == {"share": 0.5, "degree": 0.75, "stale": False}


def test_workload_is_validated_by_the_workloads_package(tmp_path):
    with pytest.raises(SpecError) as ei:
        load_spec(None, {"workload": "fragmented"})
    assert ei.value.field == "workload" and "fragment" in str(ei.value)
    with pytest.raises(SpecError) as ei:
        load_spec(None, {"workload": "fragment", "workload_params": {"sharee": 0.5}})
    assert ei.value.field == "workload_params" and "sharee" in str(ei.value)


def test_batch_pages_as_linux():
    s = ExperimentSpec(arms=["pfn", "bitmap"])
    assert s.batch_pages_for("pfn") == 256 and s.batch_pages_for("bitmap") is None
    assert ExperimentSpec(arms=["bitmap"], batch_pages=4096).batch_pages_for("bitmap") == 4096


@pytest.mark.parametrize("text, bits", [("10gbit", 10**10), ("10Gbit/s", 10**10), ("2.5gbps", 25 * 10**8),
                                        ("800mbit", 8 * 10**8), ("1000", 1000), (123, 123)])
def test_bandwidth_parsing(text, bits):
    assert parse_bandwidth(text) == bits
    assert parse_bandwidth(format_bandwidth(bits)) == bits


@pytest.mark.parametrize("bad", ["fast", "10 GB", "-1gbit", "0", "10MB/s", True])
def test_bandwidth_refused(bad):
    with pytest.raises(SpecError, match="bandwidth"):
        parse_bandwidth(bad)


def test_dict_and_toml_round_trip(tmp_path):
    s = load_spec(write(tmp_path, GOOD_TOML), {"probe_overhead": False})
    assert ExperimentSpec.from_dict(s.to_dict()) == s
    again = load_spec(write(tmp_path, s.to_toml(), "again.toml"))
    assert again == s


def test_probe_overhead_schedules_baseline_without_probes():
    s = ExperimentSpec(arms=["pfn", "bitmap"], probes=True, probe_overhead=True)
    plans = s.schedule()
    assert [(p.label, p.arm, p.probes) for p in plans] == [
        ("pfn", "pfn", True), ("bitmap", "bitmap", True), ("pfn/no-probes", "pfn", False)]


def _cli():
    captured = {}

    @click.command()
    @spec_options
    def cmd(**kwargs):
        captured["spec"] = spec_from_cli(kwargs)
        assert not kwargs, f"spec options left behind: {kwargs}"

    return cmd, captured


def test_command_line_reproduces_spec_through_the_real_options(tmp_path):
    s = load_spec(write(tmp_path, GOOD_TOML))
    line = s.command_line()
    argv = shlex.split(line)
    assert argv[:2] == ["balloon-lab", "compare"]
    cmd, captured = _cli()
    res = CliRunner().invoke(cmd, argv[2:])
    assert res.exit_code == 0, res.output
    assert captured["spec"] == s


def test_flags_override_spec_file(tmp_path):
    cmd, captured = _cli()
    p = write(tmp_path, GOOD_TOML)
    res = CliRunner().invoke(cmd, ["--spec", str(p), "--trials", "4", "--arms", "pfn,chunks",
                                   "--workload-param", "share=0.75", "--workload-param", "stale=false", "--probes"])
    assert res.exit_code == 0, res.output
    s = captured["spec"]
    assert s.trials == 4 and s.arms == ["pfn", "chunks"] and s.probes is True
    assert s.workload_params == {"share": 0.75, "degree": 0.75, "stale": False}
    assert s.guest_mib == 8192  # from the file


def test_cli_bad_value_raises_spec_error():
    cmd, _ = _cli()
    res = CliRunner().invoke(cmd, ["--arms", "pfn,nope"])
    assert isinstance(res.exception, SpecError) and "nope" in str(res.exception)
