"""What vtool's commands print (with or without Invoke: the tasks and vtool.lean share it):
progress on stderr, results on stdout, tables, and the summary of a command run on nodes."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from .errors import UsageError, VtoolError


class Stop(Exception):
    """A command's end as the user sees it: ``message`` on stderr, exit ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Around a command's work: a VtoolError becomes ``Stop`` with its one-line message and
    exit code, Ctrl-C ``Stop("vtool: interrupted", 130)``; with VTOOL_DEBUG both go on as
    they are (a traceback). SIGTERM stops vtool as Ctrl-C does: in order, closing what it
    opened (and stopping its commands on the nodes); so does SIGHUP (its terminal closed),
    unless it is ignored (nohup)."""
    debug = os.environ.get("VTOOL_DEBUG", "").lower() in ("1", "true", "yes", "on")
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _sigterm_as_interrupt)
    try:
        yield
    except VtoolError as e:
        if debug:
            raise
        raise Stop(f"vtool: {e}", e.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise Stop("vtool: interrupted", 130) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Output:
    """Progress on stderr (one updating line on a terminal), results on stdout."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.live = self.err.isatty()
        self._lock = threading.Lock()
        self._pending = False
        self._t0 = time.monotonic()

    def progress(self, message: str) -> None:
        with self._lock:
            stamp = f"[{time.monotonic() - self._t0:5.1f}s] "
            if self.live:
                self.err.write(f"\r\033[K{stamp}{message}")
                self._pending = True
            else:
                self.err.write(f"{stamp}{message}\n")
            self.err.flush()

    def _end_live(self) -> None:
        if self._pending:
            self.err.write("\n")
            self._pending = False

    def line(self, text: str = "", err: bool = False) -> None:
        with self._lock:
            self._end_live()
            stream = self.err if err else self.out
            stream.write(text + "\n")
            stream.flush()

    def node_line(self, index: int, stream: str, text: str) -> None:
        self.line(f"[{index}] {text}", err=(stream == "err"))

    def done(self) -> None:
        with self._lock:
            self._end_live()


def number(value: Any, flag: str, *, minimum: float = 0) -> float:
    """A numeric flag's value, or a UsageError naming the flag."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} needs a number, not {value!r}") from None
    if n < minimum:
        raise UsageError(f"{flag} must be at least {minimum:g}, not {value!r}")
    return n


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(r, widths, strict=False)).rstrip() for r in [header, *rows]
    ]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def run_summary(result: Any, out: Output) -> None:
    """``run``'s table of nodes (exit code, time, error) and its count, on stderr."""
    rows = []
    for r in result.results:
        code = "-" if r.exit_code is None else str(r.exit_code)
        note = "" if r.ok else (r.error or "")
        rows.append([str(r.index), code, f"{r.seconds:.2f}s", note])
    out.line(table(rows, ["node", "exit", "time", "error"]), err=True)
    out.line(f"{len(result.succeeded)} ok, {len(result.failed)} failed", err=True)
