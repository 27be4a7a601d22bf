"""Laplace: ``pyfastbayes.laplace.Laplace`` side by side with laplace-torch 0.3 (``pip install
laplace-torch``; the reference Laplace library) in the same run, as ratios (issue 13).

1. fit: 'kron' and 'diag' over all weights and 'full' over the last layer, on the digits MLP
   64-96-96-10 (tanh) and a small CNN (Conv2d(1,16,3)-ReLU-Conv2d(16,32,3)-ReLU-Linear-10 on the
   8 x 8 digits as 1 x 8 x 8 images); train split 1437 rows, batches of 128. laplace-torch with each
   GGN backend that runs here (CurvlinopsGGN, its default; AsdlGGN; BackPackGGN); one that raises
   is left out with the reason printed.
2. ``optimize_prior_precision(method='marglik')``, the same Adam steps on both sides.
3. the 'kron' GLM probit predictive on the test split (360 rows): time and peak memory (CUDA:
   ``torch.cuda.max_memory_allocated``; CPU: the torch CPU allocator's events recorded by
   ``torch.profiler(profile_memory=True)``, the peak of their running sum, i.e. tensor bytes).
4. a 'kron' GLM predictive over all weights of a model whose [N, C, P] Jacobian (laplace-torch's
   predictive) does not fit the device: ours only on the CPU, with the bytes laplace-torch would
   need; on CUDA laplace-torch is tried too and its out-of-memory error reported.
4b. the same probit predictive with ``enable_backprop=True`` and the gradient of the class-0
   probabilities with respect to the inputs (Bayesian optimisation's use): both sides build
   explicit Jacobians here; gradients checked against laplace-torch's default backend.
4c. subnetwork Laplace ('full' over the 1000 weights of largest |theta|, the same indices on both
   sides): fit, and the GLM probit predictive on the test split (time, peak memory), against
   laplace-torch's SubnetLaplace (default backend).
4d. functional (GP) Laplace on 200 training rows (the digits MLP): fit and the GP probit predictive on
   the test split (independent outputs: laplace-torch's joint-kernel predictive mixes output indices
   on this network), against laplace-torch's FunctionalLaplace (its default backend, BackPackGGN).
5. eigendecomposition: ``eigh_many`` ('batched', 'loop', 'cpu', 'streams': CUDA streams, one host thread each) against ``torch.linalg.eigh`` on
   the stacked batch and a loop of it (laplace-torch decomposes one factor at a time), on 16
   matrices 512 x 512 and on the Kronecker factors of the MLP.

Ours uses ``bias_block='separate'`` (laplace-torch's blocks), so the numbers must agree: every
result is checked against laplace-torch's default backend (else the first backend that agrees)
(log marginal likelihood rel 1e-4, tuned prior rel 1e-3, probabilities max abs 1e-4), and the
suite raises before reporting a time if they differ; other backends that disagree are timed and
marked DIFFERS. Models are trained here (full-batch Adam, fixed seeds, one thread).

Timing: the first call is the warm-up; a call over 2 s (``--quick``: 0.5 s) is timed twice and
the faster counts, others are the median of 3 (CUDA 7; ``--quick`` 1). ``--quick`` also trains
fewer steps, predicts fewer test rows (MLP 120, CNN 40), uses smaller eigh (CPU only) and big-model cases,
and leaves out the slow laplace-torch paths (CurvlinopsGGN 'diag', the CNN's dense last layer);
CurvlinopsGGN 'diag' of the CNN is left out of every CPU run (minutes on 2 cores).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.common import bench, peak_mb_any, row

SUITE = "laplace"
BACKENDS = ("CurvlinopsGGN", "AsdlGGN", "BackPackGGN")  # the first is laplace-torch's default
FIX = "pip install laplace-torch==0.3 (it brings curvlinops-for-pytorch, backpack-for-pytorch, asdfghjkl)"


# ---- problem ------------------------------------------------------------------------------------------
def _digits(device: str):
    """(x_train [1437, 64], y_train, x_test [360, 64], y_test): sklearn's 8 x 8 digits / 16, split by a
    fixed permutation; random inputs of the same shapes (with a note) where sklearn is missing."""
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    except ImportError:
        print("# bench_laplace: sklearn is missing: random inputs of the digits' shapes stand in (timings "
              "are shape-bound; the trained models differ)")
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(1797, 64, generator=g), torch.randint(0, 10, (1797,), generator=g)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10))


def _train(model: nn.Module, x, y, steps: int) -> nn.Module:
    """Full-batch Adam on the CPU with one thread (deterministic, and fast on a shared machine),
    then moved to x's device."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xc, yc = x.cpu(), y.cpu()
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xc), yc).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.to(x.device).eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- peer ---------------------------------------------------------------------------------------------
def _peer(quick: bool):
    """(laplace module, {backend name: class}) or (None, {}). A full run without laplace-torch
    raises (a comparison suite never drops its reference silently); --quick prints why and goes on
    with our rows alone."""
    try:
        import laplace
        import laplace.curvature as curv
    except Exception as exc:  # noqa: BLE001 - any import failure (missing module, broken dependency)
        why = f"laplace-torch cannot be imported ({type(exc).__name__}: {exc}); fix: {FIX}"
        if not quick:
            raise RuntimeError(f"bench_laplace: {why}. Run with --quick to time ours alone") from exc
        print(f"# bench_laplace --quick: laplace-torch rows left out: {why}")
        return None, {}
    backends = {name: getattr(curv, name) for name in BACKENDS if hasattr(curv, name)}
    for name in BACKENDS:
        if name not in backends:
            print(f"# bench_laplace: laplace.curvature.{name} is not available (its package is missing); left out")
    return laplace, backends


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # laplace-torch warns on every tuning call
        yield


