"""Standard QMP clients drive the lab's VMM: QEMU's own `qemu.qmp` library (async and
the sync wrapper qmp-shell uses) and a raw socket speaking the JSON stream as QEMU
parses it. All against a real VMM + guest process pair."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest

from device.virtio.layout import MiB
from device.vmm.monitor import ERROR_CLASSES, JsonStream
from lab.trials.model.balloon_trial import BalloonTrial
from lab.trials.model.processes import LabProcesses

GUEST_MIB = 256


# --- the stream splitter ---------------------------------------------------------------
def test_json_stream_needs_no_newline_and_survives_any_split():
    text = b'{"execute":"qmp_capabilities","arguments":{}}{"execute":"x","arguments":{"s":"}{\\"]"}} [1]'
    whole = JsonStream().feed(text + b" ")
    assert [json.loads(v) for v in whole] == [
        {"execute": "qmp_capabilities", "arguments": {}}, {"execute": "x", "arguments": {"s": '}{"]'}}, [1]]
    for cut in range(1, len(text)):              # any split into two reads gives the same values
        s = JsonStream()
        assert s.feed(text[:cut]) + s.feed(text[cut:] + b" ") == whole
    s = JsonStream()
    assert [s.feed(bytes([b])) for b in b'{"a":1}'][-1] == [b'{"a":1}'] and s.pending == 0


def test_json_stream_returns_stray_tokens_for_refusal():
    s = JsonStream()
    assert s.feed(b"foo") == []                  # may continue in the next read
    assert s.feed(b'bar {"execute":"q"}') == [b"foobar", b'{"execute":"q"}']


# --- a real VMM ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vmm():
    lp = LabProcesses(BalloonTrial(protocol="chunks", guest_mib=GUEST_MIB, inflate_mib=64))
    try:
        yield lp
    finally:
        lp.close()


def test_qemu_qmp_connects_inflates_and_reads_query_balloon(vmm):
    """QEMU's own client library: greeting, negotiation, query-balloon, balloon, the
    BALLOON_CHANGE events (with timestamps) up to the target, and QEMU's error classes."""
    from qemu.qmp import ExecuteError, QMPClient

    async def drive() -> None:
        qmp = QMPClient("balloon-lab-vmm")
        await asyncio.wait_for(qmp.connect(vmm.monitor_path), 10)
        try:
            version = qmp.greeting.QMP.version
            assert set(version["qemu"]) == {"major", "minor", "micro"} and isinstance(version["package"], str)
            assert await qmp.execute("query-balloon") == {"actual": GUEST_MIB * MiB}
            target = (GUEST_MIB - 64) * MiB
            with qmp.listener("BALLOON_CHANGE") as listener:
                assert await qmp.execute("balloon", {"value": target}) == {}
                seen = []
                while not seen or seen[-1]["data"]["actual"] != target:
                    seen.append(await asyncio.wait_for(listener.get(), 30))
            assert all(e["timestamp"]["seconds"] > 0 and 0 <= e["timestamp"]["microseconds"] < 10**6 for e in seen)
            assert await qmp.execute("query-balloon") == {"actual": target}
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("no-such-command")
            assert e.value.error.error.class_ == "CommandNotFound"
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("balloon", {"value": 0})
            assert e.value.error.error.class_ == "GenericError"
            await qmp.execute("balloon", {"value": GUEST_MIB * MiB})
        finally:
            await qmp.disconnect()

    asyncio.run(drive())


def test_qmp_shell_sync_wrapper(vmm):
    """qmp-shell's sync wrapper (qemu.qmp.legacy.QEMUMonitorProtocol)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    q = QEMUMonitorProtocol(vmm.monitor_path)
    try:
        greeting = q.connect(negotiate=True)
        assert "qemu" in greeting["QMP"]["version"]
        assert q.cmd("query-status")["running"] is True
        assert q.cmd_obj({"execute": "query-balloon"})["return"]["actual"] > 0
    finally:
        q.close()


def _raw(path: str, data: bytes, replies: int) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        buf, out = b"", []
        s.sendall(data)
        while len(out) < replies + 1:
            while b"\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, f"monitor closed after {out}"
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            out.append(json.loads(line))
        return out[1:]                       # without the greeting


def test_raw_stream_errors_are_qemus(vmm):
    """No newline needed; malformed input gets QEMU's texts and classes; ids echo back."""
    replies = _raw(vmm.monitor_path,
                   b'{"execute":"qmp_capabilities"}'       # no newline anywhere
                   b'{"execute":"query-balloon","id":{"n":[1]}}'
                   b'[1,2] oops '
                   b'{"execute":"query-balloon","arguments":3,"id":7}'
                   b'{"exec":"x"}{"execute":"query-balloon","nope":1}'
                   b'{"execute":"qmp_capabilities","id":"again"}', 8)
    assert replies[0] == {"return": {}}
    assert replies[1]["id"] == {"n": [1]} and "actual" in replies[1]["return"]
    assert replies[2]["error"]["desc"] == "QMP input must be a JSON object"
    assert replies[3]["error"]["desc"].startswith("JSON parse error")
    assert replies[4] == {"id": 7, "error": {"class": "GenericError",
                                             "desc": "QMP input member 'arguments' must be an object"}}
    assert replies[5]["error"]["desc"] == "QMP input member 'exec' is unexpected"
    assert replies[6]["error"]["desc"] == "QMP input member 'nope' is unexpected"
    assert replies[7]["error"]["class"] == "CommandNotFound" and replies[7]["id"] == "again"
    assert all(r["error"]["class"] in ERROR_CLASSES for r in replies[2:])


def test_balloon_right_after_the_socket_appears_is_applied_when_the_driver_comes_up(tmp_path):
    """As QEMU does: `balloon` is accepted as soon as the device exists (the monitor socket
    is there) and the target is applied once the guest's driver is up; a script written
    for QEMU must not meet "No balloon device has been activated" during the guest's boot."""
    import subprocess
    import sys
    import time

    from lab.trials.monitor_client import QMPClient, wait_for_socket

    monitor, agent = str(tmp_path / "monitor.sock"), str(tmp_path / "agent.sock")
    vmm = subprocess.Popen([sys.executable, "-m", "device.vmm.process", "--guest-mib", str(GUEST_MIB),
                            "--protocol", "pfn", "--monitor", monitor, "--agent", agent, "--"])
    try:
        wait_for_socket(monitor, 30, lambda: vmm.poll() is None)
        qmp = QMPClient(monitor, timeout=30)
        target = (GUEST_MIB - 32) * MiB
        booting = not (tmp_path / "agent.sock").exists()
        assert qmp.execute("balloon", {"value": target}) == {}       # the driver is not up yet
        assert booting, "the guest's driver came up before the test could ask: nothing was tested"
        deadline = time.monotonic() + 30
        while qmp.execute("query-balloon")["actual"] != target:
            assert time.monotonic() < deadline, qmp.execute("query-balloon")
            time.sleep(0.05)
        assert qmp.execute("x-balloon-lab-counters")["inflate"]["pages"] == 32 * 256
        qmp.execute("quit")
        qmp.close()
        vmm.wait(10)
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()
