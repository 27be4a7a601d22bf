"""The curvature Laplace accumulates over the training data, one structure per class, all fed by
one pass per batch (:func:`batch_pass`): a forward with hooks recording every covered layer's input
and output, then ONE batched backward (``torch.func.vmap``) of the m output-space directions of
:func:`pyfastbayes.laplace._likelihood.directions` to every layer's output (several, each over a
chunk of the directions, when their output gradients would pass ``laplace._FIT_BYTES``: the sums
over directions are separable, the activations are added with the first chunk). No per-input
Jacobian over all parameters is ever formed for the Kronecker structure.

- :class:`KronCurvature`: per Kronecker block the gradient factor G = sum g g^T and the activation
  factor A = (1/n) sum a a^T (bias column appended in place by ``pyfastbayes.ops.kfac_factor_``,
  never materialised; batches of fewer rows than A's width buffered up to it, added when the
  buffer is full or the factors are read), per diagonal block the diagonal.
- :class:`DiagCurvature`: the exact diagonal of the GGN / Fisher (squared per-example Jacobians,
  in factored form for unshared layers: no Jacobian tensor).
- :class:`FullCurvature`: the full [P, P] matrix from per-example Jacobian rows, in row chunks.

Every accumulator has ``tensors()`` (for the one all-reduce under torch.distributed and the
finiteness check), ``state()`` / ``load(state)``.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .. import ops
from ._layers import Block, Layer

_ROW_BUFFER_BYTES = 64 << 20  # KronCurvature's buffered activation rows of one block: at most max(this, one batch)
_CHUNK_ELEMENTS = 1 << 24  # per-example Jacobian rows are built at most this many numbers at a time


class Recorder:
    """Forward hooks on the covered layers' modules for the duration of a ``with`` block: each
    call records (input, output) on its :class:`Layer` (a layer called several times, e.g. an
    unrolled recurrent cell or a siamese branch, records every call) and hands a clone of the
    output on, so an in-place operation downstream (``ReLU(inplace=True)``) cannot change the
    recorded tensor."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers

    def __enter__(self):
        self.handles = []
        for layer in self.layers:
            layer.clear()
            self.handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    @staticmethod
    def _hook(layer: Layer):
        def hook(module, inp, out):
            if not torch.is_tensor(out):
                raise RuntimeError(f"layer {layer.name!r} ({type(module).__name__}) returns {type(out).__name__}, not a "
                                   "tensor: the curvature is formed per module from the tensor its call returns "
                                   "(nn.GRU / nn.LSTM return tuples); freeze its parameters (requires_grad=False) "
                                   "or use subset_of_weights='last_layer'")
            if not out.requires_grad:  # a call under torch.no_grad() (a stop-gradient branch): no curvature
                return None
            return layer.record(inp, out).clone()
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def backprop(f: Tensor, layers: list[Layer], R: Tensor, keep_graph: bool = False) -> list[list[Tensor] | None]:
    """Per layer the gradients [m, *out.shape] of <R[j], f> with respect to the output of each of
    its recorded calls (a list; a call the outputs do not depend on is dropped from the layer's
    record; None when they depend on none of them), for the m directions R [m, N, C] in one
    batched backward (a loop when an operation has no batching rule). ``keep_graph``: the graph
    stays for another call (the next chunk of directions); otherwise the loop's last backward may
    free it."""
    for layer in layers:
        if not layer.outs:
            raise RuntimeError(f"layer {layer.name!r} did not take part in this batch's forward pass with gradients "
                               "(not called, or called under torch.no_grad() only); every covered layer must take "
                               "part in every batch: freeze its parameters (requires_grad=False) otherwise")
    outs = [o for layer in layers for o in layer.outs]
    unused = []

    def all_directions(r):  # called once, with the m directions as vmap's batch
        gs = torch.autograd.grad(f, outs, grad_outputs=r, retain_graph=True, allow_unused=True)
        unused[:] = [g is None for g in gs]
        return tuple(r.new_zeros(()) if g is None else g for g in gs)  # vmap returns tensors only

    grads = None
    try:
        # torch.func.vmap folds the directions into the batch of every backward operation;
        # autograd.grad(is_grads_batched=True) runs the legacy vmap instead, which loops over the
        # directions at every convolution (no rule for convolution_backward; see _Conv.record)
        grads = [None if u else g for u, g in zip(unused, torch.func.vmap(all_directions)(R))]
    except RuntimeError as e:
        if "vmap" not in str(e) and "batching rule" not in str(e):
            raise
    if grads is None:
        per = [[] for _ in outs]
        for j in range(R.shape[0]):
            gs = torch.autograd.grad(f, outs, grad_outputs=R[j], retain_graph=keep_graph or j + 1 < R.shape[0],
                                     allow_unused=True)
            for acc, g in zip(per, gs):
                acc.append(g)
        grads = [None if g[0] is None else torch.stack(g) for g in per]
    result = _per_layer(layers, grads)
    for layer in layers:  # (after the discarded calls are dropped: a discarded probe on other rows is harmless)
        layer.batch_rows()  # ValueError when its calls ran on different numbers of examples
    return result


