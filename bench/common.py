"""Timing helpers shared by the benchmark suites (CPU: median of repeats; CUDA: events)."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable

import torch


def bench(fn: Callable[[], object], device: str = "cpu", warmup: int = 3, repeat: int = 7) -> float:
    """Median time of one ``fn()`` call in milliseconds.

    CPU: wall clock per call. CUDA: events around ``inner`` back-to-back calls (as many as fill
    ~2 ms, at most 50), divided by ``inner``: the throughput of a loop that enqueues calls, as a
    training loop does, so host overhead shorter than the GPU work is hidden (and a call that
    syncs the host, such as a non-finite check that raises, pays for it). Every implementation of
    a table is timed the same way."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        inner = max(1, min(50, int(2.0 / max(start.elapsed_time(end), 1e-3))))
        times = []
        for _ in range(repeat):
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        return statistics.median(times)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable[[], object], device: str) -> float | str:
    """Peak CUDA memory (MiB) that ``fn()`` allocates above what was allocated before it; ""
    on the CPU (not measured there)."""
    if device != "cuda":
        return ""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def copy_floor_ms(nbytes: int, device: str) -> float | None:
    """The hardware floor of an op that moves ``nbytes`` bytes (reads + writes): the time of a
    device-to-device copy moving the same bytes (nbytes / 2 read, nbytes / 2 written), measured
    now. None on the CPU (no floor is claimed there)."""
    if device != "cuda":
        return None
    n = max(1, nbytes // 8)  # fp32 elements copied: 4 B read + 4 B written each
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, warmup=3, repeat=10)
    del src, dst
    return ms


def row(suite: str, case: str, impl: str, ms: float, ref_ms: float | None = None, floor_ms: float | None = None,
        **extra) -> dict:
    """One result row: time, speed-up over the suite's reference (ref_ms / ms), fraction of floor."""
    r = {"suite": suite, "case": case, "impl": impl, "ms": round(ms, 4)}
    if ref_ms is not None:
        r["speedup"] = round(ref_ms / ms, 3)
    if floor_ms is not None:
        r["of_floor"] = round(floor_ms / ms, 3)
    r.update(extra)
    return r


@contextlib.contextmanager
def stderr_silenced():
    """kineto writes two 'USDT ... profiler_start/stop' lines to file descriptor 2 per profile."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def peak_mb_any(fn, device: str) -> float | None:
    """Peak memory (MiB) that fn() allocates above what was allocated before it. CUDA:
    bench.common.peak_mb (max_memory_allocated). CPU: the torch CPU allocator's allocation and
    free events (torch.profiler, profile_memory=True) in time order, the maximum of their running
    sum: the tensor bytes alive at once, the CPU analogue of max_memory_allocated. None when the
    profiler does not expose its events."""
    if device == "cuda":
        return peak_mb(fn, device)
    from torch.profiler import ProfilerActivity, profile

    try:
        with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except Exception as exc:  # noqa: BLE001 - a private profiler API: report, do not fail the timings
        print(f"# bench: CPU peak memory not measured ({type(exc).__name__}: {exc})")
        return None
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2**20
