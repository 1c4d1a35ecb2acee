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

from lm_moe.cpu_allocator import HUGE_PAGES_VARIABLE, transparent_huge_pages_mode

# Allocates and frees a 64 MB tensor 15 times after the settings, then reports how much of the
# process sits on huge pages and how many page faults the last five allocations cost (glibc takes
# a few allocations to settle on reusing the freed block). Mode "parent" tunes its allocator and
# reports on an untuned child process it starts, which inherits the environment.
_PROBE = """
import json, resource, subprocess, sys, torch
from lm_moe.cpu_allocator import tune_cpu_allocator
settings = tune_cpu_allocator() if sys.argv[1] in ("tuned", "parent") else []
if sys.argv[1] == "parent":
    child = subprocess.run([sys.executable, "-c", sys.argv[2], "untuned"], capture_output=True, text=True, check=True)
    print(child.stdout, end="")
    sys.exit()
for step in range(15):
    if step == 10:
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20)
    if step == 14:
        smaps = open("/proc/self/smaps_rollup").read()
        huge_kb = int(smaps.split("AnonHugePages:")[1].split()[0])
    del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
print(json.dumps({"settings": settings, "huge_kb": huge_kb, "faults": faults}))
"""

# What glibc and PyTorch read from the environment: each probe starts without the caller's.
_SETTINGS_VARIABLES = (HUGE_PAGES_VARIABLE, "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_FOUR_KB_PAGES = {HUGE_PAGES_VARIABLE: "0"}  # huge pages cut the page faults too


def probe(mode: str, **environment: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in _SETTINGS_VARIABLES} | environment
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, _PROBE], capture_output=True, text=True, env=env, check=True
    )
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
    # On 4 KB pages a fresh 64 MB costs 16384 faults, 81920 for the five counted; reused memory
    # faults hardly at all (none in most runs).
    assert probe("tuned", **_FOUR_KB_PAGES)["faults"] < 16384
    assert probe("untuned", **_FOUR_KB_PAGES)["faults"] >= 5 * 16384


@linux_only
@needs_thp
def test_processes_a_tuned_process_starts_inherit_both_settings():
    child = probe("parent")
    assert child["settings"] == []  # the child calls nothing itself
    assert child["huge_kb"] >= 32 * 1024
    assert probe("parent", **_FOUR_KB_PAGES)["faults"] < 16384  # freed memory kept


@linux_only
def test_an_explicit_choice_in_the_environment_wins():
    kept = probe("tuned", **_FOUR_KB_PAGES)
    assert kept["settings"] == ["freed memory kept"]
    if transparent_huge_pages_mode() == "madvise":
        assert kept["huge_kb"] == 0
    glibc_default = probe("tuned", **_FOUR_KB_PAGES, MALLOC_TRIM_THRESHOLD_=str(128 * 1024))
    assert glibc_default["settings"] == []
    assert glibc_default["faults"] >= 5 * 16384


@linux_only
def test_settings_inherited_from_a_tuned_parent_count_as_in_effect():
    inherited = probe("tuned", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**30))
    assert inherited["settings"][0] == "freed memory kept"


def test_transparent_huge_pages_mode_reads_the_bracketed_choice(tmp_path: Path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert transparent_huge_pages_mode(mode_file) == "madvise"
    mode_file.write_text("[never]\n")
    assert transparent_huge_pages_mode(mode_file) == "never"
    assert transparent_huge_pages_mode(tmp_path / "missing") is None


@pytest.mark.parametrize("has_gpu", [False, True])
def test_the_command_line_tunes_the_allocator_only_for_cpu_runs(monkeypatch, has_gpu):
    import runpy

    import torch

    import lm_moe.cli
    import lm_moe.cpu_allocator

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    monkeypatch.setattr(lm_moe.cpu_allocator, "tune_cpu_allocator", lambda: calls.append("tuned"))
    monkeypatch.setattr(lm_moe.cli, "main", lambda: calls.append("cli"))
    runpy.run_module("lm_moe", run_name="__main__")
    assert calls == (["cli"] if has_gpu else ["tuned", "cli"])
