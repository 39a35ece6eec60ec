"""The model family: likelihoods against torch.distributions and closed forms, conv nets at odd sizes, two stochastic
layers, the objectives' semantics, training options, the Burda schedule and the IWAE presets."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import DEVICES
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Normal, kl_divergence

import vaekit
from vaekit import likelihoods
from vaekit.cli import main
from vaekit.config import PRESETS, ModelConfig, make_config
from vaekit.likelihoods import Bernoulli, DiscreteLikelihood, Gaussian, Likelihood, LogisticMixture
from vaekit.model import VAE, kl_normal, log_weights, objective
from vaekit.optim import burda_schedule
from vaekit.world import Part, binarize

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- Gaussian likelihood


@pytest.mark.parametrize("variance", ["fixed", "global", "per-dim"])
def test_gaussian_log_prob_equals_torch_normal(variance):
    """log_prob is the sum of Normal(mean, sigma) log-densities, with and without a leading sample dimension."""
    shape = (2, 3)
    lik = Gaussian(shape, ModelConfig(likelihood="gaussian", variance=variance, sigma=0.3))
    assert torch.allclose(lik.log_sigma.exp(), torch.tensor(0.3))  # sigma starts where the config says
    if variance != "fixed":
        with torch.no_grad():
            lik.log_sigma.copy_(torch.randn(lik.log_sigma.shape, generator=gen(1)) * 0.5)
    sigma = lik.log_sigma.detach().exp()
    x = torch.rand(4, *shape, generator=gen(2))
    for mean in (torch.randn(4, *shape, generator=gen(3)), torch.randn(5, 4, *shape, generator=gen(4))):
        expected = Normal(mean, sigma.expand(shape)).log_prob(x).sum((-2, -1))
        got = lik.log_prob(x, mean)
        assert got.shape == mean.shape[:-2]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert lik.discrete(x) is False and torch.equal(lik.mean(mean), mean)


@pytest.mark.parametrize("variance", ["fixed", "global", "per-dim"])
def test_gaussian_variance_is_a_parameter_only_when_learned(variance):
    """Learned sigmas are parameters (global: one number, per-dim: one per dimension); fixed is a saved buffer."""
    model = VAE((5,), ModelConfig(hidden=[8], latent=2, likelihood="gaussian", variance=variance))
    params = dict(model.named_parameters())
    assert "likelihood.log_sigma" in model.state_dict()
    if variance == "fixed":
        assert "likelihood.log_sigma" not in params
    else:
        assert params["likelihood.log_sigma"].shape == ((5,) if variance == "per-dim" else ())
        assert any(p is params["likelihood.log_sigma"] for p in model.parameters())


def test_gaussian_sigma_gradient_and_learning():
    """d(-log p)/d(log sigma) = sum(1 - r^2/sigma^2); a few Adam steps move a too-small sigma up, not a fixed one."""
    lik = Gaussian((6,), ModelConfig(likelihood="gaussian", variance="global", sigma=0.1))
    x, mean = torch.rand(3, 6, generator=gen(0)), torch.rand(3, 6, generator=gen(1))
    (-lik.log_prob(x, mean).sum()).backward()
    expected = (1 - (x - mean).square() / 0.1**2).sum()
    torch.testing.assert_close(lik.log_sigma.grad, expected, rtol=1e-4, atol=1e-4)

    learned = VAE((6,), ModelConfig(hidden=[8], latent=2, likelihood="gaussian", variance="per-dim", sigma=0.1))
    fixed = VAE((6,), ModelConfig(hidden=[8], latent=2, likelihood="gaussian", variance="fixed", sigma=0.1))
    data = torch.rand(64, 6, generator=gen(2))
    for model in (learned, fixed):
        before = model.likelihood.log_sigma.detach().clone()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(10):
            opt.zero_grad()
            model.loss(data, gen(3)).mean().backward()
            opt.step()
        moved = model.likelihood.log_sigma.detach() - before
        if model is learned:
            assert (moved > 0.2).all()  # residuals of ~0.3 want a larger sigma than 0.1 in every dimension
        else:
            assert torch.equal(moved, torch.zeros_like(moved))


# ---------------------------------------------------------------- discretised logistic mixture

K = 3  # mixture components
LEVELS = torch.arange(256, dtype=f64) / 255


def mixture_params(batch: int, shape: tuple[int, ...], seed: int, scale: tuple[float, float] = (-2.5, 0.0)):
    """Random parameters (batch, 3, K, C, *rest): weight logits, means in [-1, 1], log-scales in `scale`."""
    g = gen(seed)
    logits = torch.randn(batch, 1, K, *shape, generator=g, dtype=f64)
    means = torch.rand(batch, 1, K, *shape, generator=g, dtype=f64) * 2 - 1
    lo, hi = scale
    log_scales = lo + (hi - lo) * torch.rand(batch, 1, K, *shape, generator=g, dtype=f64)
    return torch.cat([logits, means, log_scales], 1)


def flat(params: torch.Tensor) -> torch.Tensor:
    """(batch, 3, K, C, *rest) -> (batch, 3 K C, *rest): the layout params_shape describes."""
    return params.flatten(1, 3)


def reference_log_mass(levels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """log P(level) per dimension from Salimans et al.'s formula in float64: bins of width 2/255 in [-1, 1] with the
    edge bins taking the tails. levels: (batch, C, *rest) integers; params (batch, 3, K, C, *rest)."""
    logits, means, log_scales = params.unbind(1)
    c = (2 * levels.double() / 255 - 1).unsqueeze(1)
    s = log_scales.exp()
    upper, lower = (c + 1 / 255 - means) / s, (c - 1 / 255 - means) / s
    # sigma(u) - sigma(l), written as sigma(-l) - sigma(-u) right of the mean to avoid cancellation near 1.
    mass = torch.where(
        lower > 0, torch.sigmoid(-lower) - torch.sigmoid(-upper), torch.sigmoid(upper) - torch.sigmoid(lower)
    )
    top = levels.unsqueeze(1) == 255
    bottom = levels.unsqueeze(1) == 0
    mass = torch.where(top, torch.sigmoid(-lower), torch.where(bottom, torch.sigmoid(upper), mass))
    weights = torch.softmax(logits, 1)
    return (weights * mass).sum(1).log()


@pytest.mark.parametrize("shape", [(1,), (3,), (1, 2, 2)])
def test_logistic_mixture_log_prob_matches_reference(shape):
    """log_prob of 8-bit data is the sum over dimensions of the independent reference formula."""
    params = mixture_params(6, shape, seed=len(shape), scale=(-2.5, 0.0))
    levels = torch.randint(0, 256, (6, *shape), generator=gen(9))
    levels[0] = 0
    levels[1] = 255
    lik = LogisticMixture(shape, ModelConfig(likelihood="logistic-mixture", mixtures=K))
    assert lik.params_shape() == (3 * K * shape[0], *shape[1:])
    expected = reference_log_mass(levels, params).flatten(1).sum(1)
    got = lik.log_prob(levels.double() / 255, flat(params))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3 * math.prod(shape))
    got32 = lik.log_prob((levels.float() / 255), flat(params).float())
    torch.testing.assert_close(got32.double(), expected, rtol=1e-3, atol=1e-2 * math.prod(shape))


EXTREMES = {
    "moderate": None,
    "peaked": [[0.0, 0.0, 0.0], [0.5, -0.3, 0.001], [-7.0, -20.0, -9.0]],
    "flat": [[0.0, 1.0, 2.0], [0.0, 0.5, -0.5], [5.0, 8.0, 3.0]],
    "far outside": [[50.0, -50.0, 0.0], [5.0, -5.0, 0.0], [-7.0, -7.0, 0.0]],
    "at the edges": [[0.0, 0.0, 0.0], [1.0, -1.0, 1 - 1 / 255], [-5.0, -5.0, -5.0]],
    "on bin edges": [[0.0, 0.0, 0.0], [1 / 255, 3 / 255, 0.5], [-7.0, -6.0, -5.0]],
}


@pytest.mark.parametrize("case", list(EXTREMES))
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_logistic_mixture_sums_to_one_over_256_levels(case, dtype):
    """For one dimension, exp(log_prob) summed over the 256 levels is 1, for moderate and extreme parameters."""
    lik = LogisticMixture((1,), ModelConfig(likelihood="logistic-mixture", mixtures=K))
    p = mixture_params(1, (1,), seed=0)[0] if EXTREMES[case] is None else torch.tensor(EXTREMES[case], dtype=f64)
    p = p.reshape(3 * K).to(dtype)
    log_p = lik.log_prob(LEVELS.to(dtype)[:, None], p.expand(256, 3 * K))
    assert torch.isfinite(log_p).all() and (log_p <= 1e-6).all()
    assert torch.logsumexp(log_p.double(), 0).item() == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("shape", [(3,), (1, 2, 2)])
def test_logistic_mixture_normalises_in_every_dimension_together(shape):
    """Varying each dimension over its 256 levels around a fixed image shows the product of the normalisers is 1."""
    # With independent dimensions, sum_l P(x with dim j at l) = Z_j P(x) / P_j(x_j), so
    # sum_j [logsumexp_l log P(x^(j,l)) - log P(x)] + log P(x) = sum_j log Z_j, which must be 0.
    lik = LogisticMixture(shape, ModelConfig(likelihood="logistic-mixture", mixtures=K))
    params = flat(mixture_params(1, shape, seed=5, scale=(-7.0, 3.0)))
    x0 = torch.randint(0, 256, (1, *shape), generator=gen(6)).double() / 255
    base = lik.log_prob(x0, params)[0]
    total = base.clone()
    n = math.prod(shape)
    for j in range(n):
        varied = x0.flatten(1).repeat(256, 1)
        varied[:, j] = LEVELS
        log_p = lik.log_prob(varied.unflatten(1, shape), params.expand(256, *params.shape[1:]))
        total += torch.logsumexp(log_p, 0) - base
        # The other dimensions are untouched: where dim j is back at its own level, the value is log P(x) again.
        level = round(x0.flatten()[j].item() * 255)
        torch.testing.assert_close(log_p[level], base)
    assert total.item() == pytest.approx(0, abs=1e-4 * n)


def test_logistic_mixture_samples_follow_the_pmf():
    """Samples lie on the 256 levels in [0, 1] and their distribution and mean match exp(log_prob)."""
    lik = LogisticMixture((1,), ModelConfig(likelihood="logistic-mixture", mixtures=K))
    p = torch.tensor([[0.0, 1.0, -0.5], [-0.4, 0.3, 0.1], [-2.5, -3.0, -1.5]], dtype=torch.float32).reshape(9)
    n = 20000
    x = lik.sample(p.expand(n, 9), gen(0))
    assert x.shape == (n, 1)
    assert ((x >= 0) & (x <= 1)).all()
    assert torch.equal(x * 255, (x * 255).round())
    assert lik.discrete(x)
    pmf = lik.log_prob(LEVELS[:, None], p.double().expand(256, 9)).exp()
    counts = torch.bincount((x[:, 0] * 255).round().long(), minlength=256).double() / n
    # Kolmogorov-Smirnov distance; 0.02 is about 2.8 / sqrt(n), far beyond chance.
    assert (counts.cumsum(0) - pmf.cumsum(0)).abs().max() < 0.02
    assert x.double().mean().item() == pytest.approx((pmf * LEVELS).sum().item(), abs=0.01)
    # The mixture mean is the pmf's mean when little mass is cut off at the edges.
    assert lik.mean(p[None]).item() == pytest.approx((pmf * LEVELS).sum().item(), abs=2e-3)


def test_logistic_mixture_mean_and_samples_stay_in_range_for_extreme_parameters():
    """Means and samples stay in [0, 1] (samples on the levels) even for wild parameters."""
    lik = LogisticMixture((1, 2, 2), ModelConfig(likelihood="logistic-mixture", mixtures=K))
    params = torch.randn(50, 3 * K, 2, 2, generator=gen(1)) * 40
    params[:, 2 * K :] = params[:, 2 * K :].clamp(max=80)  # log-scales whose exp is finite in float32
    mean = lik.mean(params)
    assert mean.shape == (50, 1, 2, 2) and ((mean >= 0) & (mean <= 1)).all()
    x = lik.sample(params, gen(2))
    assert x.shape == (50, 1, 2, 2) and ((x >= 0) & (x <= 1)).all()
    assert torch.equal(x * 255, (x * 255).round())
    assert torch.isfinite(lik.log_prob(x, params)).all()


def test_logistic_mixture_sample_ignores_unpicked_components():
    """A component with weight e^-40 and a huge log-scale (its exp overflows float32) cannot make samples NaN."""
    lik = LogisticMixture((1,), ModelConfig(likelihood="logistic-mixture", mixtures=2))
    # [weight logits, means, log-scales]: component 0 holds all the weight, component 1 is never picked.
    params = torch.tensor([20.0, -20.0, 0.0, 0.0, -3.0, 90.0]).expand(200, 6)
    assert lik.log_prob(torch.full((200, 1), 0.5), params).isfinite().all()
    x = lik.sample(params, gen(0))
    assert not x.isnan().any(), "samples are NaN: an unpicked component's inf * 0"
    assert ((x >= 0) & (x <= 1)).all()
    # The picked component is a logistic around 0.5 with scale e^-3 in [-1, 1] space: samples stay near the middle.
    assert (x - 0.5).abs().median() < 0.1


def test_discrete_tells_8_bit_and_binary_data_from_floats():
    """discrete() is True for 8-bit levels (logistic mixture) and 0/1 data (Bernoulli), False for arbitrary floats."""
    mixture = LogisticMixture((3,), ModelConfig(likelihood="logistic-mixture"))
    bernoulli = Bernoulli((3,), ModelConfig())
    eight_bit = torch.randint(0, 256, (100, 3), generator=gen(0)).float() / 255
    floats = torch.rand(100, 3, generator=gen(1))
    assert mixture.discrete(eight_bit) and not mixture.discrete(floats)
    assert not mixture.discrete(torch.full((1, 3), 0.5))  # 127.5 / 255, between two levels
    assert bernoulli.discrete(torch.bernoulli(floats)) and not bernoulli.discrete(eight_bit)


# ---------------------------------------------------------------- convolutional nets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bernoulli", "logistic-mixture"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_discrete_likelihoods_give_every_value_its_probability(name, grad, device):
    """value_log_probs gives, per dimension, a distribution over the levels whose entries at the data's values sum to
    log_prob: what an entropy coder needs, consistent with the likelihood the model is trained on."""
    shape = (2, 3, 2)
    lik = likelihoods.build(shape, ModelConfig(likelihood=name, mixtures=3))
    assert isinstance(lik, Likelihood) and isinstance(lik, DiscreteLikelihood)
    g = torch.Generator().manual_seed(0)
    params = 2 * torch.randn(4, 5, *lik.params_shape(), generator=g, dtype=f64).to(device)
    with torch.set_grad_enabled(grad):
        table = lik.value_log_probs(params)
        levels = torch.randint(0, lik.levels, (5, *shape), generator=g).to(device)
        log_p = lik.log_prob(levels.double() / (lik.levels - 1), params)
    assert table.shape == (4, 5, *shape, lik.levels) and table.device.type == device
    ones = torch.ones(4, 5, *shape, dtype=f64, device=device)
    torch.testing.assert_close(table.exp().sum(-1), ones, rtol=0, atol=1e-6)
    picked = table.gather(-1, levels.expand(4, *levels.shape).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked.flatten(2).sum(-1), log_p, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "logistic-mixture"])
def test_log_prob_dims_are_the_terms_that_log_prob_sums(name, device):
    """log_prob_dims gives one term per dimension, (S, B, *shape), which sum to log_prob; for the discrete
    likelihoods each term is the log-probability of that dimension's value."""
    shape = (2, 3, 2)
    lik = likelihoods.build(shape, ModelConfig(likelihood=name, mixtures=3, sigma=0.3)).to(device)
    params = 2 * torch.randn(4, 5, *lik.params_shape(), generator=gen(0), dtype=f64).to(device)
    levels = torch.randint(0, getattr(lik, "levels", 256), (5, *shape), generator=gen(1)).to(device)
    x = levels.double() / (getattr(lik, "levels", 256) - 1)
    terms = lik.log_prob_dims(x, params)
    assert terms.shape == (4, 5, *shape)
    torch.testing.assert_close(terms.flatten(2).sum(-1), lik.log_prob(x, params), rtol=1e-12, atol=1e-9)
    if isinstance(lik, DiscreteLikelihood):
        table = lik.value_log_probs(params)
        torch.testing.assert_close(terms, table.gather(-1, levels.expand(4, *levels.shape)[..., None])[..., 0])
    else:
        torch.testing.assert_close(terms, Normal(params, 0.3).log_prob(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "logistic-mixture"])
