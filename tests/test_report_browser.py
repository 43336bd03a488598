"""A report of a real 3-arm, 6-trial run with eBPF probes, opened in headless Chromium
(Debian's `chromium` + `chromium-driver`): it renders, logs no console error, requests
nothing but the file itself, shows every chart, and stays under 2 MB."""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from lab.trials.experiment import run_experiment
from lab.trials.arm_trial import run_trial
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store
from lab.cli.report_data import load
from reports.html import write_report

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MAX_BYTES = 2 * 1000 * 1000
EXPECTED_CHARTS = ("plot-totals", "plot-stages-inflate", "plot-stages-deflate", "plot-stage-shares",
                   "plot-madvise-len", "plot-madvise-ns", "plot-page-alloc-order", "plot-run-length",
                   "plot-kicks-per-mib")

pytestmark = [pytest.mark.slow, pytest.mark.ebpf]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The README's default comparison (pfn, bitmap, chunks, probes on, with the opt-in
    kernel time so every chart has data), on small guests and 6 trials + 1 warm-up each
    (the default is 10) so it takes about a minute: every chart and statistic the report
    draws needs no more."""
    from probes.session import DEFAULT_CONCERNS, ProbeSession

    tmp = tmp_path_factory.mktemp("browser")
    spec = ExperimentSpec(arms=["pfn", "bitmap", "chunks"], guest_mib=128, inflate_mib=64, trials=6, warmups=1,
                          probes=True, extra_probes=["syscall-time"])
    session = ProbeSession(enabled=True, concerns=DEFAULT_CONCERNS + ("syscall-time",))
    try:
        with Store(tmp / "lab.db") as store:
            run_id = run_experiment(spec, lambda s, arm, rnd: run_trial(s, arm, session), store, progress=False,
                                    probe_session=session)
            rep = write_report(load(store, run_id), tmp / "report.html")
            run = store.get_run(run_id)
    finally:
        session.detach()
    assert run.status == "complete" and run.trials_ok == 18, (run.status, run.trials_ok, run.notes)
    assert run.probe_backend == "bcc", f"probes did not run ({run.probe_backend}): `balloon-lab doctor`"
    return tmp / "report.html", rep


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="balloon-lab-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--window-size=1280,900",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    opts.add_experimental_option("perfLoggingPrefs", {"enableNetwork": True, "enablePage": False})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)


def test_report_renders_offline_without_errors_with_every_chart(report, browser, tmp_path):
    path, rep = report
    size = path.stat().st_size
    assert size < MAX_BYTES, f"report is {size} bytes"
    assert set(EXPECTED_CHARTS) <= set(rep.charts), rep.missing
    url = path.resolve().as_uri()
    browser.get_log("browser")
    browser.get_log("performance")  # start both logs clean
    browser.get(url)
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title.startswith("balloon-lab report:")

    # no console errors (a blocked load would also show here, as a CSP violation)
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    # no request anywhere but the file itself: from the report's document nothing but the
    # file (and data: URIs), and from the whole browser nothing on the network at all
    # (Chromium's own chrome:// pages load chrome:// resources; those never leave the machine)
    mine, network = [], []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] not in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            continue
        p = msg["params"]
        u = p.get("request", {}).get("url") or p.get("url") or ""
        if p.get("documentURL") == url or u == url:
            mine.append(u)
        if u.split(":", 1)[0].lower() in ("http", "https", "ws", "wss", "ftp"):
            network.append(u)
    assert url in mine, mine                            # the log works: it saw the page itself
    assert all(u == url or u.startswith("data:") for u in mine), [u for u in mine if u != url]
    assert not network, network
    n_resources = browser.execute_script("return performance.getEntriesByType('resource').length")
    assert n_resources == 0

    # every chart is present, sized, and drawn (its own pixels are not blank)
    for cid in EXPECTED_CHARTS:
        el = browser.find_element("id", cid)
        chart = el.find_element("css selector", "svg.chart, img.chart")
        w, h = chart.size["width"], chart.size["height"]
        assert w > 400 and h > 150, (cid, w, h)
        if chart.tag_name == "svg":
            drawn = browser.execute_script(
                "return arguments[0].querySelectorAll('path, use, rect, text').length", chart)
            assert drawn > 30, (cid, drawn)
        else:
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", chart) > 0
        px = _pixels(chart.screenshot_as_png)
        assert px.std() > 12 and (px < 200).mean() > 0.01, (cid, px.std(), (px < 200).mean())

    # the page reads at a laptop's width: nothing wider than the window
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than the window"

    # a whole-page screenshot that is not blank
    height = browser.execute_script("return document.documentElement.scrollHeight")
    assert height > 3000
    browser.set_window_size(1280, min(height + 150, 20000))
    png = browser.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    px = _pixels(png)
    assert px.shape[0] > 3000 and px.std() > 20
    assert (px < 128).mean() > 0.01                    # text and chart ink, not an empty white page
    verdict = browser.find_element("id", "verdict").text
    assert ("is fastest" in verdict or "a tie" in verdict) and "Inflating 64 MiB" in verdict


def test_report_content_matches_the_run(report):
    path, rep = report
    html = path.read_text()
    # probes ran: the histograms' axes carry units; no constant about QEMU stands in for a qemu arm
    assert "madvise length per call (log2 buckets)" in html and "kernel time per madvise call" in html
    assert "QEMU 7.2 + Linux 6.1 (pfn)" not in html and "Add the arm <code>qemu-pfn</code>" in html
    # the pfn arm's probe-counted madvise calls: one per 4 KiB page, 256 per MiB, as QEMU
    assert ">256</td>" in html.replace(" ", "")
    assert rep.missing == []                            # a balloon run with probes: nothing left out
    # what the probes cost each arm, measured: one table per arm, the syscall program and the trap in it
    for arm in ("pfn", "bitmap", "chunks"):
        table = html.split(f'id="probe-cost-{arm}"', 1)[1].split("</table>", 1)[0]
        assert "<code>sys_exit</code>" in table and "<code>usdt_trap</code>" in table and "total" in table
    assert '<section id="migration">' not in html
