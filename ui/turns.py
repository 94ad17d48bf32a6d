"""Turns on the one shared pipeline: one request per session at a time, sessions served in arrival order.

Gradio's queue is first in, first out over every request: a user who sends five long requests ahead
of another user's small one makes that user wait for all five. The app therefore lets Gradio start
many pipeline events at once (``WAITING_SESSIONS``) and hands the pipeline over here: each session may
have one request running or waiting, so a small request waits for at most the one request of each
session that arrived before it. A second request from a busy session is refused at once with one line.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from loracompose.errors import UserError

WAIT_POLL_SECONDS = 1.0  # a safety net: every hand-over wakes the waiting requests at once

BUSY_MESSAGE = ("this session already has a request running or waiting; wait for it to finish, then send the "
                "next (one request per session at a time, so every user gets a turn)")


class PipelineTurns:
    """Hands the shared pipeline to one request at a time, in arrival order, at most one per session."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sessions: list[str] = []  # arrival order; the first one holds the pipeline

    def waiting(self) -> list[str]:
        """The sessions holding or waiting for the pipeline, in arrival order (a copy)."""
        with self._changed:
            return list(self._sessions)

    @contextmanager
    def turn(self, session: str, on_wait: Callable[[int], None] | None = None) -> Iterator[None]:
        """Wait for ``session``'s turn and hold the pipeline for the ``with`` block.

        ``on_wait(ahead)`` is called while waiting with how many requests are ahead. Raises
        :class:`UserError` (at once, without waiting) when the session already has a request here.
        """
        self._join(session, on_wait)
        try:
            yield
        finally:
            self._leave(session)

    def _join(self, session: str, on_wait: Callable[[int], None] | None) -> None:
        with self._changed:
            if session in self._sessions:
                raise UserError(BUSY_MESSAGE)
            self._sessions.append(session)
            reported = None
            try:
                while (ahead := self._sessions.index(session)) > 0:
                    if on_wait is not None and ahead != reported:
                        on_wait(ahead)
                        reported = ahead
                    self._changed.wait(WAIT_POLL_SECONDS)
            except BaseException:  # a failed progress report or an interrupt: give the place up
                self._sessions.remove(session)
                self._changed.notify_all()
                raise

    def _leave(self, session: str) -> None:
        with self._changed:
            self._sessions.remove(session)
            self._changed.notify_all()
