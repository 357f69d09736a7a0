"""Getting one payload (a package or a delta) onto many nodes, sending it from the client once.

(inject streams a payload through a pipelined tree first, ``api._broadcast``; this
scheduler serves the nodes that the tree missed, and the cases where some nodes already
hold the payload, e.g. the nodes of a launch that joins a cluster.)

The client sends the payload to one node (the seed). From then on every node that holds it
passes it on to one node that does not, over the cluster's own SSH (``remote.relay``), so the
number of holders doubles each round and the client's uplink carries the payload once,
whatever the cluster size. Below ``relay_min`` nodes the client sends to each directly (a
relay round costs a little latency that a few direct uploads do not).

Faults: a holder that cannot be reached any more is dropped and its target goes back in the
queue; a target that a holder cannot reach or that fails to unpack is tried once directly
from the client, and only then reported; when no holder is left the client seeds again. So a
node that dies mid-relay never stops the others.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import NodeError, VtoolError
from .models import Node
from .ssh import kill_running, stopping


class HolderLost(NodeError):
    """The node passing the payload on failed (not the one receiving it)."""


class BaseChanged(NodeError):
    """A delta could not be applied: its base release is missing or changed on the node."""


Send = Callable[[Node], str]  # client -> node; returns how ("direct")
Relay = Callable[[Node, Node], str]  # holder -> target; returns how ("relay")


def distribute(
    nodes: Sequence[Node],
    *,
    send: Send,
    relay: Relay,
    relay_min: int,
    concurrency: int,
    holders: Sequence[Node] = (),
    on_done: Callable[[int, VtoolError | None], None] | None = None,
) -> dict[int, str | VtoolError]:
    """Put the payload on every node in ``nodes``; per node index, how it got there
    ("direct"/"relay") or the error that stopped it. ``holders``: nodes that may already
    hold the payload (one that turns out not to is dropped)."""
    use_relay = relay_min > 0 and len(nodes) >= relay_min
    pending: deque[Node] = deque(nodes)
    sources: deque[Node] = deque(holders)
    retried: set[int] = set()  # targets already given their direct attempt
    results: dict[int, str | VtoolError] = {}
    cond = threading.Condition()
    in_flight = 0
    seeding = 0  # client -> seed uploads running
    relaying = 0  # holder -> target transfers running (each gives its holder back)

    def finish(node: Node, outcome: str | VtoolError) -> None:
        results[node.index] = outcome
        if on_done is not None:
            on_done(node.index, None if isinstance(outcome, str) else outcome)

    def do_send(node: Node, seed: bool) -> None:
        nonlocal in_flight, seeding
        try:
            how: str | VtoolError = send(node)
        except VtoolError as e:
            how = e
        except Exception as e:  # a bug must not leave the other nodes waiting
            how = NodeError(f"internal error: {type(e).__name__}: {e}")
        with cond:
            in_flight -= 1
            seeding -= int(seed)
            finish(node, how)
            if isinstance(how, str):
                sources.append(node)
            cond.notify_all()

    def do_relay(holder: Node, target: Node) -> None:
        nonlocal in_flight, relaying
        try:
            how: str | VtoolError = relay(holder, target)
        except VtoolError as e:
            how = e
        except Exception as e:
            how = NodeError(f"internal error: {type(e).__name__}: {e}")
        with cond:
            in_flight -= 1
            relaying -= 1
            if isinstance(how, str):
                sources.extend((holder, target))
                finish(target, how)
            elif isinstance(how, HolderLost):
                pending.appendleft(target)  # the holder is gone, not the target
            else:
                sources.append(holder)
                if isinstance(how, BaseChanged):
                    finish(target, how)
                else:
                    retried.add(target.index)
                    pending.appendleft(target)  # its direct attempt decides
            cond.notify_all()

    stopping.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="vtool-relay")
    futures: list[Future[None]] = []
    try:
        with cond:
            while pending or in_flight:
                started = False
                while pending and in_flight < concurrency:
                    target = pending[0]
                    if use_relay and target.index not in retried:
                        if sources:
                            pending.popleft()
                            in_flight += 1
                            relaying += 1
                            futures.append(pool.submit(do_relay, sources.popleft(), target))
                        elif seeding == 0 and relaying == 0:
                            # No holder (the start, or every holder lost): the client seeds.
                            pending.popleft()
                            in_flight += 1
                            seeding += 1
                            futures.append(pool.submit(do_send, target, True))
                        else:
                            break
                    else:
                        pending.popleft()
                        in_flight += 1
                        futures.append(pool.submit(do_send, target, False))
                    started = True
                if not started:
                    cond.wait(0.5)
        for fut in futures:
            fut.result()
    except BaseException:
        kill_running()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results
