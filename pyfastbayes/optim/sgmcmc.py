"""Fused stochastic-gradient MCMC samplers: SGLD, SGHMC and pSGLD.

Convention (all three): ``p.grad`` holds the gradient g of the MEAN negative log-likelihood of a
minibatch, and the potential is

    U(theta) = num_data * mean-NLL(theta) + prior_precision * |theta|^2 / 2,
    grad U   = num_data * g + prior_precision * theta,        xi ~ N(0, I).

One native call per parameter group and step updates every tensor of the group (one kernel
launch on CUDA); the noise xi comes from an in-kernel Philox4x32-10 stream keyed by a seed drawn
once from the torch generator, so ``torch.manual_seed`` (or ``generator=``) fixes the chain,
CPU and CUDA draw the same noise, and no noise tensor is ever allocated. Within a group, the i-th
parameter that has a gradient in a step draws from Philox stream i at that step's counter.

A step is all-or-nothing: every group is validated (hyper-parameters, gradients, layouts, memory
overlap, non-finite gradients in 'raise' mode) before the first write, so a step that raises has
changed no parameter, no state buffer and no RNG position. No tensor's memory may be updated
twice: parameters that share memory (the same tensor twice, overlapping views, expanded views)
are refused when they are added.

CUDA graphs. A step of a CUDA parameter group reads its hyper-parameters and RNG position from
device memory, so ``step()`` can be captured and replayed. The recipe:

    lr = torch.tensor(1e-3, dtype=torch.float64, device="cuda")   # 0-dim device tensors for
    opt = SGLD(model.parameters(), lr=lr, num_data=N, nonfinite="skip")  # what changes
    side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss_fn(model(x)).backward(); opt.step()       # warm-up: draws the seed, allocates state
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        opt.zero_grad(set_to_none=False); loss_fn(model(x)).backward(); opt.step()
    for t in range(T):
        x.copy_(next_batch); lr.fill_(schedule(t)); g.replay()   # or CyclicalSchedule.apply(opt, t)

A captured step refuses ``nonfinite='raise'`` (its check syncs the host every step: use 'skip',
which skips on the device, or 'ignore'), refuses a group that has not stepped yet, and refuses
Python-number hyper-parameters that changed since the last step (a capture cannot copy host
memory). Python numbers that stay fixed are fine, but a replay keeps their captured values (a
warning lists them): change them between replays only through 0-dim device tensors updated in place.

FSDP2. Parameters may be DTensors (``torch.distributed.tensor``), as ``fully_shard`` makes them:
placed Shard(0) (rows split over the ranks, ceil-chunked) and/or Replicate, so that each rank's
local shard is one contiguous range [off, off + numel) of the full row-major tensor. Each rank steps
its local shard (state buffers are local-shard-sized) with the noise the unsharded tensor's
elements off .. off + numel - 1 get (the ops' ``offsets``), on the stream of the tensor's position
in the group, with rank 0's seed (chains='shared'): the sharded chain equals the single-process
chain whose gradients are FSDP's (reduce-scattered) ones. Other placements (Shard(d) for d > 0,
Partial, strided shards) are refused when the parameter is added. With sharded parameters, the
non-finite check of a step is combined over the ranks (one all-reduce of a flag per group), so all
ranks raise or skip together and no shard steps alone; chains='per_rank' is refused (the ranks
hold one model together), and verify=True compares what the ranks share: the unsharded parameters
and every group's RNG position (seed, step); shards hold different elements and are not compared.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor

from .. import _native, ops
from ..calibration._checks import check_generator
from .._distributed import dtensor_type, is_dtensor, is_sharded, local_tensor, shard_offset
from .._memory import memory_overlaps, overlaps_itself
from ._checks import Interval, check_hyper
from .._warnings import warn_user

_NONFINITE = ("raise", "skip", "ignore")
_BACKEND = {None: None, True: "native", False: "reference"}  # fused= -> backend= of the ops
_POSITIVE, _NONNEGATIVE = Interval(), Interval(lo_closed=True)
# hyper-parameter key of a param group -> (its slot name in ops.HYPER, allowed range)
_COMMON_HYPER = {"lr": ("lr", _POSITIVE), "temperature": ("temperature", _NONNEGATIVE),
                 "num_data": ("num_data", _POSITIVE), "prior_precision": ("prior_precision", _NONNEGATIVE)}
_TORCH_DUPLICATE_WARNING = "optimizer contains a parameter group with duplicate parameters"
_STATE_KEYS = ("rng", "hyper", "_hyper_cache")  # per-group state, kept with the group's first parameter
_DTYPE, _DEVICE, _LAYOUT = (operator.attrgetter(a) for a in ("dtype", "device", "layout"))


class _Plan(NamedTuple):
    """One param group's share of a step, validated: the op's tensor lists and backend."""

    index: int
    group: dict
    params: list[Tensor]  # those with a gradient; a DTensor's local shard in its place
    grads: list[Tensor]  # their gradients (local shards likewise)
    backend: str | None
    sources: list[Tensor]  # the group's parameters behind ``params`` (DTensors themselves): the state keys
    offsets: list[int] | None = None  # the ops' offsets: each local shard's flat offset (None: no DTensor)
    sharded: bool = False  # some parameter is split over the ranks (a Shard placement)


def _name(gi: int, i: int, p: Tensor) -> str:
    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"


# ---- DTensor parameters (FSDP2): the placement helpers live in pyfastbayes._distributed ----------
def _shard_offset(p: Tensor) -> int:
    """The flat offset in the full tensor of DTensor ``p``'s local shard (Shard(0) / Replicate
    only; ValueError completing the parameter's name otherwise): :func:`shard_offset`."""
    return shard_offset(p, user="The samplers step")


