"""A real report opens cleanly in headless Chromium: images decode, nothing errs or touches the network.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (``browser.py``), not over
a websocket and not through Selenium. The pipe needs only the standard library, no free TCP port and no
``chromium-driver`` whose version must match the browser; it carries the console, network and
screenshot events that WebDriver exposes only in part; and Chromium quits by itself when the pipe
closes, so even a killed test run leaves no browser behind. Without a Chromium binary the tests skip,
unless ``DARKMATTER_REQUIRE_BROWSER=1`` (the README test command sets it), when they fail.

The full-page screenshot goes to ``$DARKMATTER_ARTIFACTS/report-screenshot.png`` (default: ``artifacts/``
at the repo root).
"""

from __future__ import annotations

import html
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from browser import Chromium, check_report, find_chromium, png_size
from darkmatter.cli import main

from conftest import tiny_study_overrides

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VIEWPORT_WIDTH = 1280


def artifacts_dir() -> Path:
    return Path(os.environ.get("DARKMATTER_ARTIFACTS") or REPO / "artifacts")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        why = "no Chromium binary on PATH (apt-get install chromium, or set DARKMATTER_CHROMIUM)"
        if os.environ.get("DARKMATTER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{why}, and DARKMATTER_REQUIRE_BROWSER=1 requires one")
        pytest.skip(why)
    chromium = Chromium(binary, tmp_path_factory.mktemp("chromium"))
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture(scope="module")
def report(browser: Chromium, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """``report.html`` of a tiny study run through the CLI (once per module, after the browser check)."""
    root = tmp_path_factory.mktemp("study")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial bankers"
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(random.Random(0).choices(words.split(" "), k=800)))
    sets = [a for item in tiny_study_overrides(tiny_model_dir, corpus) for a in ("--set", item)]
    assert main(["run", "--out", str(root / "out"), "--quiet", *sets]) == 0
    return root / "out" / "report.html"


def test_report_renders_cleanly_and_offline(browser: Chromium, report: Path) -> None:
    shot = artifacts_dir() / "report-screenshot.png"
    shot.unlink(missing_ok=True)
    check = check_report(browser, report, shot, width=VIEWPORT_WIDTH)
    assert check.problems() == []
    # The checks above were not vacuous: the page held the study's figures and sections ...
    assert len(check.images) == check.expected_images >= 8
    assert all(im["src"].startswith("data:image/png;base64,") for im in check.images)
    assert check.expected_title == check.title == "sae-darkmatter report"
    for heading in (
        "SAE dark matter report",
        "Activations",
        "The SAE family",
        "Configuration and provenance",
    ):
        assert heading in check.expected_headings and check.headings[heading]
    # ... and latent cards for each error component and the split SAE's own sample, their shading showing
    assert set(check.expected_cards) == set(check.cards) == {"linear", "nonlinear", "sae"}
    for component, seen in check.cards.items():
        assert seen["cards"] == check.expected_cards[component] > 0, component
        assert seen["shaded_visible"] > 0 and seen["shaded"] >= seen["cards"], component
    # ... and network monitoring was live: it saw the document itself, and nothing but data: URIs besides.
    assert check.requests[0] == report.resolve().as_uri()
    assert all(u.startswith("data:") for u in check.requests[1:])
    width, height = png_size(shot)
    assert width == VIEWPORT_WIDTH and height > 2000  # the whole page, not just the first viewport
    assert shot.stat().st_size > 50_000


def test_checker_catches_a_broken_report(browser: Chromium, report: Path, tmp_path: Path) -> None:
    source = report.read_text(encoding="utf-8")
    first_alt = html.unescape(re.findall(r'<img alt="([^"]*)"', source)[0])
    second_h2 = html.unescape(re.findall(r"<h2>(.*?)</h2>", source)[1])
    # Valid base64, but the first image's PNG signature is gone, so it cannot decode.
    broken, n = re.subn(r"(data:image/png;base64,)iVBORw0KGgo", r"\1AAAAAAAAAAA", source, count=1)
    assert n == 1
    injected = (
        '<script>console.error("x")</script>'
        "<style>h2:nth-of-type(2){visibility:hidden}.t{background:none!important}</style>"
        '<link rel="stylesheet" href="http://127.0.0.1:9/missing.css">'
    )
    broken = broken.replace("<body>", "<body>" + injected, 1)
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")

    problems = check_report(browser, page, tmp_path / "broken.png").problems()
    assert f"image 0 ({first_alt}) did not decode" in problems
    assert sum("did not decode" in p for p in problems) == 1  # the other figures still do
    assert "console error: x" in problems
    for component in ("linear", "nonlinear", "sae"):  # the shading is gone, the cards are still there
        assert f"latent cards of {component}: no highlighted token visible" in problems
    assert not any("in the page" in p for p in problems)
    assert f"heading {second_h2!r} not visible" in problems
    assert "network request: http://127.0.0.1:9/missing.css" in problems
    assert any(p.startswith("failed request: http://127.0.0.1:9/missing.css") for p in problems)


def _live_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_close_kills_every_chromium_process(browser: Chromium, tmp_path: Path) -> None:
    binary = find_chromium()
    assert binary is not None
    other = Chromium(binary, tmp_path)
    assert "Chrome" in other.send("Browser.getVersion")["product"]
    assert other.pid in _live_members(other.pid)
    other.close()
    deadline = time.monotonic() + 5.0
    while _live_members(other.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(other.pid) == []
