"""Run one operation on many nodes: a bounded pool, one result per node, failures isolated.

A dead or hung node never blocks or fails the others: its operation raises (connection
refused, timeout ...), which becomes that node's ``NodeResult`` with the error, while the
other nodes go on. Ctrl-C cancels what has not started and kills the ssh clients running.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from .errors import VtoolError
from .models import GroupResult, Node, NodeResult
from .ssh import kill_running, stopping


def fan_out(
    nodes: Sequence[Node],
    operation: Callable[[Node], Any],
    *,
    concurrency: int,
    on_done: Callable[[NodeResult], None] | None = None,
    debug: bool = False,
) -> GroupResult:
    """Call ``operation(node)`` for every node, at most ``concurrency`` at once.

    The operation returns a value (kept in ``NodeResult.value``) or raises; a
    ``NodeResult.exit_code`` is taken from a returned object's ``exit_code`` if it has one.
    """
    results: dict[int, NodeResult] = {}

    def one(node: Node) -> NodeResult:
        start = time.monotonic()
        try:
            value = operation(node)
        except VtoolError as e:
            return NodeResult(node.index, False, error=str(e), seconds=time.monotonic() - start)
        except Exception as e:  # a bug must not take the other nodes down; show it in full with debug
            detail = traceback.format_exc() if debug else f"{type(e).__name__}: {e}"
            return NodeResult(node.index, False, error=f"internal error: {detail}", seconds=time.monotonic() - start)
        code = getattr(value, "exit_code", None)
        ok = code in (None, 0)
        error = None if ok else f"exited {code}"
        return NodeResult(node.index, ok, exit_code=code, error=error, value=value, seconds=time.monotonic() - start)

    if not nodes:
        return GroupResult(())
    stopping.clear()  # a new operation (an earlier one may have been interrupted, in a program)
    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(nodes))), thread_name_prefix="vtool-node")
    pending: set[Future[NodeResult]] = set()
    try:
        pending = {pool.submit(one, n) for n in nodes}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                r = fut.result()
                results[r.index] = r
                if on_done is not None:
                    on_done(r)
    except BaseException:
        for fut in pending:
            fut.cancel()
        kill_running()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return GroupResult(tuple(results[i] for i in sorted(results)))
