"""pipe_rtt: 1-byte round trip over two Pipe(False), microseconds."""
import multiprocessing as mp

import common


def echo(inp, out, parents_end):
    parents_end.close()  # a fork child holds a copy of every end: close the one it won't use,
    try:                 # or EOF never comes (mp's Connection is closed in children for you)
        while True:
            out.send_bytes(inp.recv_bytes())
    except EOFError:  # the parent closed its end: done
        pass


if __name__ == "__main__":
    n = common.size_argument(10_000)
    there_in, there_out = mp.Pipe(False)
    back_in, back_out = mp.Pipe(False)
    echoer = mp.Process(target=echo, args=(there_in, back_out, there_out))
    echoer.start()
    there_in.close()
    back_out.close()
    t0 = common.now()
    for _ in range(n):
        there_out.send_bytes(b"x")
        if back_in.recv_bytes() != b"x":
            raise SystemExit("pipe_rtt got a wrong byte")
    s = common.now() - t0
    there_out.close()  # EOF: the echo process ends
    echoer.join()
    common.report("pipe_rtt", s / n * 1e6, "us")
