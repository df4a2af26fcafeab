"""queue_small: 64-byte messages, 1 producer -> 1 consumer process, messages per second."""
import multiprocessing as mp
import struct

import common


def put_small(q, n):
    for i in range(n):
        q.put(struct.pack("<Q56x", i))  # a sequence number padded to 64 bytes


if __name__ == "__main__":
    n = common.size_argument(200_000)
    q = mp.Queue()
    producer = mp.Process(target=put_small, args=(q, n))
    producer.start()
    in_order = True
    for i in range(n):
        in_order = in_order and struct.unpack_from("<Q", q.get())[0] == i
        if i == 0:
            t0 = common.now()  # the clock starts at the first message
    s = common.now() - t0
    producer.join()
    if not in_order or producer.exitcode != 0:
        raise SystemExit("queue_small went wrong")
    common.report("queue_small", (n - 1) / s, "msgs/s")