def test_samples_follow_the_generator_and_the_likelihoods_mean(name, device):
    """A sample is a function of the generator's state, and the average of many is the likelihood's mean."""
    lik = likelihoods.build((3,), ModelConfig(likelihood=name, mixtures=2, sigma=0.2)).to(device)
    params = torch.tensor([-1.0, 0.5, 2.0])
    if name == "logistic-mixture":  # two components per dimension: weight logits, means in [-1, 1], log-scales
        params = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.5, 2.0, -0.6, 0.2, 0.0, -0.2, 0.7, 0.4] + [-2.0] * 6)
    many = params.to(device).expand(40000, -1)

    def gen_on(seed: int) -> torch.Generator:
        return torch.Generator(device).manual_seed(seed)

    x = lik.sample(many, gen_on(0))
    assert x.shape == (40000, 3) and x.device.type == device
    assert torch.equal(x, lik.sample(many, gen_on(0))) and not torch.equal(x, lik.sample(many, gen_on(1)))
    torch.testing.assert_close(x.mean(0), lik.mean(many[0]), rtol=0, atol=0.01)
    if name == "gaussian":
        torch.testing.assert_close(x.std(0), torch.full((3,), 0.2, device=device), rtol=0.02, atol=0)
        # Drawn in the parameters' precision: float64 noise is not float32 noise widened.
        noise = lik.sample(many[:100].double(), gen_on(0)) - many[:100].double()
        assert noise.dtype == f64 and not torch.equal(noise, noise.float().double())


