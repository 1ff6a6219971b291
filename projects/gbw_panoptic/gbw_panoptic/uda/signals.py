"""The stop signals of a run (SIGTERM, SIGINT) and the exception that ends a run stopped by one; shared by
the trainer, which checkpoints and stops, and the launcher, which forwards the signals to its processes."""
import logging
import signal
import threading
import time
from typing import Dict, Optional

__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingInterrupted"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(BaseException):
    """Training stopped by a signal (a ``BaseException``, like ``KeyboardInterrupt``: not a failure).

    Attributes:
        signum: the signal number; the command line exits with ``128 + signum``.
        checkpoint: the checkpoint written before stopping, or None (stopped before any new iteration,
            or abandoned by a second signal).
    """

    def __init__(self, message: str, signum: int, checkpoint: Optional[str] = None):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint



class StopSignals:
    """While entered (in the main thread), SIGTERM / SIGINT set :attr:`received` instead of killing the
    process; a second signal, :data:`REPEAT_AFTER_S` or more after the first, raises
    :class:`TrainingInterrupted` at once (copies of one signal, e.g. sent to the process group and
    forwarded by the launcher, arrive closer together). Other threads install nothing."""

    REPEAT_AFTER_S = 2.0

    def __init__(self) -> None:
        self.received: int = 0
        self._received_at = 0.0
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        self.received = 0
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            if time.monotonic() - self._received_at < self.REPEAT_AFTER_S:
                return
            raise TrainingInterrupted(f"{name} received twice: training abandoned without a new checkpoint", signum)
        self.received, self._received_at = signum, time.monotonic()
        logger.warning(
            f"{name} received: finishing the current iteration, then writing a checkpoint and stopping "
            f"(send {name} again to stop at once without a checkpoint)"
        )