# ---- measurement --------------------------------------------------------------------------------------
def _time(fn, device: str, rep: dict):
    """(fn()'s first result, its time in ms). The first call is the warm-up; when it took longer
    than rep['slow_ms'], one more call is made and the faster of the two is the time (a busy shared
    machine can stall one call many times over); else the median of rep['repeat'] more calls
    (bench.common.bench)."""
    out = []
    first = bench(lambda: out.append(fn()), device, warmup=0, repeat=1)
    result = out[0]
    out.clear()
    if first > rep["slow_ms"]:
        return result, min(first, bench(fn, device, warmup=0, repeat=1))
    return result, bench(fn, device, warmup=0, repeat=rep["repeat"])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _agree(what: str, err: float, tol: float, kind: str = "rel") -> str:
    """Raise when ours and laplace-torch's default differ by more than tol (the timings would
    compare different computations); else the difference, for the table."""
    if not err <= tol:
        raise RuntimeError(f"bench_laplace: {what}: pyfastbayes and laplace-torch differ ({kind} {err:.1e} > "
                           f"{tol:g}); not timing different computations")
    return f"{kind} {err:.0e}"


# ---- 1. fit -------------------------------------------------------------------------------------------
STRUCTURES = (("kron", "all"), ("diag", "all"), ("full", "last_layer"))


def _label(be_name: str) -> str:
    return f"laplace-torch {be_name}" + (" (default)" if be_name == BACKENDS[0] else "")


def _fit_rows(name, model, loader, laplace, backends, device, quick, rep, fitted):
    """Fit rows of one model. fitted[(name, structure)] = (ours, laplace-torch's fitted object,
    its backend): the default backend's, else the first one that agreed with ours."""
    from pyfastbayes.laplace import Laplace

    rows = []
    state = copy.deepcopy(model.state_dict())
    for structure, subset in STRUCTURES:
        case = f"fit {structure} ({subset.replace('_', ' ')}), {name}"
        if quick and structure == "full" and name.startswith("CNN"):
            print(f"# bench_laplace --quick: {case} left out (a dense GGN of the 5 130 last-layer weights: "
                  "7-18 s per library on 2 CPU cores)")
            continue

        def ours_fit():
            return Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure,
                           bias_block="separate").fit(loader, progress=False)

        ours, t_ours = _time(ours_fit, device, rep)
        lml = float(ours.log_marginal_likelihood())
        peers, notes, ref_obj = {}, {}, None
        for be_name, be in backends.items():
            if be_name == "CurvlinopsGGN" and structure == "diag" and (quick or (device == "cpu" and "CNN" in name)):
                # its diagonal comes from full per-batch Jacobians (torch.func.jacrev): ~5 s for the MLP and
                # 1-6 minutes for the CNN (vmapped convolution backward) on 2 CPU cores
                print(f"# bench_laplace{' --quick' if quick else ''}: {case}: laplace-torch CurvlinopsGGN left out "
                      "(its diagonal from full Jacobians: minutes on the CPU); ours is checked against the others")
                continue
            # a fresh copy per backend: BackPack's extend() leaves hooks on the modules it saw
            peer_model = copy.deepcopy(model)
            peer_model.load_state_dict(state)

            def peer_fit(m=peer_model, be=be):
                la = laplace.Laplace(m, "classification", subset_of_weights=subset, hessian_structure=structure,
                                     backend=be)
                la.fit(loader)
                return la

            try:
                with _quiet():
                    la, t = _time(peer_fit, device, rep)
                    their_lml = float(la.log_marginal_likelihood())
            except Exception as exc:  # noqa: BLE001 - a backend that does not run here is reported, not timed
                print(f"# bench_laplace: {case}: laplace-torch {be_name} raised {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:160]}; left out")
                continue
            r = _rel(lml, their_lml)
            if be_name == BACKENDS[0]:
                notes[be_name] = _agree(f"{case}: log marginal likelihood {lml:.8g} vs {their_lml:.8g}", r, 1e-4)
            elif r > 1e-4:
                notes[be_name] = f"DIFFERS rel {r:.0e}"
                print(f"# bench_laplace: {case}: laplace-torch {be_name}'s log marginal likelihood is {their_lml:.6g}, "
                      f"ours {lml:.6g} (rel {r:.1e}; its default backend agrees with ours): it computes another "
                      "curvature here; timed anyway")
            else:
                notes[be_name] = f"rel {r:.0e}"
            if r <= 1e-4 and (ref_obj is None or be_name == BACKENDS[0]):
                ref_obj = (la, be_name)
            peers[be_name] = t
        if backends and ref_obj is None:
            raise RuntimeError(f"bench_laplace: {case}: no laplace-torch backend ran and agreed with ours; "
                               "see the lines above")
        ref = peers.get(BACKENDS[0])
        for be_name, t in peers.items():
            rows.append(row(SUITE, case, _label(be_name), t, ref, agree=notes[be_name]))
        extra = dict(vs_best_peer=round(min(peers.values()) / t_ours, 2)) if peers else {}
        rows.append(row(SUITE, case, "pyfastbayes Laplace", t_ours, ref, **extra))
        fitted[(name, structure)] = (ours,) + (ref_obj or (None, None))
    return rows


