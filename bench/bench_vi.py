"""Variational inference: one Bayes-by-Backprop training step of ``pyfastbayes.vi`` side by side
with bayesian-torch 0.5.0 (``pip install bayesian-torch``; the reference BBB layer library) and the
layer a user writes in eager PyTorch, in the same run, as ratios (issue 12).

One step = ``zero_grad``, forward, ``cross_entropy + KL / N`` (N = 60 000, MNIST's training set),
backward, ``torch.optim.SGD`` step, on random data (batch 128) for

(a) Blundell et al.'s MNIST MLP 784-1200-1200-10 (ReLU; 2.39 M weights, each with mu and rho), and
(b) a small CNN: Conv2d(1,16,3)-ReLU-Conv2d(16,32,3)-ReLU-Flatten-Linear(18 432, 10) on 1 x 28 x 28,
(c) the host's cost per step: MLP 16-16-16-10 at batch 2, next to nothing to compute, so the time is
    Python, dispatch and (on CUDA) launches. On the GPU, (a) at batch 128 is host-bound too: the H200
    ratios of 2026-11-27 (1.77x / 1.28x / 1.34x) matched this case's CPU ratios (1.82x / 1.23x / 1.50x).

Implementations (every Linear / Conv2d Bayesian, prior N(0, 1), the same mu and rho loaded into all):
- ``pyfastbayes`` ``BayesianLinear`` / ``BayesianConv2d`` with estimator 'reparam', 'local' and
  'flipout', KL by ``pyfastbayes.vi.kl_divergence`` after the forward (the KLs the layers' forwards
  carried: made in their weight passes, their gradients added in their d/d rho passes);
- bayesian-torch ``LinearReparameterization`` / ``Conv2dReparameterization`` and ``LinearFlipout`` /
  ``Conv2dFlipout`` in its dnn_to_bnn mode (forward returns the output only) with the KL summed over
  the layers by its ``get_kl_loss`` (each layer's ``kl_loss()``; 0.5.0 averages the closed form over
  each tensor's elements, a different scale but the same work);
- "hand-written": mu + softplus(rho) * torch.randn_like(mu), ``F.linear`` / ``F.conv2d``, the
  closed-form Gaussian KL summed in Python in the layer's forward (the baseline a user writes;
  the ``speedup`` column is over it).

Columns: ``vs_peer`` = bayesian-torch's time / ours (reparam and local against its
Reparameterization layers, flipout against its Flipout layers; target >= 2); ``peak_MB`` = the peak
memory one step allocates above what was allocated before it (parameters, buffers, the previous
step's gradients, optimizer state): CUDA ``torch.cuda.max_memory_allocated``, CPU the running sum
of the torch CPU allocator's events (torch.profiler, as bench_laplace); ``mem_vs_peer`` = ours /
bayesian-torch's (target <= 0.6); ``state_MB`` = parameters + buffers held by the model.

Before anything is timed every implementation is checked (``_check``): with sigma -> 0 (rho = -40)
its output and the NLL's mu-gradients equal those of the deterministic network at mu; at the
loaded mu / rho our KL equals the hand-written closed form (value and gradients) and bayesian-torch's
per-tensor closed form summed over elements; the NLL alone gives every layer's rho a non-zero
gradient (the noise path is connected); one real step gives a finite loss and finite gradients. A failed check raises: nothing wrong is timed.

Timing: ``bench.common.bench`` (3 warm-up calls, median of 7; ``--quick``: 1 and 3), in 3
interleaved rounds over the implementations (``--quick``: 1), the fastest round's median counts (a
burst of load on a shared machine hits one round, not one implementation). ``--quick`` on the CPU
uses the MLP 784-400-400-10 and batch 64 (on CUDA the full sizes); the full run the MNIST net above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import bench, peak_mb_any, row

SUITE = "vi"
NUM_DATA = 60_000  # the KL / N of the ELBO per data point
PRIOR_STD = 1.0
INIT_STD = 0.05  # initial sigma (bayesian-torch's default rho = -3 gives 0.049)
FIX = "pip install bayesian-torch==0.5.0 --no-deps (it imports without torchvision / tensorboard)"
OURS = ("reparam", "local", "flipout")
HAND = "hand-written eager BBB"
BT = {"reparam": "bayesian-torch Reparameterization", "flipout": "bayesian-torch Flipout"}
PEER_OF = {"reparam": "reparam", "local": "reparam", "flipout": "flipout"}


# ---- architectures: a list of ("linear", in, out) / ("conv", in, out, k) / "relu" / "flatten" -----------
def _mlp_spec(hidden: int) -> list:
    return [("linear", 784, hidden), "relu", ("linear", hidden, hidden), "relu", ("linear", hidden, 10)]


HOST_SPEC = [("linear", 16, 16), "relu", ("linear", 16, 16), "relu", ("linear", 16, 10)]
CNN_SPEC = [("conv", 1, 16, 3), "relu", ("conv", 16, 32, 3), "relu", "flatten", ("linear", 32 * 24 * 24, 10)]


def _weight_shape(layer) -> tuple:
    return (layer[2], layer[1]) if layer[0] == "linear" else (layer[2], layer[1], layer[3], layer[3])


def _canonical(spec: list) -> list[tuple]:
    """(weight_mu, weight_rho, bias_mu, bias_rho) per Bayesian layer, fixed by a seed: mu as
    nn.Linear / nn.Conv2d's default init range, rho = softplus^-1(INIT_STD) + N(0, 0.1^2) (spread
    like bayesian-torch's init, so sigma differs between weights)."""
    g = torch.Generator().manual_seed(0)
    rho0 = INIT_STD + math.log(-math.expm1(-INIT_STD))
    out = []
    for layer in spec:
        if isinstance(layer, str):
            continue
        shape = _weight_shape(layer)
        bound = 1 / math.sqrt(math.prod(shape[1:]))
        out.append(((torch.rand(shape, generator=g) * 2 - 1) * bound, rho0 + 0.1 * torch.randn(shape, generator=g),
                    (torch.rand(shape[0], generator=g) * 2 - 1) * bound, rho0 + 0.1 * torch.randn(shape[0], generator=g)))
    return out