def _param_problem(p: Tensor) -> Exception | None:
    """Why ``p`` cannot be a sampler parameter (the message completes its name), or None.
    A DTensor is judged by its placements, then by its local shard."""
    if not torch.is_tensor(p):
        return None  # torch.optim.Optimizer.add_param_group raises its own TypeError
    if is_dtensor(p):
        try:
            _shard_offset(p)
        except ValueError as exc:
            return exc
        p = local_tensor(p)
    if p.layout != torch.strided:
        return ValueError(f"is a {p.layout} tensor; parameters must be dense (strided)")
    if not p.is_floating_point():
        return TypeError(f"has dtype {p.dtype}; parameters must be floating point")
    if p.dtype not in ops.KERNEL_DTYPES:
        return TypeError(f"has dtype {p.dtype}; the samplers step float64, float32, float16 and bfloat16 "
                         "parameters")
    if p.is_meta:
        return ValueError("is a meta tensor (a shape without data): materialise the model (e.g. "
                          "model.to_empty(device=...) and initialise it) before building the sampler")
    if overlaps_itself(p):
        return ValueError(f"overlaps itself (stride {tuple(p.stride())}: an expand()ed or as_strided view), so "
                          f"one memory location would be updated several times per step; pass a tensor that "
                          f"owns its elements, e.g. nn.Parameter(t.clone())")
    return None


def _host_hyper(values: list) -> tuple:
    """The host part of a hyper vector, the key of its cached device copy: each number as a
    float, None for a 0-dim tensor slot (copied on the device every step). None, not a number:
    a tensor slot set back to a number equal to the placeholder must still be written."""
    return tuple(None if torch.is_tensor(v) else float(v) for v in values)


