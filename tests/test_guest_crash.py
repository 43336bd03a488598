"""Reading a real guest's crash from its console: consoles captured from destination guests
of `balloon-lab migrate --backend qemu --arms upstream` (QEMU 7.2, Linux 6.1, TCG) that
crashed after the migration completed (docs/REAL_STACK.md, 'A destination guest that crashes')."""
from pathlib import Path

from lab.trials.qemu.guest_crash import read_crash

CONSOLES = Path(__file__).parent / "data" / "guest_consoles"


def test_a_panic_in_an_interrupt_names_the_task_it_interrupted():
    crash = read_crash((CONSOLES / "panic_in_interrupt.txt").read_text())
    assert crash.header == "BUG: unable to handle page fault for address: 00000000c066e3c0"
    assert crash.panic == "Kernel panic - not syncing: Fatal exception in interrupt"
    assert crash.trace[0] == "lapic_next_event"                 # where it faulted
    assert "report_free_page_func" in crash.trace               # the hinting worker it interrupted
    line = crash.describe()
    assert "report_free_page_func" in line and "\n" not in line and " ? " not in line
    assert line.endswith("; Kernel panic - not syncing: Fatal exception in interrupt")


def test_a_corrupted_list_is_the_header_without_a_panic():
    crash = read_crash((CONSOLES / "list_del_corruption.txt").read_text())
    assert crash.header.startswith("list_del corruption. prev->next should be ")
    assert crash.trace[:3] == ("pick_next_task_fair", "__schedule", "schedule")


def test_a_console_without_an_oops_is_no_crash():
    assert read_crash((CONSOLES / "source_booted.txt").read_text()) is None
    assert read_crash("") is None


def test_repeated_frames_are_counted_and_a_long_trace_keeps_both_ends():
    console = "\n".join(["[    1.0] BUG: kernel NULL pointer dereference, address: 0000000000000008", "Call Trace:"]
                        + [f" f{i}+0x1/0x10" for i in range(20)] + [" f19+0x1/0x10", " ? stale+0x1/0x10",
                                                                    "---[ end trace 0 ]---"])
    line = read_crash(console).describe()
    assert line.startswith("BUG: kernel NULL pointer dereference")
    assert "f0 < f1 < f2 < f3 < ... < f13" in line and line.endswith("f18 < f19 x2") and "stale" not in line
