"""Telling the user's Ctrl-C from a ``KeyboardInterrupt`` that plugin code raises itself.

Once raised, the two look the same. A plugin (or a library it imports) can raise
``KeyboardInterrupt`` or call ``sys.exit()`` at import; that is the plugin's failure, reported like
any other, while a real Ctrl-C must still stop the program. So, around the plugin code, a temporary
SIGINT handler notes that a signal arrived and then does what the previous handler does (by default
raise ``KeyboardInterrupt``). A ``KeyboardInterrupt`` without that note is the plugin's own.

No handler is installed, and none is needed, where no Ctrl-C can become a ``KeyboardInterrupt`` in
the guarded code: off the main thread (Python runs signal handlers in the main thread only, and
``signal.signal`` refuses elsewhere), or while SIGINT is ignored or left to the OS default (which
ends the process). When the current handler was installed from C (``getsignal`` returns None) it
cannot be put back, so it is left alone and every ``KeyboardInterrupt`` counts as the user's: the
cautious side, never swallowing a real Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class InterruptWatch:
    """``with InterruptWatch() as watch:`` around plugin code; ``watch.is_users(exc)`` says whether
    what the block raised must propagate as the user's interrupt.

    If a SIGINT arrived, leaving the block raises ``KeyboardInterrupt`` whatever the block did (the
    plugin may have caught the interrupt and raised something else, or nothing): a Ctrl-C during a
    plugin's import always stops the program.
    """

    def __init__(self) -> None:
        self._seen = False
        self._installed = False
        self._previous: Any = None
        self._unknown_handler = False

    def is_users(self, exc: BaseException) -> bool:
        """True when a SIGINT arrived in the block (whatever ``exc`` is), or ``exc`` is a
        ``KeyboardInterrupt`` whose origin cannot be told (a handler installed from C)."""
        return self._seen or (isinstance(exc, KeyboardInterrupt) and self._unknown_handler)

    def _handler(self, signum: int, frame: FrameType | None) -> Any:
        self._seen = True
        return self._previous(signum, frame)

    def __enter__(self) -> InterruptWatch:
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous is None:
            self._unknown_handler = True
        elif callable(previous):
            self._previous = previous
            signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # also undoes a handler the plugin installed
            self._installed = False
        if self._seen and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt("interrupted while a plugin was loading") from exc
        return False
