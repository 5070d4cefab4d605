"""Headless Chromium over the DevTools protocol pipe, and a checker for the static HTML report.

Chromium is started with ``--remote-debugging-pipe``: it reads DevTools commands from fd 3 and
writes replies and events to fd 4, one JSON message per NUL-terminated frame. That needs only the
standard library (no websocket, no free port, no WebDriver binary whose version must match).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def find_chromium() -> str | None:
    """Path of a Chromium binary: ``$DARKMATTER_CHROMIUM`` if set, else the first on ``PATH``."""
    override = os.environ.get("DARKMATTER_CHROMIUM")
    if override:
        return shutil.which(override)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(RuntimeError):
    """A DevTools command failed, timed out, or the browser went away."""


class Chromium:
    """One headless Chromium process, driven over the DevTools pipe; ``close`` always kills it."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.log_path = profile / "chromium.log"
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._closed = False
        self._cond = threading.Condition()
        args = [
            binary,
            "--headless=new",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile / 'profile'}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "--force-device-scale-factor=1",
            *(["--no-sandbox"] if os.geteuid() == 0 else []),  # the sandbox refuses to run as root
            "about:blank",
        ]
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()
        # Lift the child's ends above fd 4 so the dup2 actions below cannot overwrite each other.
        child_in = fcntl.fcntl(to_child, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_child, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child)
        os.close(from_child)
        profile.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.pid = os.posix_spawn(
                binary,
                args,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                    (os.POSIX_SPAWN_DUP2, child_in, 3),
                    (os.POSIX_SPAWN_DUP2, child_out, 4),
                ],
                setsid=True,  # own process group, so close() can kill every helper process too
            )
        finally:
            for fd in (child_in, child_out, log_fd):
                os.close(fd)
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *frames, buf = buf.split(b"\0")
            with self._cond:
                for frame in frames:
                    msg = json.loads(frame)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self._events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def log_tail(self, n: int = 2000) -> str:
        """The end of Chromium's stderr, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """Run one DevTools command and return its result."""
        with self._cond:
            self._next_id += 1
            cid = self._next_id
        msg: dict[str, Any] = {"id": cid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._to_browser, data) :]
        except OSError as e:
            raise CDPError(f"{method}: cannot write to Chromium ({e}); its log:\n{self.log_tail()}") from e
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while cid not in self._replies:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "Chromium exited" if self._closed else f"no reply in {self.timeout:.0f} s"
                    raise CDPError(f"{method}: {why}; its log:\n{self.log_tail()}")
                self._cond.wait(left)
            reply = self._replies.pop(cid)
        if "error" in reply:
            raise CDPError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def events(self, session: str) -> list[dict[str, Any]]:
        """Every event received so far for one page session."""
        with self._cond:
            return [e for e in self._events if e.get("sessionId") == session]

    def wait_event(self, method: str, session: str) -> dict[str, Any]:
        """Block until an event ``method`` arrives for ``session``; return it."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                for e in self._events:
                    if e.get("method") == method and e.get("sessionId") == session:
                        return e
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise CDPError(f"no {method} event; Chromium log:\n{self.log_tail()}")
                self._cond.wait(left)

    def _running(self) -> bool:
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def close(self) -> None:
        """Ask Chromium to quit, then kill its whole process group and reap it."""
        with contextlib.suppress(CDPError, OSError):
            if not self._closed:
                self.timeout = 5.0
                self.send("Browser.close")
        deadline = time.monotonic() + 5.0
        # Wait without reaping: the exited leader keeps the process group id reserved for killpg.
        while time.monotonic() < deadline and self._running():
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._reader.join(timeout=5.0)


