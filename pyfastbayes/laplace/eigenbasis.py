"""Eigendecomposition of many symmetric factors at once.

KFAC gives one or two small symmetric factors per layer: many matrices of a few sizes. Calling
``torch.linalg.eigh`` once per factor pays a launch and a synchronisation each (and on CUDA a
batched ``eigh`` of matrices above 32 x 32 runs them one after another), so :func:`eigh_many`
groups factors by (size, dtype, device) and decomposes each group with one batched call, or on
the CPU (``method='cpu'``): the matrices are copied to the host once and decomposed by LAPACK's
divide and conquer, several matrices at a time in a thread pool (torch releases the GIL), the
results copied back once, or on CUDA streams (``method='streams'``): one host thread per
stream, each decomposing one matrix after another on its own stream. ``torch.linalg.eigh`` of a
factor above 32 x 32 on CUDA is latency-bound (cuSOLVER's divide and conquer is a chain of small
kernels, and every call waits for its error code): the H200 took 1.8 ms for each 128 x 128
factor whether batched or not, so independent streams can overlap the factors' chains.
bench/bench_laplace.py measures the methods side by side (16 factors of 512 x 512 and a
realistic mix).
"""
from __future__ import annotations

import threading
from collections import defaultdict

import torch
from torch import Tensor

METHODS = ("auto", "batched", "loop", "cpu", "streams")
STREAMS = 8  # default workers of method='streams' (host threads, one CUDA stream each)
_THREADS_LOCK = threading.Lock()  # held while the host pool has torch's thread count lowered (process-wide)
POOL_MIN_SIZE = 256  # 'auto' takes the host pool for 2 or more CPU matrices of at least this size