# ---- 2. marglik ---------------------------------------------------------------------------------------
def _marglik_rows(name, fitted, device, quick, rep):
    """Prior tuning from delta = 1 on both sides; the priors are set back to 1 afterwards."""
    rows = []
    n_steps = 30 if quick else 100
    for structure, prior in (("kron", "scalar"), ("kron", "layerwise"), ("diag", "scalar"), ("full", "scalar")):
        ours, theirs, be_name = fitted.get((name, structure), (None, None, None))
        if ours is None:
            continue
        case = f"marglik {prior} prior, {n_steps} Adam steps, {structure}, {name}"

        def ours_tune():
            return ours.optimize_prior_precision(method="marglik", prior_structure=prior, n_steps=n_steps,
                                                 init_prior_prec=1.0)

        d_ours, t_ours = _time(ours_tune, device, rep)
        ours.prior_precision = 1.0
        if theirs is None:
            rows.append(row(SUITE, case, "pyfastbayes Laplace", t_ours))
            continue

        def their_tune():
            theirs.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=n_steps, init_prior_prec=1.0,
                                            prior_structure=prior)
            return theirs.prior_precision

        with _quiet():
            d_theirs, t_theirs = _time(their_tune, device, rep)
        theirs.prior_precision = 1.0
        d_ours, d_theirs = d_ours.detach().reshape(-1).double().cpu(), d_theirs.detach().reshape(-1).double().cpu()
        err = float((d_ours - d_theirs).abs().max() / d_theirs.abs().max())
        agree = _agree(f"{case}: tuned prior precision {d_ours.tolist()} vs {d_theirs.tolist()}", err, 1e-3)
        rows.append(row(SUITE, case, f"laplace-torch (fit by {be_name})", t_theirs, t_theirs))
        rows.append(row(SUITE, case, "pyfastbayes Laplace", t_ours, t_theirs, agree=agree))
    return rows


