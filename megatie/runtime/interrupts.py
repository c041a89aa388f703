"""Ctrl-C and SIGTERM end a run cleanly, even when the interrupt lands somewhere that swallows it.

The signal handlers raise ``KeyboardInterrupt`` at once, so a rank blocked in a long step unwinds
(closing its process group). But Python drops an exception raised while a destructor runs ("Exception
ignored in ... __del__", with a traceback on stderr): an interrupt landing there used to vanish and the
run trained on until the launcher's SIGKILL. So each handler records the request, raises only outside
destructors, and the training loop calls ``raise_if_requested`` at every step boundary.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_requested = threading.Event()


def raise_if_requested() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C or SIGTERM arrived, even if the first raise was lost."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _on_sigint(signum, frame):
    _requested.set()
    if not _in_destructor(frame):  # there Python would print the exception and drop it: wait for the loop
        raise KeyboardInterrupt


def _in_destructor(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_sigterm(signum, frame):
    # One-shot: a repeated SIGTERM must not interrupt the unwinding the first one started (the
    # deepspeed launcher follows its SIGTERM with SIGKILL 30 s later if a rank hangs).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _on_sigint(signum, frame)


@contextmanager
def interrupts_end_the_run():
    """While the block runs, Ctrl-C and SIGTERM raise ``KeyboardInterrupt`` (and are remembered). On
    Ctrl-C the deepspeed launcher sends SIGTERM to its ranks, which would otherwise die silently; this
    way they unwind and print the same resume hint as a plain Ctrl-C. The previous handlers are put
    back afterwards, so a caller (tests, benchmarks) keeps its own."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _requested.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        _requested.clear()
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def ignore_interrupts() -> None:
    """Ctrl-C reaches the ranks as SIGINT and, from the launcher, as SIGTERM just after: once the
    run is unwinding, the second must not turn the resume hint into a traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
