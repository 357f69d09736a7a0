"""What every vtool task shares: the error decorator, the common flags, output helpers."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

from invoke import Exit, Task, task
from invoke.parser import ParserContext

from ..output import Output, Stop, duration, guarded, number, table  # noqa: F401  (the tasks' names for them)


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
            try:
                with guarded():
                    return body(c, *args, **kw)
            except Stop as e:
                raise Exit(e.message, code=e.code) from None

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
