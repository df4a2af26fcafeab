"""manager_dict_set: N x d[i % 64] = i through a Manager().dict() proxy, microseconds per op."""
import multiprocessing as mp

import common

if __name__ == "__main__":
    n = common.size_argument(20_000)
    with mp.Manager() as manager:
        d = manager.dict()
        t0 = common.now()
        for i in range(n):
            d[i % 64] = i
        s = common.now() - t0
        if len(d) != min(n, 64):
            raise SystemExit("manager_dict_set went wrong")
    common.report("manager_dict_set", s / n * 1e6, "us")
