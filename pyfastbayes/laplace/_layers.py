"""What Laplace knows about each kind of layer: which blocks its parameters form, and for one batch
their per-example Jacobians and Kronecker-factor rows, from the layer's input ``a`` and the
gradients ``g`` of m output-space directions with respect to the layer's output.

Blocks. A Kronecker block holds a parameter matrix Theta [p, q] (rows: the "left" side, columns: the
"right" side) whose curvature is approximated by L (x) R, L [p, p], R [q, q]; ``index`` [p, q] gives
each entry's position in the flat [P] vector of :class:`pyfastbayes.nn.ParamLayout`.

- ``nn.Linear`` (inputs [N, ..., in]: every leading position beyond N shares the weight): Theta =
  [W | b] [out, in + 1] with L = G (output gradients) and R = A (inputs with the bias column) when
  ``bias_block='joint'``; with 'separate' (laplace-torch's convention) W [out, in] (L = G, R = A) and
  b [out, 1] (L = G, R = [[1]]).
- ``nn.Conv1d`` / ``nn.Conv2d`` (groups = 1, zero padding): the same with the unfolded patches as
  inputs (W viewed as [out, in * kernel]). A frozen weight leaves the bias alone: b [out, 1] with
  L = G, R = [[1]].
- ``nn.Embedding``: Theta = W [V, D] with L = A (diagonal: token counts over the number of
  non-padding tokens, stored as a vector) and R = G [D, D] (summed over the non-padding tokens:
  ``padding_idx`` tokens are not rows of either factor). 'reduce' with several tokens per example
  is refused (its averaged one-hot inputs give a dense [V, V] factor).
- Diagonal blocks: the affine parameters of LayerNorm, GroupNorm and BatchNorm (eval mode), and with
  ``unsupported='diag'`` any other module's own parameters, from per-example gradients
  (``torch.func``: vmap over examples and directions of the module's own forward).

A parameter shared by several modules (tied weights) is refused: the flat layout holds it once and
no per-module block would see all of its uses. A module called several times per forward (an
unrolled recurrent cell, siamese branches) is not: its calls are recorded one by one, its
per-example Jacobian is the sum of theirs, and for its Kronecker factors the calls are further
positions sharing the weight (below).

Weight sharing (positions t = 1..T beyond the batch dimension, over all of the module's calls)
follows Eschenhagen et al. (2023): 'expand' treats the N*T positions as examples (A averaged over
N*T rows, G summed over them); 'reduce' averages the inputs and sums the output gradients over
positions first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn.utils import parametrize

from .._warnings import warn_user
from ..nn.stateless import functional_call

KRON_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
DIAG_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
SUPPORTED_TEXT = ("Kronecker-factored: Linear, Conv1d, Conv2d (groups=1, zero padding), Embedding; diagonal: "
                  "LayerNorm, GroupNorm, BatchNorm (eval mode)")


class Block:
    """A group of parameters with one curvature structure (see the module docstring).

    Attributes: name (for messages), kind ('kron' or 'diag'), index (flat positions: [p, q] for
    'kron', [p] for 'diag'), p, q, left_diag (True when L is diagonal, stored as a vector)."""

    def __init__(self, name: str, kind: str, index: Tensor, left_diag: bool = False):
        self.name, self.kind, self.index, self.left_diag = name, kind, index, left_diag
        self.p = index.shape[0]
        self.q = index.shape[1] if kind == "kron" else 1

    @property
    def numel(self) -> int:
        return self.index.numel()

    def __repr__(self) -> str:
        shape = f"{self.p}x{self.q}" if self.kind == "kron" else f"{self.p}"
        return f"Block({self.name!r}, {self.kind}, {shape})"


class KronRows:
    """One batch's contribution to a Kronecker block's factors.

    The gradient factor G (summed over rows) gets ``g_rows`` [*, g_dim]; the activation factor A
    (averaged: its sum is divided by the total ``n`` over all batches) gets the rows of every
    tensor of ``a_parts`` (an iterable of [*, a_dim] row blocks, made one at a time: a
    convolution's patches come chunk by chunk, see :meth:`_Conv._patch_parts`) with a column of
    ones appended when ``a_bias`` (the bias column), or ``a_counts`` [a_dim] on its diagonal
    (Embedding: token counts), or, when both are None, ``n`` on its one entry (a bias block of its
    own: A = [[1]]).

    ``a_order`` (or None: the identity) says that the parts' columns come in another order than
    the block's: the update U of the parts (bias last) lands on A as A[j, k] += U[a_order[j],
    a_order[k]] (conv patches built channel-last, see :meth:`_Conv._patch_rows`). Blocks of one
    layer may share one ``g_rows`` tensor (a separate bias block has its weight's G): the
    accumulator computes its update once."""

    def __init__(self, g_rows: Tensor, n: int, a_parts=None, a_bias: bool = False,
                 a_counts: Tensor | None = None, a_order: Tensor | None = None):
        self.g_rows, self.n, self.a_parts, self.a_bias, self.a_counts = g_rows, n, a_parts, a_bias, a_counts
        self.a_order = a_order


class Layer:
    """One module whose direct trainable parameters are covered, its blocks and what a forward
    recorded, per call of the module: ``inputs`` (the first input, detached, or None when it is
    not a tensor) and ``outs`` (the output tensors in the graph). The per-batch methods take the
    output gradients ``gs`` of m directions as a list, one [m, *out.shape] per call."""

    def __init__(self, name: str, module: nn.Module, params: dict[str, tuple[int, tuple, int]],
                 bias_block: str, sharing: str):
        self.name, self.module, self.sharing = name, module, sharing
        self.params = params  # local name -> (flat offset, shape, numel)
        self.inputs: list[Tensor | None] = []
        self.outs: list[Tensor] = []
        self.blocks = self._make_blocks(bias_block)

    # ---- structure ------------------------------------------------------------------------------
    def _index(self, local: str) -> Tensor:
        off, shape, n = self.params[local]
        return torch.arange(off, off + n).view(shape)

    def _make_blocks(self, bias_block: str) -> list[Block]:
        return [Block(f"{self.name}.{k}" if self.name else k, "diag", self._index(k).reshape(-1)) for k in self.params]

    # ---- per batch ------------------------------------------------------------------------------
    def record(self, inp: tuple, out: Tensor) -> Tensor:
        """Record one call's input and output; returns the output the forward goes on with (the
        recorded one: see :meth:`_Conv.record`)."""
        self.inputs.append(inp[0].detach() if inp and torch.is_tensor(inp[0]) else None)
        self.outs.append(out)
        return out

    def clear(self) -> None:
        self.inputs, self.outs = [], []

    def keep(self, calls: list[bool]) -> None:
        """Forget the recorded calls whose entry in ``calls`` is False."""
        self.inputs = [a for a, k in zip(self.inputs, calls) if k]
        self.outs = [o for o, k in zip(self.outs, calls) if k]

    def batch_rows(self, strict: bool = True) -> int | None:
        """The number N of examples every recorded call ran on (the first dimension of its input),
        or None when a call's input is not a tensor of rows; ValueError when the calls disagree
        (their per-example Jacobians could not be added), or with ``strict=False`` the largest
        (an estimate for the memory budget, made before discarded calls are dropped)."""
        if not self.inputs or any(a is None or a.dim() == 0 for a in self.inputs):
            return None
        sizes = {a.shape[0] for a in self.inputs}
        if len(sizes) > 1:
            if not strict:
                return max(sizes)
            raise ValueError(f"layer {self.name!r} ({type(self.module).__name__}) is called on inputs of "
                             f"{sorted(sizes)} rows in one forward; Laplace needs every call of a covered layer "
                             "to run on the batch's N examples (freeze it, requires_grad=False, if it is not)")
        return sizes.pop()

    def jacobians(self, gs: list[Tensor]) -> list:
        """Per block the per-example Jacobians of the m directions whose output gradients are
        ``gs`` (per call [m, *out.shape]), summed over the calls: ('factored', U [m, N, p],
        V [N, q]) meaning U (x) V, or ('matrix', M [m, N, p, q]) for Kronecker blocks; ('rows',
        R [m, N, p]) for diagonal blocks."""
        self._example_rows(gs)
        params = {k: getattr(self.module, k) for k in self.params}
        rows = None
        for a, g in zip(self.inputs, gs):
            call = _per_example_grads(self.module, params, a, g)
            rows = call if rows is None else [r + c for r, c in zip(rows, call)]
        return [("rows", r) for r in rows]

    def _example_rows(self, gs: list[Tensor]) -> int:
        """N, the batch rows every call ran on (ValueError otherwise: no per-example gradients)."""
        N = self.batch_rows()
        if N is None or any(g.shape[1] != N for g in gs):
            # e.g. a parametrization (weight_norm): it computes a weight every example shares
            raise ValueError(f"layer {self.name!r} ({type(self.module).__name__}) is not called on the batch's "
                             "examples (its first input is not a tensor of N rows), so its parameters have no "
                             "per-example gradients; freeze them (requires_grad=False) or use "
                             "subset_of_weights='last_layer'")
        return N

    def jacobian_numel(self) -> int:
        """Numbers per direction of the parts :meth:`jacobians` builds beyond the output gradients
        (for fit's memory budget): per-example rows [N, p] of every parameter (0 when the calls'
        inputs are not rows: :meth:`jacobians` refuses them)."""
        N = self.batch_rows(strict=False)
        return 0 if N is None else N * sum(n for _, _, n in self.params.values())

    def kron_rows(self, gs: list[Tensor]) -> list["KronRows"]:
        """Per Kronecker block, what one batch adds to its factors (see :class:`KronRows`)."""
        return []


def _grad_rows(gg: Tensor) -> Tensor:
    """The gradient factor's rows [m * N * T, out] of output gradients gg [m, N, T, out]. A
    convolution's gg is a view of [m, N, out, T] (channel first): its rows are then the transpose
    of the [out, m * N * T] copy, which moves runs of T contiguous numbers where the rows' own copy
    moves single numbers (CPU: a quarter of the time), and which the GEMM of the factor reads
    transposed at no cost."""
    if gg.stride(-1) != 1 and gg.stride(-2) == 1:
        return gg.permute(3, 0, 1, 2).reshape(gg.shape[-1], -1).t()
    return gg.reshape(-1, gg.shape[-1])


def _join(tensors: list[Tensor], dim: int) -> Tensor:
    """The calls' tensors joined along ``dim`` (one call's as it is: no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _per_example_grads(module: nn.Module, params: dict[str, Tensor], a: Tensor, g: Tensor) -> list[Tensor]:
    """Gradients [m, N, numel] of <g[j, n], module(a[n])> for every direction j and example n, one
    per parameter, by vmapping the module's own forward on single examples (the module must treat
    examples independently, e.g. BatchNorm in eval mode)."""
    detached = {k: v.detach() for k, v in params.items()}
    # the module's other parameters (a child's weights, when the module has its own too) are
    # swapped in detached as well: left live, they tied every batch's result to the model's graph
    # (curvature that required grad, a backward through the model in prior tuning)
    others = {k: v.detach() for k, v in module.named_parameters() if k not in params}

    def one(p, x, gj):
        out = functional_call(module, {**others, **p}, (x.unsqueeze(0),))
        return (out.squeeze(0) * gj).sum()

    per = vmap(vmap(grad(one), in_dims=(None, 0, 0)), in_dims=(None, None, 0))(detached, a, g)
    return [per[k].reshape(g.shape[0], g.shape[1], -1) for k in params]


