"""pool_map_chunk1 / pool_map_auto: Pool(2).map(identity, range(N)), microseconds per task.
Usage: pool_map.py chunk1|auto --n N"""
import multiprocessing as mp
import sys

import common


def identity(x):
    return x


if __name__ == "__main__":
    variant = sys.argv.pop(1)
    n = common.size_argument(20_000)
    with mp.Pool(2) as pool:
        pool.map(identity, range(100))  # the workers are up before the clock starts
        t0 = common.now()
        out = pool.map(identity, range(n), chunksize=1) if variant == "chunk1" else \
            pool.map(identity, range(n))
        s = common.now() - t0
    if out != list(range(n)):
        raise SystemExit("pool_map went wrong")
    common.report(f"pool_map_{variant}", s / n * 1e6, "us")
