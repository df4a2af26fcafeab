"""pipe_small: 64-byte messages over Pipe(False), messages per second."""
import multiprocessing as mp
import struct

import common


def send_small(out, n):
    for i in range(n):
        out.send(struct.pack("<Q56x", i))


if __name__ == "__main__":
    n = common.size_argument(200_000)
    inp, out = mp.Pipe(False)  # a receiving end, then a sending end
    writer = mp.Process(target=send_small, args=(out, n))
    writer.start()
    out.close()  # our copy of the sending end
    in_order = True
    for i in range(n):
        in_order = in_order and struct.unpack_from("<Q", inp.recv())[0] == i
        if i == 0:
            t0 = common.now()
    s = common.now() - t0
    writer.join()
    if not in_order or writer.exitcode != 0:
        raise SystemExit("pipe_small went wrong")
    common.report("pipe_small", (n - 1) / s, "msgs/s")