def test_a_learned_deviation_below_its_floor_samples_at_the_floor():
    """Samples of a Gaussian whose learned log-deviation sank below log(1e-3) spread by 1e-3, as log_prob assumes."""
    lik = Gaussian((2,), ModelConfig(likelihood="gaussian", variance="global", sigma=1.0))
    with torch.no_grad():
        lik.log_sigma.fill_(-20.0)
    x = lik.sample(torch.zeros(20000, 2), gen(0))
    assert x.std().item() == pytest.approx(1e-3, rel=0.02)


@pytest.mark.parametrize("name", ["bernoulli", "logistic-mixture"])
def test_the_cdf_at_level_boundaries_accumulates_the_value_probabilities(name):
    """cdf(b) = P(x < level b): 0 at the first boundary, 1 at the last, and its steps are the probabilities of the
    levels that value_log_probs gives, to float64 precision: what the entropy coder codes with."""
    lik = likelihoods.build((2, 3), ModelConfig(likelihood=name, mixtures=3))
    params = 2 * torch.randn(4, *lik.params_shape(), generator=gen(0), dtype=f64)
    cdf = lik.cdf(params, torch.arange(lik.levels + 1))
    assert cdf.shape == (4, 2, 3, lik.levels + 1) and cdf.dtype == f64
    assert (cdf[..., 0] == 0).all()
    torch.testing.assert_close(cdf[..., -1], torch.ones(4, 2, 3, dtype=f64), rtol=0, atol=1e-12)
    # A component's probabilities below 1e-5 come from its density at the level (a difference of two sigmoids loses
    # its digits there, Salimans et al. 2017), so the steps agree with them to 1e-6, not to float64 precision.
    torch.testing.assert_close(cdf.diff(dim=-1), lik.value_log_probs(params).exp(), rtol=0, atol=1e-6)
    if name == "logistic-mixture":  # the mixture of logistic distribution functions at the edges between levels
        logits, means, log_scales = params.unflatten(1, (3, 3, 2)).unbind(1)  # (4, k, 2, 3) each
        edges = torch.cat([torch.tensor([-math.inf]), (2 * torch.arange(1, 256, dtype=f64) - 1) / 255 - 1])
        edges = torch.cat([edges, torch.tensor([math.inf])])
        terms = torch.sigmoid((edges - means[..., None]) / log_scales.clamp(min=-7).exp()[..., None])
        expected = (logits.softmax(1)[..., None] * terms).sum(1)
        torch.testing.assert_close(cdf, expected, rtol=0, atol=1e-14)


