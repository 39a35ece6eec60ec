"""Importance-sampled evaluation against exact answers: a linear-Gaussian model solved in closed form, a 1-D latent
Bernoulli model integrated on a grid, the two code paths of the Bernoulli sum, active units, and `vaekit evaluate`.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, Terminal
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import MultivariateNormal, Normal, kl_divergence

import vaekit
from vaekit.cli import main
from vaekit.config import ModelConfig
from vaekit.likelihoods import Bernoulli
from vaekit.model import VAE, log_weights
from vaekit.uses.evaluation import estimate, table

D, L, SIGMA = 5, 2, 0.5  # the linear-Gaussian model: x = W z + b + SIGMA * noise, z ~ N(0, I_L)
f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the linear-Gaussian model, solved exactly


def linear_gaussian(shift: float = 0.0, inflate: float = 1.0) -> tuple[VAE, torch.Tensor, torch.Tensor]:
    """A float64 linear-Gaussian VAE with decoder z -> W z + b (W with orthogonal columns, so that the exact
    posterior is diagonal) and an encoder set to the exact posterior, moved by `shift` posterior deviations and
    with its deviation multiplied by `inflate`. Returns the model, W and b."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, L, generator=g, dtype=f64))
    w = q * torch.tensor([1.5, 0.8], dtype=f64)
    b = torch.randn(D, generator=g, dtype=f64)
    model = VAE((D,), ModelConfig(hidden=[], latent=L, likelihood="gaussian", variance="fixed", sigma=SIGMA)).double()
    # Exact posterior of z given x: covariance (I + W^T W / s^2)^-1, diagonal here; mean = cov W^T (x - b) / s^2.
    post_var = 1 / (1 + (w**2).sum(0) / SIGMA**2)
    gain = post_var[:, None] * w.T / SIGMA**2
    decoder = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    encoder = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(decoder) == len(encoder) == 1  # hidden=[] gives one linear map each way
    with torch.no_grad():
        model.likelihood.log_sigma.fill_(math.log(SIGMA))  # built in float32: make it log(0.5) in float64
        decoder[0].weight.copy_(w)
        decoder[0].bias.copy_(b)
        encoder[0].weight.zero_()
        encoder[0].weight[:L] = gain
        encoder[0].bias[:L] = -gain @ b + shift * post_var.sqrt()
        encoder[0].bias[L:] = post_var.log() + 2 * math.log(inflate)
    return model, w, b


def draw_data(w: torch.Tensor, b: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples from the linear-Gaussian model and their exact log p(x) = log N(x; b, W W^T + s^2 I)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, L, generator=g, dtype=f64)
    x = z @ w.T + b + SIGMA * torch.randn(n, D, generator=g, dtype=f64)
    exact = MultivariateNormal(b, w @ w.T + SIGMA**2 * torch.eye(D, dtype=f64)).log_prob(x)
    return x, exact


def test_linear_gaussian_large_k_matches_exact_log_likelihood():
    """With k = 20000 the IW estimate equals the closed-form log p(x) and the ELBO lies below it for every example."""
    model, w, b = linear_gaussian(shift=2.0, inflate=2.0)
    x, exact = draw_data(w, b, 100, seed=1)
    result = estimate(model, x, k=20000, seed=0, progress=False)
    assert result.log_px.shape == result.elbo.shape == (100,)
    assert (result.log_px - exact).abs().max() < 0.1
    assert abs((result.log_px - exact).mean()) < 0.01
    # A 2-sigma-off, twice-too-wide posterior costs nats of ELBO for every example.
    assert (result.elbo < exact - 0.5).all()
    assert not result.discrete and result.bits_per_dim is None  # a density: no code length


def test_linear_gaussian_estimate_rises_with_k():
    """The mean IW estimate rises with k = 1, 10, 100, 1000 towards the exact value and never exceeds it by much."""
    model, w, b = linear_gaussian(shift=2.0, inflate=2.0)
    x, exact = draw_data(w, b, 3000, seed=2)
    gaps = [(estimate(model, x, k=k, seed=k, progress=False).log_px - exact).mean().item() for k in (1, 10, 100, 1000)]
    # The bias of log of a k-sample mean shrinks like 1/k; at these sizes each step is several standard errors.
    assert gaps[0] < gaps[1] - 1 < gaps[2] - 1
    assert gaps[2] < -0.015  # k = 100 is still visibly biased (about -0.035 expected) ...
    assert -0.012 < gaps[3] < 0.01  # ... k = 1000 ten times less (about -0.0035)


