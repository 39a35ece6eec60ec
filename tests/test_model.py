"""The model's loss against the tutorial's formula and torch.distributions, on random data."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from vaekit import VAE, ModelConfig


def test_loss_equals_seed_formula():
    """Per-example loss sums to the tutorial's sigmoid + BCE(sum) + KL with the same noise."""
    torch.manual_seed(0)
    model = VAE((1, 28, 28), ModelConfig(hidden=[256], latent=2))
    x = torch.rand(64, 1, 28, 28)
    loss = model.loss(x, torch.Generator().manual_seed(7))

    mu, logvar = model.encode(x)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    recon = torch.sigmoid(model.decoder(mu + eps * torch.exp(0.5 * logvar)).view(-1, 784))
    bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    assert loss.shape == (64,)
    torch.testing.assert_close(loss.sum(), bce + kld, rtol=1e-5, atol=1e-3)


def test_elbo_terms_match_torch_distributions():
    """log p(x|z) is the Bernoulli log-likelihood and the KL is the analytic Gaussian KL to N(0, I)."""
    torch.manual_seed(1)
    model = VAE((20,), ModelConfig(hidden=[32, 16], latent=5, activation="tanh"))
    x = torch.bernoulli(torch.full((10, 20), 0.3))
    log_px, kl = model.terms(x, 1, generator=torch.Generator().manual_seed(3))
    log_px, kl = log_px[0], kl[0].sum(-1)

    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    expected_log_px = Bernoulli(logits=model.decoder(z)).log_prob(x).sum(1)
    expected_kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(log_px, expected_log_px)
    torch.testing.assert_close(kl, expected_kl)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 7, 9), (13,)])
def test_shapes_follow_the_data(shape):
    """Encoder, decoder and sampler work for any example shape and keep it."""
    model = VAE(shape, ModelConfig(hidden=[64, 32], latent=3, activation="elu"))
    x = torch.rand(5, *shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    out = model.decode(mu)
    assert out.shape == (5, *shape)
    assert ((out >= 0) & (out <= 1)).all()
    assert model.sample(4).shape == (4, *shape)
    assert model.loss(x).shape == (5,)


def test_loss_is_finite_for_extreme_logits():
    """Logits far from zero give finite losses and gradients (no log(0) from a sigmoid)."""
    torch.manual_seed(2)
    model = VAE((16,), ModelConfig(hidden=[8], latent=2))
    with torch.no_grad():
        model.decoder.net[-1].bias.fill_(200.0)
    x = torch.zeros(4, 16)
    loss = model.loss(x).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() > 16 * 100  # every pixel is confidently wrong
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bernoulli_log_prob_value_and_gradient_match_torch():
    """The Bernoulli log-likelihood and its gradient equal -BCE-with-logits, including at 0 and extreme logits."""
    from vaekit.likelihoods import Bernoulli

    torch.manual_seed(3)
    logits = torch.cat([torch.randn(6, 30) * 8, torch.tensor([[0.0, 100.0, -100.0, 30.0, -30.0] * 6])])
    x = torch.rand(7, 30)
    x[:, :5] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5])
    ours = logits.clone().double().requires_grad_()
    ref = logits.clone().double().requires_grad_()
    value = Bernoulli((30,), ModelConfig()).log_prob(x.double(), ours)
    expected = -F.binary_cross_entropy_with_logits(ref, x.double(), reduction="none").sum(1)
    torch.testing.assert_close(value, expected)
    weights = torch.rand(7, dtype=torch.float64)
    (value * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad)
    assert torch.autograd.gradcheck(
        lambda a, b: Bernoulli((30,), ModelConfig()).log_prob(b, a),
        (ours.detach()[:, :8].requires_grad_(), x.double()[:, :8].requires_grad_()),
    )


def test_every_custom_autograd_function_has_the_gradient_of_its_forward():
    """torch.autograd.gradcheck (float64, finite differences) of the fast tanh and the Bernoulli log-probability,
    whose backward passes are written by hand: a wrong closed form (1 - y instead of 1 - y**2, say) fails here."""
    from vaekit.likelihoods import _BernoulliLogProb
    from vaekit.nets import _TanhFunction

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(_TanhFunction.apply, (x,))
    logits = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 4).requires_grad_()
    data = torch.rand(4, 7, generator=g, dtype=torch.float64).requires_grad_()  # grey levels: x is differentiable too
    assert torch.autograd.gradcheck(_BernoulliLogProb.apply, (logits, data))