def test_a_density_is_a_likelihood_but_not_a_discrete_one():
    """The Gaussian satisfies the likelihood protocol but offers no per-value probabilities."""
    lik = likelihoods.build((3,), ModelConfig(likelihood="gaussian"))
    assert isinstance(lik, Likelihood) and not isinstance(lik, DiscreteLikelihood)
    assert lik.support is None and Bernoulli((3,), ModelConfig()).support is not None


@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic-mixture"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 7, 9), (3, 15, 17), (1, 2, 3)])
def test_conv_vae_keeps_any_image_shape(shape, likelihood):
    """Conv encoder and decoder work at even and odd sizes: decoder outputs match params_shape, decode the input."""
    channels = [4] if shape == (1, 2, 3) else [8, 16]
    model = VAE(
        shape, ModelConfig(net="conv", channels=channels, hidden=[16], latent=3, likelihood=likelihood, mixtures=2)
    )
    x = torch.randint(0, 256, (4, *shape), generator=gen(0)).float() / 255
    if likelihood == "bernoulli":
        x = x.round()
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (4, 3)
    params = model.decoder(torch.randn(2, 4, 3, generator=gen(1)))
    assert params.shape == (2, 4, *model.likelihood.params_shape())
    out = model.decode(mean)
    assert out.shape == (4, *shape) and ((out >= 0) & (out <= 1)).all()
    log_px, kl = model.terms(x, 2, generator=gen(2))
    assert log_px.shape == (2, 4) and kl.shape == (2, 4, 3)
    assert torch.isfinite(model.loss(x, gen(3))).all()
    assert model.sample(3, gen(4)).shape == (3, *shape)


@pytest.mark.parametrize(
    ("shape", "channels"), [((1, 3, 3), [8, 16]), ((1, 1, 5), [8]), ((3, 4, 40), [8, 16, 32]), ((1, 8, 8), [4] * 4)]
)
def test_conv_refuses_images_too_small_for_its_layers(shape, channels):
    """Each stride-2 convolution halves the size; an image that would shrink below 1 pixel is a VaekitError."""
    with pytest.raises(vaekit.VaekitError, match="too small"):
        VAE(shape, ModelConfig(net="conv", channels=channels, hidden=[8], latent=2))


@pytest.mark.parametrize("shift", [-50.0, 50.0])
def test_the_conv_decoder_puts_its_activation_between_dense_and_deconvolution(shift):
    """With relu after the dense layers, dense outputs pushed far below zero all reach the deconvolutions as 0, so the
    decoder no longer depends on z; pushed far above zero they pass through, and it does. The last layer has no
    activation: its outputs (logits) take both signs."""
    torch.manual_seed(0)
    model = VAE((1, 8, 8), ModelConfig(net="conv", channels=[4, 4], hidden=[8], latent=2, activation="relu"))
    with torch.no_grad():
        model.decoder.dense[0].net[-1].bias.add_(shift)
    params = model.decoder(torch.randn(5, 2, generator=gen(0)))
    spread = (params - params[0]).abs().max().item()
    assert spread == 0.0 if shift < 0 else spread > 1e-3
    assert (params < 0).any() and (params > 0).any()


def test_the_conv_decoder_has_an_activation_between_every_two_deconvolutions_and_none_after_the_last():
    """Three transposed convolutions with the activation between them, as in the encoder, and logits out of the last."""
    model = VAE((1, 16, 16), ModelConfig(net="conv", channels=[4, 8, 8], hidden=[8], latent=2, activation="elu"))
    layers = [type(m).__name__ for m in model.decoder.deconv]
    assert layers == ["ConvTranspose2d", "ELU", "ConvTranspose2d", "ELU", "ConvTranspose2d"]


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "logistic-mixture"])
def test_conv_refuses_tabular_data(likelihood):
    """net='conv' on examples of shape (13,) is a VaekitError, whatever the likelihood."""
    with pytest.raises(vaekit.VaekitError, match="conv"):
        VAE((13,), ModelConfig(net="conv", channels=[8], hidden=[8], latent=2, likelihood=likelihood))