def test_exact_posterior_makes_elbo_tight_and_weights_constant():
    """With the encoder at the exact posterior, ELBO = IW estimate = log p(x) and every importance weight is equal."""
    model, w, b = linear_gaussian()
    x, exact = draw_data(w, b, 50, seed=3)
    a = estimate(model, x, k=100, seed=0, progress=False)
    c = estimate(model, x, k=7, seed=5, progress=False)
    torch.testing.assert_close(a.elbo, exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(a.log_px, exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(c.log_px, exact, rtol=0, atol=1e-9)
    with torch.no_grad():
        log_px, kl = model.terms(x, 200, analytic=False, generator=torch.Generator().manual_seed(4))
    log_w = log_px - kl.sum(-1)
    assert log_w.std(0).max() < 1e-9


# ---------------------------------------------------------------- a 1-D latent Bernoulli model, integrated on a grid


def tiny_bernoulli(dtype: torch.dtype = f64) -> VAE:
    """A random 6-pixel Bernoulli VAE with one latent dimension, its decoder made steep enough to matter."""
    torch.manual_seed(3)
    model = VAE((6,), ModelConfig(hidden=[8], latent=1)).to(dtype)
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(4)
    return model


ALL_BINARY = ((torch.arange(64)[:, None] >> torch.arange(6)) & 1).double()  # every 6-pixel binary image


def grid_log_px(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log of the integral of N(z; 0, 1) p(x|z) over z, by the trapezoid rule on a fine grid (float64)."""
    z = torch.linspace(-12, 12, 24001, dtype=f64)
    step = z[1] - z[0]
    with torch.no_grad():
        logits = model.decoder(z[:, None])
    joint = TorchBernoulli(logits=logits[:, None, :]).log_prob(x[None]).sum(-1) + Normal(0.0, 1.0).log_prob(z)[:, None]
    weights = torch.full_like(z, step.item())
    weights[[0, -1]] /= 2
    return torch.logsumexp(joint + weights.log()[:, None], 0)


def test_bernoulli_estimate_matches_numerical_integration():
    """For all 64 binary images, the k = 20000 estimate equals log p(x) integrated over z, and the p(x) sum to 1."""
    model = tiny_bernoulli()
    exact = grid_log_px(model, ALL_BINARY)
    assert abs(exact.exp().sum().item() - 1) < 1e-6  # the grid itself is accurate
    result = estimate(model, ALL_BINARY, k=20000, seed=0, progress=False)
    assert (result.log_px - exact).abs().max() < 0.05
    assert abs((result.log_px - exact).mean()) < 0.005
    assert abs(result.log_px.exp().sum().item() - 1) < 0.01
    assert (result.elbo <= exact + 0.005).all()
    assert result.discrete
    nll = -exact.mean().item()
    assert result.bits_per_dim is not None
    assert result.bits_per_dim == pytest.approx(result.nll / (6 * math.log(2)), rel=1e-12)
    assert result.bits_per_dim == pytest.approx(nll / (6 * math.log(2)), abs=0.005)
    summary = result.summary()
    assert summary["examples"] == 64 and summary["k"] == 20000
    assert summary["bits_per_dim"] == result.bits_per_dim


def test_bernoulli_estimate_in_float32_matches_integration():
    """The float32 model, as trained, gives the same estimate through the fast no-grad Bernoulli sum."""
    model32 = tiny_bernoulli(torch.float32)
    exact = grid_log_px(tiny_bernoulli(), ALL_BINARY)
    result = estimate(model32, ALL_BINARY.float(), k=20000, seed=0, progress=False)
    assert (result.log_px - exact).abs().max() < 0.05


def test_log_likelihood_is_the_integrated_log_px_and_what_estimate_reports():
    """vaekit.log_likelihood, the core without diagnostics, gives the integrated log p(x) of all 64 binary images, and
    with one block of examples exactly the values estimate reports for the same seed (float64, on the CPU)."""
    model = tiny_bernoulli()
    exact = grid_log_px(model, ALL_BINARY)
    one_block = 64 * 20000 * 6
    log_px = vaekit.log_likelihood(model, ALL_BINARY, k=20000, seed=0, max_elements=one_block)
    assert log_px.shape == (64,) and log_px.dtype == f64 and log_px.device.type == "cpu"
    assert (log_px - exact).abs().max() < 0.05
    assert abs(log_px.exp().sum().item() - 1) < 0.01
    assert torch.equal(log_px, estimate(model, ALL_BINARY, 20000, 0, one_block, progress=False).log_px)
    with pytest.raises(vaekit.VaekitError, match="k must be"):
        vaekit.log_likelihood(model, ALL_BINARY, k=0)


def test_log_weights_are_the_importance_weights_of_the_draws():
    """log_weights gives log p(x|z) + log p(z) - log q(z|x) at the reparameterised draws z = mean + sd * eps that its
    generator makes, (k, B); analytic=True replaces the latent terms by the closed-form KL and beta scales them."""
    model, x, k = tiny_bernoulli(), ALL_BINARY[:5], 7
    w = log_weights(model, x, k, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mean, logvar = model.encode(x)
        sd = (0.5 * logvar).exp()
        z = mean + sd * torch.randn((k, *mean.shape), generator=torch.Generator().manual_seed(4), dtype=f64)
        log_px_z = TorchBernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
        expected = log_px_z + Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mean, sd).log_prob(z).sum(-1)
        kl = kl_divergence(Normal(mean, sd), Normal(0.0, 1.0)).sum(-1)
    assert w.shape == (k, 5)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    analytic = log_weights(model, x, k, analytic=True, beta=0.5, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(analytic, log_px_z - 0.5 * kl, rtol=1e-12, atol=1e-12)


def test_non_binary_data_has_no_bits_per_dim():
    """Grey levels under a Bernoulli likelihood are not discrete: bits_per_dim is None, the NLL is still finite."""
    model = tiny_bernoulli()
    x = torch.rand(20, 6, generator=torch.Generator().manual_seed(0), dtype=f64)
    result = estimate(model, x, k=20, seed=0, progress=False)
    assert result.discrete is False
    assert result.bits_per_dim is None and result.summary()["bits_per_dim"] is None
    assert math.isfinite(result.nll)


def test_same_seed_is_identical_and_other_seeds_agree():
    """A seed fixes the result exactly; another seed or another chunking gives statistically the same numbers."""
    model = tiny_bernoulli()
    x = ALL_BINARY
    a = estimate(model, x, k=2000, seed=1, progress=False)
    b = estimate(model, x, k=2000, seed=1, progress=False)
    assert torch.equal(a.log_px, b.log_px) and torch.equal(a.elbo, b.elbo) and a.kl_per_dim == b.kl_per_dim
    c = estimate(model, x, k=2000, seed=2, progress=False)
    assert not torch.equal(a.log_px, c.log_px)
    assert (a.log_px - c.log_px).abs().max() < 0.3
    assert abs(a.nll - c.nll) < 0.02
    # 600 numbers per block: 100 draws of one example at a time, against all examples and draws in one block.
    chunked = estimate(model, x, k=2000, seed=1, max_elements=600, progress=False)
    again = estimate(model, x, k=2000, seed=1, max_elements=600, progress=False)
    whole = estimate(model, x, k=2000, seed=1, max_elements=2**22, progress=False)
    assert torch.equal(chunked.log_px, again.log_px)
    exact = grid_log_px(model, x)
    for r in (chunked, whole):
        assert (r.log_px - exact).abs().max() < 0.15
        assert abs((r.log_px - exact).mean()) < 0.02
    assert abs(chunked.nll - whole.nll) < 0.02
    assert abs(chunked.neg_elbo - whole.neg_elbo) < 0.05


# ---------------------------------------------------------------- the two code paths of the Bernoulli sum


@pytest.mark.parametrize("shape", [(13,), (784,), (1, 28, 28), (67,)])
@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_no_grad_path_equals_grad_path(shape, lead, dtype):
    """Under no_grad the rearranged Bernoulli sum equals the autograd path and -BCE, at 0 and +-100 logits too."""
    g = torch.Generator().manual_seed(sum(shape))
    n = math.prod(shape)
    logits = torch.randn(*lead, 4, n, generator=g, dtype=dtype) * 10
    logits[..., :3] = torch.tensor([100.0, -100.0, 0.0], dtype=dtype)
    logits[..., 0, :] = 0.0  # one example with every logit 0
    x = torch.bernoulli(torch.full((4, n), 0.5, dtype=dtype), generator=g)
    x[:, :3] = torch.tensor([0.0, 1.0, 1.0], dtype=dtype)  # confidently wrong at +-100
    logits, x = logits.unflatten(-1, shape), x.unflatten(-1, shape)
    lik = Bernoulli(shape, ModelConfig())
    with torch.enable_grad():
        slow = lik.log_prob(x, logits)
    with torch.no_grad():
        fast = lik.log_prob(x, logits)
    expected = (
        -F.binary_cross_entropy_with_logits(logits.double(), x.double().expand(logits.shape), reduction="none")
        .flatten(-len(shape))
        .sum(-1)
    )
    assert slow.shape == fast.shape == (*lead, 4)
    tol = {"rtol": 1e-5, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-9}
    torch.testing.assert_close(fast.double(), expected, **tol)
    torch.testing.assert_close(slow.double(), expected, **tol)
    torch.testing.assert_close(fast, slow, **tol)
    assert (fast[..., 1:] < -190).all()  # two pixels confidently wrong cost 100 nats each


# ---------------------------------------------------------------- active units and KL per dimension


def test_active_units_count_only_dimensions_that_vary():
    """Latent dims whose posterior mean ignores x are inactive and have zero KL; the others match closed forms."""
    torch.manual_seed(0)
    model = VAE((6,), ModelConfig(hidden=[], latent=4)).double()
    linear = model.encoder.net[0]
    with torch.no_grad():
        linear.weight[0] = torch.tensor([2.0, -1.5, 1.0, 0.5, -2.0, 1.0])  # varies a lot
        linear.weight[1] = 0.02  # varies, but with a variance far below 0.01
        linear.weight[2:4] = 0.0  # dims 2 and 3: mean 0 for every x ...
        linear.bias[2:4] = 0.0
        linear.weight[6:8] = 0.0  # ... and log-variance 0: exactly the prior
        linear.bias[6:8] = 0.0
    x = torch.bernoulli(torch.full((300, 6), 0.5, dtype=f64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, logvar = model.encode(x)
    variance = mean.var(0, correction=0)
    assert variance[0] > 1 and variance[1] < 0.005  # the construction does what it says
    result = estimate(model, x, k=5, seed=0, progress=False)
    assert result.active_units == [1]
    assert result.summary()["active_units"] == 1
    assert len(result.kl_per_dim) == 4
    assert result.kl_per_dim[2] == pytest.approx(0, abs=1e-12) and result.kl_per_dim[3] == pytest.approx(0, abs=1e-12)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean(0)
    np.testing.assert_allclose(result.kl_per_dim, expected.numpy(), rtol=1e-10, atol=1e-12)
    assert result.summary()["kl"] == pytest.approx(expected.sum().item(), rel=1e-10)


def test_two_layer_model_reports_both_layers():
    """A two-stochastic-layer model has KL for latent + latent2 dimensions and active units per layer."""
    torch.manual_seed(0)
    model = VAE((10,), ModelConfig(hidden=[16], latent=4, hidden2=[8], latent2=3))
    x = torch.bernoulli(torch.full((40, 10), 0.4), generator=torch.Generator().manual_seed(2))
    result = estimate(model, x, k=30, seed=0, progress=False)
    assert len(result.kl_per_dim) == 7 and len(result.active_units) == 2
    assert 0 <= result.active_units[0] <= 4 and 0 <= result.active_units[1] <= 3
    assert (result.log_px >= result.elbo - 1e-6).all()  # log of a mean >= mean of logs over the same draws
    assert math.isfinite(result.nll) and result.bits_per_dim is not None


# ---------------------------------------------------------------- `vaekit evaluate` on a trained run


@pytest.fixture(scope="module")
def pristine_run(digits, tmp_path_factory):
    """A digits run trained for 2 epochs, never evaluated: tests copy it before writing into it."""
    root = tmp_path_factory.mktemp("evaluate")
    run = vaekit.train("digits", out=root / "run", dataset=digits, epochs=2, verbose=False)
    return run.dir


def copy_run(source, tmp_path):
    return shutil.copytree(source, tmp_path / "run")


def test_cli_evaluate_writes_summary_and_per_example_arrays(pristine_run, digits, tmp_path, capsys):
    """`evaluate RUN --k 50` writes evaluation.json and .npz that agree with each other, the API and the metrics."""
    run = copy_run(pristine_run, tmp_path)
    assert main(["evaluate", str(run), "--k", "50"]) == 0
    out = capsys.readouterr().out
    assert "evaluation.json" in out
    summary = json.loads((run / "evaluation.json").read_text())
    n_test = len(digits.split("test").x)
    assert summary["split"] == "test" and summary["k"] == 50 and summary["seed"] == 0
    assert summary["likelihood"] == "bernoulli" and summary["active_units_per_layer"] == [summary["active_units"]]
    assert summary["note"].startswith("the data do not all lie on the binary values 0 and 1, so the bernoulli")
    assert summary["examples"] == n_test
    assert summary["neg_elbo"] > 0 and summary["nll"] > 0
    assert summary["nll"] <= summary["neg_elbo"] + 1e-6
    assert len(summary["kl_per_dim"]) == 2
    assert isinstance(summary["active_units"], int) and 0 <= summary["active_units"] <= 2
    assert summary["kl"] == pytest.approx(sum(summary["kl_per_dim"]))
    assert summary["bits_per_dim"] is None and "note" in summary  # digits are grey levels under a Bernoulli
    with np.load(run / "evaluation.npz") as npz:
        assert set(npz.files) == {"neg_elbo", "nll"}
        neg_elbo, nll = npz["neg_elbo"], npz["nll"]
    assert neg_elbo.shape == nll.shape == (n_test,)
    assert nll.mean() == pytest.approx(summary["nll"], rel=1e-9)
    assert neg_elbo.mean() == pytest.approx(summary["neg_elbo"], rel=1e-9)
    assert (nll <= neg_elbo + 1e-6).all()
    # The same seed through the API gives the same numbers; the training loop's one-draw test loss agrees roughly.
    _, again = vaekit.evaluate(run, k=50, seed=0, save=False, progress=False)
    assert again["nll"] == summary["nll"] and again["neg_elbo"] == summary["neg_elbo"]
    test_loss = vaekit.read_metrics(run)[-1]["test_loss"]
    assert summary["neg_elbo"] == pytest.approx(test_loss, abs=1.0)


def test_cli_evaluate_train_split_writes_its_own_file(pristine_run, digits, tmp_path, capsys):
    """`--split train` writes evaluation-train.json over the training examples and leaves evaluation.json alone."""
    run = copy_run(pristine_run, tmp_path)
    assert main(["evaluate", str(run), "--split", "train", "--k", "3"]) == 0
    capsys.readouterr()
    summary = json.loads((run / "evaluation-train.json").read_text())
    assert summary["split"] == "train" and summary["examples"] == len(digits.split("train").x)
    with np.load(run / "evaluation-train.npz") as npz:
        assert npz["nll"].shape == (len(digits.split("train").x),)
    assert not (run / "evaluation.json").exists()


def test_cli_evaluate_no_save_writes_nothing(pristine_run, tmp_path, capsys):
    """`--no-save` prints the table and writes no file."""
    run = copy_run(pristine_run, tmp_path)
    assert main(["evaluate", str(run), "--k", "2", "--no-save"]) == 0
    assert "NLL" in capsys.readouterr().out
    assert not list(run.glob("evaluation*"))


def test_cli_evaluate_help_explains_limit(capsys):
    """`evaluate --help` documents --limit: which examples, and where they are saved."""
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--limit N evaluate only the first N examples of the split, in stored order" in text
    assert "evaluation-firstN" in text


def test_cli_evaluate_limit_scores_the_first_examples_of_the_split(pristine_run, digits, tmp_path, capsys):
    """--limit N evaluates the split's first N examples in their stored order, into a file of its own. With one
    example per block the draws of an example do not depend on the later ones, so its values are exactly the first N
    of the whole split's evaluation; a limit beyond the split is the whole split."""
    run = copy_run(pristine_run, tmp_path)
    one_per_block = ["--k", "20", "--max-elements", str(20 * 64)]
    assert main(["evaluate", str(run), *one_per_block]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), *one_per_block, "--limit", "7"]) == 0
    out = capsys.readouterr().out
    assert "first 7 of test (7 examples)" in out and str(run / "evaluation-first7.json") in out
    whole, first = (json.loads((run / name).read_text()) for name in ("evaluation.json", "evaluation-first7.json"))
    assert first["examples"] == 7 and first["first"] == 7 and "first" not in whole
    with np.load(run / "evaluation.npz") as a, np.load(run / "evaluation-first7.npz") as b:
        for key in ("nll", "neg_elbo"):
            assert np.array_equal(a[key][:7], b[key]) and not np.array_equal(a[key][1:8], b[key])
    n_test = len(digits.split("test").x)
    for limit in (n_test, n_test + 5):  # the whole split, saved as such
        result, summary = vaekit.evaluate(run, k=20, limit=limit, max_elements=20 * 64, progress=False)
        assert summary["examples"] == n_test and "first" not in summary
        assert json.loads((run / "evaluation.json").read_text())["nll"] == whole["nll"] == summary["nll"]
    assert sorted(p.name for p in run.glob("evaluation*")) == [
        "evaluation-first7.json",
        "evaluation-first7.npz",
        "evaluation.json",
        "evaluation.npz",
    ]


BAD = {
    "k zero": ["--k", "0"],
    "k negative": ["--k", "-5"],
    "missing run": None,
    "unknown split": ["--split", "bogus"],
    "unknown device": ["--device", "nonsense"],
    "negative seed": ["--seed", "-1"],
    "garbage weights": ["--k", "2"],
    "max elements zero": ["--max-elements", "0"],
    "limit zero": ["--limit", "0"],
}
SAYS = {  # what the error names, for the cases where vaekit words it
    "k zero": "k must be an integer from 1 to 10,000,000, got 0",
    "negative seed": "the seed must be an integer from 0 to 2**63 - 1, got -1",
    "max elements zero": "max_elements must be at least 1, got 0",
    "limit zero": "the limit must be at least 1 example, got 0",
    "unknown split": "no split 'bogus'",
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_evaluate_bad_input_is_one_line_and_exit_2(case, pristine_run, tmp_path, capsys):
    """Each bad input exits 2 with one 'vaekit: error:' line, no traceback and no evaluation file."""
    run = copy_run(pristine_run, tmp_path)
    if case == "missing run":
        shutil.rmtree(run)
    if case == "garbage weights":
        (run / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 10)
    assert main(["evaluate", str(run), *(BAD[case] or [])]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("vaekit: error:") and SAYS.get(case, "") in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    if case == "missing run":
        assert not run.exists()
    else:
        assert not list(run.glob("evaluation*"))


def test_evaluate_refuses_a_model_with_nan_weights_and_writes_nothing(pristine_run, tmp_path, capsys):
    """NaN weights give NaN results, which JSON cannot hold: one line, exit 2, and neither evaluation file."""
    from safetensors.torch import load_file, save_file

    run = copy_run(pristine_run, tmp_path)
    weights = load_file(run / "model.safetensors")
    save_file({k: torch.full_like(v, math.nan) for k, v in weights.items()}, run / "model.safetensors")
    assert main(["evaluate", str(run), "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "NaN" in err, err
    assert not (run / "evaluation.json").exists() and not (run / "evaluation.npz").exists()


def test_active_units_count_the_dimensions_whose_mean_varies_more_than_a_hundredth():
    """A linear encoder whose posterior means are c_j * x_0, with x_0 half zeros and half ones (variance 1/4): the
    means vary by c_j^2 / 4 = 0.05, 0.005, 0.5 and 0 over the data, so exactly two units pass Burda et al.'s 0.01
    (a threshold of 0.1 or 0.001 would give one or three)."""
    model = VAE((1, 2, 2), ModelConfig(hidden=[], latent=4))
    weight, bias = model.encoder.net[0].weight, model.encoder.net[0].bias
    with torch.no_grad():
        weight.zero_(), bias.zero_()
        weight[:4, 0] = torch.tensor([0.2, 0.02, 2.0, 0.0]).sqrt()  # the means; the log-variances stay 0
    x = torch.zeros(64, 1, 2, 2)
    x[::2, 0, 0, 0] = 1.0
    result = estimate(model, x, k=2, progress=False)
    assert result.active_units == [2]


@pytest.mark.parametrize(
    ("k", "max_elements", "n", "calls", "largest", "encodings"),
    [
        (50, 6400, 5, 3, 6400, 3),  # all 50 draws of 2 examples per block of 50 x 2 x 64: blocks of 2, 2 and 1
        (500, 6400, 2, 10, 6400, 2),  # 100 draws of one example per decoder call, five calls per example
        (250, 6400, 1, 3, 6400, 1),  # 100, 100, then the 50 draws left
        (7, 1000, 3, 2, 7 * 2 * 64, 2),  # 7 draws of 2 examples fill 896 of 1000: blocks of 2 and 1
        (3, 10, 2, 6, 64, 2),  # a cap below one draw: one draw of one example at a time
        (2**15, None, 1, 2, 2**20, 1),  # a CPU's default cap: 2**20 numbers, two calls of 16,384 draws
    ],
)
def test_no_decoder_output_holds_more_than_max_elements_and_blocks_fill_it(
    k, max_elements, n, calls, largest, encodings
):
    """The estimator's memory cap: every decoder output holds at most max_elements numbers (2**20 by default on a
    CPU), with as many draws, then as many examples, in each as fit; each block of examples is encoded once, however
    many decoder calls its draws take."""
    torch.manual_seed(0)
    model = VAE((64,), ModelConfig(hidden=[8], latent=2))
    sizes, encoded = [], []
    model.decoder.register_forward_hook(lambda module, args, out: sizes.append(out.numel()))
    model.encoder.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    x = torch.bernoulli(torch.full((n, 64), 0.5))
    vaekit.log_likelihood(model, x, k=k, max_elements=max_elements)
    assert len(sizes) == calls and max(sizes) == largest and sum(sizes) == k * n * 64  # k draws of each example
    assert len(encoded) == encodings and sum(encoded) == n


def test_a_float32_models_draws_are_summed_in_float64():
    """Thousands of float32 log-weights are summed in float64: the estimates are the float64 log-mean-exp and mean
    of the very draws the estimator makes."""
    torch.manual_seed(0)
    model = VAE((64,), ModelConfig(hidden=[8], latent=2))
    x = torch.bernoulli(torch.full((2, 64), 0.5))
    result = estimate(model, x, 4096, 3, 2**20, False)  # both examples' 4096 draws in one decoder call
    with torch.no_grad():  # as the estimator draws: the likelihood's no-grad path rounds differently
        draws = log_weights(model, x, 4096, generator=torch.Generator().manual_seed(3), posterior=model.encode(x))
    assert draws.dtype == torch.float32 and result.log_px.dtype == result.elbo.dtype == torch.float64
    torch.testing.assert_close(result.log_px, torch.logsumexp(draws.double(), 0) - math.log(4096), rtol=1e-13, atol=0)
    torch.testing.assert_close(result.elbo, draws.double().mean(0), rtol=1e-13, atol=0)


def test_the_evaluation_table_says_every_number_with_its_unit():
    """The lines `vaekit evaluate` prints: names, values to four places with their units, n/a for a bits/dim that
    does not apply, the subset evaluated, and the note."""
    summary = {"split": "test", "examples": 7, "first": 7, "k": 50, "neg_elbo": 25.123456, "nll": 24.5,
               "bits_per_dim": None, "kl": 3.25, "active_units": 2, "kl_per_dim": [1.0, 2.25, 0.0],
               "seconds": 1.26, "note": "a note"}  # fmt: skip
    assert table(summary).splitlines() == [
        "split                first 7 of test (7 examples)",
        "negative ELBO        25.1235 nats",
        "NLL (IS, k=50)       24.5000 nats",
        "bits/dim             n/a",
        "KL                   3.2500 nats",
        "active units         2 of 3",
        "time                 1.3 s",
        "note: a note",
    ]
    whole = {**{k: v for k, v in summary.items() if k not in ("first", "note")}, "bits_per_dim": 0.123456}
    lines = table(whole).splitlines()
    assert lines[0] == "split                test (7 examples)" and lines[3] == "bits/dim             0.1235"
    assert len(lines) == 7


def test_evaluate_shows_its_progress_on_a_terminal_unless_told_not_to(pristine_run, monkeypatch):
    """A long evaluation draws a bar on a terminal by default; progress=False keeps it quiet."""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    vaekit.evaluate(pristine_run, k=2, save=False, progress=False)
    assert terminal.text == ""
    vaekit.evaluate(pristine_run, k=2, save=False)
    assert "evaluate k=2" in terminal.text


def test_sums_over_draws_are_float64_except_on_apple_gpus():
    """Thousands of log-weights are summed in float64, on every device that has it: all but Apple's (MPS)."""
    from vaekit.importance import accumulation_dtype

    assert accumulation_dtype(torch.device("mps")) == torch.float32
    assert accumulation_dtype(torch.device("cpu")) == accumulation_dtype(torch.device("cuda")) == torch.float64


def test_the_argument_limits_are_where_they_say():
    """The largest seed is 2**63 - 1, the smallest memory cap one number and the most draws ten million: each works,
    one past it is refused."""
    model = VAE((4,), ModelConfig(hidden=[4], latent=1))
    x = torch.bernoulli(torch.full((3, 4), 0.5))
    assert vaekit.log_likelihood(model, x[:0], k=10**7).shape == (0,)  # no examples: the limit alone is checked
    with pytest.raises(vaekit.VaekitError, match="^k must be an integer from 1 to 10,000,000, got 10000001$"):
        vaekit.log_likelihood(model, x[:0], k=10**7 + 1)
    assert torch.isfinite(vaekit.log_likelihood(model, x, k=3, seed=2**63 - 1, max_elements=1)).all()
    with pytest.raises(vaekit.VaekitError, match=f"from 0 to 2\\*\\*63 - 1, got {2**63}"):
        vaekit.log_likelihood(model, x, k=3, seed=2**63)
    with pytest.raises(vaekit.VaekitError, match="max_elements must be at least 1, got 0"):
        vaekit.log_likelihood(model, x, k=3, max_elements=0)


def test_evaluate_draws_5000_by_default_saves_in_the_run_and_takes_a_limit_of_one(pristine_run, tmp_path):
    """evaluate's defaults are 5000 draws per example, saved in the run (summary and values); the smallest limit, one
    example, is allowed."""
    run = copy_run(pristine_run, tmp_path)
    result, summary = vaekit.evaluate(run, limit=1, progress=False)
    saved = vaekit.open_run(run).evaluation_path("test", 1)
    assert result.k == summary["k"] == 5000 and len(result.log_px) == 1 and summary["first"] == 1
    assert json.loads(saved.read_text())["k"] == 5000 and saved.with_suffix(".npz").is_file()


@pytest.mark.parametrize("blocked", ["split", "split values", "first", "first values"])
def test_evaluate_refuses_a_file_it_did_not_write_at_any_place_a_limit_may_save_before_any_work(
    pristine_run, tmp_path, monkeypatch, blocked
):
    """A limit saves under the split's own name when it covers the split and under a first-N name otherwise, each a
    summary and its values: a file vaekit did not write at any of the four stops evaluate before it estimates
    anything, naming the file, which stays as it was."""
    run = copy_run(pristine_run, tmp_path)
    opened = vaekit.open_run(run)
    path = opened.evaluation_path("test", None if blocked.startswith("split") else 2)
    path = path.with_suffix(".npz") if blocked.endswith("values") else path
    path.write_text("mine")

    def too_soon(*args, **kwargs):
        raise AssertionError("evaluate estimated before checking where it saves")

    monkeypatch.setattr("vaekit.uses.evaluation.estimate", too_soon)
    with pytest.raises(vaekit.VaekitError) as refused:
        vaekit.evaluate(run, k=5, limit=2, progress=False)
    assert (
        str(refused.value) == f"{path} is not a file vaekit wrote in this run, so it is left alone: move it away first"
    )
    assert path.read_text() == "mine"


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_computes_on_the_device_it_is_given(pristine_run, device):
    """evaluate runs the estimator on the device it is given: its numbers are the estimator's there (a GPU draws
    other noise than a CPU from the same seed)."""
    opened = vaekit.open_run(pristine_run)
    result, _ = vaekit.evaluate(pristine_run, k=50, limit=20, device=device, save=False, progress=False)
    there = estimate(opened.model_on(torch.device(device)), opened.examples("test").x[:20], 50, 0, None, False)
    assert torch.equal(result.log_px, there.log_px) and torch.equal(result.elbo, there.elbo)


def test_evaluate_says_why_the_nll_is_not_a_code_length(pristine_run, digits, tmp_path):
    """Where bits/dim is left out the summary says why: a Gaussian likelihood is a density, and a Bernoulli one on
    grey data is no probability of them."""
    _, grey = vaekit.evaluate(pristine_run, k=5, limit=3, save=False, progress=False)
    assert grey["bits_per_dim"] is None and grey["note"] == (
        "the data do not all lie on the binary values 0 and 1, so the bernoulli 'likelihood' is not a probability of "
        "them: the NLL is not comparable with published log-likelihoods, and bits/dim is omitted"
    )
    gaussian = vaekit.train("digits", tmp_path / "run", epochs=1, likelihood="gaussian", dataset=digits, verbose=False)
    _, density = vaekit.evaluate(gaussian.dir, k=5, limit=3, save=False, progress=False)
    assert density["bits_per_dim"] is None
    assert density["note"] == "the likelihood is a density, so the NLL is not a code length and bits/dim is omitted"
