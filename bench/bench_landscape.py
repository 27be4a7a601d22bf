"""Loss landscapes: a 2-D grid of losses around a trained point, side by side with what a user
would otherwise run.

Baselines in the same run: a plain loop of ``torch.func.functional_call`` (fresh parameters per
point, the way tomgoldstein/loss-landscape evaluates), ``vmap`` over chunks of points (each data
batch read once per chunk), and loss-landscapes' ``random_plane`` (``pip install loss-landscapes``;
its own points, same count). Cases: (1) MLP: CPU, the digits MLP 64-128-128-10 on all 1797 digits,
25 x 25; CUDA, MLP 784-512-512-10 on 10 000 random inputs, 21 x 21. (2) CNN on the 8 x 8 digits
(all 1797, both devices), 21 x 21: conv 1->8 3x3 pad 1, ReLU, conv 8->16 3x3 pad 1 stride 2, ReLU,
linear 256->10. ``--quick``: 400 digits, 9 x 9. ``GFLOP/s`` counts the forward multiply-adds of
every point (2 flops each) of the whole model, also for pyfastbayes, whose first-layer shortcut
skips a third of them on the MLP; ``of_peak`` divides it by the GFLOP/s of one large fp32 GEMM
measured in the same run (the machine's practical peak on all its threads).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from bench.common import bench, row

SUITE = "landscape"


def _digits(quick: bool):
    """scikit-learn's 1797 8x8 digits in [0, 1]; where scikit-learn is absent (the GPU machine, whose
    carried wheels leave it out for room), uniform pixels and random labels of the same shape: the
    timings depend on the shapes only."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("# bench_landscape: scikit-learn is absent; random data of the digits' shape (1797 x 64)")
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(1797, 64, generator=g), torch.randint(0, 10, (1797,), generator=g)
    else:
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16
        y = torch.tensor(d.target)
    return (x[:400], y[:400]) if quick else (x, y)


def _problem(device: str, quick: bool):
    if device == "cuda" and not quick:
        widths, n = (784, 512, 512, 10), 10_000
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    else:
        x, y = _digits(quick)
        widths = (64, 128, 128, 10)
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    return model, x.to(device), y.to(device), widths


def _flops(widths, n_inputs: int, n_points: int) -> float:
    return 2.0 * n_inputs * n_points * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def _cnn_problem(device: str, quick: bool):
    """The digits CNN (module docstring) and its forward multiply-adds per input."""
    x, y = _digits(quick)
    x = x.view(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).to(device)
    macs = 8 * 1 * 9 * 8 * 8 + 16 * 8 * 9 * 4 * 4 + 256 * 10  # conv1 on 8x8, conv2 on 4x4 outputs, linear
    return model, x.to(device), y.to(device), macs


def _loop(model, loss_fn, x, y, theta0, D, alphas, betas, names, shapes, sizes):
    from torch.func import functional_call

    out = torch.empty(len(alphas), len(betas), dtype=torch.float64)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            flat = theta0 + a * D[0] + b * D[1]
            ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
            out[i, j] = float(loss_fn(functional_call(model, ps, (x,)), y))
    return out


def _vmap_chunks(model, loss_fn, x, y, theta0, D, alphas, betas, names, shapes, sizes, chunk=64):
    from torch.func import functional_call, vmap

    coords = torch.cartesian_prod(alphas, betas).to(theta0)
    losses = []
    for c in coords.split(chunk):
        thetas = torch.addmm(theta0.unsqueeze(0), c, D)

        def one(flat):
            ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
            return loss_fn(functional_call(model, ps, (x,)), y)

        losses.append(vmap(one)(thetas))
    return torch.cat(losses).view(len(alphas), len(betas))


def _gemm_peak(device: str) -> float:
    """GFLOP/s of a 2048^3 fp32 matmul (median of 5): the practical FLOP peak of this machine."""
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    return 2.0 * 2048**3 / bench(lambda: a @ b, device, warmup=2, repeat=5) / 1e6


def _rows(case: str, model, x, y, steps: int, flops: float, device: str, peak: float) -> list[dict]:
    from pyfastbayes.landscape import grid, random_directions

    loss_fn = nn.CrossEntropyLoss()
    alphas = betas = torch.linspace(-1, 1, steps)
    D = random_directions(model, n=2, normalization="filter", generator=torch.Generator().manual_seed(1)).to(device)
    named = [(n, p) for n, p in model.named_parameters()]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    rep = dict(warmup=1, repeat=3)
    with torch.no_grad():
        timed = {
            "plain loop of functional_call": bench(lambda: _loop(model, loss_fn, x, y, theta0, D, alphas, betas, names,
                                                                 shapes, sizes), device, **rep),
            "vmap over chunks of 64 points": bench(lambda: _vmap_chunks(model, loss_fn, x, y, theta0, D, alphas, betas,
                                                                        names, shapes, sizes), device, **rep),
        }
        try:
            import loss_landscapes
            import loss_landscapes.metrics as llm

            metric = llm.Loss(loss_fn, x, y)

            def peer():
                # loss-landscapes draws its directions with torch.randn(size) (no device): on CUDA it would mix
                # devices; the default-device context puts them next to the model, as a user would. Not on the
                # CPU: the context is a TorchFunctionMode that adds Python to every torch call (~15 % of its time)
                where = torch.device(device) if device != "cpu" else contextlib.nullcontext()
                with where:
                    return loss_landscapes.random_plane(model, metric, distance=1, steps=steps,
                                                        normalization="filter", deepcopy_model=True)

            timed["loss-landscapes random_plane"] = bench(peer, device, **rep)
        except ImportError:
            print("# bench_landscape: loss-landscapes cannot be imported; its row is left out")
        timed["pyfastbayes landscape.grid"] = bench(
            lambda: grid(model, loss_fn, (x, y), D, (alphas, betas), progress=False), device, **rep)
    ref, vm = timed["plain loop of functional_call"], timed["vmap over chunks of 64 points"]
    peer = timed.get("loss-landscapes random_plane")
    return [row(SUITE, case, impl, ms, ref, GFLOPs=round(flops / ms / 1e6, 1),
                of_peak=round(flops / ms / 1e6 / peak, 3), vs_vmap=round(vm / ms, 3),
                vs_loss_landscapes=round(peer / ms, 3) if peer else "") for impl, ms in timed.items()]


def run(device: str, quick: bool) -> list[dict]:
    peak = _gemm_peak(device)
    print(f"# bench_landscape: fp32 GEMM peak {peak:.0f} GFLOP/s on {device}")
    model, x, y, widths = _problem(device, quick)
    steps = 25 if device == "cpu" and not quick else (21 if not quick else 9)
    rows = _rows(f"{steps}x{steps} grid, MLP {'-'.join(map(str, widths))}, {len(x)} inputs", model, x, y, steps,
                 _flops(widths, len(x), steps * steps), device, peak)
    model, x, y, macs = _cnn_problem(device, quick)
    steps = 9 if quick else 21
    rows += _rows(f"{steps}x{steps} grid, CNN conv8-conv16-linear on 8x8 digits, {len(x)} inputs", model, x, y,
                  steps, 2.0 * macs * len(x) * steps * steps, device, peak)
    return rows