def eigh_many(mats: list[Tensor], method: str = "auto", threads: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """Eigendecompositions (eigenvalues [n] ascending, eigenvectors [n, n] in columns) of the
    symmetric matrices ``mats`` (each [n_i, n_i], any sizes, dtypes and devices), in their order;
    eigenvalues of these positive semi-definite factors are clamped at 0 (rounding).

    method: 'batched' -> one ``torch.linalg.eigh`` per group of equal (size, dtype, device);
    'loop' -> one call per matrix; 'cpu' -> every matrix decomposed on the CPU (a thread pool of
    up to ``threads`` workers, default ``torch.get_num_threads()``; each worker one matrix at a
    time on its share of torch's threads, which are set to ``torch.get_num_threads() // workers``
    for the duration of the call, process-wide) and the results moved back; 'streams' -> the
    CUDA matrices one call each, spread over up to ``threads`` (default 8) host threads with a
    CUDA stream each, the caller's stream waiting for them at the end (CPU matrices: as 'cpu');
    'auto' -> 'cpu' when every matrix is on the CPU, torch has at least 2 threads and at least 2
    matrices have :data:`POOL_MIN_SIZE` rows or more (2 cores, 16 x 512 x 512: 1.27-1.47x the
    stacked batch; one LAPACK call gains less from 2 threads than 2 calls from one each), else
    'batched' (CUDA: unmeasured against the others, see bench/RESULTS.md).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for i, m in enumerate(mats):
        if not torch.is_tensor(m) or m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"mats[{i}] must be a square matrix [n, n], got "
                             f"{tuple(m.shape) if torch.is_tensor(m) else type(m).__name__}")
    if method == "auto":
        pool = (torch.get_num_threads() >= 2 and all(m.device.type == "cpu" for m in mats)
                and sum(m.shape[0] >= POOL_MIN_SIZE for m in mats) >= 2)
        method = "cpu" if pool else "batched"
    out: list = [None] * len(mats)
    if method == "loop":
        for i, m in enumerate(mats):
            vals, vecs = _eigh(m.unsqueeze(0), m.device)
            out[i] = (vals[0], vecs[0])
        return out
    if method == "cpu":
        return _eigh_host(mats, threads)
    if method == "streams":
        return _eigh_streams(mats, threads)
    groups: dict = defaultdict(list)
    for i, m in enumerate(mats):
        groups[(m.shape[0], m.dtype, m.device)].append(i)
    for (_, _, device), idx in groups.items():
        vals, vecs = _eigh(torch.stack([mats[i] for i in idx]), device)
        for j, i in enumerate(idx):
            out[i] = (vals[j], vecs[j])
    return out


def _eigh_host(mats: list[Tensor], threads: int | None) -> list[tuple[Tensor, Tensor]]:
    """Every matrix decomposed on the CPU in a thread pool; one host copy in, one device copy out
    per (size, dtype, device) group."""
    from concurrent.futures import ThreadPoolExecutor

    host = [m.detach().to("cpu", non_blocking=False) for m in mats]
    budget = torch.get_num_threads()  # torch's CPU threads: the cores this process may use
    workers = max(1, min(len(host), threads or budget))
    if workers == 1:
        results = [psd_eigh(h) for h in host]
    else:
        # the cores split between the workers (each LAPACK call on budget // workers threads): with
        # every worker on all of torch's threads they oversubscribe the cores (2 cores, 16 x 512 x 512:
        # 250 ms against 157 ms split, 190 ms for one call after another on both threads)
        with _THREADS_LOCK:  # concurrent calls one at a time: no call restores another's reduced count
            torch.set_num_threads(max(1, budget // workers))
            try:
                with ThreadPoolExecutor(workers) as pool:
                    results = list(pool.map(psd_eigh, host))
            finally:
                torch.set_num_threads(budget)
    return [(vals.clamp_min(0).to(m.device), vecs.to(m.device)) for (vals, vecs), m in zip(results, mats)]


def _eigh_streams(mats: list[Tensor], threads: int | None) -> list[tuple[Tensor, Tensor]]:
    """CUDA matrices over side streams (one host thread each), the rest on the host pool."""
    from concurrent.futures import ThreadPoolExecutor

    out: list = [None] * len(mats)
    cuda = [i for i, m in enumerate(mats) if m.is_cuda]
    rest = [i for i, m in enumerate(mats) if not m.is_cuda]
    for i, r in zip(rest, _eigh_host([mats[i] for i in rest], threads) if rest else []):
        out[i] = r
    if not cuda:
        return out
    workers = max(1, min(len(cuda), threads or STREAMS))
    by_device: dict = defaultdict(list)
    for i in cuda:
        by_device[mats[i].device].append(i)
    jobs = []  # (device, [matrix indices]): one per worker and device
    for device, idx in by_device.items():
        for w in range(min(workers, len(idx))):
            jobs.append((device, idx[w::workers]))
    callers = {d: torch.cuda.current_stream(d) for d in by_device}
    streams = [torch.cuda.Stream(device) for device, _ in jobs]

    def work(k):
        (device, idx), stream = jobs[k], streams[k]
        stream.wait_stream(callers[device])  # the matrices are ready on the caller's stream
        with torch.cuda.stream(stream):
            return [(i, *_eigh(mats[i].unsqueeze(0), device)) for i in idx]

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            done = list(pool.map(work, range(len(jobs))))
    finally:  # also when a worker raised: later work on the caller's stream waits for every side stream
        for (device, _), stream in zip(jobs, streams):
            callers[device].wait_stream(stream)
    for (device, _), res in zip(jobs, done):
        caller = callers[device]
        for i, vals, vecs in res:
            vals.record_stream(caller)  # made on the side stream, used and freed on the caller's
            vecs.record_stream(caller)
            out[i] = (vals[0], vecs[0])
    return out


def _eigh(stack: Tensor, device) -> tuple[Tensor, Tensor]:
    vals, vecs = psd_eigh(stack)
    return vals.clamp_min(0).to(device), vecs.to(device)


def psd_eigh(a: Tensor, eigenvectors: bool = True):
    """``torch.linalg.eigh`` (or ``eigvalsh`` without ``eigenvectors``) of symmetric matrices
    [..., n, n], retried where LAPACK / cuSOLVER fails to converge: a curvature whose entries are
    all tiny (float32, a GGN of ~1e-8 over weights the data barely move, e.g. a subnetwork of the
    largest-variance weights) makes float32 ``syevd`` fail. The retry divides each matrix by its
    largest |entry| (the eigenvalues scale back exactly, the eigenvectors are the same), then,
    should that fail too, decomposes in float64 and rounds back. A matrix that decomposes the
    first time gets torch's result unchanged."""
    f = torch.linalg.eigh if eigenvectors else torch.linalg.eigvalsh
    try:
        return f(a)
    except torch.linalg.LinAlgError:
        pass
    scale = a.detach().abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    b = a / scale
    try:
        out = f(b)
    except torch.linalg.LinAlgError:
        out = f(b.double())
        out = tuple(t.to(a.dtype) for t in out) if eigenvectors else out.to(a.dtype)
    if eigenvectors:
        return out[0] * scale[..., 0], out[1]
    return out * scale[..., 0]