def _per_layer(layers: list[Layer], grads: list) -> list[list[Tensor] | None]:
    """The flat per-output gradients regrouped by layer (see :func:`backprop`). A call the outputs
    do not depend on (its output discarded) is forgotten by its layer: its zero gradients would
    still put its inputs into the Kronecker activation factor."""
    result, i = [], 0
    for layer in layers:
        gs, i = grads[i:i + len(layer.outs)], i + len(layer.outs)
        if all(g is None for g in gs):
            result.append(None)
            continue
        used = [g is not None for g in gs]
        if not all(used):
            layer.keep(used)
        result.append([g for g in gs if g is not None])
    return result


def block_parts(layers: list[Layer], grads: list):
    """(block, part) for every block of every layer: Jacobian parts (see :meth:`Layer.jacobians`)."""
    for layer, g in zip(layers, grads):
        yield from zip(layer.blocks, layer.jacobians(_needed(g, layer)))


def _needed(g, layer: Layer) -> list[Tensor]:
    if g is None:
        raise RuntimeError(f"this batch's outputs do not depend on layer {layer.name!r} (its calls' outputs are "
                           "discarded): every covered layer must take part in every batch; freeze its parameters "
                           "(requires_grad=False) otherwise")
    return g


def part_rows(part, dtype) -> Tensor:
    """A Jacobian part as explicit rows [m, N, numel] (flattened in the block's index order)."""
    kind, *t = part
    if kind == "factored":
        U, V = t
        return (U.unsqueeze(-1) * V.unsqueeze(0).unsqueeze(2)).reshape(U.shape[0], U.shape[1], -1).to(dtype)
    if kind == "matrix":
        M = t[0]
        return M.reshape(M.shape[0], M.shape[1], -1).to(dtype)
    return t[0].to(dtype)


def part_sq_sum(part, dtype: torch.dtype) -> Tensor:
    """sum over directions and examples of the squared Jacobian, [numel] in index order, computed
    in ``dtype`` (the accumulator's: float32 for a half model, whose squares would overflow)."""
    kind, *t = part
    t = [x.to(dtype) for x in t]
    if kind == "factored":
        U, V = t
        return (U.square().sum(0).t() @ V.square()).reshape(-1)  # [p, N] @ [N, q]
    if kind == "matrix":
        return t[0].square().sum((0, 1)).reshape(-1)
    return t[0].square().sum((0, 1))


