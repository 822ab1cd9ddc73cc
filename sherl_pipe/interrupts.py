"""Ctrl-C around work that crosses processes: held back during bookkeeping that must not be cut
in two, ignored by local workers (the coordinating process stops the work itself) and while the
first workers start."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def shielded():
    """Ctrl-C ignored while the first workers start: an ignored signal stays ignored across fork
    and exec (and Python keeps it so), so the terminal's Ctrl-C, sent to the whole foreground
    process group, never reaches them; workers started later ignore it from their plugin's setup on.
    (Blocking the signal instead does not reach them: dask spawns from threads that exist already.)
    A Ctrl-C in those few seconds is lost; the next one stops the work."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def held_interrupts():
    """Ctrl-C held back while the block runs, then handed to the handler it would have reached:
    for bookkeeping that must not be cut in two (a sweep's trial taken off its running set but not
    yet recorded: a second Ctrl-C there left it 'running' in the study and queued nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(*held[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def ignore_interrupts() -> None:
    """In a local worker: the terminal's Ctrl-C reaches every process of the foreground group;
    the coordinating process stops the work itself."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
