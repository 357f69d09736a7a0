"""The ``vtool`` console script: an Invoke Program over the vtool collection (vtool.program).

Before anything heavy is imported, a node command opens its SSH connections in the
background (vtool.early), so they are ready by the time the command needs them, and two of
Invoke's imports that a vtool command seldom uses are put off until first use
(``defer_invoke_extras``).
"""

from __future__ import annotations

import gc
import os
import sys

# typing for type checkers only, as in vtool.early
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Mock:
    """What ``invoke.context`` gets for ``unittest.mock.Mock`` (see defer_invoke_extras): the
    real one, made when Invoke's MockContext first asks for one."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from unittest.mock import Mock

        return Mock(*args, **kwargs)


def _stand_in(name: str, **names: Any) -> Any:
    """A module in ``sys.modules[name]`` with ``names`` in it; any other name imports the real
    module (the stand-in leaves ``sys.modules`` then) and is taken from there."""
    import types

    module = types.ModuleType(name)
    module.__dict__.update(names)

    def forward(attribute: str) -> Any:
        if attribute.startswith("__"):  # the import system asking what it is (__path__, __file__)
            raise AttributeError(attribute)
        if sys.modules.get(name) is module:
            del sys.modules[name]
        import importlib

        return getattr(importlib.import_module(name), attribute)

    module.__dict__["__getattr__"] = forward
    sys.modules[name] = module
    return module


def defer_invoke_extras() -> Any:
    """Put off two imports Invoke makes at start-up that a vtool command seldom needs: about a
    quarter of vtool's start-up CPU (measured with ``python -X importtime``).

    - ``unittest.mock`` (with asyncio and ssl, ~18 ms), which ``invoke.context`` imports for
      its MockContext: it gets a ``Mock`` that makes the real one on first use.
    - Invoke's vendored YAML (~12 ms), which ``invoke.util`` imports for config files: vtool
      reads its own files with PyYAML (vtool.config), so this one loads only if something
      uses it.

    Until Invoke is imported, both are stand-ins in ``sys.modules`` (any other name loads the
    real module). Call this before Invoke is imported, and what it returns right after: that
    takes the stand-ins out of ``sys.modules``, so a later import is the real module. It does
    nothing once Invoke is imported, and leaves YAML alone when Invoke has no vendored copy."""
    stand_ins: list[Any] = []

    def done() -> None:
        for stand_in in stand_ins:
            name = stand_in.__name__
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]

    if "invoke" in sys.modules:
        return done
    if "unittest.mock" not in sys.modules:
        stand_ins.append(_stand_in("unittest.mock", Mock=_Mock))
    import importlib.util

    spec = importlib.util.find_spec("invoke")
    if spec is not None and spec.origin and "invoke.vendor.yaml" not in sys.modules:
        if os.path.isfile(os.path.join(os.path.dirname(spec.origin), "vendor", "yaml", "__init__.py")):
            stand_ins.append(_stand_in("invoke.vendor.yaml"))
    return done


def make_program(before_tasks: Any = None) -> Any:
    from .program import make_program as make

    return make(before_tasks)


def collect_garbage_again() -> None:
    """End ``main``'s pause of the garbage collector (once the command's task is about to run).
    What start-up made (modules, classes, the task collection, the settings) lives until
    the process ends: it is frozen, so that later collections do not walk it again."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


_gc_paused = False


def leave(code: int) -> None:
    """End the process with ``code`` now that a command is done, without the interpreter's
    tear-down: ``exit`` handlers (vtool's, a plugin's) run and the output is flushed, but the
    ~200 modules a command imported are not taken apart one by one, which was ~3% of a
    ``vtool run``'s CPU (instructions counted with valgrind). Returns, for the usual exit,
    while a thread that is not a daemon still runs (the interpreter would wait for it), and
    once a third-party plugin was loaded: its code may hold a file it never closed, which only
    the tear-down would flush."""
    import threading

    from . import plugin_manager

    if plugin_manager.third_party_loaded():
        return
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # (a reader that left; no stream at all)
            pass
    os._exit(code)


def main() -> None:
    # Start-up allocates tens of thousands of objects that all live to the end (imports,
    # dataclasses, Invoke's parser): the cyclic garbage collector, run every 700 of them,
    # finds nothing to free and cost ~12% of a `vtool run`'s Python CPU (perf). Paused until
    # the task runs (collect_garbage_again).
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True
    from . import early

    opened = early.start(sys.argv[1:])
    leave_now = None
    if opened and os.environ.get("VTOOL_DEBUG", "").lower() in ("1", "true", "yes", "on"):
        print(f"vtool: opening {opened} connection(s) while starting", file=sys.stderr)
    try:
        if sys.argv[1:2] == ["run"]:  # without Invoke, when it can (vtool.lean)
            from . import lean
            from .output import Stop

            try:
                ran = lean.run(sys.argv[2:], before=collect_garbage_again)
            except Stop as e:
                print(e.message, file=sys.stderr)
                leave_now = e.code
                raise SystemExit(e.code) from None
            if ran:
                leave_now = 0
                raise SystemExit(0)
        imported = defer_invoke_extras()
        try:
            import invoke  # noqa: F401  (with the stand-ins; then no plugin ever sees them)
        finally:
            imported()
        make_program(collect_garbage_again).run()
    except BrokenPipeError:  # `vtool --list | head -1`: the reader left; that is not an error
        pass
    except BaseException as e:
        refused = not (isinstance(e, SystemExit) and e.code in (0, None))
        if refused and opened and not early.contacted():
            early.abandon()  # the command stopped before contacting the nodes: close what it opened
        raise
    finally:
        collect_garbage_again()
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if leave_now is not None:
            leave(leave_now)