# ---- 3. predictive ------------------------------------------------------------------------------------
def _predictive_rows(name, model, loader, x_test, fitted, laplace, backends, device, rep):
    """The kron GLM probit predictive at prior precision 1: ours against each backend's."""
    rows = []
    ours, ref_obj, ref_name = fitted[(name, "kron")]
    case = f"kron GLM probit predictive, {len(x_test)} test rows, {name}"
    p_ours, t_ours = _time(lambda: ours.la(x_test, link_approx="probit"), device, rep)
    m_ours = peak_mb_any(lambda: ours.la(x_test, link_approx="probit"), device)
    peers = {}
    for be_name, be in backends.items():
        if be_name == ref_name:
            la = ref_obj
        else:
            peer_model = copy.deepcopy(model)
            try:
                with _quiet():
                    la = laplace.Laplace(peer_model, "classification", subset_of_weights="all",
                                         hessian_structure="kron", backend=be)
                    la.fit(loader)
            except Exception as exc:  # noqa: BLE001
                print(f"# bench_laplace: {case}: laplace-torch {be_name} fit raised {type(exc).__name__}; left out")
                continue

        def pred(la=la):
            return la(x_test, pred_type="glm", link_approx="probit")

        try:
            with _quiet():
                p, t = _time(pred, device, rep)
                m = peak_mb_any(pred, device)
        except Exception as exc:  # noqa: BLE001 - a backend that does not run here is reported, not timed
            print(f"# bench_laplace: {case}: laplace-torch {be_name} raised {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:160]}; left out")
            continue
        diff = float((p - p_ours).abs().max())
        if be_name == ref_name:
            agree = _agree(f"{case}: probabilities", diff, 1e-4, "max abs")
        elif diff <= 1e-4:
            agree = f"max abs {diff:.0e}"
        else:
            agree = f"DIFFERS max abs {diff:.0e}"
            print(f"# bench_laplace: {case}: laplace-torch {be_name}'s probabilities differ from ours and "
                  f"{ref_name}'s by up to {diff:.1e} (its curvature differs, see the fit rows); timed anyway")
        peers[be_name] = (t, m, agree)
    ref = peers.get(BACKENDS[0], (None,))[0]
    for be_name, (t, m, agree) in peers.items():
        rows.append(row(SUITE, case, _label(be_name), t, ref, peak_MB=_mb(m), agree=agree))
    extra = {}
    if peers:
        extra["vs_best_peer"] = round(min(t for t, _, _ in peers.values()) / t_ours, 2)
        mems = [m for _, m, _ in peers.values() if m]
        if mems and m_ours:
            m_default = peers.get(BACKENDS[0], (None, None))[1]
            extra["mem_vs_default"] = round(m_default / m_ours, 1) if m_default else ""
            extra["mem_vs_best_peer"] = round(min(mems) / m_ours, 1)
    rows.append(row(SUITE, case, "pyfastbayes Laplace", t_ours, ref, peak_MB=_mb(m_ours), **extra))
    return rows


def _mb(m):
    return "" if m is None else round(m, 1)


def _backprop_rows(name, x_test, fitted, device, rep):
    """The kron GLM probit predictive with enable_backprop and the input gradient of the class-0
    probabilities: ours against laplace-torch's default backend (the fitted pair of the fit rows)."""
    ours, theirs, ref_name = fitted[(name, "kron")]
    if theirs is None:
        return []
    case = f"kron GLM probit + input gradient (enable_backprop), {len(x_test)} rows, {name}"

    def grad_of(call):
        def run():
            x = x_test.detach().clone().requires_grad_(True)
            return torch.autograd.grad(call(x)[:, 0].sum(), x)[0]
        return run

    saved = (ours.enable_backprop, theirs.enable_backprop)
    ours.enable_backprop = theirs.enable_backprop = True
    try:
        g_ours, t_ours = _time(grad_of(lambda x: ours.la(x, link_approx="probit")), device, rep)
        with _quiet():
            g_theirs, t_theirs = _time(grad_of(lambda x: theirs(x, pred_type="glm", link_approx="probit")), device,
                                       rep)
    finally:
        ours.enable_backprop, theirs.enable_backprop = saved
    scale = float(g_theirs.abs().max())
    agree = _agree(f"{case}: input gradients", float((g_ours - g_theirs).abs().max()) / max(scale, 1e-30), 1e-4,
                   "rel to max")
    return [row(SUITE, case, _label(ref_name), t_theirs, t_theirs, agree=agree),
            row(SUITE, case, "pyfastbayes Laplace", t_ours, t_theirs)]


def _fit_pair(case, ours_fit, peer_fit, peer_label, ours_label, device, rep, peer_evidence_may_fail=False):
    """(ours, theirs, rows): both fits timed, their log marginal likelihoods checked (rel 1e-4).
    ``peer_evidence_may_fail``: a LinAlgError of the peer's evidence is printed and put in the row
    (the caller checks the two fits agree another way)."""
    ours, t_ours = _time(ours_fit, device, rep)
    with _quiet():
        theirs, t_theirs = _time(peer_fit, device, rep)
    lml = float(ours.log_marginal_likelihood())
    try:
        their_lml = float(theirs.log_marginal_likelihood())
    except torch.linalg.LinAlgError as exc:
        if not peer_evidence_may_fail:
            raise
        print(f"# bench_laplace: {case}: {peer_label}'s log marginal likelihood raised LinAlgError "
              f"({str(exc).splitlines()[0][:90]}...); ours is {lml:.8g}")
        return ours, theirs, [row(SUITE, case, peer_label, t_theirs, t_theirs, agree="peer evidence: LinAlgError"),
                              row(SUITE, case, ours_label, t_ours, t_theirs)]
    agree = _agree(f"{case}: log marginal likelihood {lml:.8g} vs {their_lml:.8g}", _rel(lml, their_lml), 1e-4)
    return ours, theirs, [row(SUITE, case, peer_label, t_theirs, t_theirs, agree=agree),
                          row(SUITE, case, ours_label, t_ours, t_theirs)]


