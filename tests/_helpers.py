"""What every test file shares: the device/dtype grid, the CI rules, and the op-test base.

The op-test base writes the per-op contract once. An op family describes each op with an
:class:`OpSpec` (how to make its arguments, its tolerances, its bad inputs) and gets the generic
tests by subclassing :class:`OpContract`::

    class TestSgldStep(OpContract):
        spec = OpSpec("sgld_step_", grid=ALL_DTYPES, make=..., good=..., bad=[Bad(...), ...])

The contract, for every op: (a) the native kernel matches the reference on random inputs over
devices x grid, (b) also on empty and non-contiguous inputs, (c) ``torch.library.opcheck``,
(d) the wrapper traces under ``torch.compile(fullgraph=True, backend='aot_eager')`` with eager
numbers, (e) every bad input raises the same exception type with the same message on both
backends (``backend='native'`` and ``'reference'``) and leaves every input unchanged, (f) calls
mixing meta and real tensors are refused (they are bad inputs whose id starts with ``meta``), (g) every
tensor the schema marks written gets a new version (autograd's in-place check), no other does.
Arguments are dicts keyed by the op's parameter names (the schema's, the wrapper's and the
reference's are the same), so a bad input is a small edit of a good one.

CI rules: under ``CI=true`` the suite fails (instead of skipping) when the native extension did
not load (``conftest.py``) or a peer library is missing (:func:`require`).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable, Sequence

import pytest
import torch

import pyfastbayes
from pyfastbayes import _native, ops

# ---- the device / dtype grid ------------------------------------------------------------------
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
FLOAT_DTYPES = [torch.float32, torch.float64]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NATIVE = _native.available()

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_native = pytest.mark.skipif(not NATIVE, reason="needs the compiled extension")


# ---- CI rules ---------------------------------------------------------------------------------
def in_ci() -> bool:
    """True under ``CI=true`` (or 1 / yes): missing pieces fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def require(module: str, why: str = "") -> Any:
    """Import ``module`` (a peer library the test compares against) and return it.

    Missing: skips locally, FAILS under ``CI=true`` (CI installs every test extra, so a missing
    one is a broken setup, not a reason to stay green). Works at module level too.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        msg = f"{module} is not installed ({type(exc).__name__}: {exc}){': ' + why if why else ''}"
        if in_ci():
            pytest.fail(f"CI=true: {msg}; the setup (scripts/setup.sh) must install it", pytrace=False)
        pytest.skip(msg, allow_module_level=True)


def native_problem(info: dict | None = None) -> str | None:
    """Why this run must stop before collecting anything, or None: under CI=true a build whose
    native extension did not load (the suite would otherwise skip every native test and pass)."""
    info = pyfastbayes.build_info() if info is None else info
    if in_ci() and not info.get("native", False):
        return (f"CI=true but the pyfastbayes native extension did not load: {info.get('error')}. "
                f"Every native test would be skipped; rebuild with `pip install --no-build-isolation -e .`")
    return None


# ---- the op-test base -------------------------------------------------------------------------
Args = dict  # parameter name -> value, in the op's parameter order

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-6, atol=1e-6),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
KINDS = ("random", "empty", "noncontig")


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad input: ``edit(good_args, device)`` returns the bad arguments; both backends must
    raise ``exc`` with a message matching ``match`` (re.search) and change no input.

    An id starting with ``meta`` marks a meta/real mix. cuda: the case mixes devices (needs CUDA).
    """
    id: str
    edit: Callable[[Args, str], Args]
    match: str
    exc: type = RuntimeError
    cuda: bool = False


