"""One Ctrl-C stops a run within seconds, whatever it is doing.

Python turns SIGINT into ``KeyboardInterrupt`` only when the main thread next runs bytecode, and
two things defeat that in a long study:

* the exception can be raised inside a finaliser (a ``__del__`` such as tqdm's, run by the
  garbage collector at any allocation); Python then prints "Exception ignored in ...
  KeyboardInterrupt" and carries on, so the first Ctrl-C is lost;
* the main thread can sit seconds to minutes inside one C call (a torch op, with the GIL
  released) before it runs bytecode again.

:func:`handle_interrupts` answers both: a swallowed interrupt is delivered again
(``sys.unraisablehook`` → ``_thread.interrupt_main``), and a watchdog thread, woken at once by
the signal through ``signal.set_wakeup_fd`` (written by the C-level handler, not the Python one),
ends the process with status 130 if it is still alive ``grace_s`` seconds later. A hard exit is
safe because every file interp writes is written atomically (temporary file, then rename) and
resumes after ``kill -9`` (``tests/test_reliability.py``).

Only the command line installs this: in a notebook a Ctrl-C ("interrupt kernel") must not end
the kernel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process ended by Ctrl-C

_state = {"interrupted": False}


def interrupted() -> bool:
    """Whether a SIGINT arrived while :func:`handle_interrupts` was active."""
    return _state["interrupted"]


def _on_sigint(signum, frame):  # noqa: ARG001 - signal handler signature
    _state["interrupted"] = True
    raise KeyboardInterrupt


def _unraisable(hook):
    def wrapped(unraisable):
        if _state["interrupted"] and isinstance(unraisable.exc_value, KeyboardInterrupt):
            # raised inside a finaliser and dropped by Python: raise it again in the main thread,
            # from another thread a moment later (raised now, it would land in this hook and be
            # dropped again); if it lands in a finaliser again, this repeats
            import _thread

            threading.Timer(0.02, _thread.interrupt_main).start()
            return
        hook(unraisable)

    return wrapped


def _watchdog(read_fd: int, grace_s: float, message: str) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)  # blocks (GIL released) until the C handler writes a signal number
        except OSError:
            return
        if not data:  # the write end closed: the block ended without an interrupt
            os.close(read_fd)
            return
        if signal.SIGINT in data:
            break
    time.sleep(grace_s)
    sys.stderr.write(f"\n{message}\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def handle_interrupts(grace_s: float = 5.0,
                      message: str = "interrupted: stopped without waiting for the current operation; "
                                     "finished units are cached") -> Iterator[None]:
    """Within the block, the first SIGINT raises ``KeyboardInterrupt`` in the main thread (again if
    a finaliser swallows it), and the process exits with status 130 if it has not ended
    ``grace_s`` seconds after the signal. Call from the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["interrupted"] = False
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_handler = signal.signal(signal.SIGINT, _on_sigint)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    old_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(old_hook)
    threading.Thread(target=_watchdog, args=(r, grace_s, message), name="interp-interrupt-watchdog",
                     daemon=True).start()
    try:
        yield
    finally:
        sys.unraisablehook = old_hook
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old_handler)
        if not _state["interrupted"]:
            os.close(w)  # the watchdog's read returns b"" and the thread ends
        # after an interrupt the watchdog keeps its timer: it bounds the rest of the shutdown too
