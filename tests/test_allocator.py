"""The CPU allocator settings: huge pages for large tensors, freed memory kept for reuse.

Each check runs in a fresh interpreter: both settings act on the whole process, and PyTorch
reads its huge-page switch only once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_moe.profiling.allocator import HUGE_PAGES_VARIABLE, transparent_huge_pages_mode

# Allocates and frees a 64 MB tensor ten times after the settings, then reports how much of the
# process sits on huge pages and how many page faults the last five allocations cost.
_PROBE = """
import json, resource, sys, torch
from lm_moe.profiling.allocator import tune_cpu_allocator
settings = tune_cpu_allocator() if sys.argv[1] == "tuned" else []
for step in range(10):
    if step == 5:
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)
    if step == 9:
        smaps = open("/proc/self/smaps_rollup").read()
        huge_kb = int(smaps.split("AnonHugePages:")[1].split()[0])
    del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
print(json.dumps({"settings": settings, "huge_kb": huge_kb, "faults": faults}))
"""


def probe(mode: str, **environment: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != HUGE_PAGES_VARIABLE} | environment
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux features")
needs_thp = pytest.mark.skipif(
    transparent_huge_pages_mode() not in ("always", "madvise"), reason="the kernel has transparent huge pages off"
)


@linux_only
@needs_thp
def test_tuned_allocator_puts_large_tensors_on_huge_pages():
    tuned = probe("tuned")
    assert tuned["settings"] == ["freed memory kept", "huge pages"]
    assert tuned["huge_kb"] >= 32 * 1024  # most of the 64 MB tensor
    if transparent_huge_pages_mode() == "madvise":  # under "always" every process gets them anyway
        assert probe("untuned")["huge_kb"] == 0


@linux_only
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    # 64 MB on 4 KB pages is 16384 faults per fresh allocation; reused memory faults at most a few.
    assert probe("tuned")["faults"] < 100
    assert probe("untuned", **{HUGE_PAGES_VARIABLE: "0"})["faults"] > 5 * 1000


@linux_only
def test_an_explicit_choice_in_the_environment_wins():
    kept = probe("tuned", **{HUGE_PAGES_VARIABLE: "0"})
    assert kept["settings"] == ["freed memory kept"]
    if transparent_huge_pages_mode() == "madvise":
        assert kept["huge_kb"] == 0


def test_transparent_huge_pages_mode_reads_the_bracketed_choice(tmp_path: Path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert transparent_huge_pages_mode(mode_file) == "madvise"
    mode_file.write_text("[never]\n")
    assert transparent_huge_pages_mode(mode_file) == "never"
    assert transparent_huge_pages_mode(tmp_path / "missing") is None