@dataclasses.dataclass
class OpSpec:
    """The declarative description of one op for :class:`OpContract`.

    name: the op (``ops.<name>``, ``torch.ops.pyfastbayes.<name>``, ``_reference.<name>``).
    grid: the values of the dtype axis (a dtype, or whatever ``make`` understands).
    make(kind, device, g, gen) -> [Args, ...]: the calls of one comparison, run in order (state
        tensors shared between calls carry over); kind in KINDS.
    good(device) -> Args: small valid arguments (opcheck, torch.compile, base of the bad inputs).
    bad: the bad inputs.
    tol(tensor) -> dict(rtol, atol): how close native and reference must be on one output.
    opcheck: more argument sets for opcheck (functions of the device), besides ``good``.
    post(kind, calls, outs, after): the op's own assertions on the native results of a
        comparison (calls: the arguments before, after: the same arguments after the calls).
    """
    name: str
    grid: Sequence[Any]
    make: Callable[[str, str, Any, torch.Generator], list]
    good: Callable[[str], Args]
    bad: Sequence[Bad]
    tol: Callable[[torch.Tensor], dict] = lambda t: TOL.get(t.dtype, dict(rtol=0, atol=0))
    opcheck: Sequence[Callable[[str], Args]] = ()
    post: Callable[[str, list, list, list], None] | None = None
    seed: int = 0

    def __repr__(self):
        return f"OpSpec({self.name})"


def grid_id(g) -> str:
    if isinstance(g, (tuple, list)):
        return "-".join(grid_id(x) for x in g)
    return str(g).replace("torch.", "")


def wrapper(name: str) -> Callable:
    return getattr(ops, name)


def native_kernel(name: str, device: str) -> Callable:
    if ops.native_op(name, device) is None:
        pytest.skip(f"no native {name} kernel for {device}")
    return getattr(torch.ops.pyfastbayes, name).default


def tensors_of(tree) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts / lists / tuples, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in tensors_of(x)]
    return []


def run_calls(name: str, calls: list, backend: str) -> tuple[list, list]:
    """Run the calls on a deep copy (aliasing between the calls' tensors kept) with one backend;
    returns (the return values, the call arguments afterwards)."""
    calls = copy.deepcopy(calls)
    fn = wrapper(name)
    outs = [fn(**a, backend=backend) for a in calls]
    return outs, calls


