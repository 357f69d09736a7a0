"""Combine the shards fetched by `vtool scpgetall mc-shard.json out/shard`:

    python3 combine.py out/shard        # reads out/shard.0, out/shard.1, ...

Prints the combined estimate of pi and the total number of samples. Node indices may have
gaps (after `vtool terminate --nodes 1`, say), so every PREFIX.N file is read, not 0..count-1.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path


def shard_files(prefix: str) -> list[Path]:
    base = Path(prefix)
    pattern = re.compile(re.escape(base.name) + r"\.(\d+)")
    found = [(int(m.group(1)), p) for p in base.parent.glob(base.name + ".*") if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 combine.py PREFIX   (reads PREFIX.0, PREFIX.1, ...)", file=sys.stderr)
        return 2
    files = shard_files(argv[1])
    if not files:
        print(
            f"combine.py: no files named {argv[1]}.0, {argv[1]}.1 ...: run `vtool scpgetall mc-shard.json {argv[1]}` first",
            file=sys.stderr,
        )
        return 1
    inside = samples = 0
    counts = set()
    for path in files:
        shard = json.loads(path.read_text())
        counts.add(shard["count"])
        print(
            f"{path}: node {shard['index']}: {shard['inside']}/{shard['samples']} inside, pi ~ {shard['estimate']:.5f}"
        )
        inside += shard["inside"]
        samples += shard["samples"]
    if counts != {len(files)}:
        # A node's shard is missing, or an old file from a bigger cluster is still there.
        print(
            f"combine.py: warning: {len(files)} shard file(s), but the nodes counted {sorted(counts)}", file=sys.stderr
        )
    estimate = 4.0 * inside / samples
    print(f"shards: {len(files)}")
    print(f"total samples: {samples}")
    print(f"pi ~ {estimate:.6f} (error {estimate - math.pi:+.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
