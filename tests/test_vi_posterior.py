"""VariationalPosterior: the Posterior interface over the deterministic twin of a Bayesian model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyfastbayes.vi import BayesianLinear, VariationalPosterior, to_bayesian


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return to_bayesian(net, init_std=0.2)


def test_draws_follow_q_and_the_twin_has_plain_layers():
    model = _model()
    post = VariationalPosterior(model)
    assert isinstance(post.model[0], nn.Linear) and not isinstance(post.model[0], BayesianLinear)
    draws = post.sample(20000, generator=torch.Generator().manual_seed(0))
    mu = torch.cat([model[0].weight_mu.reshape(-1), model[0].bias_mu, model[2].weight_mu.reshape(-1), model[2].bias_mu])
    sd = torch.cat([F.softplus(t).reshape(-1) for t in (model[0].weight_rho, model[0].bias_rho, model[2].weight_rho,
                                                       model[2].bias_rho)])
    assert draws.shape == (20000, post.numel) == (20000, mu.numel())
    # mean within 5 standard errors; std within 5 of its standard errors (sd / sqrt(2 n))
    assert ((draws.mean(0) - mu.detach()).abs() <= 5 * sd.detach() / 20000 ** 0.5).all()
    assert ((draws.std(0) - sd.detach()).abs() <= 5 * sd.detach() / (2 * 20000) ** 0.5).all()


def test_predict_is_the_average_over_draws_and_follows_training():
    model = _model()
    post = VariationalPosterior(model)
    x = torch.randn(5, 4)
    g = torch.Generator().manual_seed(1)
    p = post.predict(x, n_samples=7, generator=g)
    draws = post.sample(7, generator=torch.Generator().manual_seed(1))
    want = torch.stack([torch.func.functional_call(post.model, post.layout.unflatten(d), (x,)).softmax(-1)
                        for d in draws]).mean(0)
    torch.testing.assert_close(p, want)
    with torch.no_grad():  # the twin follows the model's current means
        model[2].bias_mu[0] += 3.0  # (a constant shift of all logits would not change the softmax)
    assert not torch.allclose(post.predict(x, n_samples=7, generator=torch.Generator().manual_seed(1)), p)


def test_sample_into_a_plain_network_and_state_dict():
    model = _model()
    post = VariationalPosterior(model)
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    post.sample_(plain, generator=torch.Generator().manual_seed(0))
    state = post.state_dict()
    other = VariationalPosterior(_model())
    with torch.no_grad():
        for p in other.source.parameters():
            p.add_(1.0)
    other.load_state_dict(state)
    torch.testing.assert_close(other.mean(), post.mean())
    with pytest.raises(ValueError, match="no Bayesian layer"):
        VariationalPosterior(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="n_samples"):
        post.predict(torch.randn(2, 4), n_samples=0)


def test_sample_into_the_bayesian_model_is_refused_by_name():
    """It said "the model's trainable parameters changed since the VariationalPosterior was built"."""
    torch.manual_seed(0)
    model = to_bayesian(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    post = VariationalPosterior(model)
    with pytest.raises(TypeError, match=r"sample_ writes a draw into a deterministic network \(posterior.model"):
        post.sample_(model)
    twin = post.sample_(generator=torch.Generator().manual_seed(1))
    assert twin is post.model
