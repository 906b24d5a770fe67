"""Rendering a report page in headless Chromium (Debian's; `make test` installs it) for the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path


def chromium() -> str | None:
    """Path of the chromium binary, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, profile: Path) -> tuple[str, str]:
    """(DOM after scripts ran, Chromium's stderr log) of ``page`` in a fresh profile, offline."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--enable-logging=stderr",
           "--v=0", "--dump-dom", Path(page).resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    return proc.stdout, proc.stderr


def assert_rendered(page: Path, profile: Path, min_figures: int) -> str:
    """Render ``page`` and assert: no page errors, every figure drawn (the page's own counters),
    at least ``min_figures`` of them, no console errors. Returns the DOM."""
    dom, log = render(page, profile)
    body = re.search(r"<body([^>]*)>", dom)
    assert body, log[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    assert "errors" not in attrs, attrs.get("errors")
    assert int(attrs["figures-total"]) >= min_figures
    assert attrs.get("figures-rendered") == attrs["figures-total"]
    console_errors = [l for l in log.splitlines() if "CONSOLE" in l and ("Error" in l or "Uncaught" in l)]
    assert not console_errors, console_errors
    return dom