class _Outline(HTMLParser):
    """The ``<title>``, ``<h1>``–``<h3>`` texts, ``<img>`` count and latent cards per component of an HTML
    source."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.headings: list[str] = []
        self.images = 0
        self.cards: dict[str, int] = {}
        self._component = ""
        self._open: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        classes = (named.get("class") or "").split()
        if "cards" in classes and named.get("data-component"):
            self._component = str(named["data-component"])
            self.cards.setdefault(self._component, 0)
        elif "card" in classes and self._component:
            self.cards[self._component] += 1
        if tag == "img":
            self.images += 1
        elif tag in ("title", "h1", "h2", "h3"):
            self._open, self._text = tag, []

    def handle_data(self, data: str) -> None:
        if self._open:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            text = " ".join("".join(self._text).split())
            if tag == "title":
                self.title = text
            else:
                self.headings.append(text)
            self._open = None


# Runs in the page: facts about every image and heading, each heading scrolled into view and
# hit-tested so that one hidden, zero-sized or covered by another element counts as not visible.
_INSPECT_JS = """
(() => {
  const visible = (el) => {
    const s = getComputedStyle(el);
    if (s.visibility !== 'visible' || Number(s.opacity) === 0) return false;
    const opts = {opacityProperty: true, visibilityProperty: true};
    if (el.checkVisibility && !el.checkVisibility(opts)) return false;
    el.scrollIntoView({block: 'center'});
    const r = el.getBoundingClientRect();
    if (r.width <= 0 || r.height <= 0) return false;
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return hit !== null && el.contains(hit);
  };
  const images = Array.from(document.images, (img, i) => {
    const r = img.getBoundingClientRect();
    return {index: i, alt: img.alt, src: img.src.slice(0, 40), complete: img.complete,
            naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
            width: r.width, height: r.height};
  });
  const headings = Array.from(document.querySelectorAll('h1, h2, h3'), (h) => ({
    text: h.textContent.split(/\\s+/).filter(Boolean).join(' '), visible: visible(h)}));
  const clear = (c) => c === 'transparent' || /^rgba\\(.*,\\s*0\\)$/.test(c);
  const page = [document.body, document.documentElement].map((e) => getComputedStyle(e).backgroundColor)
    .find((c) => !clear(c)) || 'rgb(255, 255, 255)';
  // latent cards: per component, the cards and the shaded tokens that show (the first 50 checked)
  const cards = Array.from(document.querySelectorAll('.cards[data-component]'), (sec) => {
    const shaded = Array.from(sec.querySelectorAll('.t')).filter((t) => /(^| )s\\d+( |$)/.test(t.className));
    const shown = shaded.slice(0, 50).filter((t) => {
      const bg = getComputedStyle(t).backgroundColor;
      return !clear(bg) && bg !== page && visible(t);
    });
    return {component: sec.dataset.component, cards: sec.querySelectorAll('.card').length,
            shaded: shaded.length, shaded_visible: shown.length};
  });
  window.scrollTo(0, 0);
  return {title: document.title, images, headings, cards};
})()
"""


@dataclass
class ReportCheck:
    """What the browser saw of one report, and the list of problems it implies."""

    expected_title: str
    expected_headings: list[str]
    expected_images: int
    title: str
    images: list[dict[str, Any]]
    headings: dict[str, bool]
    expected_cards: dict[str, int] = field(default_factory=dict)  # component -> cards in the source
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)  # component -> what the page shows
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    def problems(self) -> list[str]:
        """Human-readable problems; empty when the report renders cleanly."""
        out = []
        if not self.title or self.title != self.expected_title:
            out.append(f"title {self.title!r}, expected {self.expected_title!r}")
        if len(self.images) != self.expected_images:
            out.append(f"{len(self.images)} images in the page, {self.expected_images} <img> in the source")
        for im in self.images:
            if not (im["complete"] and im["naturalWidth"] > 0 and im["naturalHeight"] > 0):
                out.append(f"image {im['index']} ({im['alt']}) did not decode")
            elif not (im["width"] > 0 and im["height"] > 0):
                out.append(f"image {im['index']} ({im['alt']}) has an empty box")
        for text in self.expected_headings:
            if not self.headings.get(text, False):
                out.append(f"heading {text!r} not visible")
        for component, n in self.expected_cards.items():
            seen = self.cards.get(component, {})
            if seen.get("cards") != n:
                out.append(
                    f"latent cards of {component}: {seen.get('cards', 0)} in the page, {n} in the source"
                )
            if n and not seen.get("shaded_visible"):
                out.append(f"latent cards of {component}: no highlighted token visible")
        out += [f"console error: {m}" for m in self.console_errors]
        out += [f"failed request: {m}" for m in self.failed_requests]
        out += [f"network request: {u}" for u in self.foreign_requests]
        return out


def _remote_text(arg: dict[str, Any]) -> str:
    return str(arg.get("value", arg.get("description", arg.get("type", ""))))


def _collect_events(check: ReportCheck, events: list[dict[str, Any]], page_url: str) -> None:
    urls: dict[str, str] = {}
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            check.console_errors.append(" ".join(_remote_text(a) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            check.console_errors.append(str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            check.console_errors.append(f"{p['entry'].get('text')} ({p['entry'].get('url', '')})")
        elif method == "Network.requestWillBeSent":
            url = p["request"]["url"]
            urls[p["requestId"]] = url
            check.requests.append(url[:40] if url.startswith("data:") else url)
            if url != page_url and not url.startswith("data:"):
                check.foreign_requests.append(url)
        elif method == "Network.loadingFailed":
            url = urls.get(p["requestId"], "?")[:80]
            check.failed_requests.append(f"{url}: {p.get('errorText')}")


def check_report(browser: Chromium, report: Path, screenshot: Path, width: int = 1280) -> ReportCheck:
    """Load ``report`` in a fresh tab, inspect it, and save a full-page PNG to ``screenshot``.

    The screenshot is written before anything is judged, so it exists for a failing report too.
    """
    outline = _Outline()
    outline.feed(report.read_text(encoding="utf-8"))
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        page_url = report.resolve().as_uri()
        nav = browser.send("Page.navigate", {"url": page_url}, session=session)
        if nav.get("errorText"):
            raise CDPError(f"cannot open {page_url}: {nav['errorText']}")
        browser.wait_event("Page.loadEventFired", session)
        browser.send(
            "Runtime.evaluate",
            {
                "expression": "Promise.all(Array.from(document.images, i => i.decode().catch(() => null)))",
                "awaitPromise": True,
            },
            session=session,
        )
        seen = browser.send(
            "Runtime.evaluate", {"expression": _INSPECT_JS, "returnByValue": True}, session=session
        )["result"]["value"]
        size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = browser.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            },
            session=session,
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        events = browser.events(session)
    finally:
        with contextlib.suppress(CDPError):
            browser.send("Target.closeTarget", {"targetId": target})
    headings: dict[str, bool] = {}
    for h in seen["headings"]:  # a repeated heading text counts as visible only if every copy is
        headings[h["text"]] = headings.get(h["text"], True) and h["visible"]
    check = ReportCheck(
        expected_title=outline.title,
        expected_headings=outline.headings,
        expected_images=outline.images,
        title=seen["title"],
        images=seen["images"],
        headings=headings,
        expected_cards=outline.cards,
        cards={c["component"]: c for c in seen["cards"]},
        screenshot=screenshot,
    )
    _collect_events(check, events, page_url)
    return check


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG file's header; raises ValueError if it is not a PNG."""
    head = path.read_bytes()[:24]
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)
