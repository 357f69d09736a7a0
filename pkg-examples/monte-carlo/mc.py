"""Estimate pi on this node's shard: throw SAMPLES random points into the unit square and
count those inside the quarter circle. The seed comes from the node's index, so every
shard is different and a rerun gives the same numbers.

Writes ~/mc-shard.json (through a temporary file and a rename, so a fetch never sees half
a file). Plain Python: no numpy needed on the nodes.
"""

import json
import os
import random
import time

SAMPLES = 200_000  # per node; combine.py checks every shard used the same number

index = int(os.environ["VTOOL_NODE_INDEX"])
count = int(os.environ["VTOOL_NODE_COUNT"])
rank = int(os.environ.get("VTOOL_NODE_RANK", index))

rng = random.Random(1_000_003 * (index + 1))
t0 = time.monotonic()
inside = 0
for _ in range(SAMPLES):
    x, y = rng.random(), rng.random()
    if x * x + y * y <= 1.0:
        inside += 1
seconds = time.monotonic() - t0

shard = {
    "index": index,
    "rank": rank,
    "count": count,
    "samples": SAMPLES,
    "inside": inside,
    "estimate": 4.0 * inside / SAMPLES,
    "seconds": round(seconds, 3),
}
home = os.path.expanduser("~")
tmp = os.path.join(home, f".mc-shard.json.{os.getpid()}.tmp")
with open(tmp, "w") as f:
    json.dump(shard, f, indent=1)
    f.write("\n")
os.replace(tmp, os.path.join(home, "mc-shard.json"))
print(f"node {index} (rank {rank} of {count}): {inside}/{SAMPLES} inside, pi ~ {shard['estimate']:.5f}")
