"""pipe_1mib: 1 MiB messages over Pipe(False), MB per second."""
import multiprocessing as mp

import common

MIB = 1 << 20


def send_big(out, n):
    block = bytearray(b"x" * MIB)
    for i in range(n):
        block[0] = block[-1] = i % 256
        out.send_bytes(block)


if __name__ == "__main__":
    n = common.size_argument(200)
    inp, out = mp.Pipe(False)
    writer = mp.Process(target=send_big, args=(out, n))
    writer.start()
    out.close()
    whole = True
    for i in range(n):
        b = inp.recv_bytes()
        whole = whole and len(b) == MIB and b[0] == i % 256 and b[-1] == i % 256
        if i == 0:
            t0 = common.now()
    s = common.now() - t0
    writer.join()
    if not whole or writer.exitcode != 0:
        raise SystemExit("pipe_1mib went wrong")
    common.report("pipe_1mib", (n - 1) * MIB / s / 1e6, "MB/s")
