"""One message for "the data has another dtype than the model's parameters":
``pyfastbayes.nn.inputs.dtype_mismatch``, its rules, and every public API that names the mismatch
(VI layers, Laplace, curvature operators, posteriors' predict, landscape grids) giving the same
words, the argument's name first."""
import re

import pytest
import torch
from torch import nn

from pyfastbayes import curvature as cv
from pyfastbayes import landscape as L
from pyfastbayes.laplace import Laplace
from pyfastbayes.nn.inputs import dtype_mismatch
from pyfastbayes.posteriors import SWAG
from pyfastbayes.vi import BayesianLinear

F32, F64 = torch.float32, torch.float64
MISMATCH = RuntimeError("mat1 and mat2 must have the same dtype, but got Double and Float")


# ---- the function's rules ------------------------------------------------------------------------------
def test_float_inputs_of_another_dtype_are_named_with_both_fixes():
    err = dtype_mismatch(torch.ones(2, dtype=F64), F32, MISMATCH, refit=", then fit again")
    assert isinstance(err, TypeError)
    assert str(err) == ("x: the inputs are torch.float64 but the model's parameters are torch.float32: cast the "
                        "data (x.to(torch.float32)) or the model (model.to(torch.float64), then fit again) "
                        "so that they agree")


def test_matching_inputs_explain_nothing():
    assert dtype_mismatch(torch.ones(2), F32, MISMATCH) is None
    assert dtype_mismatch([torch.ones(2), (torch.ones(2), 3)], F32, MISMATCH) is None


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), ValueError("dtype"),
                                   KeyError("type")])
def test_out_of_memory_and_other_exceptions_are_never_reinterpreted(error):
    assert dtype_mismatch(torch.ones(2, dtype=F64), F32, error) is None


def test_integer_inputs_are_named_only_when_nothing_else_can_explain_a_dtype_error():
    ids = torch.ones(2, dtype=torch.long)  # token ids are normal inputs
    assert dtype_mismatch(ids, F32, RuntimeError("index 7 is out of bounds")) is None
    err = dtype_mismatch(ids, F32, RuntimeError("expected scalar type Float but found Long"))
    assert str(err).startswith("x: the inputs are torch.int64 but")
    assert "model.to" not in str(err)  # an integer model is no fix
    assert dtype_mismatch(ids, F32) is not None  # an up-front check (no error): named
    # ids beside float features: the float64 features are the culprit, not the ids (review finding)
    err = dtype_mismatch((ids, torch.ones(2, dtype=F64)), F32, MISMATCH, name="data")
    assert str(err).startswith("data: input 1 is torch.float64") and "model.to(torch.float64)" in str(err)
    # ids beside float32 features of the right dtype: a dtype error comes from elsewhere (a buffer)
    assert dtype_mismatch((ids, torch.ones(2)), F32, MISMATCH) is None


def test_positional_arguments_are_numbered_and_batches_searched():
    err = dtype_mismatch((torch.ones(2), torch.ones(2, dtype=F64)), F32, MISMATCH, name="data")
    assert str(err).startswith("data: input 1 is torch.float64 but the model's parameters are torch.float32")
    assert "(inputs.to(torch.float32))" in str(err)  # data is a tuple or a loader: no data.to()
    err = dtype_mismatch([torch.ones(2), (torch.ones(2, dtype=F64), "mask")], F32, MISMATCH, owner="the layer")
    assert str(err).startswith("x: the inputs are torch.float64 but the layer's parameters are torch.float32")


# ---- every API says it the same way ----------------------------------------------------------------------
def _mlp(dtype=F32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _data(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _vi(x, y):
    BayesianLinear(4, 3)(x.double())


def _laplace(x, y):
    Laplace(_mlp(), "classification").fit([(x.double(), y)], progress=False)


def _curvature(x, y):
    m = _mlp()
    op = cv.ggn(m, nn.CrossEntropyLoss(), (x.double(), y))
    op @ torch.randn(sum(p.numel() for p in m.parameters()))


def _predict(x, y):
    m = _mlp()
    post = SWAG(m, max_rank=2)
    for _ in range(3):
        post.collect()
    post.predict(x.double(), 2)


def _grid(x, y):
    m = _mlp()
    L.grid(m, nn.CrossEntropyLoss(), (x.double(), y), L.random_directions(m, 1), [-1, 0, 1], progress=False)


@pytest.mark.parametrize("call, name, owner", [(_vi, "x", "the Bayesian layer"), (_laplace, "loader", "the model"),
                                               (_curvature, "data", "the model"), (_predict, "x", "the model"),
                                               (_grid, "data", "the model")])
def test_every_api_names_the_mismatch_in_the_same_words(call, name, owner):
    with pytest.raises(TypeError) as info:
        call(*_data())
    cast = "x" if name == "x" else "inputs"
    assert re.match(rf"{name}: the inputs are torch\.float64 but {re.escape(owner)}'s parameters are "
                    rf"torch\.float32: cast the data \({cast}\.to\(torch\.float32\)\) or the model "
                    r"\(model\.to\(torch\.float64\)[^)]*\) so that they agree$", str(info.value)), str(info.value)


class _Float64Buffer(nn.Module):
    """A float32 model whose forward multiplies by a float64 buffer: a dtype error the data does not cause."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3, 3, dtype=F64))

    def forward(self, x):
        return self.lin(x) @ self.scale


def test_a_dtype_error_the_data_does_not_cause_keeps_torchs_message():
    """Review finding: Laplace's 'nn' predictive searched the (X, y) batches, targets included, and blamed
    the int64 targets for the buffer's error."""
    x, y = _data()
    model = _Float64Buffer()
    model.scale = model.scale.float()
    la = Laplace(model, "classification", hessian_structure="diag").fit([(x, y)], progress=False)
    post = SWAG(model, max_rank=2)
    post.collect()
    model.scale = model.scale.double()  # the data is float32 like the parameters; the buffer is not
    for call in (lambda: post.predict([(x, y)], 2), lambda: la.predict([(x, y)], pred_type="nn", n_samples=2),
                 lambda: la.fit([(x, y)], progress=False)):
        with pytest.raises(RuntimeError) as info:
            call()
        assert not isinstance(info.value, TypeError), info.value
