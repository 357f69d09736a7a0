"""What every vtool task shares: the error decorator, the common flags, output helpers."""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from invoke import Exit, Task, task
from invoke.parser import ParserContext

from ..errors import UsageError, VtoolError


class _LazyApi:
    """``vtool.api``, imported the first time a task uses it: ``vtool --help`` and argument
    errors never pay for it (measured: a fifth of vtool's own start-up)."""

    def __getattr__(self, name: str) -> Any:
        from .. import api as real

        return getattr(real, name)


api: Any = _LazyApi()

COMMON_HELP = {
    "cluster": "cluster name (default: the `cluster` setting, VTOOL_CLUSTER, or 'default')",
    "profile": "apply the named profile from vtool.yaml (or VTOOL_PROFILE)",
}


class VtoolTask(Task):
    """A Task with predictable short flags: ``-c`` is always --cluster and ``-p`` --profile,
    positional arguments take none (Invoke gives them one, so ``run``'s COMMAND took ``-c``),
    ``shortflags`` assigns chosen ones, and the rest get their first letter when it is free."""

    shortflags: dict[str, str] = {}
    ALWAYS = {"cluster": "c", "profile": "p"}

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Any]:
        args = super().get_arguments(ignore_unknown_help=ignore_unknown_help)
        chosen = {**self.ALWAYS, **self.shortflags}
        taken = set(chosen.values()) | {"h"} | {a.names[0] for a in args if len(a.names[0]) == 1}
        for arg in args:
            long = arg.names[0]
            names = [long] + [n for n in arg.names[1:] if len(n) > 1]
            name = arg.name or long
            if not arg.positional and len(long) > 1:
                short = chosen.get(name)
                if short is None and name[0] not in taken:
                    short = name[0]
                    taken.add(short)
                if short:
                    names.append(short)
            arg.names = tuple(names)
        return args


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def vtool_task(
    *,
    help: dict[str, str] | None = None,
    optional_positional: tuple[str, ...] = (),
    shortflags: dict[str, str] | None = None,
    **kwargs: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` that turns VtoolError into a one-line message and its exit code.

    ``optional_positional`` names arguments that may be given bare (``launch 4``) or left out
    (``launch``), which Invoke's own positional arguments do not allow.
    """

    def deco(body: Callable[..., Any]) -> Any:
        @functools.wraps(body)
        def wrapper(c: Any, *args: Any, **kw: Any) -> Any:
            debug = os.environ.get("VTOOL_DEBUG", "").lower() in ("1", "true", "yes", "on")
            previous = {}
            if threading.current_thread() is threading.main_thread():
                # SIGTERM stops vtool as Ctrl-C does: in order, closing what it opened (and
                # stopping its commands on the nodes); so does SIGHUP (its terminal closed),
                # unless it is ignored (nohup).
                previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
                if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
                    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _sigterm_as_interrupt)
            try:
                return body(c, *args, **kw)
            except VtoolError as e:
                if debug:
                    raise
                raise Exit(f"vtool: {e}", code=e.exit_code) from None
            except KeyboardInterrupt:
                if debug:
                    raise
                raise Exit("vtool: interrupted", code=130) from None
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

        params = inspect.signature(body).parameters
        common = {k: v for k, v in COMMON_HELP.items() if k in params}
        t = task(help={**common, **(help or {})}, klass=VtoolTask, **kwargs)(wrapper)
        t.shortflags = dict(shortflags or {})
        t.optional_positional = optional_positional
        t.positional = list(dict.fromkeys([*t.positional, *optional_positional]))
        return t

    return deco


class VtoolParserContext(ParserContext):
    """Lets an argument be positional yet optional: eaten when given, None when not."""

    optional: tuple[str, ...] = ()

    @property
    def missing_positional_args(self) -> list[Any]:  # type: ignore[override]
        missing = [x for x in self.positional_args if x.value is None]
        # Invoke's parser asks in two places: when it sees a bare token (it may eat it,
        # unless it is a long option such as --help) and when the task's arguments end
        # (then an optional argument is simply not given).
        caller = sys._getframe(1)
        token = caller.f_locals.get("token")
        if isinstance(token, str) and (token.startswith("--") or token == "-h"):
            return []  # an option, never a positional value (so `vtool scpget --help` helps)
        if caller.f_code.co_name == "complete_context":
            parser = caller.f_locals.get("self")
            initial = getattr(parser, "initial", None)
            asked_help = initial is not None and "--help" in initial.flags and initial.flags["--help"].value
            if asked_help:
                return []  # `vtool scpget --help` shows help instead of a missing-argument error
            missing = [x for x in missing if x.name not in self.optional]
        return missing


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
