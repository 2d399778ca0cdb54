"""Timers for ``slq bench``: CUDA graph replays timed with CUDA events, eager calls timed on the CPU clock.

Each timer returns the median over ``iters`` calls in milliseconds, after warm-up calls. On CUDA a
call is one replay of a CUDA graph that captured ``fn()`` (launch overhead excluded, as in a decode
step captured whole); on CPU it is ``fn()`` itself. :func:`peak_bandwidth` is the roofline's
denominator: (bytes read + bytes written) / time of a copy larger than the last-level cache.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_graph(fn, iters: int = 20, warm: int = 3) -> float:
    """Median ms of one replay of a CUDA graph that captured ``fn()`` (bench/kernels_gpu.py uses this one too)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warm):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(a.elapsed_time(e))
    del g
    return statistics.median(ts)


def time_eager(fn, iters: int = 5, warm: int = 1, device: torch.device = torch.device("cpu")) -> float:
    """Median ms of ``fn()`` run eagerly (synchronized on CUDA)."""
    for _ in range(warm):
        fn()
    sync(device)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def time_fn(fn, device: torch.device, iters: int) -> float:
    return time_graph(fn, iters=iters) if device.type == "cuda" else time_eager(fn, iters=iters, device=device)


def cache_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, level) of the cache that rotation must exceed: L2 on GPU, the LLC on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size), "L2"
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            txt = (idx / "size").read_text().strip()
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return (best or 32 * 1024**2), "LLC"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Measured copy bandwidth (bytes read + written per second)."""
    if device.type == "cuda":
        nbytes = nbytes or 1024**3
        a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
        b = torch.empty_like(a)
        ms = time_graph(lambda: b.copy_(a), iters=10)
        method = f"device-to-device copy of {nbytes / 1024**3:.2f} GiB in a CUDA graph, (read + write bytes) / time"
    else:
        cache, _ = cache_bytes(device)
        nbytes = nbytes or max(64 * 1024**2, 8 * cache)
        a = torch.ones(nbytes // 2, dtype=torch.float16)
        b = torch.empty_like(a)
        ms = time_eager(lambda: b.copy_(a), iters=5, warm=2)
        method = (f"CPU memcpy (Tensor.copy_) of {nbytes / 1024**2:.0f} MiB, {torch.get_num_threads()} torch "
                  "thread(s), (read + write bytes) / time")
    gbps = 2 * a.numel() * 2 / ms / 1e6
    del a, b
    return {"GBps": gbps, "method": method, "bytes": nbytes}