class _Matrix(Layer):
    """Linear and convolutions: Theta = [W | b] (or W and b apart), L = G, R = A."""

    def _make_blocks(self, bias_block: str) -> list[Block]:
        self.has_bias = "bias" in self.params
        self.has_weight = "weight" in self.params
        prefix = f"{self.name}." if self.name else ""
        if not self.has_weight:  # a frozen weight: the bias alone, L = G, R = [[1]]
            self.joint = False
            b = self._index("bias")
            return [Block(prefix + "bias", "kron", b.reshape(b.numel(), 1))]
        out = self.params["weight"][1][0]
        w = self._index("weight").reshape(out, -1)
        if not self.has_bias:
            self.joint = False
            return [Block(prefix + "weight", "kron", w)]
        b = self._index("bias").reshape(out, 1)
        self.joint = bias_block == "joint"
        if self.joint:
            return [Block(prefix + "weight+bias", "kron", torch.cat([w, b], 1))]
        return [Block(prefix + "weight", "kron", w), Block(prefix + "bias", "kron", b)]

    def _inputs(self) -> Tensor:
        """The inputs as [N, T, in]: the T positions sharing the weight over all calls."""
        return _join([self._call_inputs(a) for a in self.inputs], 1)

    def _grads(self, gs: list[Tensor]) -> Tensor:
        """Output gradients (per call [m, *out.shape]) -> [m, N, T, out], the calls' positions in
        the order of :meth:`_inputs`."""
        return _join([self._call_grads(g) for g in gs], 2)

    def _call_inputs(self, a: Tensor) -> Tensor:
        """One call's input as [N, T_call, in]."""
        raise NotImplementedError

    def _call_grads(self, g: Tensor) -> Tensor:
        """One call's output gradients [m, *out.shape] -> [m, N, T_call, out]."""
        raise NotImplementedError

    def _patch_parts(self, reduce: bool) -> tuple[list[Tensor], Tensor | None]:
        """The activation factor's rows: ([rows [N * T, in]], None) (with ``reduce``, the mean over
        the T positions: [N, in]); a convolution's come in chunks and another column order."""
        a = self._inputs()
        if reduce:
            a = a.mean(1, keepdim=True)
        return [a.reshape(-1, a.shape[-1])], None

    def _bias_part(self, gg: Tensor):
        """The Jacobian of a bias of its own: sum_t g_t ([m, N, out, 1])."""
        if gg.shape[2] == 1:
            return ("factored", gg[:, :, 0], gg.new_ones(gg.shape[1], 1))
        return ("matrix", gg.sum(2).unsqueeze(-1))

    def jacobian_numel(self) -> int:
        # T positions sharing the weight (the output holds N x T x out numbers, a Linear's and a
        # convolution's alike): one position is factored (U, the output gradients, and V, the
        # inputs); several build the matrix [N, out, in (+ 1)] per direction, Layer's count
        n_out = self.params["weight"][1][0] if self.has_weight else self.params["bias"][2]
        one = len(self.outs) == 1 and self.outs[0].numel() == self.outs[0].shape[0] * n_out
        return 0 if one else super().jacobian_numel()

    def jacobians(self, gs):
        # The exact per-example Jacobian sum_t g_t a_t^T, whatever kfac_approx says: 'reduce' only
        # changes how the Kronecker FACTORS are formed (kron_rows); the diagonal and full
        # structures and the GLM predictive J P^-1 J^T need the true Jacobian.
        gg = self._grads(gs)
        if not self.has_weight:
            return [self._bias_part(gg)]
        a = self._inputs()
        av = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], -1) if self.joint else a
        if a.shape[1] == 1:
            parts = [("factored", gg[:, :, 0], av[:, 0])]
        else:
            parts = [("matrix", torch.einsum("mnto,nti->mnoi", gg, av))]
        if self.has_bias and not self.joint:
            parts.append(self._bias_part(gg))
        return parts

    def entry_jacobians(self, gs, takes: list[tuple[int, Tensor]]) -> list[Tensor]:
        """Per (block j, entries ``take`` of its flat [p * q] order) the per-example Jacobian
        columns [m, N, k] of those entries alone: sum_t g[.., t, o] a[.., t, i] for entry (o, i),
        without the block's [m, N, p, q] matrix (a subnetwork over a few weights of a wide
        convolution: m N T k numbers instead of m N out in)."""
        # the output and input channels first: each entry's gathers are contiguous rows
        g0 = self._grads(gs).permute(3, 0, 1, 2).contiguous()  # [out, m, N, T]
        a0 = None
        out, biggest = [], 0
        for j, take in takes:
            q = self.blocks[j].q
            o, i = take // q, take % q
            g_sel = g0.index_select(0, o)  # [k, m, N, T]
            biggest = max(biggest, 2 * g_sel.numel())  # (and the product)
            if not self.has_weight or j == 1:  # a bias block of its own (_make_blocks: [bias] or [weight, bias])
                out.append(g_sel.sum(-1).permute(1, 2, 0))
                continue
            if a0 is None:
                a = self._inputs()  # [N, T, in]
                av = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], -1) if self.joint else a
                a0 = av.permute(2, 0, 1).contiguous()  # [in, N, T]
            out.append((g_sel * a0.index_select(0, i).unsqueeze(1)).sum(-1).permute(1, 2, 0))  # [m, N, k]
        # the temporaries (for the GLM predictive's chunk budget): the permuted copies and the gathers
        self.entry_bytes = (g0.numel() + (0 if a0 is None else a0.numel()) + biggest) * g0.element_size()
        return out

    def entry_numel(self, k: int) -> int:
        """Numbers per direction that :meth:`entry_jacobians` builds for k entries, N T k (as
        :meth:`jacobian_numel`, beyond the output gradients and the inputs' rows, which both
        paths read)."""
        N = self.batch_rows(strict=False)
        if N is None:
            return 0
        n_out = self.params["weight"][1][0] if self.has_weight else self.params["bias"][2]
        T = sum(o.numel() // max(1, o.shape[0] * n_out) for o in self.outs)
        return 2 * N * T * k  # (the gathered output gradients and their product with the inputs)

    # feature_reduction='pick_first' / 'pick_last' (laplace-torch's option, a last layer over [N, T, in]
    # whose model reads one position of its outputs): that position's index, set by Laplace; None: all
    pick: int | None = None

    def _picked(self, gg: Tensor) -> Tensor:
        """gg [m, N, T, out] at the picked position only ([m, N, 1, out]), after checking that the
        model's outputs do not depend on the other positions (their output gradients are all zero)."""
        p = self.pick % gg.shape[2]
        if bool(gg[:, :, :p].any()) or bool(gg[:, :, p + 1:].any()):
            which = "first" if self.pick == 0 else "last"
            raise ValueError(f"feature_reduction='pick_{which}' says the model reads only the {which} of the "
                             f"{gg.shape[2]} positions of layer {self.name!r}'s outputs, but the model's outputs depend "
                             "on other positions too (their output gradients are not zero); pass the reduction the "
                             "model does ('pick_first', 'pick_last', 'average') or None")
        return gg[:, :, p:p + 1]

    def kron_rows(self, gs):
        gg = self._grads(gs)
        pick = self.pick is not None and gg.shape[2] > 1
        if pick:
            gg = self._picked(gg)
        reduce = self.sharing == "reduce" and gg.shape[2] > 1
        if reduce:
            gg = gg.sum(2, keepdim=True)
        g_rows = _grad_rows(gg)
        if not self.has_weight:
            return [KronRows(g_rows, g_rows.shape[0])]  # A = [[1]]: the bias alone
        if pick:  # the picked position's inputs: the features laplace-torch's reduction hands the last layer
            parts, order = [self._inputs()[:, self.pick]], None
        else:
            parts, order = self._patch_parts(reduce)
        n = gg.shape[1] * gg.shape[2]  # the activation rows: examples (x positions unless reduced)
        if order is not None and self.joint:
            order = torch.cat([order, order.new_tensor([order.numel()])])  # the bias stays last
        rows = [KronRows(g_rows, n, parts, a_bias=self.joint, a_order=order)]
        if self.has_bias and not self.joint:
            rows.append(KronRows(g_rows, n))  # A = [[1]]: the bias alone
        return rows


class _Linear(_Matrix):
    def _call_inputs(self, a):
        return a.reshape(a.shape[0], -1, a.shape[-1])

    def _call_grads(self, g):
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


PATCH_BYTES = 64 << 20  # a convolution's activation rows are built at most this many bytes at a time


class _Conv(_Matrix):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m = self.module
        d = 1 if isinstance(m, nn.Conv1d) else 2
        self.dims = d
        if m.groups != 1 or m.padding_mode != "zeros":
            raise _Unsupported(f"{type(m).__name__} with groups={m.groups}, padding_mode={m.padding_mode!r}")
        if isinstance(m.padding, str):
            if m.padding == "valid":
                self.pad = (0,) * d
            else:  # 'same' (stride 1): symmetric padding when the total is even
                total = [dl * (k - 1) for dl, k in zip(m.dilation, m.kernel_size)]
                if any(t % 2 for t in total):
                    raise _Unsupported(f"{type(m).__name__}(padding='same') with an odd total padding")
                self.pad = tuple(t // 2 for t in total)
        else:
            self.pad = tuple(m.padding)

    def record(self, inp, out):
        """As :meth:`Layer.record`; when the input needs a gradient, the output goes on (and is
        recorded) through a node of its own, :class:`_ConvInputGrad`, cut from the convolution's
        graph: under vmap, ``convolution_backward`` expands the saved input to the batch of
        directions and takes a path 3-4x slower than the transposed convolution of all directions
        folded into the batch that the node runs (CPU, Laplace's digits CNN), and it is never asked
        for the weight and bias gradients here."""
        out = super().record(inp, out)
        x = inp[0] if inp else None
        # a weight computed in the forward (torch.nn.utils.parametrize) may come from covered
        # parameters of its own: the conv's graph stays, or their output would be cut off
        plain = not parametrize.is_parametrized(self.module, "weight")  # (reading .weight would run it)
        if plain and torch.is_tensor(x) and x.requires_grad and x.dim() == self.dims + 2:
            self.outs[-1] = _ConvInputGrad.apply(x, out.detach(), self)
        return self.outs[-1]

    def input_grad(self, g: Tensor, in_size: tuple) -> Tensor:
        """The gradient [N, C_in, *in_size] of <g, conv(x)> with respect to the input x, from output
        gradients g [N, C_out, *out_size]: the transposed convolution with the weight (its
        output_padding restores the rows and columns a stride > 1 dropped)."""
        m = self.module
        w = m.weight.detach()
        full = [(o - 1) * s - 2 * p + dl * (k - 1) + 1
                for o, s, p, dl, k in zip(g.shape[2:], m.stride, self.pad, m.dilation, w.shape[2:])]
        extra = [i - f for i, f in zip(in_size, full)]
        conv_t = F.conv_transpose1d if self.dims == 1 else F.conv_transpose2d
        return conv_t(g, w, None, m.stride, self.pad, extra, 1, m.dilation)

    def _call_inputs(self, a):
        m = self.module
        if a.dim() != self.dims + 2:
            raise ValueError(f"layer {self.name!r}: Laplace needs batched inputs [N, C, ...] for "
                             f"{type(m).__name__}, got {tuple(a.shape)}")
        if self.dims == 1:
            cols = F.unfold(a.unsqueeze(-1), (m.kernel_size[0], 1), dilation=(m.dilation[0], 1),
                            padding=(self.pad[0], 0), stride=(m.stride[0], 1))
        else:
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=self.pad, stride=m.stride)
        return cols.transpose(1, 2)  # [N, L, C * k]

    def _call_grads(self, g):
        return g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(2, 3)  # [m, N, L, out]

    def _patch_parts(self, reduce: bool):
        """The patches in chunks of examples whose rows stay under PATCH_BYTES (a generator: one
        chunk of one call lives at a time, so the batch's whole im2col matrix [N * L, k * C] is
        never formed; with ``reduce`` each chunk's mean over the positions of all calls), and
        their column order (see :meth:`_patch_rows`)."""
        m = self.module
        if any(a.dim() != self.dims + 2 for a in self.inputs):
            return super()._patch_parts(reduce)  # _call_inputs' error message
        N, a0 = self.batch_rows(), self.inputs[0]
        # one example's patches per call: L output positions (the recorded output's) x C_in x kernel
        L = [math.prod(o.shape[2:]) for o in self.outs]
        per_example = max(L) * a0.shape[1] * math.prod(m.kernel_size) * a0.element_size()
        chunks = min(N, max(1, -(-N * per_example // PATCH_BYTES)))

        def parts():
            if reduce:  # the mean over all calls' positions, example chunk by example chunk
                for rows in zip(*(a.tensor_split(chunks) for a in self.inputs)):
                    yield sum(self._patch_rows(r).sum(1) for r in rows) / sum(L)
                return
            for a in self.inputs:
                for chunk in a.tensor_split(chunks):
                    r = self._patch_rows(chunk)
                    yield r.reshape(-1, r.shape[-1])
                    del r

        return parts(), _patch_order(a0.shape[1], math.prod(m.kernel_size), a0.device)

    def _patch_rows(self, a: Tensor) -> Tensor:
        """The patches [N, L, k * C] of inputs a [N, C, ...] with the input channel fastest (column
        (kernel offset t, channel c) at t * C + c; the block's order, F.unfold's, is c * k + t:
        :func:`_patch_order`). L >= 1: the layer's own forward produced its output.

        Built by ONE copy from a strided view of the channel-last (padded) input, whose runs of
        kernel-width x C elements are contiguous, instead of F.unfold (im2col, a loop over the
        examples) followed by the transposing copy of its [N, C * k, L] result to rows: the
        activation factor's update is computed in this order and its rows and columns put back
        in the block's order (a gather of the small [D, D] update, see KronRows.a_order)."""
        m = self.module
        if self.dims == 1:
            a = a.unsqueeze(-1)
            ks, dil, st, pad = (m.kernel_size[0], 1), (m.dilation[0], 1), (m.stride[0], 1), (self.pad[0], 0)
        else:
            ks, dil, st, pad = m.kernel_size, m.dilation, m.stride, self.pad
        N, C, H, W = a.shape
        Hp, Wp = H + 2 * pad[0], W + 2 * pad[1]
        Ho, Wo = (Hp - dil[0] * (ks[0] - 1) - 1) // st[0] + 1, (Wp - dil[1] * (ks[1] - 1) - 1) // st[1] + 1
        if pad[0] or pad[1]:
            xl = a.new_zeros(N, Hp, Wp, C)
            xl[:, pad[0]:pad[0] + H, pad[1]:pad[1] + W].copy_(a.permute(0, 2, 3, 1))
        else:
            xl = a.permute(0, 2, 3, 1).contiguous()
        s0, s1, s2 = Hp * Wp * C, Wp * C, C  # xl's strides (n, h, w); the channel's is 1
        view = xl.as_strided((N, Ho, Wo, ks[0], ks[1], C),
                             (s0, st[0] * s1, st[1] * s2, dil[0] * s1, dil[1] * s2, 1), xl.storage_offset())
        return view.reshape(N, Ho * Wo, ks[0] * ks[1] * C)


def _patch_order(C: int, kk: int, device) -> Tensor | None:
    """The column order of channel-last patches (C channels x kk kernel offsets) against the
    block's (F.unfold's): the block's column c * kk + t is the patches' column t * C + c; None
    when they agree (one channel or a 1-element kernel)."""
    if C == 1 or kk == 1:
        return None
    return torch.arange(kk * C, device=device).view(kk, C).t().reshape(-1)


class _ConvInputGrad(torch.autograd.Function):
    """y = conv(x) as a node of its own (see :meth:`_Conv.record`): the forward hands on the
    convolution's detached output, the backward gives x the transposed convolution of y's gradient
    (:meth:`_Conv.input_grad`) and the weight nothing (Laplace differentiates with respect to the
    layers' outputs only)."""

    @staticmethod
    def forward(ctx, x, out, layer):
        ctx.layer, ctx.in_size = layer, tuple(x.shape[2:])
        return out

    @staticmethod
    def backward(ctx, g):
        return ctx.layer.input_grad(g, ctx.in_size), None, None


class _Embedding(Layer):
    """Theta = W [V, D]: L = diag(token counts), R = G."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.module.max_norm is not None:
            raise _Unsupported("Embedding(max_norm=...) (it renormalises its weight in place)")

    def _make_blocks(self, bias_block):
        prefix = f"{self.name}." if self.name else ""
        return [Block(prefix + "weight", "kron", self._index("weight"), left_diag=True)]

    def _onehot_parts(self, gs):
        N = self._example_rows(gs)
        idx = _join([a.reshape(N, -1) for a in self.inputs], 1)  # [N, T] over all calls
        gg = _join([g.reshape(g.shape[0], N, -1, g.shape[-1]) for g in gs], 2)  # [m, N, T, D]
        keep = torch.ones_like(idx, dtype=torch.bool)
        if self.module.padding_idx is not None:
            keep = idx != self.module.padding_idx
        if self.sharing == "reduce" and idx.shape[1] > 1:
            return idx, gg, keep, True
        return idx, gg, keep, False

    def jacobians(self, gs):
        idx, gg, keep, _ = self._onehot_parts(gs)
        V = self.module.num_embeddings
        m, N, T, D = gg.shape
        M = gg.new_zeros(m, N, V, D)
        src = gg * keep.to(gg.dtype)[None, :, :, None]
        M.scatter_add_(2, idx[None, :, :, None].expand(m, N, T, D), src)
        return [("matrix", M)]

    def entry_jacobians(self, gs, takes: list[tuple[int, Tensor]]) -> list[Tensor]:
        """(see :meth:`_Matrix.entry_jacobians`) entry (v, d): sum_t [idx_t = v] g[.., t, d]
        over the non-padding tokens, without the [m, N, V, D] matrix."""
        idx, gg, keep, _ = self._onehot_parts(gs)
        D = gg.shape[-1]
        g0 = gg.permute(3, 0, 1, 2).contiguous()  # [D, m, N, T]
        out, biggest = [], 0
        for _, take in takes:
            v, d = take // D, take % D
            hit = ((idx.unsqueeze(0) == v[:, None, None]) & keep.unsqueeze(0)).to(gg.dtype)  # [k, N, T]
            g_sel = g0.index_select(0, d)
            biggest = max(biggest, 2 * g_sel.numel() + hit.numel())
            out.append((g_sel * hit.unsqueeze(1)).sum(-1).permute(1, 2, 0))  # [m, N, k]
        self.entry_bytes = (g0.numel() + biggest) * g0.element_size()  # (see _Matrix.entry_jacobians)
        return out

    def entry_numel(self, k: int) -> int:
        N = self.batch_rows(strict=False)
        if N is None:
            return 0
        T = sum(a.numel() // max(1, a.shape[0]) for a in self.inputs)
        return 3 * N * T * k  # (the gathered output gradients, the token matches, their product)

    def kron_rows(self, gs):
        idx, gg, keep, reduce = self._onehot_parts(gs)
        V = self.module.num_embeddings
        w = keep.to(gg.dtype)
        if reduce:  # a_n = mean_t onehot(idx_t): a dense [V, V] factor, no diagonal L
            raise ValueError(f"layer {self.name!r}: nn.Embedding with kfac_approx='reduce' and {idx.shape[1]} tokens "
                             "per example is not supported (the averaged one-hot inputs give a dense [V, V] "
                             "factor); use kfac_approx='expand', or hessian_structure='diag' / 'full'")
        counts = torch.zeros(V, dtype=gg.dtype, device=gg.device).index_add_(0, idx.reshape(-1), w.reshape(-1))
        g_rows = (gg * w[None, :, :, None]).reshape(-1, gg.shape[-1])
        # Padding tokens are no rows at all (their weight gradient is zero by definition): they
        # leave both factors, so A = diag(counts) / (number of non-padding tokens). Counting them
        # in A's normalisation while dropping them from G shrank the block by the padding fraction
        # (KFAC of one token per example, all the same token, is then no longer exact).
        return [KronRows(g_rows, int(keep.sum()), a_counts=counts)]


class _Unsupported(Exception):
    """Raised while building a layer the Kronecker path cannot represent."""


def build_layers(model: nn.Module, layout, selected: set[str], *, bias_block: str, sharing: str,
                 unsupported: str) -> list[Layer]:
    """The layers covering the ``selected`` flat-layout parameter names (each exactly once), in
    model order; ValueError listing the supported layers when a parameter's module is not one of
    them and ``unsupported='error'``; with 'diag' such a module gets diagonal blocks and a warning
    (a Kronecker posterior's approximation), with 'generic' the same blocks silently (for the
    structures that use its per-example gradients exactly: diag, full, lowrank)."""
    for mname, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            # In eval mode it still normalises with the batch's own statistics: every output
            # depends on the other rows of the batch, and the per-example likelihood (and every
            # per-example Jacobian) Laplace is built on does not exist.
            raise ValueError(f"module {mname or '<root>'!r} ({type(module).__name__}(track_running_stats=False)) "
                             "normalises with batch statistics even in eval mode, so the examples are not "
                             "independent; Laplace needs BatchNorm with running statistics (track_running_stats=True)")
    aliases: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(pname)
    for names in aliases.values():
        if len(names) > 1 and any(n in selected for n in names):
            # the flat layout lists a tied parameter once; a block per module would see only one
            # of its uses and miss the other's curvature (silently wrong)
            raise ValueError(f"parameter {names[0]!r} is shared by {names} (tied weights): Laplace needs every "
                             "covered parameter to belong to one module; untie them, or freeze them "
                             "(requires_grad=False) / use subset_of_weights='last_layer'")
    offsets = {n: (o, s, math.prod(s)) for n, o, s in zip(layout.names, layout.offsets, layout.shapes)}
    layers, covered, fallback = [], set(), []
    for mname, module in model.named_modules():
        own = {k: offsets[f"{mname}.{k}" if mname else k] for k, p in module.named_parameters(recurse=False)
               if (f"{mname}.{k}" if mname else k) in selected}
        if not own:
            continue
        cls = None
        if isinstance(module, nn.Linear):
            cls = _Linear
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            cls = _Conv
        elif isinstance(module, nn.Embedding):
            cls = _Embedding
        elif isinstance(module, DIAG_MODULES):
            cls = Layer
        layer = None
        if cls is not None and (cls is Layer or set(own) <= {"weight", "bias"}):
            try:
                layer = cls(mname, module, own, bias_block, sharing)
            except _Unsupported as e:
                why = str(e)
            else:
                why = ""
        else:
            why = f"{type(module).__name__}"
        if layer is None:
            if unsupported == "error":
                raise ValueError(f"module {mname or '<root>'!r} ({why}) has trainable parameters Laplace cannot "
                                 f"factor; supported: {SUPPORTED_TEXT}. Pass unsupported='diag' to give its "
                                 "parameters a diagonal block (per-example gradients), or freeze them "
                                 "(requires_grad=False) / use subset_of_weights='last_layer'")
            fallback.append(mname or type(module).__name__)
            layer = Layer(mname, module, own, bias_block, sharing)
        layers.append(layer)
        covered |= {f"{mname}.{k}" if mname else k for k in own}
    missing = selected - covered
    if missing:
        raise ValueError(f"parameters {sorted(missing)} were not found as direct parameters of any module")
    if fallback and unsupported == "diag":
        warn_user(f"Laplace: diagonal blocks (unsupported='diag') for {fallback}; supported for "
                  f"Kronecker factors: {SUPPORTED_TEXT}")
    return layers