class KronCurvature:
    """Kronecker factors per Kronecker block, diagonals per diagonal block (module docstring)."""

    structure = "kron"

    def __init__(self, blocks: list[Block], dtype: torch.dtype, device):
        self.blocks = blocks
        self.G, self.A, self.n, self.h = {}, {}, {}, {}
        for i, b in enumerate(blocks):
            if b.kind == "diag":
                self.h[i] = torch.zeros(b.numel, dtype=dtype, device=device)
                continue
            g_dim, a_dim = (b.q, b.p) if b.left_diag else (b.p, b.q)
            self.G[i] = torch.zeros(g_dim, g_dim, dtype=dtype, device=device)
            self.A[i] = (torch.zeros(a_dim, dtype=dtype, device=device) if b.left_diag
                         else torch.zeros(a_dim, a_dim, dtype=dtype, device=device))
            self.n[i] = 0
        self._pending = {}  # block -> (row buffer [rows, in], rows filled, bias): see _add_activation_rows

    def add(self, layers: list[Layer], grads: list[Tensor], activations: bool = True) -> None:
        """Add one batch's output gradients of m directions ``grads`` (per layer and call [m, *out.shape])
        to G and, with ``activations``, its inputs to A and its rows to the counts: a batch whose
        directions come in several chunks passes activations=True with the first only (G sums
        over directions, A and the counts are per batch)."""
        i = 0
        for layer, g in zip(layers, grads):
            g = _needed(g, layer)
            if layer.blocks[0].kind == "diag":
                for part in layer.jacobians(g):
                    self.h[i] += part_sq_sum(part, self.h[i].dtype)
                    i += 1
                continue
            layer_rows = layer.kron_rows(g)
            uses = {}
            for rows in layer_rows:
                uses[id(rows.g_rows)] = uses.get(id(rows.g_rows), 0) + 1
            shared = {}  # id(g_rows) -> its G update, for g_rows used by several blocks
            for rows in layer_rows:
                G = self.G[i]
                key = id(rows.g_rows)
                if uses[key] == 1:
                    ops.kfac_factor_(G, rows.g_rows.to(G.dtype), 1.0, False)
                else:
                    # a weight block and its separate bias block: one GEMM, the same update added
                    # to both (0 + u is u exactly, so each G gets the bits of its own in-place call)
                    if key not in shared:
                        shared[key] = ops.kfac_factor_(torch.zeros_like(G), rows.g_rows.to(G.dtype), 1.0, False)
                    G += shared[key]
                if activations:
                    self._add_activation_rows(i, rows)
                    self.n[i] += rows.n
                i += 1

    def _add_activation_rows(self, i: int, rows) -> None:
        """One batch's activation rows (:class:`KronRows`) added to block i's factor sum A.

        Rows of one part that are fewer than the factor's width (a Linear of 512 inputs fed 128
        rows per batch) are copied into a row buffer of the factor's width instead, and the
        buffer's rows go into A by one update when it is full or when the sums are read
        (:meth:`flush`): an update of M < d rows costs a pass over all d^2 entries of A (the
        GEMM's writes and the op's symmetric pass) for M d^2 products, so the CPU fit of the
        digits CNN spent 0.7 ms per batch on its 512-wide factor. The rows are copied (a loader
        may refill its batch tensor in place) and the sums are those of the rows, in another order.
        The buffer holds at most _ROW_BUFFER_BYTES (and at least one batch)."""
        A = self.A[i]
        parts = rows.a_parts
        if (rows.a_counts is None and rows.a_order is None and isinstance(parts, list) and len(parts) == 1
                and A.dim() == 2 and parts[0].shape[0] < parts[0].shape[1]):
            x = parts[0]
            if i not in self._pending:
                cap = max(x.shape[0], min(x.shape[1], _ROW_BUFFER_BYTES // (x.shape[1] * A.element_size())))
                self._pending[i] = (x.new_empty((cap, x.shape[1]), dtype=A.dtype), 0, None)
            buf, filled, _ = self._pending[i]
            if filled + x.shape[0] > buf.shape[0]:
                if filled:
                    ops.kfac_factor_(A, buf[:filled], 1.0, rows.a_bias)
                filled = 0
            if x.shape[0] > buf.shape[0]:  # a batch larger than the buffer (a later, bigger one): added as it is
                ops.kfac_factor_(A, x.to(A.dtype), 1.0, rows.a_bias)
            else:
                buf[filled:filled + x.shape[0]].copy_(x)
                filled += x.shape[0]
            self._pending[i] = (buf, filled, rows.a_bias)
            return
        _add_activations(A, rows)

    def flush(self) -> None:
        """Add the buffered activation rows to their factors (see :meth:`_add_activation_rows`)."""
        for i, (buf, filled, bias) in self._pending.items():
            if filled:
                ops.kfac_factor_(self.A[i], buf[:filled], 1.0, bias)
        self._pending.clear()

    def tensors(self) -> list[Tensor]:
        self.flush()
        return [*self.G.values(), *self.A.values(), *self.h.values()]

    def counts(self) -> list[int]:
        return list(self.n.values())

    def set_counts(self, counts: list[int]) -> None:
        for k, c in zip(list(self.n), counts):
            self.n[k] = int(c)

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """(left, right) factors of Kronecker block i: L [p, p] (or its diagonal [p]) and R [q, q],
        the averaged activation factor divided by its row count."""
        self.flush()
        G, A = self.G[i], self.A[i] / max(self.n[i], 1)
        return (A, G) if self.blocks[i].left_diag else (G, A)


def _add_activations(A: Tensor, rows) -> None:
    """One batch's activation rows (:class:`KronRows`) added to the factor sum A in place."""
    if rows.a_counts is not None:
        A += rows.a_counts.to(A.dtype)
    elif rows.a_parts is None:
        A += rows.n  # a bias block of its own: A = [[1]]
    else:
        # parts whose columns come in another order (channel-last conv patches): their update in
        # that order, its rows and columns gathered back into the block's order
        u = A if rows.a_order is None else torch.zeros_like(A)
        for part in rows.a_parts:
            ops.kfac_factor_(u, part.to(A.dtype), 1.0, rows.a_bias)
        if rows.a_order is not None:
            o = rows.a_order
            A += u.index_select(0, o).index_select(1, o)  # 3x faster than u[o[:, None], o]


class DiagCurvature:
    """The exact diagonal [numel] of every block (in the block's index order)."""

    structure = "diag"

    def __init__(self, blocks: list[Block], dtype, device):
        self.blocks = blocks
        self.h = {i: torch.zeros(b.numel, dtype=dtype, device=device) for i, b in enumerate(blocks)}

    def add(self, layers, grads, activations: bool = True) -> None:
        """Add the squared Jacobians of one chunk of directions (separable: ``activations`` unused)."""
        for i, (_, part) in enumerate(block_parts(layers, grads)):
            self.h[i] += part_sq_sum(part, self.h[i].dtype)

    def tensors(self):
        return list(self.h.values())

    def counts(self):
        return []

    def set_counts(self, counts):
        pass


class FullCurvature:
    """The full matrix H [P, P] over the covered parameters in selection order (``block.sel``)."""

    structure = "full"

    def __init__(self, blocks: list[Block], dtype, device):
        self.blocks = blocks
        self.P = sum(b.numel for b in blocks)
        self.H = torch.zeros(self.P, self.P, dtype=dtype, device=device)
        self._runs: dict[int, slice | None] = {}  # id(block) -> its positions as a slice (see _run)

    def add(self, layers, grads, activations: bool = True) -> None:
        """Add J^T J of one chunk of directions (separable: ``activations`` unused)."""
        parts = list(block_parts(layers, grads))
        if all(part[0] == "factored" for _, part in parts):
            self._add_factored(parts)
            return
        m, N = grads_shape(parts)
        step = max(1, _CHUNK_ELEMENTS // max(1, m * self.P))
        for n0 in range(0, N, step):
            J = jacobian_rows(parts, self.P, self.H.dtype, slice(n0, n0 + step))
            J = J.reshape(-1, self.P)
            self.H.addmm_(J.t(), J)

    def _add_factored(self, parts) -> None:
        """Every block's Jacobian is U (x) V (unshared layers): the block pair (i, j) of
        sum_n sum_m J^T J is sum_n M_n (x) (V_i V_j^T)_n with M_n = (sum_m U_i U_j^T)_n
        [p_i, p_j] (N p_i p_j q_i q_j flops instead of the rows' m N p_i p_j q_i q_j).
        Row block c of the pair (rows c q_i ... (c + 1) q_i) is V_i^T W_c with W_c [N, p_j q_j]
        = rows n of M_n[c, :] (x) V_j,n: one GEMM per c whose output lands in place; the
        alternative, one GEMM over the [N, q_i q_j] outer products of the V's (and a permuting
        copy of the [p_i p_j, q_i q_j] result), moves ~20x the bytes on a last-layer block of
        5 130 weights, so it is kept for small blocks only (q_i q_j < 4 096), where one call
        beats p_i of them."""
        for i, (bi, (_, Ui, Vi)) in enumerate(parts):
            for j in range(i, len(parts)):
                bj, (_, Uj, Vj) = parts[j]
                if Vi.shape[-1] * Vj.shape[-1] >= 4096:  # q_i q_j
                    Hij = self._pair_by_rows(Ui, Vi, Uj, Vj)
                else:
                    Hij = self._pair_by_outer(Ui, Vi, Uj, Vj)
                self._scatter_add(bi, bj, Hij)
                if j != i:
                    self._scatter_add(bj, bi, Hij.t())

    def _pair_by_rows(self, Ui, Vi, Uj, Vj) -> Tensor:
        """The pair's block [p_i q_i, p_j q_j], one GEMM per row block c (see _add_factored)."""
        dt, N = self.H.dtype, Vi.shape[0]
        pi, qi, pj, qj = Ui.shape[-1], Vi.shape[-1], Uj.shape[-1], Vj.shape[-1]
        Hij = torch.zeros(pi * qi, pj * qj, dtype=dt, device=self.H.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, pj * qj + pi * pj))
        for n0 in range(0, N, step):
            r = slice(n0, n0 + step)
            M = torch.einsum("mnp,mnr->npr", Ui[:, r].to(dt), Uj[:, r].to(dt))  # [n, p_i, p_j]
            vi, vj = Vi[r].to(dt), Vj[r].to(dt)
            for c in range(pi):
                W = (M[:, c, :, None] * vj[:, None, :]).reshape(-1, pj * qj)
                Hij[c * qi:(c + 1) * qi].addmm_(vi.t(), W)
        return Hij

    def _pair_by_outer(self, Ui, Vi, Uj, Vj) -> Tensor:
        """The pair's block by one GEMM over the outer products of the V's (small blocks)."""
        dt, N = self.H.dtype, Vi.shape[0]
        pi, qi, pj, qj = Ui.shape[-1], Vi.shape[-1], Uj.shape[-1], Vj.shape[-1]
        step = max(1, _CHUNK_ELEMENTS // max(1, pi * pj + qi * qj))
        block = torch.zeros(pi * pj, qi * qj, dtype=dt, device=self.H.device)
        for n0 in range(0, N, step):
            r = slice(n0, n0 + step)
            G = torch.einsum("mnp,mnr->npr", Ui[:, r].to(dt), Uj[:, r].to(dt)).reshape(-1, pi * pj)
            A = torch.einsum("nq,ns->nqs", Vi[r].to(dt), Vj[r].to(dt)).reshape(-1, qi * qj)
            block.addmm_(G.t(), A)
        return block.view(pi, pj, qi, qj).permute(0, 2, 1, 3).reshape(pi * qi, pj * qj)

    def _scatter_add(self, bi: Block, bj: Block, Hij: Tensor) -> None:
        """H[bi's positions, bj's positions] += Hij. A block's positions are a run of consecutive
        ones in some order (a whole parameter tensor; a weight and its bias column interleaved in
        a joint block): the update goes into that slice of H, its rows and columns gathered into
        position order first. Advanced indexing on H, the general case, costs ~10x the slice (40
        of a last-layer fit's 80 ms on digits)."""
        ri, rj = self._run(bi), self._run(bj)
        if ri is None or rj is None:
            si, sj = bi.sel.reshape(-1), bj.sel.reshape(-1)
            self.H[si.unsqueeze(1), sj.unsqueeze(0)] += Hij
            return
        (span_i, order_i), (span_j, order_j) = ri, rj
        if order_i is not None:
            Hij = Hij.index_select(0, order_i)
        if order_j is not None:
            Hij = Hij.index_select(1, order_j)
        self.H[span_i, span_j] += Hij

    def _run(self, b: Block) -> tuple[slice, Tensor | None] | None:
        """(slice of the block's positions, the order that sorts its entries into them, or None
        when they are in order already), or None when the positions are not consecutive."""
        if id(b) not in self._runs:
            sel = b.sel.reshape(-1).cpu()
            order = torch.argsort(sel)
            start, n = (int(sel[order[0]]) if sel.numel() else 0), sel.numel()
            run = None
            if torch.equal(sel[order], torch.arange(start, start + n)):
                in_order = torch.equal(order, torch.arange(n))
                run = (slice(start, start + n), None if in_order else order.to(self.H.device))
            self._runs[id(b)] = run
        return self._runs[id(b)]

    def tensors(self):
        return [self.H]

    def counts(self):
        return []

    def set_counts(self, counts):
        pass


def grads_shape(parts) -> tuple[int, int]:
    """(m, N) of a list of (block, part)."""
    kind, t0, *_ = parts[0][1]
    return t0.shape[0], t0.shape[1]


def jacobian_rows(parts, P: int, dtype, rows: slice) -> Tensor:
    """Explicit per-example Jacobians [m, n, P] (selection order) of the examples ``rows``."""
    sliced = []
    for b, part in parts:
        kind, *t = part
        if kind == "factored":
            sliced.append((b, ("factored", t[0][:, rows], t[1][rows])))
        else:
            sliced.append((b, (kind, t[0][:, rows])))
    m, n = grads_shape(sliced)
    J = torch.zeros(m, n, P, dtype=dtype, device=sliced[0][1][1].device)
    for b, part in sliced:
        J[:, :, b.sel.reshape(-1)] = part_rows(part, dtype)
    return J


STRUCTURES = {"kron": KronCurvature, "diag": DiagCurvature, "full": FullCurvature}
