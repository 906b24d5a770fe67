"""Rendering a report page in headless Chromium (Debian's; `make test` installs it) for the tests.

Time limits: ``--virtual-time-budget`` is Chromium's *virtual* clock (it advances only while the
page is idle, so a page slowed by a loaded machine still gets all of it: a diagnosis page whose
script busy-loops before drawing rendered all its figures after 174 s of wall time); the wall-clock
limit of the whole process is
:data:`TIMEOUT_S` (env ``INTERP_BROWSER_TIMEOUT``), generous because on 2 shared cores at nice 19
one ``--dump-dom`` of a diagnosis page took from 24 s to ~3 min. Console errors are never excused.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

#: wall-clock seconds one Chromium run may take before the test fails (machine under load)
TIMEOUT_S = float(os.environ.get("INTERP_BROWSER_TIMEOUT", "900"))
#: virtual milliseconds the page gets to run its scripts (see module docstring)
VIRTUAL_TIME_BUDGET_MS = 20000


def chromium() -> str | None:
    """Path of the chromium binary, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, profile: Path, timeout_s: float | None = None) -> tuple[str, str]:
    """(DOM after scripts ran, Chromium's stderr log) of ``page`` in a fresh profile, offline.

    Raises:
        TimeoutError: Chromium ran past ``timeout_s`` (default :data:`TIMEOUT_S`) wall seconds;
            its whole process group is killed (renderer and GPU processes included).
    """
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
           "--enable-logging=stderr", "--v=0", "--dump-dom", Path(page).resolve().as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only Chromium's processes
        proc.communicate()
        raise TimeoutError(f"headless Chromium did not finish rendering {page} within {timeout_s:g} s of wall "
                           "time (a loaded machine? raise INTERP_BROWSER_TIMEOUT)") from None
    return out, err


def assert_rendered(page: Path, profile: Path, min_figures: int) -> str:
    """Render ``page`` and assert: no page errors, every figure drawn (the page's own counters),
    at least ``min_figures`` of them, no console errors. Returns the DOM."""
    dom, log = render(page, profile)
    body = re.search(r"<body([^>]*)>", dom)
    assert body, log[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    assert "errors" not in attrs, attrs.get("errors")
    assert int(attrs["figures-total"]) >= min_figures
    assert attrs.get("figures-rendered") == attrs["figures-total"], (attrs, log[-2000:])
    console_errors = [l for l in log.splitlines() if "CONSOLE" in l and ("Error" in l or "Uncaught" in l)]
    assert not console_errors, console_errors
    return dom