# ---------------------------------------------------------------- two stochastic layers


def two_layer() -> VAE:
    torch.manual_seed(0)
    return VAE((12,), ModelConfig(hidden=[16], latent=4, hidden2=[8], latent2=3, activation="tanh"))


def test_two_layer_shapes_and_finite_objectives():
    """terms gives (k, B) and (k, B, latent + latent2); both objectives are finite; samples have the data shape."""
    model = two_layer()
    x = torch.bernoulli(torch.full((10, 12), 0.3), generator=gen(0))
    for analytic in (True, False):
        log_px, kl = model.terms(x, 5, analytic=analytic, generator=gen(1))
        assert log_px.shape == (5, 10) and kl.shape == (5, 10, 7)
    for kind in ("elbo", "iwae"):
        loss = objective(model, x, kind, k=5, generator=gen(2))
        assert loss.shape == (10,) and torch.isfinite(loss).all()
    samples = model.sample(6, gen(3))
    assert samples.shape == (6, 12) and ((samples >= 0) & (samples <= 1)).all()
    means = model.posterior_means(x, generator=gen(4))
    assert [m.shape for m in means] == [(10, 4), (10, 3)]


def test_two_layer_log_weights_match_torch_distributions():
    """The log weight log p(x, z1, z2) - log q(z1, z2 | x) at the same draws equals torch.distributions'."""
    model = two_layer()
    x = torch.bernoulli(torch.full((6, 12), 0.5), generator=gen(0))
    k = 4
    with torch.no_grad():
        log_px, kl = model.terms(x, k, analytic=False, generator=gen(7))
        # The same draws: z1 = mean + sd * eps1, then z2 given z1, from one generator in that order.
        g = gen(7)
        mu1, logvar1 = model.encode(x)
        q1 = Normal(mu1, (0.5 * logvar1).exp())
        z1 = mu1 + (0.5 * logvar1).exp() * torch.randn(k, *mu1.shape, generator=g)
        mu2, logvar2 = model.encoder2(z1)
        q2 = Normal(mu2, (0.5 * logvar2).exp())
        z2 = mu2 + (0.5 * logvar2).exp() * torch.randn(mu2.shape, generator=g)
        pm, plv = model.prior1(z2)
        p1 = Normal(pm, (0.5 * plv).exp())
        expected_kl = q1.log_prob(z1).sum(-1) + q2.log_prob(z2).sum(-1) - p1.log_prob(z1).sum(-1)
        expected_kl -= Normal(0.0, 1.0).log_prob(z2).sum(-1)
        expected_px = TorchBernoulli(logits=model.decoder(z1)).log_prob(x).sum(-1)
        torch.testing.assert_close(log_px, expected_px, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kl.sum(-1), expected_kl, rtol=1e-5, atol=1e-4)
        # With analytic=True only z2's term becomes KL(q(z2|z1) || N(0, I)), at the same draws.
        _, kl_a = model.terms(x, k, analytic=True, generator=gen(7))
        expected_top = kl_divergence(q2, Normal(0.0, 1.0))
        torch.testing.assert_close(kl_a[..., 4:], expected_top, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl_a[..., :4], kl[..., :4])


def test_two_layer_iwae_bound_is_above_elbo():
    """The 50-sample IWAE bound is above the 50-draw ELBO: per example at the same draws, and on average."""
    model = two_layer()
    x = torch.bernoulli(torch.full((100, 12), 0.5), generator=gen(0))
    with torch.no_grad():
        iwae = objective(model, x, "iwae", k=50, generator=gen(1))
        log_px, kl = model.terms(x, 50, analytic=False, generator=gen(1))
        same_draws_elbo = -(log_px - kl.sum(-1)).mean(0)
        elbo = objective(model, x, "elbo", k=50, generator=gen(2))
    assert (iwae <= same_draws_elbo + 1e-5).all()  # log of a mean >= mean of logs
    assert iwae.mean() < elbo.mean() - 0.05


# ---------------------------------------------------------------- objective semantics


def one_layer() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    model = VAE((10,), ModelConfig(hidden=[16], latent=3))
    with torch.no_grad():
        model.encoder.net[-1].weight.mul_(10)  # posteriors far enough from the prior for KLs of a few nats
    return model, torch.bernoulli(torch.full((8, 10), 0.5), generator=gen(0))


def draws(model: VAE, x: torch.Tensor, k: int, seed: int):
    """The posterior, k reparameterised draws z = mean + sd * eps with eps from gen(seed), and log p(x|z)."""
    mean, logvar = model.encode(x)
    q = Normal(mean, (0.5 * logvar).exp())
    z = mean + (0.5 * logvar).exp() * torch.randn(k, *mean.shape, generator=gen(seed))
    return q, z, TorchBernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)


def test_beta_zero_is_reconstruction_only():
    """beta = 0 leaves -mean_k log p(x|z), the KL ignored; beta = 1 adds the analytic KL, other betas (a fraction, a
    whole number) weight it."""
    model, x = one_layer()
    q, _, log_px = draws(model, x, 3, seed=5)
    kl = kl_divergence(q, Normal(0.0, 1.0)).sum(-1)
    assert kl.min() > 0.5
    torch.testing.assert_close(objective(model, x, k=3, beta=0.0, generator=gen(5)), -log_px.mean(0))
    torch.testing.assert_close(objective(model, x, k=3, beta=1.0, generator=gen(5)), -log_px.mean(0) + kl)
    torch.testing.assert_close(objective(model, x, k=3, beta=0.25, generator=gen(5)), -log_px.mean(0) + 0.25 * kl)
    torch.testing.assert_close(objective(model, x, k=3, beta=2.0, generator=gen(5)), -log_px.mean(0) + 2 * kl)


def test_iwae_with_one_draw_is_the_sampled_elbo():
    """iwae with k = 1 is -(log p(x|z) + log p(z) - log q(z|x)) at the same draw."""
    model, x = one_layer()
    q, z, log_px = draws(model, x, 1, seed=6)
    log_w = log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    torch.testing.assert_close(objective(model, x, "iwae", k=1, generator=gen(6)), -log_w[0], rtol=1e-5, atol=1e-5)