# ---- 3b. subnetwork Laplace ----------------------------------------------------------------------------
SUBNET_K = 1000


def _subnet_rows(name, model, loader, x_test, laplace, device, quick, rep):
    """Subnetwork Laplace ('full' over the SUBNET_K weights of largest |theta|, the same indices on
    both sides): fit, and the GLM probit predictive on the test rows, ours against laplace-torch's
    SubnetLaplace (default backend: per-batch Jacobians over ALL weights, then their columns)."""
    from pyfastbayes.laplace import Laplace, subnetmask

    if laplace is None:
        return []
    if quick and name.startswith("CNN"):
        print(f"# bench_laplace --quick: the CNN's subnetwork rows left out (laplace-torch: ~20 s per call and an "
              f"11 GB predictive on 2 CPU cores)")
        return []
    idx = subnetmask.LargestMagnitudeSubnetMask(model, SUBNET_K).select()
    fit_case = f"fit subnetwork full (k = {SUBNET_K}), {name}"
    pred_case = f"subnetwork GLM probit predictive, {len(x_test)} test rows, {name}"

    def ours_fit():
        return Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=idx).fit(loader,
                                                                                                  progress=False)

    def peer_fit():
        la = laplace.Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="full",
                             subnetwork_indices=idx)
        la.fit(loader)
        return la

    ours, theirs, rows = _fit_pair(fit_case, ours_fit, peer_fit, _label(BACKENDS[0]), "pyfastbayes Laplace", device,
                                   rep)
    p_ours, t_ours = _time(lambda: ours.la(x_test, link_approx="probit"), device, rep)
    m_ours = peak_mb_any(lambda: ours.la(x_test, link_approx="probit"), device)
    with _quiet():
        p_theirs, t_theirs = _time(lambda: theirs(x_test, pred_type="glm", link_approx="probit"), device, rep)
        m_theirs = peak_mb_any(lambda: theirs(x_test, pred_type="glm", link_approx="probit"), device)
    agree = _agree(f"{pred_case}: probabilities", float((p_ours - p_theirs).abs().max()), 1e-4, "max abs")
    extra = dict(mem_vs_default=round(m_theirs / m_ours, 1)) if m_ours and m_theirs else {}
    rows += [row(SUITE, pred_case, _label(BACKENDS[0]), t_theirs, t_theirs, peak_MB=_mb(m_theirs), agree=agree),
             row(SUITE, pred_case, "pyfastbayes Laplace", t_ours, t_theirs, peak_MB=_mb(m_ours), **extra)]
    return rows


# ---- 4d. functional (GP) Laplace -------------------------------------------------------------------------
GP_SUBSET = 200


def _functional_rows(name, model, loader, x_test, laplace, device, quick, rep):
    """FunctionalLaplace on GP_SUBSET training rows (laplace-torch's subset draw, seed 0), over all
    weights and over the last layer: fit, and the GP probit predictive on the test rows, against
    laplace-torch's FunctionalLaplace / FunctionalLLLaplace (its default backend, BackPackGGN: the
    kernel block of every pair of subset batches from Jacobians computed anew for the pair). The
    predictive is compared with independent_outputs=True on both sides: laplace-torch's
    joint-kernel predictive mixes the test and training output indices
    (tests/test_laplace_functional.py), visible on this two-hidden-layer MLP."""
    if laplace is None or not hasattr(laplace, "FunctionalLaplace"):
        return []
    rows = []
    for subset in ("all", "last_layer"):
        rows += _functional_pair(name, model, loader, x_test, laplace, device, quick, rep, subset)
    return rows