def unique(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in order of first appearance, each object once (calls share state tensors)."""
    seen, out = set(), []
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def assert_same_result(spec: OpSpec, got, want, what: str) -> None:
    a, e = unique(tensors_of(got)), unique(tensors_of(want))
    assert len(a) == len(e), f"{spec.name}: {what}: {len(a)} tensors vs {len(e)}"
    for i, (x, y) in enumerate(zip(a, e)):
        torch.testing.assert_close(x, y, **spec.tol(y), equal_nan=True,
                                   msg=lambda m: f"{spec.name}: {what}, tensor {i}: {m}")


def snapshot(args: Args):
    """A copy of the inputs to compare with afterwards (meta tensors have no values: skipped)."""
    return [None if t.device.type == "meta" else t.detach().clone() for t in tensors_of(args)]


def assert_unchanged(name: str, args: Args, before) -> None:
    for i, (t, b) in enumerate(zip(tensors_of(args), before)):
        if b is None:
            continue
        x, y = (t.to_dense(), b.to_dense()) if t.layout != torch.strided else (t, b)
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{name}: input tensor {i} changed by a refused call: {m}")


def raise_message(spec: OpSpec, bad: Bad, device: str, backend: str) -> tuple[type, str]:
    """Call the op with the bad input on one backend; the exception it raised (type, message)."""
    args = bad.edit(spec.good(device), device)
    before = snapshot(args)
    with pytest.raises(Exception) as info:
        wrapper(spec.name)(**args, backend=backend)
    assert_unchanged(spec.name, args, before)
    return info.type, str(info.value)


class OpContract:
    """The generic tests of one op; subclass with ``spec = OpSpec(...)``. Parametrized from the
    spec by :meth:`pytest_generate_tests` (pytest runs a test class's own hook)."""

    spec: OpSpec

    def pytest_generate_tests(self, metafunc):
        spec = self.spec
        names = metafunc.fixturenames
        if "kind" in names:
            metafunc.parametrize("kind", KINDS)
        if "g" in names:
            metafunc.parametrize("g", list(spec.grid), ids=[grid_id(g) for g in spec.grid])
        if "device" in names:
            metafunc.parametrize("device", DEVICES)
        if "backend" in names:
            metafunc.parametrize("backend", ["native", "reference"])
        if "bad" in names:
            metafunc.parametrize("bad", list(spec.bad), ids=[b.id for b in spec.bad])
        if "args_fn" in names:
            fns = [spec.good] + list(spec.opcheck)
            metafunc.parametrize("args_fn", fns, ids=[f"args{i}" for i in range(len(fns))])

    # (a), (b): native vs reference on random, empty and non-contiguous inputs
    def test_matches_reference(self, kind, device, g):
        spec = self.spec
        native_kernel(spec.name, device)
        gen = torch.Generator().manual_seed(spec.seed + 1000 * KINDS.index(kind))
        calls = spec.make(kind, device, g, gen)
        assert calls, f"{spec.name}: no calls for {kind}"
        n_out, n_args = run_calls(spec.name, calls, "native")
        r_out, r_args = run_calls(spec.name, calls, "reference")
        assert_same_result(spec, n_out, r_out, f"{kind} returns")
        assert_same_result(spec, n_args, r_args, f"{kind} arguments after the calls")
        if spec.post is not None:
            spec.post(kind, calls, n_out, n_args)
        if kind == "noncontig":
            assert any(not t.is_contiguous() for t in tensors_of(calls)), "noncontig case has no non-contiguous tensor"
        if kind == "empty":
            assert any(t.numel() == 0 for t in tensors_of(calls)), "empty case has no empty tensor"

    def test_spec_covers_the_contract(self):
        spec = self.spec
        ids = [b.id for b in spec.bad]
        assert spec.bad and len(set(ids)) == len(ids), f"{spec.name}: bad inputs needed, with distinct ids"
        if len(tensors_of(spec.good("cpu"))) > 1:  # (f): an op of several tensors refuses meta mixes
            assert any(i.startswith("meta") for i in ids), f"{spec.name}: no meta/real mix among the bad inputs"
        assert set(spec.good("cpu")) == set(inspect.signature(wrapper(spec.name)).parameters) - {"backend"}, \
            f"{spec.name}: good() must name every parameter of the wrapper"

    # (c)
    def test_opcheck(self, device, args_fn):
        op = native_kernel(self.spec.name, device)
        args = args_fn(device)
        torch.library.opcheck(op, tuple(args.values()))

    # (d): the public wrapper, compiled whole, gives the eager numbers
    def test_compiles_with_eager_numbers(self, device):
        spec = self.spec
        native_kernel(spec.name, device)
        fn = wrapper(spec.name)
        torch._dynamo.reset()  # one code object (the lambda) serves every op: start each op's count afresh
        compiled = torch.compile(lambda args: fn(**args), fullgraph=True, backend="aot_eager")
        args_c = spec.good(device)
        args_e = copy.deepcopy(args_c)
        for _ in range(2):  # twice: a mutating op's second call sees the first call's writes
            out_c = compiled(args_c)
            out_e = fn(**args_e)
            torch.testing.assert_close(tensors_of(out_c), tensors_of(out_e), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(tensors_of(args_c), tensors_of(args_e), rtol=0, atol=0, equal_nan=True)

    # (e), (f): bad inputs, both backends, same type, same message, inputs unchanged
    def test_bad_input(self, bad, backend, device):
        spec = self.spec
        if bad.cuda and not CUDA:
            pytest.skip("mixes CPU and CUDA tensors: needs a CUDA device")
        if backend == "native":
            native_kernel(spec.name, device)
        typ, msg = raise_message(spec, bad, device, backend)
        assert issubclass(typ, bad.exc), f"{spec.name} [{backend}] raised {typ.__name__}: {msg}"
        assert re.search(bad.match, msg), f"{spec.name} [{backend}]: {msg!r} does not match {bad.match!r}"
        if backend == "native":  # parity: the reference says exactly the same
            ref = raise_message(spec, bad, device, "reference")
            assert ref == (typ, msg), f"{spec.name} [{bad.id}]: native {(typ, msg)} but reference {ref}"


    # (g): every tensor the schema marks written (Tensor(a!)) has a new version, the others not, so
    # autograd refuses a backward through a saved tensor the op changed (csrc/ops/version_bump.cpp)
    def test_bumps_the_versions_of_written_tensors(self, backend, device):
        spec = self.spec
        if backend == "native":
            native_kernel(spec.name, device)
        args = spec.good(device)
        schema = getattr(torch.ops.pyfastbayes, spec.name).default._schema
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        before = {k: [t._version for t in tensors_of(v)] for k, v in args.items()}
        wrapper(spec.name)(**args, backend=backend)
        for k, v in args.items():
            for t, old in zip(tensors_of(v), before[k]):
                if k in written:
                    assert t._version > old, f"{spec.name} [{backend}]: {k} was written but its version did not change"
                else:
                    assert t._version == old, f"{spec.name} [{backend}]: {k} is read-only but its version changed"


# ---- small argument editors for Bad.edit --------------------------------------------------------
def placement(op: str, arg: str, first: str, device: str | None = None, index: int | None = None,
              meta: bool = True, sparse: bool = True) -> list[Bad]:
    """The placement cases of one tensor argument (``arg``, or element ``index`` of the list
    ``arg``): a meta tensor among real ones (refused naming it and ``first``, the label of the
    call's first real tensor), a sparse tensor, and, with the regex ``device``, a tensor
    on the other device of a CUDA machine."""
    label = arg if index is None else f"{arg}[{index}]"

    def edit(f):
        def replace(args: Args, dev: str) -> Args:
            if index is None:
                return dict(args, **{arg: f(args[arg], dev)})
            items = list(args[arg])
            items[index] = f(items[index], dev)
            return dict(args, **{arg: items})
        return replace

    cases = []
    if meta:
        cases.append(Bad(f"meta-{label}", edit(lambda t, d: meta_like(t)),
                         rf"{op}: {re.escape(label)} is a meta tensor but {re.escape(first)} is on"))
    if sparse:
        cases.append(Bad(f"sparse-{label}", edit(lambda t, d: sparse_like(t)), rf"{op}: .*(?i:sparse)"))
    if device is not None:
        cases.append(Bad(f"device-{label}", edit(lambda t, d: t.to(other_device(d))), device, cuda=True))
    return cases


def put(**changes) -> Callable[[Args, str], Args]:
    """Bad.edit that replaces arguments: values, or functions (args, device) -> value."""
    def edit(args: Args, device: str) -> Args:
        out = dict(args)
        for k, v in changes.items():
            out[k] = v(args, device) if callable(v) else v
        return out
    return edit


def other_device(device: str) -> str:
    """The other real device of a CUDA machine: 'cuda' for 'cpu' and 'cpu' for 'cuda'."""
    return "cpu" if device == "cuda" else "cuda"


def meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def sparse_like(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to_sparse()


def self_overlapping(shape=(3, 2), dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An as_strided view [3, 2] whose elements [2, 0] and [0, 1] are one memory location (no
    stride 0: torch's own has_internal_overlap cannot decide it)."""
    return torch.zeros(8, dtype=dtype, device=device).as_strided(shape, (1, 2))


def expanded_like(t: torch.Tensor) -> torch.Tensor:
    """A stride-0 view with t's shape, dtype and device (its elements share one memory location)."""
    return torch.zeros([1] * t.dim(), dtype=t.dtype, device=t.device).expand(t.shape)


# ---------------------------------------------------------------------------------------------
# CUDA-vs-CPU tests: views made on the device with sentinels around them
# ---------------------------------------------------------------------------------------------
SENTINEL = -96.0  # written around every device view (exact in every dtype); the ops must never touch it


def require_cuda_kernel(op: str) -> None:
    """Inside a CUDA-vs-CPU test: a build without the op's CUDA kernel fails under CI, skips locally."""
    from pyfastbayes import ops

    if not ops.native_op(op, "cuda"):
        msg = "the pyfastbayes extension has no CUDA kernels (built without CUDA)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)


def placed(values: torch.Tensor, offset: int, slack: int = 9):
    """values (CPU) copied into a fresh device buffer at element `offset`: a view made on the
    device, whose data pointer is `offset` elements past a 512-byte aligned allocation, with
    SENTINEL in the `offset` elements before it and the `slack` elements after it.
    Returns (view, buffer)."""
    n = values.numel()
    buf = torch.full((offset + n + slack,), SENTINEL, dtype=values.dtype, device="cuda")
    view = buf[offset:offset + n].view(values.shape)
    view.copy_(values)
    assert view.storage_offset() == offset
    return view, buf


def sentinels_intact(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """Every element of buf outside view still holds SENTINEL (no out-of-bounds write)."""
    start = view.storage_offset()
    outside = torch.cat([buf[:start], buf[start + view.numel():]])
    return bool((outside == SENTINEL).all())


# ---- torch.distributed tests ----------------------------------------------------------------------
def fully_sharded(model, world: int):
    """FSDP2 on the CPU (inside a gloo worker): every nn.Linear of ``model`` and then the model
    wrapped by ``fully_shard`` over a 1-D mesh of ``world`` ranks; returns (model, mesh)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, mesh


def spawn_gloo(worker, world: int) -> list:
    """Run ``worker(rank, world, port, out_dir)`` in ``world`` processes (torch.multiprocessing.spawn
    on a free localhost port; the worker initialises its gloo group) and return what each rank saved
    with ``torch.save(obj, os.path.join(out_dir, f"{rank}.pt"))``, in rank order. Skips where
    torch.distributed is unavailable."""
    import socket
    import tempfile

    import pytest
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        parent = (pyfastbayes.__file__, NATIVE)
        mp.spawn(_gloo_worker, args=(worker, world, port, d, parent), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"{r}.pt")) for r in range(world)]


def _gloo_worker(rank: int, worker, world: int, port: int, out_dir: str, parent: tuple) -> None:
    """spawn_gloo's process body. torch._dynamo is imported BEFORE the worker initialises its
    group: the first optimizer imports it, and imported after init_process_group it keeps the
    group alive past destroy_process_group, so gloo's threads sometimes abort the process at exit
    ("terminate called without an active exception", ~2 % of runs; examples/torchrun_sgld.py).
    The rank must load the pyfastbayes the test process loaded: a source tree ahead of
    site-packages on sys.path once gave the ranks the pure-PyTorch fallbacks beside a native
    single-process run (the H200 run of 2026-11-27), a mismatch reported as wrong numbers."""
    import torch._dynamo  # noqa: F401

    if (pyfastbayes.__file__, NATIVE) != parent:
        raise RuntimeError(f"rank {rank} imported pyfastbayes {pyfastbayes.__file__} (native={NATIVE}), "
                           f"the test process {parent[0]} (native={parent[1]}): fix sys.path")

    worker(rank, world, port, out_dir)
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End a spawned rank whose result is saved without the interpreter's teardown, where gloo's
    threads can still abort the process ("terminate called without an active exception", seen once
    in ~3 400 tests on 2026-11-28 in a 3-rank FSDP test, with the dynamo import in place)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class CountingBatches:
    """A re-iterable of batches that counts how often it is walked (tests that data is read once)."""

    def __init__(self, batches):
        self.batches, self.walks = batches, 0

    def __iter__(self):
        self.walks += 1
        return iter(self.batches)


def recompute_bn_(m: torch.nn.Module, data) -> torch.nn.Module:
    """The reference BatchNorm refresh (torch.optim.swa_utils.update_bn's recipe, the BatchNorm
    layers alone in train mode): running statistics reset, momentum None, one pass over the
    (inputs, targets) batches of ``data`` without gradients; returns m in eval mode."""
    m.eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
            mod.train()
    with torch.no_grad():
        for x, _ in data:
            m(x)
    return m.eval()
