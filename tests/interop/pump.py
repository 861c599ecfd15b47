"""Output pumps for the processes the interop tests start (shared by the fixtures)."""

from __future__ import annotations

import collections
import queue
import re
import threading
from typing import List, Optional

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class LinePump:
    """Reads a child's pipe line by line on a daemon thread.

    Every line is kept in a bounded tail for failure messages. Until
    `stop_forwarding()` is called, lines are also handed to the consumer
    through a queue (None marks end of stream). The thread keeps draining the
    pipe for the child's whole life, so a chatty child never blocks on a full
    pipe.
    """

    def __init__(self, stream, name: str, forward: bool = True, tail_lines: int = 200) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._tail: collections.deque = collections.deque(maxlen=tail_lines)
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._forward = forward
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in iter(self._stream.readline, b""):
                line = _ANSI_ESCAPE.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n")
                with self._lock:
                    self._tail.append(line)
                    forward = self._forward
                if forward:
                    self._queue.put(line)
        except (OSError, ValueError):
            pass  # pipe closed underneath us during teardown
        finally:
            self._queue.put(None)

    def next_line(self, timeout: float) -> Optional[str]:
        """The next line, None at end of stream; raises queue.Empty on timeout."""
        return self._queue.get(timeout=max(timeout, 0.0))

    def stop_forwarding(self) -> None:
        with self._lock:
            self._forward = False
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self._tail)

    def contains(self, needle: str) -> List[str]:
        """The tail's lines that contain `needle`."""
        with self._lock:
            return [line for line in self._tail if needle in line]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