def _functional_pair(name, model, loader, x_test, laplace, device, quick, rep, subset):
    from laplace.curvature import BackPackGGN

    from pyfastbayes.laplace import FunctionalLaplace

    M = 100 if quick else GP_SUBSET
    what = "functional (GP" + (", last layer" if subset == "last_layer" else "")
    fit_case = f"fit {what}, n_subset = {M}), {name}"
    pred_case = f"{what}) probit predictive (independent outputs), {len(x_test)} test rows, {name}"
    peer = "laplace-torch " + ("FunctionalLLLaplace" if subset == "last_layer" else "FunctionalLaplace") + \
        " (BackPackGGN)"

    def ours_fit(independent=False):
        return FunctionalLaplace(model, "classification", M, subset_of_weights=subset, batch_size=loader.batch_size,
                                 independent_outputs=independent).fit(loader, progress=False)

    def peer_fit(independent=False):
        la = laplace.Laplace(model, "classification", subset_of_weights=subset, hessian_structure="gp", n_subset=M,
                             independent_outputs=independent, backend=BackPackGGN)
        la.fit(loader)
        return la

    if not _peer_runs(fit_case, peer, peer_fit):
        return []
    # the last layer's float32 kernel is singular once M C passes its rank (the 96 features + 1 times
    # C): laplace-torch's evidence (its Cholesky of s K + 1e-5 I) raises there, ours forms K in float64;
    # the predictive's probabilities below check the two fits agree
    _, _, rows = _fit_pair(fit_case, ours_fit, peer_fit, peer, "pyfastbayes FunctionalLaplace", device, rep,
                           peer_evidence_may_fail=subset == "last_layer")
    _, pred_rows = _gp_predictive_pair(pred_case, ours_fit(True), peer_fit(True), x_test, peer,
                                       "pyfastbayes FunctionalLaplace", device, rep)
    return rows + pred_rows


def _peer_runs(case: str, peer_label: str, peer_fit) -> bool:
    """Whether the peer's fit runs here (a path that does not run on this device is reported and
    its rows left out, not the suite stopped: BackPACK on CUDA, say)."""
    try:
        with _quiet():
            peer_fit()
        return True
    except Exception as exc:  # noqa: BLE001
        print(f"# bench_laplace: {case}: {peer_label} raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}; "
              f"these rows are left out")
        return False


def _gp_predictive_pair(case, ours, theirs, x_test, peer_label, ours_label, device, rep):
    """(agreement, rows): the GP probit predictives of two fitted posteriors timed, their
    probabilities checked (max abs 1e-4)."""
    p_ours, t_ours = _time(lambda: ours(x_test), device, rep)
    with _quiet():
        p_theirs, t_theirs = _time(lambda: theirs(x_test, pred_type="gp", link_approx="probit"), device, rep)
    agree = _agree(f"{case}: probabilities", float((p_ours - p_theirs.to(p_ours)).abs().max()), 1e-4, "max abs")
    return agree, [row(SUITE, case, peer_label, t_theirs, t_theirs, agree=agree),
                   row(SUITE, case, ours_label, t_ours, t_theirs)]


ELLA_M, ELLA_K = 500, 20


def _ella_rows(name, model, loader, x_test, laplace, device, quick, rep):
    """ELLA (M = ELLA_M rows, K = ELLA_K features; laplace-torch's subset and output draws, seed
    1234): fit (the Nystrom basis and the curvature over all the training rows), and the GP probit
    predictive on the test rows, against laplace-torch's ELLA (its default backend, CurvlinopsGGN:
    per-batch Jacobians for the basis, K forward-mode JVPs per batch for the features). ELLA has
    no evidence: the two fits are checked by the predictive's probabilities."""
    from pyfastbayes.laplace import ELLA

    if laplace is None or not hasattr(laplace, "ELLA"):
        return []
    M, K = (200, 10) if quick else (ELLA_M, ELLA_K)
    fit_case = f"fit ELLA (M = {M}, K = {K}), {name}"
    pred_case = f"ELLA probit predictive, {len(x_test)} test rows, {name}"
    peer = "laplace-torch ELLA (CurvlinopsGGN)"

    def ours_fit():
        return ELLA(model, "classification", M, K, batch_size=loader.batch_size).fit(loader, progress=False)

    def peer_fit():
        la = laplace.ELLA(model, "classification", M, K)
        la.fit(loader)
        return la

    if not _peer_runs(fit_case, peer, peer_fit):
        return []
    ours, t_ours = _time(ours_fit, device, rep)
    with _quiet():
        theirs, t_theirs = _time(peer_fit, device, rep)
    agree, pred_rows = _gp_predictive_pair(pred_case, ours, theirs, x_test, peer, "pyfastbayes ELLA", device, rep)
    return [row(SUITE, fit_case, peer, t_theirs, t_theirs, agree=agree),
            row(SUITE, fit_case, "pyfastbayes ELLA", t_ours, t_theirs)] + pred_rows


