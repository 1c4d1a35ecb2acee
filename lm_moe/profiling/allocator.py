"""CPU allocator setting for benchmarks and training runs on the CPU.

glibc returns every large freed block to the OS and page-faults it back in on the next
allocation of the same size. A training step frees and re-allocates the same large activations
every time, so on the CPU a step can spend a fifth of its time in page faults. Caching
allocators (PyTorch's on GPUs, jemalloc, tcmalloc) avoid this; `keep_freed_memory` makes glibc
do the same: memory stays with the process at its peak size instead of going back to the OS.
"""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; returns False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl and other C libraries without glibc's knobs
        return False
    no_mmap = libc.mallopt(_M_MMAP_MAX, 0)  # large blocks come from the heap, not fresh mmaps
    no_trim = libc.mallopt(_M_TRIM_THRESHOLD, 2**30)  # and freed heap is not handed back
    return bool(no_mmap and no_trim)