def test_the_mlp_decoder_mirrors_the_encoders_layers():
    """An MLP with hidden [32, 16] encodes through 32 then 16 units and decodes through 16 then 32 to the data."""
    model = VAE((20,), ModelConfig(hidden=[32, 16], latent=3))
    encoder = [(m.in_features, m.out_features) for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    decoder = [(m.in_features, m.out_features) for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert encoder[:2] == [(20, 32), (32, 16)] and decoder == [(3, 16), (16, 32), (32, 20)]


def test_the_conv_decoder_mirrors_the_encoders_dense_layers():
    """A conv net with dense layers [32, 16] encodes through 32 then 16 units and decodes through 16 then 32."""
    model = VAE((1, 8, 8), ModelConfig(net="conv", channels=[4], hidden=[32, 16], latent=2))

    def widths(net: torch.nn.Module) -> list[int]:
        return [layer.out_features for layer in net.modules() if isinstance(layer, torch.nn.Linear)]

    assert widths(model.encoder)[:2] == [32, 16] and widths(model.decoder)[:2] == [16, 32]


def test_the_likelihood_and_kl_terms_are_float32_under_bfloat16_autocast():
    """Under bf16 autocast the networks give bfloat16, but log p(x|z) and every KL term are computed in float32 from
    those outputs: the KL equals the closed form evaluated in float32 on the bfloat16 encoder's mean and log-variance,
    not its bfloat16 rounding."""
    from vaekit.model import kl_normal

    torch.manual_seed(4)
    model = VAE((30,), ModelConfig(hidden=[32], latent=16, likelihood="gaussian"))
    x = torch.rand(8, 30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mean, logvar = model.encode(x)
        log_px, kl = model.terms(x, 2, generator=torch.Generator().manual_seed(0))
    assert mean.dtype == torch.bfloat16 and log_px.dtype == kl.dtype == torch.float32
    expected = kl_normal(mean.float(), logvar.float()).expand_as(kl)
    torch.testing.assert_close(kl, expected, rtol=1e-6, atol=1e-7)
    assert (kl_normal(mean, logvar).float() != expected).any()  # bfloat16 arithmetic would have given other values


def test_common_noise_is_shared_by_both_layers_of_a_two_layer_model():
    """With common noise every example gets the same draws of z1 and of z2, so an example's log-weights do not depend
    on the others in its batch: equal examples get equal weights, and an example alone gets what it gets among
    others. Without it, they differ."""
    from vaekit.model import log_weights

    torch.manual_seed(5)
    model = VAE((12,), ModelConfig(hidden=[16], latent=4, hidden2=[8], latent2=2))
    a, b = torch.rand(2, 1, 12)
    with torch.no_grad():
        together = log_weights(model, torch.cat([a, b, a]), 3, generator=torch.Generator().manual_seed(1), common=True)
        alone = log_weights(model, a, 3, generator=torch.Generator().manual_seed(1), common=True)
        apart = log_weights(model, torch.cat([a, b, a]), 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(together[:, 0], together[:, 2])
    torch.testing.assert_close(alone[:, 0], together[:, 0])
    assert (apart[:, 0] != apart[:, 2]).all()


def test_unknown_activation_and_likelihood_names_are_refused_listing_the_known_ones():
    """A model config naming an activation or likelihood vaekit does not have is a VaekitError that lists those it
    has, not a KeyError."""
    from vaekit.errors import VaekitError

    with pytest.raises(VaekitError) as err:
        VAE((4,), ModelConfig(activation="swish"))
    assert str(err.value) == "unknown activation 'swish' (allowed: relu, tanh, elu, gelu, silu, leaky_relu, softplus)"
    with pytest.raises(VaekitError) as err:
        VAE((4,), ModelConfig(likelihood="poisson"))
    assert str(err.value) == "unknown likelihood 'poisson' (allowed: bernoulli, gaussian, logistic-mixture)"
