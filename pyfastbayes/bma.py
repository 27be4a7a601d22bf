"""Bayesian model averaging over stored parameter draws."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["SampleBuffer", "iterate_inputs"]


def iterate_inputs(data, batch_size: int):
    """Yield input batches from a tensor [N, ...] (split into ``batch_size`` rows) or a loader
    whose items are tensors or (input, target, ...) tuples."""
    if torch.is_tensor(data):
        if data.dim() == 0:
            raise ValueError("x must have a batch dimension")
        yield from data.split(batch_size)
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


class SampleBuffer:
    """Flat copies of parameter draws of ``model`` and their Bayesian model average.

    Keeps at most ``max_samples`` draws in one [max_samples, P] tensor (oldest overwritten),
    P = number of trainable parameters (order of ``model.parameters()``). ``thin`` keeps every
    ``thin``-th call of :meth:`collect`.

    Args:
        model: the network whose trainable parameters are drawn.
        max_samples: capacity S_max >= 1.  thin: >= 1.
        device: where draws are kept (default: the parameters' device); dtype is the parameters'.
    """

    def __init__(self, model: nn.Module, max_samples: int, thin: int = 1, device=None):
        if int(max_samples) < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if int(thin) < 1:
            raise ValueError(f"thin must be >= 1, got {thin}")
        self.model = model
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self._named:
            raise ValueError("model has no trainable parameters")
        dtypes = {p.dtype for _, p in self._named}
        if len(dtypes) != 1:
            raise TypeError(f"SampleBuffer needs one parameter dtype, the model has {sorted(map(str, dtypes))}")
        first = self._named[0][1]
        self.device = torch.device(device) if device is not None else first.device
        self.numel = sum(p.numel() for _, p in self._named)
        self.max_samples, self.thin = int(max_samples), int(thin)
        self.draws = torch.empty(self.max_samples, self.numel, dtype=first.dtype, device=self.device)
        self.count = 0  # draws written so far (the ring position is count % max_samples)
        self._calls = 0

    def __len__(self) -> int:
        return min(self.count, self.max_samples)

    def _check_model(self) -> None:
        now = [(n, p.shape) for n, p in self.model.named_parameters() if p.requires_grad]
        if now != [(n, p.shape) for n, p in self._named]:
            raise RuntimeError("the model's trainable parameters changed since the SampleBuffer was built")

    @torch.no_grad()
    def collect(self) -> bool:
        """Store the model's current parameters (subject to thinning); returns True if stored."""
        self._check_model()
        self._calls += 1
        if (self._calls - 1) % self.thin:
            return False
        row = self.draws[self.count % self.max_samples]
        off = 0
        for _, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            n = p.numel()
            row[off:off + n].copy_(p.detach().reshape(-1))
            off += n
        self.count += 1
        return True

    def params_of(self, index: int) -> dict[str, Tensor]:
        """Draw ``index`` as a dict name -> view [shape of the parameter] (no copy)."""
        if not 0 <= index < len(self):
            raise IndexError(f"draw {index} out of range: {len(self)} stored")
        row = self.draws[index]
        out, off = {}, 0
        for name, p in self._named:
            out[name] = row[off:off + p.numel()].view(p.shape)
            off += p.numel()
        return out

    @torch.no_grad()
    def predict(self, x, batch_size: int = 1024, likelihood: str = "classification",
                progress: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Bayesian model average over the stored draws.

        Args:
            x: inputs [N, ...] or a loader of inputs / (input, target) batches.
            likelihood: 'classification' -> mean over draws of softmax(logits) [N, C];
                'regression' -> (mean [N, D], variance over draws [N, D]) of the outputs: the
                epistemic variance (add the noise variance for the predictive one).
        """
        if len(self) == 0:
            raise RuntimeError("no draws stored yet: call collect() first")
        if likelihood not in ("classification", "regression"):
            raise ValueError(f"likelihood must be 'classification' or 'regression', got {likelihood!r}")
        self._check_model()
        buffers = dict(self.model.named_buffers())
        dev = self._named[0][1].device
        draws = range(len(self))
        if progress:
            from tqdm.auto import tqdm

            draws = tqdm(draws, desc="BMA", leave=False)
        batches = [b.to(dev) for b in iterate_inputs(x, batch_size)]
        acc1 = acc2 = None
        for s in draws:
            params = {k: v.to(dev) for k, v in self.params_of(s).items()}
            params.update(buffers)
            out = torch.cat([functional_call(self.model, params, (b,)) for b in batches])
            if likelihood == "classification":
                out = out.float().softmax(-1) if out.dtype in (torch.float16, torch.bfloat16) else out.softmax(-1)
                acc1 = out if acc1 is None else acc1 + out
            else:
                acc1 = out.clone() if acc1 is None else acc1 + out
                acc2 = out * out if acc2 is None else acc2 + out * out
        n = len(self)
        mean = acc1 / n
        if likelihood == "classification":
            return mean
        return mean, (acc2 / n - mean * mean).clamp_min(0)

    def state_dict(self) -> dict:
        """Draws and ring position."""
        return {"draws": self.draws[: len(self)].clone(), "count": self.count, "calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (shapes must match)."""
        d = state["draws"]
        if d.shape[1] != self.numel or d.shape[0] > self.max_samples:
            raise ValueError(f"draws of shape {tuple(d.shape)} do not fit [<= {self.max_samples}, {self.numel}]")
        self.draws[: d.shape[0]].copy_(d)
        self.count, self._calls = int(state["count"]), int(state["calls"])