# ---- the hand-written baseline -------------------------------------------------------------------------
def _gauss_kl(mu: torch.Tensor, sigma: torch.Tensor, s: float) -> torch.Tensor:
    """sum of KL(N(mu, sigma^2) || N(0, s^2)) over the elements."""
    return (math.log(s) - torch.log(sigma) + (sigma.square() + mu.square()) / (2 * s * s) - 0.5).sum()


class HandBayes(nn.Module):
    """Bayes by Backprop as written in eager PyTorch: sample W = mu + softplus(rho) eps with
    torch.randn_like, apply F.linear / F.conv2d, and keep the layer's closed-form KL in ``self.kl``."""

    def __init__(self, layer: tuple):
        super().__init__()
        shape = _weight_shape(layer)
        self.kind = layer[0]
        self.weight_mu, self.weight_rho = nn.Parameter(torch.empty(shape)), nn.Parameter(torch.empty(shape))
        self.bias_mu, self.bias_rho = nn.Parameter(torch.empty(shape[0])), nn.Parameter(torch.empty(shape[0]))
        self.kl = None

    def forward(self, x):
        w_sigma, b_sigma = F.softplus(self.weight_rho), F.softplus(self.bias_rho)
        w = self.weight_mu + w_sigma * torch.randn_like(w_sigma)
        b = self.bias_mu + b_sigma * torch.randn_like(b_sigma)
        self.kl = _gauss_kl(self.weight_mu, w_sigma, PRIOR_STD) + _gauss_kl(self.bias_mu, b_sigma, PRIOR_STD)
        return F.linear(x, w, b) if self.kind == "linear" else F.conv2d(x, w, b)


# ---- the implementations ------------------------------------------------------------------------------
def _peer(quick: bool):
    """bayesian_torch.layers, or None: a full run without it raises (a comparison suite never drops
    its reference silently); --quick prints why and goes on without its rows."""
    try:
        import bayesian_torch.layers as btl
        from bayesian_torch.models.dnn_to_bnn import get_kl_loss
    except Exception as exc:  # noqa: BLE001 - any import failure (missing module, broken dependency)
        why = f"bayesian-torch cannot be imported ({type(exc).__name__}: {exc}); fix: {FIX}"
        if not quick:
            raise RuntimeError(f"bench_vi: {why}. Run with --quick to time ours alone") from exc
        print(f"# bench_vi --quick: bayesian-torch rows left out: {why}")
        return None
    btl.get_kl_loss = get_kl_loss
    return btl


