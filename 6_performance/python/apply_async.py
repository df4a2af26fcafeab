"""apply_async: N x Pool(2).apply_async(identity, (i,)) then get() all, microseconds per task."""
import multiprocessing as mp

import common


def identity(x):
    return x


if __name__ == "__main__":
    n = common.size_argument(20_000)
    with mp.Pool(2) as pool:
        pool.map(identity, range(100))
        t0 = common.now()
        results = [pool.apply_async(identity, (i,)) for i in range(n)]
        out = [r.get() for r in results]
        s = common.now() - t0
    if out != list(range(n)):
        raise SystemExit("apply_async went wrong")
    common.report("apply_async", s / n * 1e6, "us")
