"""Run one operation on many nodes: a bounded pool, one result per node, failures isolated.

A dead or hung node never blocks or fails the others: its operation raises (connection
refused, timeout ...), which becomes that node's ``NodeResult`` with the error, while the
other nodes go on. Ctrl-C cancels what has not started and kills the ssh clients running.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .errors import VtoolError
from .models import GroupResult, Node, NodeResult
from .ssh import kill_running, stopping


class _Workers:
    """At most ``size`` threads that run the tasks put in, in order; a thread starts when a
    task finds none idle, and then waits for the next task until the process ends.

    concurrent.futures' ThreadPoolExecutor did this, but importing it (with logging and
    traceback) was ~5 ms of every command's start-up, and ``vtool run`` on a few nodes waits
    for vtool's start-up. The threads are daemons: a call returns only once its tasks that
    started have ended (fan_out waits for them, even on Ctrl-C), so none is cut short when
    the process ends; a task still queued then never starts."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tasks: deque[tuple[object, Callable[[], None]]] = deque()
        self.ready = threading.Condition()
        self.threads = 0
        self.idle = 0
        self.closing = False

    def put(self, owner: object, task: Callable[[], None]) -> None:
        with self.ready:
            self.tasks.append((owner, task))
            if self.idle > len(self.tasks) - 1 or self.threads >= self.size:
                self.ready.notify()
                return
            self.threads += 1
        try:
            threading.Thread(target=self._work, name=f"vtool-node-{id(self):x}", daemon=True).start()
        except BaseException:
            with self.ready:
                self.threads -= 1
            raise

    def drop(self, owner: object) -> None:
        """Take ``owner``'s tasks that have not started out of the queue."""
        with self.ready:
            kept = [t for t in self.tasks if t[0] is not owner]
            self.tasks.clear()
            self.tasks.extend(kept)

    def close(self) -> None:
        """Let the threads end once the queue is empty."""
        with self.ready:
            self.closing = True
            self.ready.notify_all()

    def _work(self) -> None:
        _here.worker = True
        while True:
            with self.ready:
                while not self.tasks:
                    if self.closing:
                        self.threads -= 1
                        return
                    self.idle += 1
                    self.ready.wait()
                    self.idle -= 1
                _, task = self.tasks.popleft()
            task()


# Worker threads kept from one call to the next (a program that runs command after command
# on the same cluster: 32 threads started per call cost 12 ms of a 64-node `run` here), by
# pool size. A call made from a worker (an operation that fans out itself) gets a pool of its
# own, so it never waits for a slot its caller holds.
_pools: dict[int, _Workers] = {}
_pools_lock = threading.Lock()
_here = threading.local()


def _pool(size: int) -> tuple[_Workers, bool]:
    """A pool of ``size`` workers, and whether it is this call's own (to close after)."""
    if getattr(_here, "worker", False):
        return _Workers(size), True
    with _pools_lock:
        return _pools.get(size) or _pools.setdefault(size, _Workers(size)), False


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
    # This call's operations under way, and whether it was stopped (Ctrl-C): one that starts
    # after that does nothing, and the call returns only once none runs (the workers are kept).
    state = {"running": 0, "stopped": False}
    changed = threading.Condition()

    def one(node: Node) -> NodeResult:
        with changed:
            if state["stopped"]:
                return NodeResult(node.index, False, error="interrupted")
            state["running"] += 1
        try:
            return attempt(node)
        finally:
            with changed:
                state["running"] -= 1
                changed.notify_all()

    def attempt(node: Node) -> NodeResult:
        start = time.monotonic()
        try:
            value = operation(node)
        except VtoolError as e:
            return NodeResult(node.index, False, error=str(e), seconds=time.monotonic() - start)
        except Exception as e:  # a bug must not take the other nodes down; show it in full with debug
            if debug:
                import traceback

                detail = traceback.format_exc()
            else:
                detail = f"{type(e).__name__}: {e}"
            return NodeResult(node.index, False, error=f"internal error: {detail}", seconds=time.monotonic() - start)
        code = getattr(value, "exit_code", None)
        ok = code in (None, 0)
        error = None if ok else f"exited {code}"
        return NodeResult(node.index, ok, exit_code=code, error=error, value=value, seconds=time.monotonic() - start)

    if not nodes:
        return GroupResult(())
    stopping.clear()  # a new operation (an earlier one may have been interrupted, in a program)
    pool, own = _pool(max(1, concurrency))
    # Each operation's result (or what it raised), as it ends: taken one by one, the same cost
    # for every node (concurrent.futures.wait(FIRST_COMPLETED), used before, set up a waiter on
    # every pending future at each call: 5.4 against 2.8 ms of CPU for 64 nodes).
    finished: deque[tuple[NodeResult | None, BaseException | None]] = deque()

    def task(node: Node) -> Callable[[], None]:
        def run() -> None:
            try:
                outcome: tuple[NodeResult | None, BaseException | None] = (one(node), None)
            except BaseException as e:  # (handed to the caller, as a future would)
                outcome = (None, e)
            with changed:
                finished.append(outcome)
                changed.notify_all()

        return run

    waiting = len(nodes)
    try:
        for n in nodes:
            pool.put(finished, task(n))
        while waiting:
            with changed:  # (a signal's handler, Ctrl-C, runs during the wait)
                while not finished:
                    changed.wait()
                r, raised = finished.popleft()
            waiting -= 1
            if raised is not None:
                raise raised
            assert r is not None
            results[r.index] = r
            if on_done is not None:
                on_done(r)
    except BaseException:
        with changed:
            state["stopped"] = True
        pool.drop(finished)
        kill_running()
        with changed:  # (their ssh clients are gone and `stopping` is set: they end at once)
            changed.wait_for(lambda: state["running"] == 0)
        raise
    finally:
        if own:
            pool.close()
    return GroupResult(tuple(results[i] for i in sorted(results)))