def test_iwae_k20_matches_log_mean_exp_and_beats_elbo():
    """iwae k = 20 is log 20 - logsumexp of the log weights, and below the 20-draw ELBO loss for every example."""
    model, x = one_layer()
    q, z, log_px = draws(model, x, 20, seed=8)
    log_w = log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    expected = -(torch.logsumexp(log_w.double(), 0) - math.log(20)).float()
    iwae = objective(model, x, "iwae", k=20, generator=gen(8))
    torch.testing.assert_close(iwae, expected, rtol=1e-5, atol=1e-4)
    assert (iwae <= -log_w.mean(0) + 1e-5).all()
    assert iwae.mean() < objective(model, x, "elbo", k=20, generator=gen(9)).mean() - 0.05


def test_free_bits_replace_small_kls_by_a_constant():
    """Dimensions whose batch-mean KL is below free_bits count as exactly free_bits; the others keep their KL."""
    model, x = one_layer()
    q, _, log_px = draws(model, x, 1, seed=4)
    kl = kl_divergence(q, Normal(0.0, 1.0))  # (B, 3)
    per_dim = kl.mean(0)
    threshold = per_dim.sort().values[1:].mean().item()  # between the middle and the largest dims' mean KLs
    kept = per_dim >= threshold
    assert 0 < kept.sum() < 3
    expected = -log_px[0] + torch.where(kept, kl, torch.full_like(kl, threshold)).sum(-1)
    got = objective(model, x, free_bits=threshold, generator=gen(4))
    torch.testing.assert_close(got, expected)


def test_free_bits_keep_a_dimension_at_the_threshold_also_below_one_nat():
    """A dimension whose batch-mean KL equals free_bits keeps its KL; thresholds below one nat act too."""
    torch.manual_seed(0)
    model = VAE((10,), ModelConfig(hidden=[16], latent=3))  # a fresh encoder: KLs well below a nat
    x = torch.bernoulli(torch.full((8, 10), 0.5), generator=gen(0))
    q, _, log_px = draws(model, x, 1, seed=4)
    kl = kl_divergence(q, Normal(0.0, 1.0))
    # The threshold: the middle dimension's mean KL to the last bit, as the objective computes it over (k, B).
    means = kl_normal(*model.encode(x)).unsqueeze(0).mean((0, 1))
    at = means.sort().values[1]
    assert 0 < at.item() < 1
    kept = means >= at
    assert kept.sum() == 2
    expected = -log_px[0] + torch.where(kept, kl, torch.full_like(kl, at.item())).sum(-1)
    torch.testing.assert_close(objective(model, x, free_bits=at.item(), generator=gen(4)), expected)
    assert log_weights(model, x, free_bits=at.item(), analytic=True, generator=gen(4)).shape == (1, 8)  # k = 1


def test_free_bits_above_every_kl_leaves_only_reconstruction_gradients():
    """With free_bits above every dimension's KL, gradients equal those of beta = 0 exactly."""
    grads = []
    for kwargs in ({"free_bits": 1e6}, {"beta": 0.0}):
        model, x = one_layer()
        objective(model, x, k=2, generator=gen(3), **kwargs).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    free, zero_beta = grads
    for name in free:
        torch.testing.assert_close(free[name], zero_beta[name], rtol=0, atol=0)
    model, x = one_layer()
    objective(model, x, k=2, generator=gen(3)).sum().backward()
    assert not torch.equal(model.encoder.net[-1].weight.grad, free["encoder.net.2.weight"])  # the KL does pull


# ---------------------------------------------------------------- training options on digits


def small(**kw):
    """Overrides for a quick digits run."""
    return {"hidden": [32], "epochs": 1, "verbose": False, **kw}


def test_iwae_objective_trains(digits, tmp_path):
    """objective=iwae with k=3 trains; the run records it; the test loss is finite and positive."""
    run = vaekit.train("digits", tmp_path / "run", dataset=digits, **small(objective="iwae", k=3))
    assert math.isfinite(run.metrics[0]["test_loss"]) and run.metrics[0]["test_loss"] > 0
    cfg = vaekit.load_config(run.dir)
    assert cfg.train.objective == "iwae" and cfg.train.k == 3


