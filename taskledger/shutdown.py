"""A stop signal ends the process within a bound, stuck call or not.

A role stops in order on SIGTERM: it takes no new work, lets running attempts finish
within their grace, closes its connections. Any step can hang: a call to a database that
stopped answering, a broker that does not close, a thread that does not join. The bound
is the last resort: `shutdown_seconds` after the first signal, the process says what it
was still waiting for and exits with status 70, whatever is left. Nothing is lost by it:
an attempt still running is retried when its lease lapses, and the embedded PostgreSQL,
if it cannot be stopped first, is adopted by the next start (taskledger/embedded.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

EXIT_STUCK = 70  # EX_SOFTWARE
# The last words (stopping the embedded server) get this long of the bound's end.
LAST_WORDS_SECONDS = 3.0

log = logging.getLogger("taskledger")


class ShutdownBound:
    def __init__(
        self, role: str, seconds: float, last_words: Callable[[], None] | None = None
    ) -> None:
        self.role = role
        self.seconds = seconds
        self.last_words = last_words
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def begin(self) -> None:
        """Start the clock (at the first stop signal; later ones change nothing)."""
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.name = "shutdown-bound"
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        stuck = sorted(
            thread.name
            for thread in threading.enumerate()
            if thread is not threading.current_thread() and not thread.daemon
        )
        log.error(
            "%s did not stop within %g s of the stop signal: exiting now (status %d). "
            "Attempts it was running are retried when their leases lapse. If this "
            "repeats, the log above says which call was stuck; raise "
            "TASKLEDGER_SHUTDOWN_SECONDS only if the stop was merely slow",
            self.role,
            self.seconds,
            EXIT_STUCK,
            extra={"threads": stuck},
        )
        if self.last_words is not None:
            words = threading.Thread(target=self._say_last_words, daemon=True)
            words.start()
            words.join(LAST_WORDS_SECONDS)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_STUCK)

    def _say_last_words(self) -> None:
        assert self.last_words is not None
        try:
            self.last_words()
        except Exception:
            log.exception("%s: the last step of a forced stop failed", self.role)