def _bayes_layer(impl: str, layer: tuple, btl):
    """One Bayesian layer of implementation ``impl`` for the spec entry ``layer``."""
    from pyfastbayes.vi import BayesianConv2d, BayesianLinear

    lin = layer[0] == "linear"
    if impl in OURS:
        cls = BayesianLinear if lin else BayesianConv2d
        return cls(*layer[1:], prior_std=PRIOR_STD, init_std=INIT_STD, estimator=impl)
    if impl == HAND:
        return HandBayes(layer)
    est = "reparam" if impl == BT["reparam"] else "flipout"
    cls = {("reparam", True): btl.LinearReparameterization, ("reparam", False): btl.Conv2dReparameterization,
           ("flipout", True): btl.LinearFlipout, ("flipout", False): btl.Conv2dFlipout}[est, lin]
    # bayesian-torch's prior_variance is used as the prior's std (kl_div's sigma_p)
    m = cls(*layer[1:], prior_mean=0.0, prior_variance=PRIOR_STD)
    m.dnn_to_bnn_flag = True  # forward returns the output only; the KL comes from get_kl_loss
    return m


def _params(m) -> tuple:
    """(weight_mu, weight_rho, bias_mu, bias_rho) of any implementation's layer."""
    if hasattr(m, "weight_mu"):
        return m.weight_mu, m.weight_rho, m.bias_mu, m.bias_rho
    if hasattr(m, "mu_kernel"):  # bayesian-torch's convolutions
        return m.mu_kernel, m.rho_kernel, m.mu_bias, m.rho_bias
    return m.mu_weight, m.rho_weight, m.mu_bias, m.rho_bias


def _build(impl: str, spec: list, canon: list, device: str, btl) -> tuple[nn.Module, list]:
    """(model, its Bayesian layers in order) with the canonical mu / rho loaded."""
    mods, bayes = [], []
    for layer in spec:
        if layer == "relu":
            mods.append(nn.ReLU())
        elif layer == "flatten":
            mods.append(nn.Flatten())
        else:
            bayes.append(_bayes_layer(impl, layer, btl))
            mods.append(bayes[-1])
    model = nn.Sequential(*mods).to(device)
    _load(bayes, canon)
    return model, bayes


def _load(bayes: list, canon: list, rho_shift: float | None = None) -> None:
    """Copy the canonical values into the layers (rho replaced by ``rho_shift`` when given)."""
    with torch.no_grad():
        for m, vals in zip(bayes, canon):
            for i, (p, v) in enumerate(zip(_params(m), vals)):
                p.copy_(v if rho_shift is None or i in (0, 2) else torch.full_like(v, rho_shift))  # 1, 3: rho


def _kl_fn(impl: str, btl):
    """model -> the KL term of the loss, as each library's user computes it."""
    if impl in OURS:
        from pyfastbayes.vi import kl_divergence

        return kl_divergence
    if impl == HAND:
        return lambda model: sum(m.kl for m in model if isinstance(m, HandBayes))
    return btl.get_kl_loss


def _data(spec: list, batch: int, device: str):
    g = torch.Generator().manual_seed(1)
    shape = (batch, spec[0][1]) if spec[0][0] == "linear" else (batch, 1, 28, 28)
    return torch.randn(shape, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)