def _by_device(flags: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = {}
    for f in flags:
        out.setdefault(f.device, []).append(f)
    return out


class _SGMCMC(torch.optim.Optimizer):
    """Shared machinery: validation, device-resident hyper-parameters and RNG, fused dispatch."""

    _op_name: str = ""
    _buffer: str | None = None  # name of the per-parameter state buffer, if any
    _hyper: dict[str, tuple[str, Interval]] = _COMMON_HYPER  # subclasses add their ops.HYPER slots a, b

    def __init__(self, params, defaults: dict, fused: bool | None, nonfinite: str,
                 generator: torch.Generator | None, chains: str = "shared", verify: bool = False):
        if chains not in ("shared", "per_rank"):
            raise ValueError(f"chains must be 'shared' or 'per_rank', got {chains!r}")
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
        check_generator(generator)
        self._chains, self._verify = chains, verify
        defaults = dict(defaults, fused=fused, nonfinite=nonfinite)
        self._check_group(defaults, "")
        if fused and not _native.available():
            raise RuntimeError(f"{type(self).__name__}(fused=True): the pyfastbayes native extension is not "
                               f"loaded ({_native.LOAD_ERROR}); use fused=None or rebuild it")
        self._generator = generator
        super().__init__(params, defaults)  # calls add_param_group for every group

    # ---- validation of a group: hyper-parameters, parameter layouts, memory ---------------------
    def _check_group(self, group: dict, where: str) -> None:
        """Hyper-parameters, ``nonfinite`` and ``fused`` of one group (or the defaults, where='')."""
        params = group.get("params") or []
        device = params[0].device if params and torch.is_tensor(params[0]) else None
        for key, (_, interval) in self._hyper.items():
            check_hyper(key, group[key], interval, device, where)
        if group["nonfinite"] not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {group['nonfinite']!r}"
                             + (f" in {where}" if where else ""))
        if group["fused"] not in _BACKEND:
            raise TypeError(f"fused must be None, True or False, got {group['fused']!r}"
                            + (f" in {where}" if where else ""))

    def _check_param_memory(self, new_group: list) -> None:
        """The parameters of ``new_group`` are usable and share no memory with each other or with
        those of the groups already added (byte ranges compared, O(n log n))."""
        gi_new = len(self.param_groups)
        named = [(_name(gi, i, p), p) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])]
        new = [(_name(gi_new, i, p), p) for i, p in enumerate(new_group) if torch.is_tensor(p)]
        if self._chains == "per_rank":
            for name, p in new:
                if is_sharded(p):
                    raise ValueError(f"{name} is a DTensor sharded over the ranks ({tuple(p.placements)}), but "
                                     f"chains='per_rank' runs an independent chain on each rank: the ranks hold "
                                     f"one model together, so they must run one chain; use chains='shared'")
        first_seen: dict[int, str] = {}
        for name, p in named + new:
            if id(p) in first_seen:
                raise ValueError(f"{name} is the same tensor as {first_seen[id(p)]}: it would be updated twice "
                                 f"per step; pass each tensor once")
            first_seen[id(p)] = name
        for name, p in new:
            if not (p.is_leaf or p.retains_grad):  # torch's own refusal would not name it
                raise ValueError(f"{name} is not a leaf tensor (it was computed from other tensors, grad_fn="
                                 f"{type(p.grad_fn).__name__}), so its .grad is never filled; pass a leaf, e.g. "
                                 f"nn.Parameter(t.detach().clone())")
            problem = _param_problem(p)
            if problem is not None:
                raise type(problem)(f"{name} {problem}")
        everything = named + new
        pairs = sorted((max(i, j), min(i, j)) for i, j in memory_overlaps([local_tensor(t) for _, t in everything]))
        if pairs:
            later, earlier = pairs[0]
            more = f" (and {len(pairs) - 1} more pairs)" if len(pairs) > 1 else ""
            raise ValueError(f"{everything[later][0]} shares memory with {everything[earlier][0]}{more}: an element "
                             f"would be updated twice per step (a data race on CUDA); pass disjoint tensors "
                             f"(disjoint views of one tensor are fine)")

    def add_param_group(self, param_group: dict) -> None:
        """Add a group as :meth:`torch.optim.Optimizer.add_param_group` does, after checking its
        parameters (floating, dense, not expanded, no memory shared with any other parameter) and,
        once the defaults are filled in, its hyper-parameters. A refused group is not added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict such as {{'params': [tensors], 'lr': 1e-3}}, got "
                            f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"param_group has no 'params' (its keys: {sorted(param_group)}); pass "
                             f"{{'params': [tensors], ...}}")
        before = dict(param_group)  # torch fills in the defaults: a refused group is put back as it came
        params = param_group["params"]
        if torch.is_tensor(params):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets itself
            try:
                params = param_group["params"] = list(params)  # a generator is read once
            except TypeError:
                raise TypeError(f"param_group['params'] must be a tensor or an iterable of tensors, got "
                                f"{type(params).__name__}") from None
            if iter(before["params"]) is before["params"]:  # a spent iterator: keep what was read from it
                before["params"] = params
        try:
            self._check_param_memory([p[1] if isinstance(p, tuple) else p for p in params])
            with warnings.catch_warnings():  # duplicates were refused above: torch's warning cannot apply
                warnings.filterwarnings("ignore", message=_TORCH_DUPLICATE_WARNING)
                super().add_param_group(param_group)
            try:
                self._check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]")
            except Exception:
                self.param_groups.pop()
                raise
        except Exception:
            param_group.clear()
            param_group.update(before)
            raise

    # ---- validation of a step: every group, before anything is written --------------------------
    def _plan(self) -> list[_Plan]:
        """Validate every group for this step; raises before any write. Returns the groups with gradients."""
        plans = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{gi}]")
            sources = [p for p in group["params"] if p.grad is not None]
            if not sources:
                continue
            backend = _BACKEND[group["fused"]]
            ops.select(self._op_name, sources[0].device, backend)  # no kernel for fused=True: raises now
            plans.append(self._local_plan(gi, group, sources, backend))
        # One op call checks all its arguments (dtypes, devices, layouts, shapes, memory overlap)
        # before it writes, on both backends, and _name_culprit explains a refusal; several calls
        # are checked here first, so that a refusal of a later one cannot follow a written group.
        if len(plans) > 1:
            for plan in plans:
                if not self._uniform(plan.params, plan.grads):
                    self._explain(plan.index, plan.group)
            self._check_step_memory(plans)
        return plans

    def _local_plan(self, gi: int, group: dict, sources: list[Tensor], backend: str | None) -> _Plan:
        """The plan of one group: plain tensors as they are; DTensors (FSDP2) as their local shards,
        with their gradients' local shards and each shard's flat offset in the full tensor."""
        dt = dtensor_type()
        if dt is None or not any(isinstance(p, dt) or isinstance(p.grad, dt) for p in sources):
            return _Plan(gi, group, sources, [p.grad for p in sources], backend, sources)
        params, grads, offsets, sharded = [], [], [], False
        for p in sources:
            where = _name(gi, next(i for i, q in enumerate(group["params"]) if q is p), p)
            if isinstance(p, dt) != isinstance(p.grad, dt) or (isinstance(p, dt) and (
                    p.grad.placements != p.placements or p.grad.device_mesh != p.device_mesh)):
                def kind(t):
                    return f"a DTensor placed {tuple(t.placements)}" if isinstance(t, dt) else "a plain tensor"
                raise ValueError(f"{where}: the parameter is {kind(p)} but its gradient is {kind(p.grad)}; a DTensor "
                                 f"parameter needs a gradient of the same placements on the same mesh (as FSDP2 "
                                 f"makes it), a plain one a plain gradient; no parameter was changed")
            if isinstance(p, dt):
                try:
                    offsets.append(_shard_offset(p))
                except ValueError as exc:  # re-placed since it was added
                    raise ValueError(f"{where} {exc}; no parameter was changed") from None
                sharded = sharded or is_sharded(p)
            else:
                offsets.append(0)
            params.append(local_tensor(p))
            grads.append(local_tensor(p.grad))
        return _Plan(gi, group, params, grads, backend, sources, offsets, sharded)

    def _first_step_undo(self, plans: list[_Plan]) -> Callable[[], None]:
        """What undoes the state that ``_op_args`` is about to create for groups stepping for the
        first time (RNG position, hyper vector, state buffers, and the seed drawn from the
        generator) when their op then refuses the call. O(groups) per step; empty after step 1."""
        fresh = [p for plan in plans if "rng" not in self.state.get(plan.group["params"][0], {})
                 for p in [plan.group["params"][0], *plan.sources] if not self.state.get(p)]
        if not fresh:
            return lambda: None
        gen = self._generator if self._generator is not None else torch.default_generator
        gen_state = gen.get_state()

        def undo() -> None:
            for p in fresh:
                self.state.pop(p, None)
            gen.set_state(gen_state)
        return undo

    def _name_culprit(self, plan: _Plan, plans: list[_Plan]) -> None:
        """After the first op call refused (nothing was written): raise the clearer error that
        names the parameter (dtype, device, layout or memory), when there is one."""
        if not self._uniform(plan.params, plan.grads):
            self._explain(plan.index, plan.group)
        self._check_step_memory(plans)

    @staticmethod
    def _uniform(params: list[Tensor], grads: list[Tensor]) -> bool:
        """Fast path: one floating dtype and one device, dense gradients of the parameters' shapes
        (C-level maps: this runs for every tensor at every step)."""
        both = params + grads
        dtypes, devices = set(map(_DTYPE, both)), set(map(_DEVICE, both))
        return (len(dtypes) == 1 and next(iter(dtypes)).is_floating_point and len(devices) == 1
                and set(map(_LAYOUT, both)) == {torch.strided}
                and list(map(Tensor.size, params)) == list(map(Tensor.size, grads)))

    def _explain(self, gi: int, group: dict) -> None:
        """Raise a clear error naming the first parameter of the group the fused op cannot take."""
        ref = None
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = _name(gi, i, p)
            if p.grad.layout != torch.strided:  # (a DTensor's layout is its local shard's)
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients: {where}")
            problem = _param_problem(p)
            if problem is not None:
                raise type(problem)(f"{where} {problem}")
            p, grad = local_tensor(p), local_tensor(p.grad)  # DTensors: what the op receives
            if ref is None:
                ref = p
            elif p.device != ref.device or p.dtype != ref.dtype:
                raise ValueError(f"{where} is {p.dtype} on {p.device} but the group's first parameter is "
                                 f"{ref.dtype} on {ref.device}; put parameters of different devices or "
                                 f"dtypes in separate param groups")
            if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
                raise ValueError(f"{where}: gradient is {grad.dtype} {tuple(grad.shape)} on {grad.device}; "
                                 f"it must match its parameter")
        raise RuntimeError(f"{type(self).__name__}: param_groups[{gi}] cannot be stepped (mixed tensors)")

    def _check_step_memory(self, plans: list[_Plan]) -> None:
        """The parameters written this step share no memory with each other or with any gradient;
        gradients that overlap themselves or each other are read from copies (exact: they are only
        read). State buffers are allocated by the optimizer (or copied at load): they share nothing."""
        params = [p for pl in plans for p in pl.params]
        owners = [(pl, k) for pl in plans for k in range(len(pl.params))]  # flat index -> (plan, k)
        if not all(map(Tensor.is_contiguous, params)):
            for x, p in enumerate(params):
                if overlaps_itself(p):  # re-pointed (p.data = ...) since it was added
                    raise ValueError(f"{self._label(*owners[x])} {_param_problem(p)}; no parameter was changed")
        for pl in plans:
            if not all(map(Tensor.is_contiguous, pl.grads)):  # e.g. torch.ones(1).expand(n)
                pl.grads[:] = [g.contiguous() if overlaps_itself(g) else g for g in pl.grads]
        n = len(params)
        for i, j in memory_overlaps(params + [g for pl in plans for g in pl.grads]):
            i, j = min(i, j), max(i, j)
            if i >= n:  # two gradients: read the later from its own memory
                pl, k = owners[j - n]
                pl.grads[k] = pl.grads[k].clone()
                continue
            later = f"the gradient of {self._label(*owners[j - n])}" if j >= n else self._label(*owners[j])
            raise ValueError(f"{later} shares memory with {self._label(*owners[i])}: the step would write memory "
                             f"that it also reads or writes elsewhere; no parameter was changed. Give each "
                             f"parameter its own memory and its own gradient")

    @staticmethod
    def _label(plan: _Plan, k: int) -> str:
        p = plan.sources[k]
        return _name(plan.index, next(i for i, q in enumerate(plan.group["params"]) if q is p), p)

    def _nonfinite_skips(self, plans: list[_Plan]) -> list[Tensor | None]:
        """The ``skip`` argument of each group's op. 'raise' groups with a NaN/inf raise here (one
        host sync per device), before any write. With a 'skip' group on a device, a non-finite
        gradient in any checked group of that device skips every group of that device (no sync)."""
        modes = [pl.group["nonfinite"] for pl in plans]
        flags = [None if m == "ignore" else ops.any_nonfinite(pl.grads, backend=pl.backend)
                 for pl, m in zip(plans, modes)]
        if any(pl.sharded for pl in plans) and _distributed():
            flags = _any_over_ranks(flags)  # each rank sees its shards only: all must agree
        raising = [f for f, m in zip(flags, modes) if m == "raise"]
        if raising and any(bool(torch.stack(fs).any()) for fs in _by_device(raising).values()):
            self._raise_nonfinite(plans, flags)
        skipping = {pl.params[0].device for pl, m in zip(plans, modes) if m == "skip"}
        combined = {d: torch.stack(fs).any() for d, fs in _by_device([f for f in flags if f is not None]).items()
                    if d in skipping}
        return [combined.get(pl.params[0].device) for pl in plans]

    def _raise_nonfinite(self, plans: list[_Plan], flags: list) -> None:
        for pl, f in zip(plans, flags):
            if pl.group["nonfinite"] == "raise" and bool(f):
                bad = [self._label(pl, k) for k, g in enumerate(pl.grads) if not bool(torch.isfinite(g).all())]
                which = (", ".join(bad) if bad else
                         "in another rank's shards: the group's parameters are sharded over the ranks")
                raise RuntimeError(
                    f"{type(self).__name__}: non-finite gradient in param_groups[{pl.index}] ({which}); "
                    f"parameters were not changed (no group was stepped). Lower the "
                    f"learning rate, clip gradients, or pass nonfinite='skip'.")

    # ---- device-resident state ------------------------------------------------------------------
    def _hyper_values(self, group: dict) -> list:
        """The op's hyper vector [ops.HYPER.size], filled by slot name; numbers or 0-dim tensors."""
        values: list = [0.0] * ops.HYPER.size
        for key, (slot, _) in self._hyper.items():
            values[getattr(ops.HYPER, slot)] = group[key]
        return values

    def _group_state(self, group: dict, device: torch.device) -> dict:
        """RNG position (seed drawn at the group's first step) and hyper vector on ``device``."""
        st = self.state[group["params"][0]]
        if "rng" not in st:
            gen = self._generator  # the seed is drawn on the generator's own device (a CUDA generator: one sync)
            seed = _distributed_seed(int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=gen,
                                                       device=gen.device if gen is not None else "cpu")),
                                     self._chains, device)
            rng = [0] * ops.RNG.size
            rng[ops.RNG.seed] = seed
            st["rng"] = torch.tensor(rng, dtype=torch.int64, device=device)
        elif st["rng"].device != device:
            st["rng"] = st["rng"].to(device)
        if "hyper" not in st or st["hyper"].device != device:
            st["hyper"] = torch.zeros(ops.HYPER.size, dtype=torch.float64, device=device)
            st["_hyper_cache"] = None
        vals = self._hyper_values(group)
        floats = _host_hyper(vals)
        if floats != st.get("_hyper_cache"):
            st["hyper"].copy_(torch.tensor([0.0 if f is None else f for f in floats], dtype=torch.float64))
            st["_hyper_cache"] = floats
        for i, v in enumerate(vals):
            if torch.is_tensor(v):  # device copy each step: graph-replay sees the live value
                st["hyper"][i].copy_(v)
        return st

    def _buffers(self, plan: _Plan, check: bool = True) -> list[Tensor]:
        """The state buffer of each of the plan's parameters (kept under ``plan.sources[k]``), shaped
        like ``plan.params[k]`` (a DTensor's local shard: the buffer is local-shard-sized, a plain
        tensor); with ``check``, a ValueError naming the first buffer that no longer fits."""
        out = []
        for src, p in zip(plan.sources, plan.params):
            st = self.state[src]
            if self._buffer not in st:
                st[self._buffer] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(st[self._buffer])
        if check and (list(map(Tensor.size, out)) != list(map(Tensor.size, plan.params))
                or set(map(_DTYPE, out)) != set(map(_DTYPE, plan.params)) or set(map(_DEVICE, out)) != set(map(_DEVICE, plan.params))):
            for k, (b, p) in enumerate(zip(out, plan.params)):
                if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                    raise ValueError(
                        f"{type(self).__name__}: the state {self._buffer!r} of {self._label(plan, k)} is "
                        f"{b.dtype} {tuple(b.shape)} on {b.device} but the parameter is now {p.dtype} "
                        f"{tuple(p.shape)} on {p.device} (re-pointed with .data = ..., resized, or converted with "
                        f".to()/.double() after the first step); no parameter was changed. Build the sampler again "
                        f"for the new parameters, or convert its state: optimizer.state[p]['{self._buffer}'] = "
                        f"optimizer.state[p]['{self._buffer}'].to(p)")
        return out

    def _op_args(self, plan: _Plan, check: bool = True) -> list:
        """[params, grads, (buffers,) hyper, rng] of one group; creates missing state. ``check``:
        test that existing buffers still fit their parameters (a ValueError naming the first
        that does not); the first group's op tests it itself before writing, so the step asks
        only for the later groups' (a few us per tensor on the step's hot path)."""
        st = self._group_state(plan.group, plan.params[0].device)
        bufs = [self._buffers(plan, check)] if self._buffer else []
        return [plan.params, plan.grads, *bufs, st["hyper"], st["rng"]]

    # ---- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One sampler step for every parameter group; returns ``closure()`` if given.

        All groups step or none does: every group is validated first, and a step that raises
        (bad hyper-parameter, gradient or layout; NaN/inf gradient with ``nonfinite='raise'``, the
        default) has changed nothing. ``'skip'`` skips on the device without a host sync: a
        non-finite gradient in any checked group skips every group on that device (the RNG does not
        advance); ``'ignore'`` does not check that group's gradients.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = self._plan()
        if any(pl.params[0].is_cuda for pl in plans) and torch.cuda.is_current_stream_capturing():
            self._check_capturable(plans)
        try:  # any_nonfinite reads the gradients first: the first op to see a bad one
            skips = self._nonfinite_skips(plans)
        except RuntimeError:
            for plan in plans:
                self._name_culprit(plan, plans)
            raise
        undo = self._first_step_undo(plans)
        try:  # the later groups' state checked here, before any write (the first group's op checks its own)
            args = [self._op_args(plan, check=k > 0) for k, plan in enumerate(plans)]
        except (ValueError, RuntimeError):
            undo()
            raise
        step_op = getattr(ops, self._op_name)
        for k, (plan, a, skip) in enumerate(zip(plans, args, skips)):
            try:  # a call validates itself before writing; with several, _plan checked across them
                step_op(*a, skip, plan.offsets, backend=plan.backend)
            except RuntimeError as exc:
                if k == 0:  # nothing was written (the op checks before it writes)
                    undo()  # nor is any state left behind, or a seed drawn
                    self._name_culprit(plan, plans)
                    if self._buffer:  # a state buffer that no longer fits: say which and how to fix it
                        self._buffers(plan, check=True)
                    raise
                done = [p.index for p in plans[:k]]
                raise RuntimeError(f"{type(self).__name__}: {self._op_name} failed on param_groups[{plan.index}] "
                                   f"although the step was validated (please report this): {exc}; param_groups "
                                   f"{done} were already stepped") from exc
        if self._verify and self._chains == "shared" and plans and _distributed():
            _verify_replicas(type(self).__name__, plans, [a[-1] for a in args])
        return loss

    def _check_capturable(self, plans: list[_Plan]) -> None:
        """Refuse what a CUDA graph cannot hold (before anything is recorded), and say which
        hyper-parameters a replay will not see change. See the class docstring, "CUDA graphs"."""
        name = type(self).__name__
        for pl in plans:
            where = f"param_groups[{pl.index}]"
            if pl.group["nonfinite"] == "raise":
                raise RuntimeError(
                    f"{name}.step() is being captured in a CUDA graph but {where} has nonfinite='raise', which "
                    f"reads a flag on the host every step (a sync, not allowed while capturing); pass "
                    f"nonfinite='skip' (the step is skipped on the device) or 'ignore'")
            st = self.state.get(pl.group["params"][0], {})
            if "rng" not in st or "hyper" not in st or st["hyper"].device != pl.params[0].device or (self._buffer and any(
                    self._buffer not in self.state.get(p, {}) for p in pl.sources)):
                raise RuntimeError(
                    f"{name}.step() is being captured in a CUDA graph before {where} has stepped on "
                    f"{pl.params[0].device}: take one step outside the capture first (on a side stream, as "
                    f"torch.cuda.graphs recommends); it draws the seed and allocates the state")
            vals = self._hyper_values(pl.group)
            floats = _host_hyper(vals)
            if floats != st.get("_hyper_cache"):
                keys = [k for k, (slot, _) in self._hyper.items()
                        if floats[getattr(ops.HYPER, slot)] != st["_hyper_cache"][getattr(ops.HYPER, slot)]]
                raise RuntimeError(
                    f"{name}.step() is being captured in a CUDA graph but {keys} of {where} changed as Python "
                    f"numbers since the last step; a capture cannot copy them from host memory. Take one step "
                    f"outside the capture after changing them, or make them 0-dim tensors on the device and "
                    f"update them in place")
        numbers = sorted({k for pl in plans for k in self._hyper if not torch.is_tensor(pl.group[k])})
        if numbers:
            warn_user(
                f"{name}: {numbers} are Python numbers in the captured step: every replay uses the values they "
                f"had at capture. To change one between replays, make it a 0-dim tensor on the device (e.g. "
                f"group['lr'] = torch.tensor(1e-3, device='cuda')) and update it in place (lr.fill_(...); "
                f"CyclicalSchedule.apply does)")

    # ---- state_dict: refuse foreign state, keep the int64 RNG position exact --------------------
    def _check_loadable(self, state_dict: dict) -> None:
        """Raise before anything is loaded when ``state_dict`` was not saved by this sampler class or
        for parameters of these shapes and this order."""
        me = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise TypeError(f"{me}.load_state_dict expects the dict of an optimizer's state_dict() "
                            f"(keys 'state' and 'param_groups'), got {type(state_dict).__name__}")
        saved, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved, (list, tuple)) or not all(isinstance(g, dict) and isinstance(g.get("params"), (
                list, tuple)) for g in saved):
            raise TypeError(f"state_dict['param_groups'] must be a list of dicts with a 'params' list, as "
                            f"{me}.state_dict() makes it; got {saved!r:.200}")
        if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
            raise TypeError(f"state_dict['state'] must be a dict of dicts (one per parameter), as {me}.state_dict() "
                            f"makes it; got {state!r:.200}")
        if len(saved) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved)} param groups but this {me} has {len(self.param_groups)}")
        foreign = {k for cls in _SGMCMC.__subclasses__() for k in cls._hyper} - set(self._hyper)
        params = []
        for gi, (group, mine) in enumerate(zip(saved, self.param_groups)):
            missing = [k for k in (*self._hyper, "nonfinite", "fused") if k not in group]
            extra = sorted(foreign & group.keys())
            if missing or extra:
                why = f"it has no {missing}" if missing else f"it has {extra}"
                raise ValueError(f"state_dict['param_groups'][{gi}] was not saved by {me} ({why}; its keys: "
                                 f"{sorted(k for k in group if k != 'params')}); load a state_dict saved by {me}")
            if len(group["params"]) != len(mine["params"]):
                raise ValueError(f"state_dict has {len(group['params'])} parameters in param_groups[{gi}] but this "
                                 f"{me} has {len(mine['params'])} there")
            self._check_group({**group, "params": mine["params"]}, f"state_dict['param_groups'][{gi}]")
            params += [(saved_id, gi, i, p) for i, (saved_id, p) in enumerate(zip(group["params"], mine["params"]))]
            ids = group["params"]
            if ids and "rng" not in state.get(ids[0], {}) and any(state.get(k) for k in ids):
                # the RNG position is kept with the group's first parameter from its first step on
                raise ValueError(f"state_dict['state'][{ids[0]!r}] has no 'rng' (seed, step) although "
                                 f"param_groups[{gi}] has state: it was not saved by {me} (or was edited); "
                                 f"load a state_dict saved by {me}")
        self._check_saved_state(state, params)

    def _check_saved_state(self, state: dict, params: list) -> None:
        allowed = set(_STATE_KEYS) | ({self._buffer} if self._buffer else set())
        for saved_id, gi, i, p in params:
            entry = state.get(saved_id, {})
            meta = sorted(k for k, v in entry.items() if torch.is_tensor(v) and v.is_meta)
            if meta:
                raise ValueError(f"state_dict['state'][{saved_id}] holds meta tensors {meta} (shapes without "
                                 f"data); load a state_dict whose tensors hold values")
            unknown = sorted(set(entry) - allowed)
            if unknown:
                raise ValueError(f"state_dict['state'][{saved_id}] has {unknown}, which {type(self).__name__} does "
                                 f"not keep: it was saved by another optimizer; load a state_dict saved by "
                                 f"{type(self).__name__}")
            buf = entry.get(self._buffer) if self._buffer else None
            shape = tuple(local_tensor(p).shape)  # a DTensor's buffer is its local shard's shape
            if buf is not None and (not torch.is_tensor(buf) or tuple(buf.shape) != shape):
                raise ValueError(f"state_dict['state'][{saved_id}][{self._buffer!r}] has shape {tuple(getattr(buf, 'shape', ()))} "
                                 f"but param_groups[{gi}]['params'][{i}] has shape {shape}: the state was "
                                 f"saved for parameters of other shapes or in another order; build the optimizer "
                                 f"over the same parameters, in the same order, as the one that was saved")
            rng = entry.get("rng")
            if rng is not None and (not torch.is_tensor(rng) or rng.dtype != torch.int64
                                    or tuple(rng.shape) != (ops.RNG.size,)):
                raise ValueError(f"state_dict['state'][{saved_id}]['rng'] must be an int64 tensor of shape "
                                 f"({ops.RNG.size},) = (seed, step), got {rng!r}")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state saved by this sampler class for parameters of the same shapes and order
        (checked first: a refused state_dict changes nothing). The RNG position (seed, step) is
        restored exactly, so a chain resumes its stream; state buffers are copied, never shared
        with ``state_dict``."""
        self._check_loadable(state_dict)
        saved = {k: v["rng"].clone() for k, v in state_dict["state"].items() if "rng" in v}
        super().load_state_dict(state_dict)  # casts every state tensor to its parameter's dtype
        params = [p for group in self.param_groups for p in group["params"]]
        id_to_param = dict(zip((k for g in state_dict["param_groups"] for k in g["params"]), params))
        for k, rng in saved.items():
            if k in id_to_param:  # (torch drops the state of ids that name no parameter)
                p = id_to_param[k]
                self.state[p]["rng"] = rng.to(device=p.device)  # int64 kept exactly
        for p in params:
            st = self.state.get(p)
            if st:  # the hyper vector, cast to the parameter's dtype by torch: rebuilt at the next step
                st.pop("hyper", None)
                st.pop("_hyper_cache", None)
            if self._buffer and st and self._buffer in st:
                st[self._buffer] = st[self._buffer].clone(memory_format=torch.preserve_format)

    def seed(self, group: int = 0) -> int:
        """The 64-bit Philox seed of a parameter group (drawn at its first step)."""
        n = len(self.param_groups)
        if isinstance(group, bool) or not isinstance(group, int):
            raise TypeError(f"group must be an int, the index of a param group, got {type(group).__name__}")
        if not -n <= group < n:
            raise IndexError(f"group must be an index of param_groups (this {type(self).__name__} has {n}), "
                             f"got {group!r}")
        params = self.param_groups[group]["params"]
        if not params:
            raise RuntimeError(f"param_groups[{group}] has no parameters, so it has no seed")
        if "rng" not in self.state.get(params[0], {}):  # .get: asking creates no state entry
            raise RuntimeError("the seed is drawn at the first step; call step() first")
        return int(self.state[params[0]]["rng"][ops.RNG.seed])


class SGLD(_SGMCMC):
    r"""Stochastic-gradient Langevin dynamics (Welling & Teh 2011), fused over all tensors.

    Update, per element, with U as in the module docstring::

        theta <- theta - (lr / 2) * grad U + sqrt(lr * T) * xi,    xi ~ N(0, 1)

    At ``temperature`` T = 1 the chain targets the posterior exp(-U); T < 1 is a cold posterior,
    T = 0 is plain (noise-free) gradient descent on U.

    Args:
        params: iterable of tensors [any shape] or param-group dicts. No two may share memory
            (disjoint views of one tensor are fine); expanded views are refused. DTensors placed
            Shard(0) or Replicate (FSDP2's ``fully_shard``; see the module docstring) are stepped
            as their local shards [local rows, *shape[1:]], whose state is local-shard-sized too.
        lr: step size (> 0); may be changed per step (schedules) or be a 0-dim float32/float64
            tensor on the parameters' device (read live each step, its value is not checked).
        num_data: N, the number of training points (> 0); scales the minibatch mean gradient.
        temperature: T >= 0.  prior_precision: alpha >= 0 of the Gaussian prior N(0, 1/alpha).
        fused: None picks the native kernel when it exists for the device, True insists, False
            runs the pure-PyTorch reference (same noise stream, slower).
        nonfinite: 'raise' (default), 'skip' or 'ignore' non-finite gradients (see :meth:`step`).
        generator: torch.Generator the seed is drawn from, on its device (CPU or CUDA; default: the
            global CPU generator). Only the seed comes from it: the noise is the in-kernel Philox stream.
        chains: under torch.distributed, 'shared' (default: one chain replicated over the ranks,
            e.g. DDP, or sharded over them, FSDP2: rank 0's seed is broadcast at a group's first
            step, one collective, so every rank draws the same noise whatever its own seed) or
            'per_rank' (each rank its own independent chain: rank 0's seed mixed with the rank;
            refused for parameters sharded over the ranks).
        verify: under torch.distributed with chains='shared', compare a checksum across ranks
            after every step (two small all-reduces) and raise when the replicas drifted apart:
            of every parameter not sharded over the ranks and of every group's RNG position
            (seed, step) (a sharded parameter's shards differ by design and are not compared).
    """

    _op_name = "sgld_step_"

    def __init__(self, params: Iterable, lr: float, num_data: int, temperature: float = 1.0,
                 prior_precision: float = 0.0, fused: bool | None = None, nonfinite: str = "raise",
                 generator: torch.Generator | None = None, *, chains: str = "shared", verify: bool = False):
        super().__init__(params, dict(lr=lr, num_data=num_data, temperature=temperature,
                                      prior_precision=prior_precision), fused, nonfinite, generator, chains, verify)


class SGHMC(_SGMCMC):
    r"""Stochastic-gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014), momentum form.

    Per element, with momentum v (state ``momentum_buffer``, zero at start)::

        v     <- (1 - friction) * v - lr * grad U + sqrt(2 * friction * lr * T) * xi
        theta <- theta + v

    Args as :class:`SGLD`, plus ``friction`` in (0, 1] (1 - friction is the momentum decay).
    """

    _op_name = "sghmc_step_"
    _buffer = "momentum_buffer"
    _hyper = {**_COMMON_HYPER, "friction": ("a", Interval(0.0, 1.0, hi_closed=True))}

    def __init__(self, params: Iterable, lr: float, num_data: int, friction: float = 0.1,
                 temperature: float = 1.0, prior_precision: float = 0.0, fused: bool | None = None,
                 nonfinite: str = "raise", generator: torch.Generator | None = None, *, chains: str = "shared",
                 verify: bool = False):
        super().__init__(params, dict(lr=lr, num_data=num_data, friction=friction, temperature=temperature,
                                      prior_precision=prior_precision), fused, nonfinite, generator, chains, verify)


class PSGLD(_SGMCMC):
    r"""Preconditioned SGLD (Li, Chen, Carlson & Carin 2016), RMSprop preconditioner, without
    the Gamma correction term. Per element, with g the minibatch gradient (``.grad``) and V the
    state ``square_avg`` (zero at start)::

        V     <- alpha * V + (1 - alpha) * g^2
        G      = 1 / (eps + sqrt(V))
        theta <- theta - (lr / 2) * G * grad U + sqrt(lr * T * G) * xi

    Args as :class:`SGLD`, plus ``alpha`` in [0, 1) and ``eps`` > 0. Parameters of float64,
    float32 or bfloat16, not float16: V lives in the parameters' dtype, and in float16 (1 - alpha)
    g^2 falls below its smallest subnormal (6e-8) for |g| < 2.4e-3 at alpha = 0.99, so V stays 0
    and G = 1 / eps: steps 3.5x too large on such gradients, silently (bfloat16 has float32's range).
    """

    _op_name = "psgld_step_"

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        for i, p in enumerate(group.get("params") or []):
            if torch.is_tensor(p) and p.dtype == torch.float16:
                raise TypeError(f"PSGLD: {where or 'params'}['params'][{i}] is float16: its running average of "
                                "squared gradients (kept in the parameter's dtype) underflows to 0 in float16 for "
                                "|grad| < 2.4e-3, which makes the preconditioner 1 / eps; use bfloat16 (float32's "
                                "range) or float32 parameters")
    _buffer = "square_avg"
    _hyper = {**_COMMON_HYPER, "alpha": ("a", Interval(0.0, 1.0, lo_closed=True)), "eps": ("b", _POSITIVE)}

    def __init__(self, params: Iterable, lr: float, num_data: int, alpha: float = 0.99, eps: float = 1e-5,
                 temperature: float = 1.0, prior_precision: float = 0.0, fused: bool | None = None,
                 nonfinite: str = "raise", generator: torch.Generator | None = None, *, chains: str = "shared",
                 verify: bool = False):
        super().__init__(params, dict(lr=lr, num_data=num_data, alpha=alpha, eps=eps, temperature=temperature,
                                      prior_precision=prior_precision), fused, nonfinite, generator, chains, verify)


# ---- torch.distributed ---------------------------------------------------------------------------------
_RANK_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: consecutive ranks get far-apart keys


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _distributed_seed(seed: int, chains: str, device: torch.device) -> int:
    """The group's seed: rank 0's, broadcast (one collective) when torch.distributed is
    initialised; mixed with the rank for chains='per_rank'. Unchanged in a single process."""
    if not _distributed():
        return seed
    dist = torch.distributed
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([seed], dtype=torch.int64, device=on)
    dist.broadcast(t, src=0)
    seed = int(t.item())
    if chains == "per_rank":
        seed = (seed + dist.get_rank() * _RANK_MIX) % 2**64
        seed -= 2**64 if seed >= 2**63 else 0
    return seed


def _any_over_ranks(flags: list[Tensor | None]) -> list[Tensor | None]:
    """The groups' non-finite flags (bool scalars; None: not checked) OR-ed over the ranks, one
    all-reduce (MAX) for all groups: with sharded parameters each rank checks only its shards, and
    every rank must raise or skip together (a shard stepping alone would break the chain)."""
    dist = torch.distributed
    idx = [i for i, f in enumerate(flags) if f is not None]
    if not idx:
        return flags
    on = flags[idx[0]].device if dist.get_backend() == "nccl" else torch.device("cpu")
    both = torch.stack([flags[i].to(on) for i in idx]).to(torch.int32)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    out = list(flags)
    for k, i in enumerate(idx):
        out[i] = both[k].to(device=flags[i].device, dtype=torch.bool)
    return out


def _verify_replicas(name: str, plans, rngs: list[Tensor]) -> None:
    """All ranks must hold the same chain after a shared-chain step: compare a checksum by MAX and
    MIN all-reduces: the sum and sum of squares (float64) of every stepped parameter that is not
    split over the ranks (shards of a DTensor hold different elements on each rank: skipped), and
    every group's RNG position (seed, step), which all ranks must share (as 32-bit halves, exact in
    float64). rngs: each plan's int64 [2] RNG position."""
    dist = torch.distributed
    device = plans[0].params[0].device
    parts = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]).to(device)
             for pl in plans for p, src in zip(pl.params, pl.sources) if not is_sharded(src)]
    parts += [rng.view(torch.int32).to(device=device, dtype=torch.float64) for rng in rngs]
    sums = torch.cat(parts)
    on = sums.device if dist.get_backend() == "nccl" else torch.device("cpu")
    lo, hi = sums.to(on), sums.to(on).clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"{name}(verify=True): the parameters differ across ranks after this step (rank "
                           f"{dist.get_rank()} of {dist.get_world_size()}): the replicas drifted apart; check that "
                           "every rank sees the same gradients (DDP) and that no rank changes parameters alone")
