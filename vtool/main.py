"""The ``vtool`` console script: an Invoke Program over the vtool collection (vtool.program).

Before anything heavy is imported, a node command opens its SSH connections in the
background (vtool.early), so they are ready by the time the command needs them.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def make_program() -> Any:
    from .program import make_program as make

    return make()


def main() -> None:
    from . import early

    opened = early.start(sys.argv[1:])
    if opened and os.environ.get("VTOOL_DEBUG", "").lower() in ("1", "true", "yes", "on"):
        print(f"vtool: opening {opened} connection(s) while starting", file=sys.stderr)
    try:
        make_program().run()
    except BrokenPipeError:  # `vtool --list | head -1`: the reader left; that is not an error
        pass
    except BaseException as e:
        refused = not (isinstance(e, SystemExit) and e.code in (0, None))
        if refused and opened and not early.contacted():
            early.abandon()  # the command stopped before contacting the nodes: close what it opened
        raise
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
