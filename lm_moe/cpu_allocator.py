"""CPU allocator settings for benchmarks and training runs on the CPU.

glibc returns every large freed block to the OS and page-faults it back in on the next
allocation of the same size. A training step frees and re-allocates the same large activations
every time, so on the CPU a step can spend a fifth of its time in page faults. Caching
allocators (PyTorch's on GPUs, jemalloc, tcmalloc) avoid this; `keep_freed_memory` makes glibc
do the same: memory stays with the process at its peak size instead of going back to the OS.

Large tensors on 4 KB pages also cost a TLB miss every 4 KB once a step's working set outgrows
the caches (expert weights and their gradients, 128 MB for 128 experts of 256 x 256):
`use_huge_pages` puts every tensor of 2 MB or more on 2 MB pages.
"""

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

# What keeps freed memory: large blocks come from the heap, not fresh mmaps, and freed heap is not
# handed back. Each setting by the environment variable glibc reads at start-up (mallopt(3)), with
# its mallopt parameter (glibc's malloc.h) and value.
_KEEP_FREED = {"MALLOC_MMAP_MAX_": (-4, 0), "MALLOC_TRIM_THRESHOLD_": (-1, 2**30)}
_KEEP_FREED_VARIABLES = {name: str(value) for name, (_, value) in _KEEP_FREED.items()}

# PyTorch's own switch: its CPU allocator aligns tensors of 2 MB and more to 2 MB and asks the
# kernel for transparent huge pages (madvise). It is read once, at the first such allocation.
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"
_THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse, in this process and in those it starts (DDP's
    spawned workers read it from the environment). Returns whether the setting is in effect:
    False where glibc is not there, or where the environment already sets MALLOC_MMAP_MAX_ or
    MALLOC_TRIM_THRESHOLD_ to something else (the user's choice wins)."""
    if not sys.platform.startswith("linux"):
        return False
    chosen = {name: os.environ[name] for name in _KEEP_FREED_VARIABLES if name in os.environ}
    if chosen:  # glibc read them at start-up; a tuned parent process passes on exactly these
        return chosen == _KEEP_FREED_VARIABLES
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl and other C libraries without glibc's knobs
        return False
    if not all(libc.mallopt(parameter, value) for parameter, value in _KEEP_FREED.values()):
        return False
    os.environ.update(_KEEP_FREED_VARIABLES)
    return True


def transparent_huge_pages_mode(mode_file: Path = _THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"), None if unknown."""
    try:
        modes = mode_file.read_text().split()  # e.g. "always [madvise] never"
    except OSError:
        return None
    selected = [mode.strip("[]") for mode in modes if mode.startswith("[")]
    return selected[0] if selected else None


def use_huge_pages() -> bool:
    """Put every CPU tensor of 2 MB or more on transparent huge pages from now on.

    Call it before the process allocates its first tensor of 2 MB: PyTorch reads the setting
    then, once. Returns whether huge pages are in use: False where the kernel has them off, or
    where the environment already sets THP_MEM_ALLOC_ENABLE to something else (the user's choice
    wins).
    """
    if transparent_huge_pages_mode() not in ("always", "madvise"):
        return False
    return os.environ.setdefault(HUGE_PAGES_VARIABLE, "1") == "1"


def tune_cpu_allocator() -> list[str]:
    """Both settings; returns the names of those in effect, for the record of a measurement."""
    settings = []
    if keep_freed_memory():
        settings.append("freed memory kept")
    if use_huge_pages():
        settings.append("huge pages")
    return settings
