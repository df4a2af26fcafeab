"""start_fork / start_spawn / start_forkserver: start + join of a process running an empty
target, in microseconds per process. Usage: start_method.py METHOD --n N"""
import multiprocessing as mp
import sys

import common


def empty_target():
    pass


if __name__ == "__main__":
    method = sys.argv.pop(1)
    n = common.size_argument(200)
    ctx = mp.get_context(method)
    warm = ctx.Process(target=empty_target)  # the first forkserver start starts the server
    warm.start()
    warm.join()
    t0 = common.now()
    for _ in range(n):
        p = ctx.Process(target=empty_target)
        p.start()
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"start_{method}: a child failed")
    common.report(f"start_{method}", (common.now() - t0) / n * 1e6, "us")
