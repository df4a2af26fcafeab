"""shm_fill: create an N MiB SharedMemory and write it, MB per second."""
from multiprocessing import shared_memory

import common

MIB = 1 << 20

if __name__ == "__main__":
    n = common.size_argument(256)
    size = n * MIB
    chunk = b"\x01" * MIB
    t0 = common.now()
    shm = shared_memory.SharedMemory(create=True, size=size)
    for off in range(0, size, MIB):  # memoryview slice assignment: a memcpy per MiB
        shm.buf[off:off + MIB] = chunk
    s = common.now() - t0
    shm.close()
    shm.unlink()
    common.report("shm_fill", size / s / 1e6, "MB/s")
