"""The floor under ``vtool run``: a Python process that does only what no Python client on
vtool's connections can skip, for the bench's reference row.

    python bench/floor.py run COMMAND -c CLUSTER [--nodes SPEC]

It opens the nodes' connections exactly as ``vtool run`` does while it starts (vtool.early:
the same keeper, vtool.keeper, or ``ssh`` masters, from the record an earlier ``vtool run``
in the same folder and environment wrote), runs COMMAND on each node through them (vtool.mux: no ``ssh``
process per command) and prints every line of output as ``[INDEX] LINE``. Nothing else: no
Invoke, no settings, no plugins, no state, no retries, no summary, no supervision of the
remote command. So its time is Python's start-up plus vtool's connections; the rest of
``vtool run``'s time is vtool's own code. Exit 0 when every node ran COMMAND with exit 0;
3 when there is no record to open the connections from (run ``vtool run`` there first).

It reads vtool.early's record through that module's private names, so it goes with the vtool
of the same commit (the bench installs both from the same tree).
"""

from __future__ import annotations

import sys

from vtool import early  # first: the connections open while the rest is imported

early.start(sys.argv[1:])  # (opens what it can; main reads the record it accepted)

import os  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402

from vtool import mux  # noqa: E402


def main() -> int:
    record = early._accepted  # (set by start when the record fits this command, open or not)
    parsed = early._flags(sys.argv[2:])
    if record is None or parsed is None or sys.argv[1:2] != ["run"] or not parsed[1]:
        print("floor: no record of vtool's connections here (run `vtool run` first)", file=sys.stderr)
        return 3
    flags, positional = parsed
    nodes = {int(i): n for i, n in record["nodes"].items()}
    wanted = early._wanted(flags.get("nodes"), sorted(nodes))
    if not wanted:
        print("floor: --nodes names a node the record does not have", file=sys.stderr)
        return 3
    command = positional[0]
    lock = threading.Lock()
    failed: list[str] = []

    def one(i: int) -> None:
        sock = nodes[i]["socket"]
        try:
            for path in (sock + early.KEEPER_SUFFIX, sock):  # vtool.keeper's, else the ssh master
                early.wait(path, 30)
                if os.path.exists(path):
                    sock = path
                    break
            proc = mux.MuxProcess(sock)
            proc.open(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert proc.stdout is not None
            out = proc.stdout.read()
            code = proc.wait()
        except Exception as e:  # (a diagnostic: any failure is the node's, reported below)
            out, code = b"", f"{type(e).__name__}: {e}"
        with lock:
            sys.stdout.write("".join(f"[{i}] {ln}\n" for ln in out.decode(errors="replace").splitlines()))
            if code != 0:
                failed.append(f"node {i}: {code}")

    threads = [threading.Thread(target=one, args=(i,)) for i in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.stdout.flush()
    if failed:
        print(f"floor: {len(failed)} failed, e.g. {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())  # (through Python's own shutdown, as vtool ends)
