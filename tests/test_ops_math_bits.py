"""Tensors with a math bit (csrc/ops/math_bits.cpp): a real tensor with the negative bit (a lazily
negated view, z.conj().imag of a complex z) or a complex one with the conjugate bit. ATen's math-bit
fallback runs an op with a written argument on a clone and takes the op's return value as the
result to copy back; pyfastbayes's in-place ops return () or other tensors, and the fallback
corrupted the heap (malloc abort) or left a partial write (found by fuzzing the ops). Now a written
argument with the bit is refused, naming it, with nothing written; a read one is resolved."""
import re

import pytest
import torch

import pyfastbayes  # noqa: F401  (registers the ops)
from _helpers import needs_native

pytestmark = needs_native
T = torch.ops.pyfastbayes


def _negview(*shape, generator=None):
    z = torch.complex(torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator))
    v = z.conj().imag
    assert v.is_neg() and not v.is_complex()
    return v


def _library_ops():
    return {s.name.split("::", 1)[1]: s for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyfastbayes::")}


def test_exactly_the_ops_that_write_have_the_math_bit_kernels():
    for name, schema in _library_ops().items():
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        for key in ("Negative", "Conjugate"):
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfastbayes::{name}", key)
            assert has == writes, f"{name}: writes={writes} but {key} kernel={has}"


def _calls():
    """(op name, call(written tensor) -> None, written tensor's shape, its argument's name, the other
    written tensors to watch)."""
    rng = torch.tensor([1, 0])
    sq = torch.zeros(5)
    gm = torch.randn(6)
    return [
        ("philox_normal_", lambda t: T.philox_normal_(t, 1, 2, 3), (7,), "out", []),
        ("kfac_factor_", lambda t: T.kfac_factor_(t, torch.randn(5, 3), 1.0, True), (4, 4), "factor", []),
        ("landscape_bias_act_", lambda t: T.landscape_bias_act_(t, None, "relu"), (2, 3, 4), "x", []),
        ("vi_rademacher_", lambda t: T.vi_rademacher_(t, rng, 0), (9,), "out", []),
        ("swag_collect_", lambda t: T.swag_collect_([torch.ones(5)], t, sq, None, 0), (5,), "mean", [sq]),
        ("vi_weight_kl_backward_",
         lambda t: T.vi_weight_kl_backward_(t, gm, torch.randn(6), torch.randn(6), rng, 0, torch.tensor(1.0), 1.0, 0,
                                            True), (6,), "grad_rho", [gm]),
        ("sgld_step_", lambda t: T.sgld_step_([t], [torch.randn(3)], torch.tensor([1e-3, 1.0, 1.0, 0.0, 0.0, 0.0],
                                                                                    dtype=torch.float64),
                                              torch.tensor([1, 0])), (3,), "params[0]", []),
    ]


@pytest.mark.parametrize("case", _calls(), ids=lambda c: c[0])
def test_a_written_argument_with_the_negative_bit_is_refused_and_nothing_is_written(case):
    name, call, shape, arg, others = case
    for _ in range(50):  # (the fallback's heap corruption showed within a few hundred calls)
        t = _negview(*shape)
        before = [t.clone()] + [o.clone() for o in others]
        pattern = re.escape(f"{name}: {arg} has the negative bit set") + r".*resolve_neg\(\)"
        with pytest.raises(RuntimeError, match=pattern):
            call(t)
        assert all(torch.equal(a, b) for a, b in zip(before, [t] + others))


def test_a_written_argument_with_the_conjugate_bit_is_refused():
    z = torch.complex(torch.randn(7), torch.randn(7)).conj()
    assert z.is_conj()
    with pytest.raises(RuntimeError, match="philox_normal_: out has the conjugate bit set"):
        T.philox_normal_(z, 1, 2, 3)


def test_read_arguments_with_the_negative_bit_are_resolved():
    """A negated view read by an op counts as its (negated) values, as for ATen ops."""
    g = torch.Generator().manual_seed(0)
    x = _negview(5, 3, generator=g)
    want, got = torch.zeros(3, 3), torch.zeros(3, 3)
    T.kfac_factor_(want, x.resolve_neg(), 1.0, False)
    T.kfac_factor_(got, x, 1.0, False)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    hyper = torch.tensor([1e-3, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    p1, p2 = torch.zeros(3), torch.zeros(3)
    grad = _negview(3, generator=g)
    T.sgld_step_([p1], [grad.resolve_neg()], hyper, torch.tensor([1, 0]))
    T.sgld_step_([p2], [grad], hyper, torch.tensor([1, 0]))
    torch.testing.assert_close(p2, p1, rtol=0, atol=0)
    assert not torch.equal(p1, torch.zeros(3))

