"""The one place dualtune installs signal handlers: the run loop, the data-parallel launchers and the
sweep each hand ``handling`` what a stop signal should do, and get the previous handlers back when
the block ends (also on an exception)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

# What a user (Ctrl-C), a terminal that closes, or a scheduler (SLURM, Kubernetes, systemd) sends.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def handling(on_signal: Callable[[int], None], signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, each of ``signals`` calls ``on_signal(signum)``; the handlers in force before
    are restored after it. Off the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handle(signum: int, frame: Any) -> None:
        on_signal(signum)

    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handle)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def name(signum: int) -> str:
    """``SIGTERM`` for 15: the name users read in a log line."""
    return signal.Signals(signum).name