def _make_step(model: nn.Module, kl_fn, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()  # set_to_none: the previous step's gradients are freed here
        loss = F.cross_entropy(model(x), y) + kl_fn(model) / NUM_DATA
        loss.backward()
        opt.step()
        return loss

    return step


# ---- checks --------------------------------------------------------------------------------------------
def _close(what: str, a: torch.Tensor, b: torch.Tensor, rtol: float) -> float:
    """max |a - b| / max |b|; raises (naming what) above rtol, or on a shape mismatch or NaN."""
    if a.shape != b.shape:
        raise RuntimeError(f"bench_vi: {what}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)}); not timing it")
    a, b = a.detach(), b.detach()
    err = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
    if not err <= rtol:
        raise RuntimeError(f"bench_vi: {what}: differs by rel {err:.1e} > {rtol:g}; not timing different computations")
    return err


def _bt_kl_sum(bayes: list) -> torch.Tensor:
    """bayesian-torch's closed form (its own kl_div), summed over elements rather than averaged."""
    total = 0
    for m in bayes:
        mu_w, rho_w, mu_b, rho_b = _params(m)
        for mu, rho, pm, ps in ((mu_w, rho_w, m.prior_weight_mu, m.prior_weight_sigma),
                                (mu_b, rho_b, m.prior_bias_mu, m.prior_bias_sigma)):
            total = total + m.kl_div(mu, torch.log1p(torch.exp(rho)), pm, ps) * mu.numel()
    return total


def _check(name: str, impls: list, spec: list, canon: list, x, y, device: str, btl) -> str:
    """Raise unless every implementation computes the same thing (module docstring); returns a
    short note of the largest differences for the table."""
    # deterministic twin at mu
    ref_layers, mods = [], []
    for layer in spec:
        if isinstance(layer, str):
            mods.append(nn.ReLU() if layer == "relu" else nn.Flatten())
        else:
            ref_layers.append(nn.Linear(layer[1], layer[2]) if layer[0] == "linear" else nn.Conv2d(*layer[1:]))
            mods.append(ref_layers[-1])
    twin = nn.Sequential(*mods).to(device)
    with torch.no_grad():
        for m, (mu_w, _, mu_b, _) in zip(ref_layers, canon):
            m.weight.copy_(mu_w), m.bias.copy_(mu_b)
    out_ref = twin(x)
    F.cross_entropy(out_ref, y).backward()
    g_ref = [p.grad for m in ref_layers for p in (m.weight, m.bias)]
    worst_out = worst_grad = 0.0
    kls = {}
    for impl in impls:
        model, bayes = _build(impl, spec, canon, device, btl)
        # 1. sigma -> 0: the deterministic network (output and NLL mu-gradients)
        _load(bayes, canon, rho_shift=-40.0)
        out = model(x)
        worst_out = max(worst_out, _close(f"{name}, {impl}: output at sigma -> 0", out, out_ref, 1e-4))
        F.cross_entropy(out, y).backward()
        for i, (m, gr) in enumerate(zip([q for m in bayes for q in (_params(m)[0], _params(m)[2])], g_ref)):
            worst_grad = max(worst_grad, _close(f"{name}, {impl}: NLL gradient of mu #{i} at sigma -> 0", m.grad, gr,
                                                1e-3))
        # 2. the KL at the canonical mu / rho
        _load(bayes, canon)
        model.zero_grad()
        if impl == HAND:
            model(x)
        if impl in BT.values():
            # the KL the step uses (get_kl_loss: per-tensor means) against the hand-written closed form
            # averaged per tensor; then its own kl_div summed over elements, compared with ours below
            timed = _kl_fn(impl, btl)(model)
            want = sum(_gauss_kl(mu, F.softplus(rho), PRIOR_STD) / mu.numel()
                       for m in bayes for mu, rho in (_params(m)[:2], _params(m)[2:]))
            _close(f"{name}, {impl}: get_kl_loss vs the per-tensor mean of the closed form", timed, want, 1e-5)
            kl = _bt_kl_sum(bayes)
        else:
            kl = _kl_fn(impl, btl)(model)
        if not bool(torch.isfinite(kl)):
            raise RuntimeError(f"bench_vi: {name}, {impl}: KL is not finite ({float(kl)})")
        kl.backward()
        kls[impl] = (kl.detach(), [p.grad.clone() for m in bayes for p in _params(m)])
        # 3. the NLL alone reaches every rho through the noise (not only through the KL)
        model.zero_grad()
        out = model(x)
        if out.shape != out_ref.shape:
            raise RuntimeError(f"bench_vi: {name}, {impl}: output shape {tuple(out.shape)} != {tuple(out_ref.shape)}")
        F.cross_entropy(out, y).backward()
        for i, m in enumerate(bayes):
            g = _params(m)[1].grad
            if g is None or not bool(torch.isfinite(g).all()) or not bool((g != 0).any()):
                raise RuntimeError(f"bench_vi: {name}, {impl}: layer {i}'s rho gets no finite NLL gradient (the noise "
                                   "path is cut)")
        # 4. one real step: a finite loss and finite gradients everywhere
        model.zero_grad()
        loss = _make_step(model, _kl_fn(impl, btl), x, y)()
        if not bool(torch.isfinite(loss)):
            raise RuntimeError(f"bench_vi: {name}, {impl}: one training step gave loss {float(loss)}")
        for m in bayes:
            if any(p.grad is None or not bool(torch.isfinite(p.grad).all()) for p in _params(m)):
                raise RuntimeError(f"bench_vi: {name}, {impl}: a gradient is missing or not finite after one step")
    kl_ours, g_ours = kls[OURS[0]]
    worst_kl = 0.0
    for impl, (kl, grads) in kls.items():
        worst_kl = max(worst_kl, _close(f"{name}: KL of {impl} vs {OURS[0]}", kl, kl_ours, 1e-5))
        if impl in OURS or impl == HAND:  # the same scale as ours: the gradients too
            for i, (a, b) in enumerate(zip(grads, g_ours)):
                _close(f"{name}: KL gradient #{i} of {impl} vs {OURS[0]}", a, b, 1e-4)
    return f"out {worst_out:.0e}, grad {worst_grad:.0e}, KL {worst_kl:.0e}"


# ---- measurement --------------------------------------------------------------------------------------
def _state_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def _case_rows(name: str, spec: list, batch: int, device: str, quick: bool, btl) -> list[dict]:
    impls = [HAND, *OURS] + ([BT["reparam"], BT["flipout"]] if btl is not None else [])
    canon = _canonical(spec)
    x, y = _data(spec, batch, device)
    note = _check(name, impls, spec, canon, x, y, device, btl)
    print(f"# bench_vi: {name}: every implementation checked (max rel. differences: {note})")
    steps, state = {}, {}
    for impl in impls:
        model, _ = _build(impl, spec, canon, device, btl)
        steps[impl], state[impl] = _make_step(model, _kl_fn(impl, btl), x, y), _state_mb(model)
    warmup, repeat, rounds = (1, 3, 1) if quick else (3, 7, 3)
    ms = {impl: math.inf for impl in impls}
    for _ in range(rounds):  # interleaved: a burst of load hits one round, not one implementation
        for impl in impls:
            ms[impl] = min(ms[impl], bench(steps[impl], device, warmup=warmup, repeat=repeat))
    peak = {impl: peak_mb_any(steps[impl], device) for impl in impls}
    for impl in impls:
        loss = steps[impl]()
        if not bool(torch.isfinite(loss)):
            raise RuntimeError(f"bench_vi: {name}, {impl}: the loss diverged while timing ({float(loss)})")
    rows = []
    for impl in impls:
        extra = {"peak_MB": "" if peak[impl] is None else round(peak[impl], 2), "state_MB": round(state[impl], 2)}
        if impl in OURS and btl is not None:
            peer = BT[PEER_OF[impl]]
            extra["vs_peer"] = round(ms[peer] / ms[impl], 3)
            if peak[impl] is not None and peak[peer]:
                extra["mem_vs_peer"] = round(peak[impl] / peak[peer], 3)
        label = f"pyfastbayes {impl}" if impl in OURS else impl
        rows.append(row(SUITE, f"train step, {name}", label, ms[impl], ref_ms=ms[HAND], **extra))
    if btl is not None:
        for impl in OURS:
            r = next(r for r in rows if r["impl"] == f"pyfastbayes {impl}")
            t_ok, m = r["vs_peer"] >= 2.0, r.get("mem_vs_peer")
            host_case = name.startswith("host overhead")  # kilobytes of activations: memory is not its point
            print(f"# bench_vi target{' (--quick: one round of 3 calls, not a measurement)' if quick else ''}, "
                  f"{name}, {impl} vs {BT[PEER_OF[impl]]}: time {r['vs_peer']:.2f}x "
                  f"(>= 2x: {'MET' if t_ok else 'MISSED'}), peak memory "
                  + ("not compared" if host_case else "not measured" if m is None
                     else f"{m:.2f}x (<= 0.6x: {'MET' if m <= 0.6 else 'MISSED'})"))
    return rows


def run(device: str, quick: bool) -> list[dict]:
    btl = _peer(quick)
    torch.manual_seed(0)
    # --quick on the CPU: a smaller MLP and batch (< 60 s on 2 cores); on CUDA the full sizes (ms per step)
    hidden, batch = (400, 64) if quick and device == "cpu" else (1200, 128)
    cases = [(f"MLP 784-{hidden}-{hidden}-10, batch {batch}", _mlp_spec(hidden), batch),
             (f"CNN 16-32 conv + linear, batch {batch}", CNN_SPEC, batch),
             # next to nothing to compute: the host's cost per step (Python, dispatch, launches), which
             # is what the GPU rows at batch 128 measure (H200, 2026-11-27: the same ratios)
             ("host overhead: MLP 16-16-16-10, batch 2", HOST_SPEC, 2)]
    rows = []
    for name, spec, b in cases:
        rows += _case_rows(name, spec, b, device, quick, btl)
    return rows
