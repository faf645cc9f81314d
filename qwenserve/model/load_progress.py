"""`LoadProgress`: a text progress bar for weight loading (`load_progress=` of the engine)."""
from __future__ import annotations

import sys


class LoadProgress:
    """A text progress bar on stderr for `LLMEngine(load_progress=...)`: (done, total) tensors.

    Redrawn in place on a terminal; on a pipe (logs, tests) one line per 10% instead.
    """

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        frac = done / max(total, 1)
        bar = "#" * int(frac * self.width)
        line = f"loading weights [{bar:<{self.width}}] {done}/{total}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            self.stream.write(line + "\n")
        self.stream.flush()
