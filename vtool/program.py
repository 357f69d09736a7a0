"""vtool's Invoke Program (see vtool.main, which imports this only after vtool.early)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from invoke import Program

from . import __version__
from .errors import VtoolError
from .invoke_config import VtoolConfig

# Invoke's own core options that mean something for vtool; the others (--dry, --echo,
# --pty, --hide, --config ...) configure Invoke's local command runner, which vtool's
# verbs do not use, so accepting them would only mislead.
CORE_OPTIONS = {
    "complete",
    "debug",
    "help",
    "list",
    "list-depth",
    "list-format",
    "print-completion-script",
    "version",
    "write-pyc",
}


class VtoolProgram(Program):
    """Invoke's Program, with vtool's errors (e.g. a broken vtool.yaml) as one line."""

    def core_args(self) -> list[Any]:
        return [a for a in super().core_args() if a.name in CORE_OPTIONS]

    def parse_core(self, argv: Any) -> None:
        # Invoke turns off writing .pyc files (for a project's tasks.py); vtool keeps Python's
        # own choice, so its modules imported on first use are compiled once, not every run.
        before = sys.dont_write_bytecode
        super().parse_core(argv)
        sys.dont_write_bytecode = before

    def _make_parser(self) -> Any:
        # Invoke's parser deep-copies the argument specs of every task it is given, each time
        # it parses (3,600 copies, ~5 ms of every command's start-up): a command line is
        # parsed against the tasks it names (shell completion still gets them all). An
        # unknown word is refused as before ("No idea what ... is").
        from invoke.parser import Parser

        contexts = self.collection.to_contexts(ignore_unknown_help=self.config.tasks.ignore_unknown_help)
        if not self.args.complete.value:
            words = set(self.core.unparsed if self.core is not None else ())
            if isinstance(self.args.help.value, str):  # `vtool --help run`
                words.add(self.args.help.value)
            contexts = [c for c in contexts if c.name in words or words.intersection(c.aliases)]
        return Parser(initial=self.initial_context, contexts=contexts)

    def update_config(self, merge: bool = True) -> None:
        # vtool reads its settings itself (vtool.config.load_settings); nothing to add here.
        self.config.set_runtime_path(None)
        if merge:
            self.config.merge()

    before_tasks: Callable[[], None] | None = None  # called once the command line is read

    def execute(self) -> None:
        if self.before_tasks is not None:
            self.before_tasks()
        super().execute()

    def run(self, argv: Any = None, exit: bool = True) -> None:
        try:
            super().run(argv, exit)
        except VtoolError as e:
            if os.environ.get("VTOOL_DEBUG", "").lower() in ("1", "true", "yes", "on"):
                raise
            print(f"vtool: {e}", file=sys.stderr)
            sys.exit(e.exit_code)


def make_program(before_tasks: Callable[[], None] | None = None) -> VtoolProgram:
    try:
        from .tasks import collection

        ns = collection()
    except VtoolError as e:  # a broken plugin: still one line, exit code 5
        print(f"vtool: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    program = VtoolProgram(name="vtool", binary="vtool", version=__version__, namespace=ns, config_class=VtoolConfig)
    program.before_tasks = before_tasks
    return program