# ---- 4. a model whose Jacobians do not fit --------------------------------------------------------------
def _device_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _big_rows(laplace, device, quick, rep):
    """All-weights kron GLM predictive of an MLP with C classes on N inputs: laplace-torch builds
    the [N, C, P] Jacobian (torch.func.jacrev over all parameters) before its variance."""
    from pyfastbayes.laplace import Laplace

    # CPU: a Jacobian well past the RAM; CUDA (quick too): past an H200's 141 GB
    width, C, N = (512, 100, 128) if quick else (1024, 100, 256)
    if device == "cuda":
        width, C, N = 2048, 1000, 256
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, C)).to(device).eval()
    P = _n_params(model)
    x_fit = torch.randn(2 * N, 784, generator=g).to(device)
    y_fit = torch.randint(0, C, (2 * N,), generator=g).to(device)
    x = torch.randn(N, 784, generator=g).to(device)
    loader = DataLoader(TensorDataset(x_fit, y_fit), batch_size=N)
    jac_gb = N * C * P * 4 / 1e9
    have_gb = _device_bytes(device) / 1e9
    case = f"kron GLM probit predictive, all weights, MLP 784-{width}-{width}-{C} (P = {P:,}), {N} inputs"
    print(f"# bench_laplace: {case}: laplace-torch would need {jac_gb:,.0f} GB for its Jacobians "
          f"[N, C, P] = [{N}, {C}, {P:,}] fp32 (device has {have_gb:,.0f} GB)")
    # the exact GGN of C classes costs C backward directions per batch: the fit uses the MC Fisher
    # (one sampled label), which this case does not time
    ours = Laplace(model, "classification", hessian_structure="kron", curvature="mc_fisher",
                   bias_block="separate").fit(loader, progress=False, generator=torch.Generator(device).manual_seed(0))
    p, t_ours = _time(lambda: ours.la(x, link_approx="probit"), device, dict(rep, repeat=1) if device == "cpu" else rep)
    if not bool(torch.isfinite(p).all()) or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise RuntimeError(f"bench_laplace: {case}: our probabilities are not a distribution")
    m_ours = peak_mb_any(lambda: ours.la(x, link_approx="probit"), device)
    peer = "not tried on the CPU (it would exhaust the machine's memory)"
    if device == "cuda":
        peer = "laplace-torch not installed"
        if laplace is not None:
            try:
                with _quiet():
                    la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
                    la.fit(loader)
                    la(x, pred_type="glm", link_approx="probit")
                peer = "laplace-torch RAN (no out-of-memory error)"
            except torch.OutOfMemoryError as exc:
                peer = f"laplace-torch: torch.OutOfMemoryError ({str(exc).splitlines()[0][:90]})"
            except RuntimeError as exc:
                peer = f"laplace-torch: {type(exc).__name__} ({str(exc).splitlines()[0][:90]})"
            finally:
                la = None
                torch.cuda.empty_cache()
        print(f"# bench_laplace: {case}: {peer}")
    return [row(SUITE, case, "pyfastbayes Laplace (laplace-torch: " + peer.split(" (")[0].replace("laplace-torch: ", "")
                + ")", t_ours, peak_MB=_mb(m_ours), jacobian_GB=round(jac_gb, 1))]


