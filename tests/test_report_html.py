"""index.html in a real headless browser: Debian's Chromium driven by Playwright (no `playwright install`).

scripts/test.sh installs chromium when /usr/bin/chromium is missing; this test skips (saying why) only when
the browser or the playwright package is not there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_report_v2 import make_v2

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright missing (dev extras)")
    exe = CHROMIUM if CHROMIUM.exists() else (Path(p) if (p := shutil.which("chromium")) else None)
    if exe is None:
        pytest.skip("no chromium: scripts/test.sh installs it with `apt-get install -y chromium`; that failed here")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(exe), args=ARGS)
        yield b
        b.close()


def test_index_html_in_browser(tmp_path, browser):
    from benchmarks.report.cli import build_report

    make_v2(tmp_path, seeds=(0, 1))
    build_report(tmp_path, plots=True)
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((tmp_path / "index.html").as_uri())
    page.wait_for_load_state("load")

    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) >= 4 and all(w > 0 for w in widths)  # every figure decodes
    assert all(u.startswith(("file:", "data:")) for u in requests)  # self-contained: no network

    col = page.eval_on_selector_all("#leaderboard th", "els => els.map(e => e.textContent)").index("test_score") + 1
    cells = f"#leaderboard tbody tr td:nth-child({col})"
    before = [float(x) for x in page.eval_on_selector_all(cells, "els => els.map(e => e.dataset.v)")]
    assert before != sorted(before)  # the leaderboard starts in another order, so sorting has work to do
    page.locator("#leaderboard th", has_text="test_score").click()
    after = [float(x) for x in page.eval_on_selector_all(cells, "els => els.map(e => e.dataset.v)")]
    assert after == sorted(before)
    page.locator("#leaderboard th", has_text="test_score").click()
    desc = [float(x) for x in page.eval_on_selector_all(cells, "els => els.map(e => e.dataset.v)")]
    assert desc == sorted(before, reverse=True)

    button = page.locator("button.cfg").first
    run = button.get_attribute("data-run")
    button.click()
    assert page.locator("#config-dialog").is_visible()
    text = page.locator("#config-json").inner_text()
    assert '"config"' in text and '"lr"' in text and run in page.locator("#config-title").inner_text()
    page.locator("#config-close").click()
    assert not page.locator("#config-dialog").is_visible()
    assert errors == []
