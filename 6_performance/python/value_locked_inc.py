"""value_locked_inc: 2 processes x N increments of a Value('q') under get_lock(), ns each."""
import multiprocessing as mp

import common


def increment(v, n):
    for _ in range(n):
        with v.get_lock():
            v.value += 1


if __name__ == "__main__":
    n = common.size_argument(100_000)
    v = mp.Value("q", 0)
    a = mp.Process(target=increment, args=(v, n))
    b = mp.Process(target=increment, args=(v, n))
    t0 = common.now()
    a.start()
    b.start()
    a.join()
    b.join()
    s = common.now() - t0
    if v.value != 2 * n:
        raise SystemExit("value_locked_inc lost increments")
    common.report("value_locked_inc", s / (2 * n) * 1e9, "ns")
