"""Memory measurement for the profiling tools: the peak torch allocates while code runs, and the
size of the tensors an object (a decoding cache) holds.

On CUDA the peak comes from the caching allocator's statistics. On the CPU, torch keeps no such
statistics and the process's resident size says little (glibc keeps freed memory, other libraries
allocate too), so the peak is read from torch's own profiler: with `profile_memory=True` it records
every CPU allocation and free (size and address).
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

MIB = 2**20
# Kineto, the profiler's back end, prints a "USDT: ... profiler_start" line at every session start
# and stop; level 6 keeps it quiet (it reads the level at the first session). A level set outside stays.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

_CPU = 0  # "Device Type" of CPU memory events in a profiler trace (c10::DeviceType::CPU)


def peak_memory_mb(run: Callable[[], object], device: torch.device) -> float:
    """MiB: the peak of memory torch allocated on `device` while `run()` ran, above what was
    allocated before (so the weights and other tensors alive before the call do not count)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu and cuda devices, got {device}")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted((event for event in events if event.get("name") == "[memory]"
                     and event["args"].get("Device Type") == _CPU), key=lambda event: event["ts"])
    # The profiler's own running total carries over what earlier sessions never saw freed: count only
    # the blocks allocated during this run, each until it is freed.
    live, current, peak = set(), 0, 0
    for event in memory:
        size, address = event["args"]["Bytes"], event["args"]["Addr"]
        if size > 0:
            live.add(address)
        elif address in live:
            live.remove(address)
        else:
            continue  # a block from before the run
        current += size
        peak = max(peak, current)
    return peak / MIB


def tensor_mb(obj: object) -> float:
    """MiB held by the distinct tensor storages reachable from `obj` through attributes,
    tuples, lists and dicts (e.g. a decoding cache: KV buffers and FFN decode states)."""
    storages: dict[tuple[torch.device, int], int] = {}
    seen: set[int] = set()
    pending = [obj]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[(item.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            pending.extend(vars(item).values())
    return sum(storages.values()) / MIB