# ---- 5. eigendecomposition ----------------------------------------------------------------------------
def _spd(n: int, k: int, device: str, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        b = torch.randn(n, n + 8, generator=g)
        out.append((b @ b.T / n + 1e-3 * torch.eye(n)).to(device))
    return out


def _eigh_rows(mlp_factors, device, quick, rep):
    """Rows of section 5; ``mlp_factors`` None: the 16-matrix case alone (run first on CUDA)."""
    from pyfastbayes.laplace import eigh_many

    n = 128 if quick and device != "cuda" else 512  # CUDA: issue 13's target case even in --quick (~0.2 s a call)
    rows = []
    cases = [(f"eigh 16 x {n} x {n} fp32", _spd(n, 16, device, 4), True)] if mlp_factors is None else \
        [(f"eigh MLP Kronecker factors {sorted({m.shape[0] for m in mlp_factors})} fp32", mlp_factors, False)]
    for case, mats, same in cases:
        ref_vals = [torch.linalg.eigvalsh(m.double()) for m in mats]
        for method in ("batched", "loop", "cpu", "streams"):
            # eigenvalues against float64, and Q diag(v) Q^T against the matrix (the eigenvectors)
            err = 0.0
            for (v, Q), r, m in zip(eigh_many(mats, method), ref_vals, mats):
                scale = float(r.abs().max())
                err = max(err, float((v.double() - r.clamp_min(0)).abs().max()) / scale,
                          float((Q @ torch.diag(v) @ Q.T - m).abs().max()) / scale)
            if not err <= 1e-4:
                raise RuntimeError(f"bench_laplace: {case}: eigh_many({method!r}) is off by {err:.1e} (relative)")
        t_loop = _time(lambda: [torch.linalg.eigh(m) for m in mats], device, rep)[1]
        timed = {"torch.linalg.eigh, one call per matrix (laplace-torch)": t_loop}
        if same:  # issue 13's target: >= 3x this one ('vs_batched')
            stack = torch.stack(mats)
            timed["torch.linalg.eigh on the stacked batch"] = _time(lambda: torch.linalg.eigh(stack), device, rep)[1]
            if device == "cuda":  # torch's other CUDA backend, where the build has it (hybrid CPU + GPU)
                with _linalg_library("magma") as ok:
                    if ok:
                        timed["torch.linalg.eigh on the stacked batch, MAGMA"] = _time(
                            lambda: torch.linalg.eigh(stack), device, rep)[1]
        for method in ("batched", "loop", "cpu", "streams"):
            timed[f"pyfastbayes eigh_many({method!r})"] = _time(lambda: eigh_many(mats, method), device, rep)[1]
        batched = timed.get("torch.linalg.eigh on the stacked batch")
        rows += [row(SUITE, case, impl, ms, t_loop, **({"vs_batched": round(batched / ms, 3)} if batched else {}))
                 for impl, ms in timed.items()]
    return rows


@contextlib.contextmanager
def _linalg_library(name: str):
    """torch.backends.cuda.preferred_linalg_library(name) for the block (yields False where this
    build refuses it or its eigh fails), the previous choice restored afterwards."""
    before = torch.backends.cuda.preferred_linalg_library()
    try:
        torch.backends.cuda.preferred_linalg_library(name)
        torch.linalg.eigh(torch.eye(4, device="cuda"))
        ok = True
    except RuntimeError as e:
        print(f"# bench_laplace: torch.linalg.eigh with the {name} backend is unavailable ({e}); its row is left out")
        ok = False
    try:
        yield ok
    finally:
        torch.backends.cuda.preferred_linalg_library(before)


# ---- suite --------------------------------------------------------------------------------------------
def run(device: str, quick: bool) -> list[dict]:
    from pyfastbayes.laplace import Laplace

    laplace, backends = _peer(quick)
    # quick: the warm-up call and one more, and any call over 0.5 s timed once
    rep = dict(repeat=1, slow_ms=500.0) if quick else dict(repeat=3 if device == "cpu" else 7, slow_ms=2000.0)
    steps = 100 if quick else 300
    x_tr, y_tr, x_te, _ = _digits(device)
    torch.manual_seed(0)
    mlp = _train(_mlp(), x_tr, y_tr, steps)
    torch.manual_seed(0)
    cnn = _train(_cnn(), x_tr.view(-1, 1, 8, 8), y_tr, steps)
    # quick: fewer test rows (laplace-torch's predictive of the CNN takes ~70 ms per row on 2 CPU cores)
    n_mlp, n_cnn = (120, 40) if quick else (len(x_te), len(x_te))
    problems = [(f"MLP 64-96-96-10 (P = {_n_params(mlp):,})", mlp, x_tr, x_te[:n_mlp]),
                (f"CNN (P = {_n_params(cnn):,})", cnn, x_tr.view(-1, 1, 8, 8), x_te[:n_cnn].view(-1, 1, 8, 8))]
    # the 16 x 512 x 512 case first: the GPU check runs this suite under a time limit, and it is the target's case
    rows, fitted = _eigh_rows(None, device, quick, rep), {}
    for name, model, xt, xs in problems:
        loader = DataLoader(TensorDataset(xt, y_tr), batch_size=128)
        rows += _fit_rows(name, model, loader, laplace, backends, device, quick, rep, fitted)
        if name.startswith("MLP"):
            rows += _marglik_rows(name, fitted, device, quick, rep)
        rows += _predictive_rows(name, model, loader, xs, fitted, laplace, backends, device, rep)
        if laplace is not None and (name, "kron") in fitted:
            rows += _backprop_rows(name, xs, fitted, device, rep)
        rows += _subnet_rows(name, model, loader, xs, laplace, device, quick, rep)
        if name.startswith("MLP"):
            rows += _functional_rows(name, model, loader, xs, laplace, device, quick, rep)
            rows += _ella_rows(name, model, loader, xs, laplace, device, quick, rep)
    rows += _big_rows(laplace, device, quick, rep)
    # the MLP's Kronecker factors with our default blocks (bias folded into the activation factor)
    joint = Laplace(mlp, "classification", hessian_structure="kron").fit(
        DataLoader(TensorDataset(x_tr, y_tr), batch_size=128), progress=False)
    factors = [m for _, L, R, _, _ in joint.posterior_precision for m in (L, R) if m is not None and m.dim() == 2]
    rows += _eigh_rows(factors, device, quick, rep)
    return rows