def test_cli_train_sets_the_objective(tmp_path, capsys):
    """`train --set train.objective=iwae --set train.k=5` trains and records the objective in config.toml."""
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--out", str(out), "-q", "--no-plots", "--set", "train.objective=iwae"]
    assert main([*args, "--set", "train.k=5", "--set", "model.hidden=[16]", "--set", "train.batch_size=256"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = vaekit.load_config(out)
    assert (cfg.train.objective, cfg.train.k, cfg.model.hidden) == ("iwae", 5, [16])
    assert len(vaekit.read_metrics(out)) == 1


def test_sgd_with_step_lr_halves_the_rate_each_epoch(digits, tmp_path):
    """SGD (momentum 0.9) with StepLR(step_size=1, gamma=0.5) logs lr = base, base/2, base/4 in the metrics."""
    run = vaekit.train(
        "digits",
        tmp_path / "run",
        dataset=digits,
        **small(
            epochs=3,
            lr=1e-5,
            optimizer="SGD",
            optimizer_args={"momentum": 0.9},
            scheduler="StepLR",
            scheduler_args={"step_size": 1, "gamma": 0.5},
        ),
    )
    assert [m["lr"] for m in run.metrics] == pytest.approx([1e-5, 5e-6, 2.5e-6], rel=1e-12)
    assert all(math.isfinite(m["test_loss"]) for m in run.metrics)


def test_burda_scheduler_in_training(digits, tmp_path):
    """scheduler=burda logs lr = base * 10^(-i/7) with stage i lasting 3^i epochs: 1, f, f, f, f^2."""
    run = vaekit.train("digits", tmp_path / "run", dataset=digits, **small(epochs=5, batch_size=512, scheduler="burda"))
    f = 10 ** (-1 / 7)
    assert [m["lr"] for m in run.metrics] == pytest.approx([1e-3, 1e-3 * f, 1e-3 * f, 1e-3 * f, 1e-3 * f * f])


def test_warmup_ramps_the_kl_weight_linearly(digits, tmp_path):
    """Warm-up over 2 epochs weights the KL by step / (steps * 2) in epoch 1: seen with the weights held still."""
    # SGD at lr 1e-30 leaves every weight as initialised, and the draws repeat from the seed, so the epoch's
    # training loss is sum over steps of (reconstruction + KL weight * KL): linear in the KL weights.
    kw = small(optimizer="SGD", lr=1e-30)
    loss = {
        name: vaekit.train("digits", tmp_path / name, dataset=digits, **kw, **extra).metrics[0]["train_loss"]
        for name, extra in [
            ("zero", {"beta": 0.0}),
            ("plain", {}),
            ("warm", {"warmup": 2}),
            ("slow", {"warmup": 10**6}),
        ]
    }
    kl = loss["plain"] - loss["zero"]
    assert kl > 1e-3
    steps = math.ceil(len(digits.split("train").x) / 64)
    mean_weight = sum(step / (steps * 2) for step in range(steps)) / steps
    assert (loss["warm"] - loss["zero"]) / kl == pytest.approx(mean_weight, abs=0.05)
    assert loss["slow"] == pytest.approx(loss["zero"], abs=1e-5)


def test_clip_grad_bounds_every_step(digits, tmp_path):
    """With plain SGD and clip_grad c, n steps move the weights by at most n * lr * c in total."""
    kw = small(optimizer="SGD", batch_size=128)
    start = vaekit.train("digits", tmp_path / "start", dataset=digits, **{**kw, "lr": 1e-30}).model.state_dict()
    run = vaekit.train("digits", tmp_path / "clip", dataset=digits, **{**kw, "lr": 0.1, "clip_grad": 0.01})
    end = run.model.state_dict()
    moved = math.sqrt(sum((end[k] - start[k]).double().square().sum().item() for k in start))
    steps = math.ceil(len(digits.split("train").x) / 128)
    assert 0 < moved <= steps * 0.1 * 0.01 * 1.0001
    assert math.isfinite(run.metrics[0]["test_loss"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"optimizer": "Adamm"}, "train.optimizer"),
        ({"scheduler": "StepLRR"}, "train.scheduler"),
        ({"optimizer": "SGD", "optimizer_args": {"bogus_arg": 1}}, "bogus_arg"),
        ({"scheduler": "StepLR", "scheduler_args": {"bogus_arg": 1}}, "bogus_arg"),
        ({"optimizer": "Adam", "optimizer_args": {"betas": "fast"}}, r"train\.optimizer_args = \{'betas': 'fast'\}"),
        ({"optimizer": "Adam", "optimizer_args": {"betas": [0.9]}}, r"train\.optimizer_args = \{'betas': \[0\.9\]\}"),
        ({"optimizer": "LBFGS"}, "train.optimizer 'LBFGS'"),
        ({"scheduler": "_LRScheduler"}, "train.scheduler '_LRScheduler'"),
        ({"scheduler": "ReduceLROnPlateau"}, "train.scheduler 'ReduceLROnPlateau'"),
        # Both fail only when stepped: the rehearsal in make_optimizer must catch them before the run starts.
        ({"scheduler": "OneCycleLR", "scheduler_args": {"max_lr": 0.01, "total_steps": 2}, "epochs": 3}, "total_steps"),
        ({"scheduler": "StepLR", "scheduler_args": {"step_size": "x"}}, "step_size"),
        ({"objective": "iwae", "k": 2, "free_bits": 0.5}, "train.free_bits"),
    ],
)
def test_bad_optimizer_settings_are_user_errors(overrides, key, digits, tmp_path):
    """Unknown optimizer or scheduler names and bad arguments raise VaekitError naming the key; no run is made."""
    with pytest.raises(vaekit.VaekitError, match=key):
        vaekit.train("digits", tmp_path / "run", dataset=digits, **small(**overrides))
    assert not (tmp_path / "run").exists()


def test_foreach_optimizer_argument_is_honoured(digits, tmp_path):
    """Asking for the foreach implementation turns off the default fused one instead of failing."""
    run = vaekit.train("digits", tmp_path / "run", dataset=digits, **small(optimizer_args={"foreach": True}))
    assert math.isfinite(run.metrics[0]["test_loss"])


def test_learned_gaussian_deviation_has_a_floor():
    """A learned deviation driven far below 1e-3 is used as 1e-3, so a constant dimension has a bounded density."""
    lik = Gaussian((3,), ModelConfig(likelihood="gaussian", variance="per-dim"))
    with torch.no_grad():
        lik.log_sigma.fill_(-50.0)
    x = torch.zeros(2, 3)
    expected = Normal(torch.zeros(3), torch.full((3,), 1e-3)).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.log_prob(x, torch.zeros(2, 3)), expected)


def test_validation_split_adds_valid_loss(digits, tmp_path):
    """validation=50 holds 50 training examples out as 'valid' and logs valid_loss every epoch."""
    run = vaekit.train("digits", tmp_path / "run", **small(validation=50))
    assert len(run.data.split("valid").x) == 50
    assert len(run.data.split("train").x) == len(digits.split("train").x) - 50
    assert torch.equal(run.data.split("test").x, digits.split("test").x)
    row = run.metrics[0]
    assert math.isfinite(row["valid_loss"]) and row["valid_loss"] > 0
    assert json.loads((run.dir / "metrics.jsonl").read_text().splitlines()[0])["valid_loss"] == row["valid_loss"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"likelihood": "gaussian", "variance": "per-dim"},
        {"net": "conv", "model.channels": [8, 16]},
        {"latent": 3, "hidden2": [8], "latent2": 2},
    ],
    ids=["gaussian-per-dim", "conv", "two-layer"],
)
def test_saved_models_reload_exactly(overrides, digits, tmp_path):
    """Gaussian per-dim, conv and two-layer runs reload with identical weights, decodings, samples and losses."""
    run = vaekit.train("digits", tmp_path / "run", dataset=digits, **small(**overrides))
    trained = run.model.cpu().eval()
    loaded = vaekit.load(run.dir)
    assert loaded.config == trained.config
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = digits.split("test").x[:20]
    with torch.no_grad():
        z = torch.randn(10, trained.latent, generator=gen(0))
        assert torch.equal(trained.decode(z), loaded.decode(z))
        assert torch.equal(trained.sample(5, gen(1)), loaded.sample(5, gen(1)))
        assert torch.equal(trained.loss(x, gen(2)), loaded.loss(x, gen(2)))
    if "variance" in overrides:
        assert loaded.likelihood.log_sigma.shape == (1, 8, 8)
        assert not torch.allclose(loaded.likelihood.log_sigma, torch.tensor(math.log(0.1)))  # it was learned


