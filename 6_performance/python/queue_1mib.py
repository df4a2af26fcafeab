"""queue_1mib: 1 MiB messages, 1 producer -> 1 consumer process, MB per second."""
import multiprocessing as mp

import common

MIB = 1 << 20


def put_big(q, n):
    block = bytearray(b"x" * MIB)
    for i in range(n):
        block[0] = block[-1] = i % 256
        q.put(bytes(block))


if __name__ == "__main__":
    n = common.size_argument(200)
    q = mp.Queue()
    producer = mp.Process(target=put_big, args=(q, n))
    producer.start()
    whole = True
    for i in range(n):
        v = q.get()
        whole = whole and len(v) == MIB and v[0] == i % 256 and v[-1] == i % 256
        if i == 0:
            t0 = common.now()
    s = common.now() - t0
    producer.join()
    if not whole or producer.exitcode != 0:
        raise SystemExit("queue_1mib went wrong")
    common.report("queue_1mib", (n - 1) * MIB / s / 1e6, "MB/s")
