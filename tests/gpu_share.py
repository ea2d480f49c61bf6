"""A lock that lets pytest-xdist workers share one GPU: tests that need most of its memory run alone.

Every GPU test holds the lock shared; a ``gpu_memory`` test holds it exclusively.  A second lock file, the gate,
keeps a waiting exclusive test from starving: a shared holder passes the gate on its way in, and an exclusive
holder keeps the gate closed until its test is over, so no new shared holder enters while it waits.
Only POSIX has ``flock``; elsewhere the lock does nothing.
"""

import contextlib
import os
import tempfile

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@contextlib.contextmanager
def gpu_lock(run_id: str, exclusive: bool, directory: str | None = None):
    if fcntl is None:
        yield
        return
    directory = directory or os.path.join(tempfile.gettempdir(), f"fa_inductor_gpu_{run_id}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "gate"), "a") as gate, open(os.path.join(directory, "gpu"), "a") as gpu:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(gpu, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(gpu, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