# ---------------------------------------------------------------- the Burda schedule and the IWAE presets


def test_burda_schedule_stages():
    """The factor is 10^(-i/7) during the 3^i passes of stage i = 0..7, and stays 10^-1 after all 3280 passes."""
    expected = [10 ** (-i / 7) for i in range(8) for _ in range(3**i)]
    assert len(expected) == 3280 == PRESETS["iwae-1l"]["train"]["epochs"]
    got = [burda_schedule(epoch) for epoch in range(3400)]
    assert got[:3280] == pytest.approx(expected, rel=1e-12)
    assert got[3280:] == pytest.approx([0.1] * 120, rel=1e-12)
    assert burda_schedule(0) == 1.0
    assert [burda_schedule(e) for e in (1, 3, 4, 12, 13, 1092, 1093, 3279)] == pytest.approx(
        [10 ** (-1 / 7)] * 2 + [10 ** (-2 / 7)] * 2 + [10 ** (-3 / 7), 10 ** (-6 / 7), 0.1, 0.1]
    )


def linear_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def n_params(shapes: list[tuple[int, int]]) -> int:
    return sum(i * o + o for i, o in shapes)


def test_iwae_presets_build_burda_architectures():
    """iwae-1l is 784-200-200-50 and iwae-2l 784-200-200-100-100-100-50, tanh, Bernoulli, with Burda's training."""
    one, two = make_config("iwae-1l"), make_config("iwae-2l")
    m1, m2 = VAE((1, 28, 28), one.model), VAE((1, 28, 28), two.model)
    assert linear_shapes(m1.encoder) == [(784, 200), (200, 200), (200, 100)]
    assert linear_shapes(m1.decoder) == [(50, 200), (200, 200), (200, 784)]
    assert linear_shapes(m1) == linear_shapes(m1.encoder) + linear_shapes(m1.decoder)
    assert linear_shapes(m2.encoder) == [(784, 200), (200, 200), (200, 200)]
    assert linear_shapes(m2.encoder2) == [(100, 100), (100, 100), (100, 100)]
    assert linear_shapes(m2.prior1) == [(50, 100), (100, 100), (100, 200)]
    assert linear_shapes(m2.decoder) == [(100, 200), (200, 200), (200, 784)]
    # Parameter counts from the layer sizes alone: nothing else (no learned variance) is trained.
    one_layer_count = 2 * 784 * 200 + 200 * 200 * 2 + 200 * 100 + 50 * 200 + (200 + 200 + 100) + (200 + 200 + 784)
    assert sum(p.numel() for p in m1.parameters()) == one_layer_count == n_params(linear_shapes(m1))
    assert sum(p.numel() for p in m2.parameters()) == n_params(linear_shapes(m2))
    for cfg in (one, two):
        assert cfg.model.activation == "tanh" and cfg.model.likelihood == "bernoulli"
        assert (cfg.data.name, cfg.data.binarize, cfg.data.validation) == ("mnist", True, 400)
        t = cfg.train
        assert (t.epochs, t.batch_size, t.lr, t.optimizer, t.scheduler) == (3280, 20, 1e-3, "Adam", "burda")
        assert tuple(t.optimizer_args["betas"]) == (0.9, 0.999) and t.optimizer_args["eps"] == 1e-4
    assert m1.sample(2, gen(0)).shape == m2.sample(2, gen(0)).shape == (2, 1, 28, 28)
    assert np.isclose(sum(burda_schedule(e) for e in range(3280)), sum(3**i * 10 ** (-i / 7) for i in range(8)))


@pytest.mark.parametrize("kind", ["elbo", "iwae"])
@pytest.mark.parametrize("layers", [1, 2])
def test_a_part_of_a_batch_gets_the_noise_the_whole_batch_gives_its_rows(kind, layers):
    """What one of several processes computes for its examples of a global batch (a world.Part) is what a single
    process computes for those rows of the whole batch, posterior draws included, so that updates do not depend on
    the number of processes; without the part, the same rows would get other draws."""
    if layers == 1:
        model, x = one_layer()
    else:
        model, x = two_layer(), torch.bernoulli(torch.full((8, 12), 0.3), generator=gen(0))
    rows = torch.tensor([0, 3, 4, 7])
    whole = objective(model, x, kind, k=3, beta=0.5, generator=gen(9))
    mine = objective(model, x[rows], kind, k=3, beta=0.5, generator=gen(9), part=Part(rows, len(x)))
    torch.testing.assert_close(mine, whole[rows])
    alone = objective(model, x[rows], kind, k=3, beta=0.5, generator=gen(9))
    assert not torch.allclose(alone, whole[rows])


def test_a_part_is_binarised_as_the_whole_batch_binarises_its_rows():
    """Dynamic binarisation of a part draws the whole batch's uniforms and keeps the part's rows."""
    x = torch.rand(10, 6, generator=gen(1))
    rows = torch.tensor([1, 2, 8])
    torch.manual_seed(3)
    whole = binarize(x)
    torch.manual_seed(3)
    assert torch.equal(binarize(x[rows], Part(rows, len(x))), whole[rows])
    assert set(whole.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("width", [784, 251, 1000])
def test_bernoulli_evaluation_sum_equals_the_elementwise_sum_at_any_width(width):
    """Without gradients, the Bernoulli log-likelihood is summed by a faster rearrangement: it equals the element-wise
    sum whatever the data width (one with many factors of two, a prime, and another), also for logits near 0, where
    a product of many factors of one half would underflow."""
    likelihood = Bernoulli((width,), ModelConfig())
    x = torch.bernoulli(torch.full((3, width), 0.5), generator=gen(1))
    for logits in (torch.randn(4, 3, width, generator=gen(2)) * 3, torch.zeros(4, 3, width)):
        expected = likelihood.log_prob_dims(x, logits).sum(-1)
        with torch.no_grad():
            torch.testing.assert_close(likelihood.log_prob(x, logits), expected)
