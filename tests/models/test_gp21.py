"""GPyTorch and BoTorch models differentiated with respect to their inputs, as their users write
it: gradients and Laplacians of an exact GP's posterior mean (BoTorch's ``SingleTaskGP``,
float64 as BoTorch builds it), the divergence of a GP vector field (a ``ModelListGP``), an SVGP's
mean, and the Jacobian of acquisition values per candidate set ``(b, q, d)``.

Not a project extra: every test skips without ``gpytorch`` and ``botorch`` (installed here
``--no-deps`` with ``linear_operator``, ``jaxtyping``, ``pyro-ppl``, ``multipledispatch`` and
``pyre-extensions``), imported by ``pytest.importorskip`` before anything of theirs.

GPyTorch's kernels centre their first input by its mean over the points (``sq_dist``'s
``x1 - x1.mean(-2)``; ``MaternKernel`` too), which the distances cancel: the watch refuses a
``(B, d)`` batch of points for it, and its message names the way out, each point its own GP
batch (``z.unsqueeze(-2)``). Hyperparameters are set by hand (``raw_lengthscale`` as
``fit_gpytorch_mll`` would train them, without its second of fitting).

References: float64 per-point loops (``torch.autograd.functional.jacobian`` of each point
alone, ``conftest.laplacian_by_grad_of_grad``), central differences for hyperparameter
gradients (``conftest.central_difference``: 1e-7 relative, measured 3e-12).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import assert_close, central_difference, laplacian_by_grad_of_grad

import torchdiv

gpytorch = pytest.importorskip("gpytorch")
botorch = pytest.importorskip("botorch")
models = pytest.importorskip("botorch.models")
acquisition = pytest.importorskip("botorch.acquisition")
sampling = pytest.importorskip("botorch.sampling")

f64 = torch.float64


def single_task_gp(n: int = 8, d: int = 2, outputs: int = 1):
    """BoTorch's ``SingleTaskGP`` (RBF kernel, ``ScaleKernel`` not used) on a smooth target, in
    eval mode: its prediction cache is built at the first call."""
    g = torch.Generator().manual_seed(0)
    train_x = torch.rand(n, d, dtype=f64, generator=g)
    targets = [torch.sin(3 * train_x).sum(-1), train_x[:, 0] * train_x[:, -1]]
    train_y = torch.stack([targets[i % 2] + 0.1 * i for i in range(outputs)], -1)
    model = models.SingleTaskGP(train_x, train_y)
    with torch.no_grad():
        model.covar_module.raw_lengthscale.copy_(torch.linspace(-0.3, 0.2, d, dtype=f64))
    return model.eval()


def points(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, dtype=f64, generator=torch.Generator().manual_seed(1))


def per_point_mean(model):
    """The posterior mean of each point alone: every point its own GP batch of one."""
    return lambda z: model.posterior(z.unsqueeze(-2)).mean.reshape(z.shape[:-1])


def per_point_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian
    return torch.stack([jac(lambda z: f(z[None])[0], xi, create_graph=True) for xi in x])


def test_a_kernel_s_centring_is_refused_with_the_way_out():
    """``model.posterior(x).mean`` over a ``(B, d)`` batch: ``sq_dist`` subtracts the points'
    mean, a shift its distances cancel, but a mean over samples to the watch. The message said
    that per-sample derivatives did not exist; it names the per-point GP batch now."""
    model = single_task_gp()
    with pytest.raises(torchdiv.BatchInteractionError, match=r"GPyTorch kernel") as error:
        torchdiv.laplacian(lambda z: model.posterior(z).mean.squeeze(-1), points(4, 2))
    assert "z.unsqueeze(-2)" in str(error.value)


def test_the_refusal_is_false_for_a_posterior_mean():
    """Under ``allow_batch_interaction()`` the ``(B, d)`` form's Laplacian is each point's:
    the centring cancels to round-off."""
    model, x = single_task_gp(), points(4, 2)
    f = lambda z: model.posterior(z).mean.squeeze(-1)  # noqa: E731
    want = torch.cat([laplacian_by_grad_of_grad(f, x[i : i + 1]) for i in range(len(x))])
    with torchdiv.allow_batch_interaction():
        assert_close(torchdiv.laplacian(f, x), want, scale=100)


@pytest.mark.parametrize("method", ["auto", "grad-of-grad"])
def test_laplacian_of_a_posterior_mean_and_its_hyperparameter_gradient(method):
    """A GP-based PDE solver's loss: the Laplacian of the posterior mean at collocation points,
    differentiated with respect to ``raw_lengthscale`` through the prediction cache
    (``propagate_grads``: BoTorch detaches the cache otherwise), against central differences
    that rebuild the cache at every shift."""
    model, x = single_task_gp(), points(4, 2)
    f = per_point_mean(model)
    p = model.covar_module.raw_lengthscale
    v = torch.tensor([0.7, -0.4], dtype=f64)

    def loss(t: float) -> torch.Tensor:
        with torch.no_grad():
            p.add_(v, alpha=t)
        model.train().eval()  # the cache, built anew
        value = laplacian_by_grad_of_grad(f, x).pow(2).sum().detach()
        with torch.no_grad():
            p.sub_(v, alpha=t)
        return value

    with botorch.settings.propagate_grads(True):
        want = central_difference(loss)
        model.train().eval()
        lap = torchdiv.laplacian(f, x, method=method)
        assert_close(lap, laplacian_by_grad_of_grad(f, x).detach())
        (grad,) = torch.autograd.grad(lap.pow(2).sum(), p)
    torch.testing.assert_close((grad * v).sum(), want, rtol=1e-7, atol=0)


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_gradient_of_the_posterior_mean_and_variance(method):
    """Per-point gradients of the mean and the variance, the cache warm (the explicit methods'
    transforms cannot build it: linear_operator's solve has no ``setup_context``)."""
    model, x = single_task_gp(), points(4, 2)
    variance = lambda z: model.posterior(z.unsqueeze(-2)).variance[..., 0, 0]  # noqa: E731
    for f in (per_point_mean(model), variance):
        f(x)
        assert_close(torchdiv.jacobian(f, x, method=method), per_point_jacobian(f, x).detach())


def test_explicit_methods_building_the_cache_name_auto():
    """The first call of a fresh model in eval mode builds its cache by linear_operator's
    ``autograd.Function``s, which torch.func's transforms cannot run: the error names
    ``method='auto'``, which computes it."""
    model, x = single_task_gp(), points(4, 2)
    f = per_point_mean(model)
    with pytest.raises(RuntimeError, match="use method='auto'"):
        torchdiv.jacobian(f, x, method="reverse")
    assert_close(torchdiv.jacobian(f, x), per_point_jacobian(f, x).detach())


def test_divergence_of_a_gp_vector_field():
    """A ``ModelListGP`` of one GP per component, a vector field on ``R^3``."""
    x = points(4, 3)
    field = models.ModelListGP(*[single_task_gp(d=3, outputs=1) for _ in range(3)]).eval()
    with torch.no_grad():
        for i, gp in enumerate(field.models):
            gp.covar_module.raw_lengthscale.add_(0.2 * i)
    f = lambda z: field.posterior(z.unsqueeze(-2)).mean.squeeze(-2)  # noqa: E731
    f(x)
    want = per_point_jacobian(f, x).diagonal(dim1=1, dim2=2).sum(-1).detach()
    for method in ("auto", "forward", "reverse"):
        assert_close(torchdiv.divergence(f, x, method=method), want)


def test_laplacian_of_an_svgp_mean():
    """A variational GP (inducing points, ``VariationalStrategy``): each point alone."""

    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self, inducing: torch.Tensor):
            q = gpytorch.variational.CholeskyVariationalDistribution(inducing.shape[0])
            strategy = gpytorch.variational.VariationalStrategy(self, inducing, q)
            super().__init__(strategy)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    model = SVGP(points(5, 2)).to(f64)
    with torch.no_grad():
        model.variational_strategy._variational_distribution.variational_mean.uniform_(-1, 1)
    model.eval()
    x = points(4, 2) * 0.5
    f = lambda z: model(z.unsqueeze(-2)).mean.squeeze(-1)  # noqa: E731
    assert_close(torchdiv.laplacian(f, x), laplacian_by_grad_of_grad(f, x).detach())


@pytest.mark.parametrize("name", ["log_ei", "qlog_ei"])
def test_acquisition_jacobian_per_candidate_set(name):
    """BoTorch optimises ``acqf(X)``, ``X`` of shape ``(b, q, d)``, by its gradient in ``X``:
    one value per candidate set, the ``q`` points coupled within it (``batch_dims=1``). The
    MC acquisition's fixed base samples (a seeded Sobol sampler) make it deterministic."""
    model = single_task_gp()
    best = model.train_targets.max()
    if name == "log_ei":
        acqf, x = acquisition.LogExpectedImprovement(model, best_f=best), points(3, 1, 2)
    else:
        sampler = sampling.SobolQMCNormalSampler(torch.Size([16]), seed=0)
        acqf, x = acquisition.qLogExpectedImprovement(model, best, sampler=sampler), points(3, 2, 2)
    want = torch.stack([torch.autograd.functional.jacobian(acqf, xi[None])[0, 0] for xi in x])
    assert_close(torchdiv.jacobian(acqf, x), want)


def test_a_covariance_across_the_q_points_stays_refused():
    """Per point (``batch_dims=2`` over ``(b, q, d)``), the posterior covariance's rows couple
    the ``q`` points of a set: refused."""
    model, x = single_task_gp(), points(3, 2, 2)
    rows = lambda z: model.posterior(z).mvn.covariance_matrix.sum(-1)  # noqa: E731
    with contextlib.suppress(Exception):
        rows(x)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.jacobian(rows, x, batch_dims=2)


def test_divergence_of_a_derivative_gp_s_gradient_field():
    """A GP with derivative observations (``RBFKernelGrad``, GPyTorch's example): its
    posterior mean is ``(value, gradient)`` per point, interleaved by the kernel's reshapes.
    The divergence of the gradient part is the Laplacian of the value part, both per point."""

    class GPWithDerivatives(gpytorch.models.ExactGP):
        def __init__(self, train_x, train_y, likelihood):
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ConstantMeanGrad()
            kernel = gpytorch.kernels.RBFKernelGrad(ard_num_dims=2)
            self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, x):
            mean, covar = self.mean_module(x), self.covar_module(x)
            return gpytorch.distributions.MultitaskMultivariateNormal(mean, covar)

    train_x = points(6, 2)
    train_y = torch.cat([torch.sin(3 * train_x).sum(-1, keepdim=True), torch.cos(3 * train_x)], 1)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=3).to(f64)
    model = GPWithDerivatives(train_x, train_y, likelihood).to(f64).eval()
    x = points(4, 2) * 0.8 + 0.1
    mean = lambda z: model(z.unsqueeze(-2)).mean.squeeze(-2)  # noqa: E731
    mean(x)
    gradient, value = (lambda z: mean(z)[:, 1:]), (lambda z: mean(z)[:, 0])
    want = torch.cat([laplacian_by_grad_of_grad(value, x[i : i + 1]) for i in range(4)]).detach()
    assert_close(torchdiv.divergence(gradient, x), want)
    assert_close(torchdiv.laplacian(value, x), want)


def test_new_training_data_is_not_served_stale():
    """GPyTorch keeps its prediction cache on the model between calls; ``set_train_data``
    drops it. A second call at the same structure (one watch and recording choice kept per
    ``f``) reads the new data, as a fresh model does."""
    model, x = single_task_gp(), points(4, 2)
    f = per_point_mean(model)
    before = torchdiv.laplacian(f, x)
    train_x = points(8, 2).flip(0) * 0.9
    train_y = torch.cos(2 * train_x).sum(-1)
    model.set_train_data(train_x, train_y, strict=False)
    fresh = models.SingleTaskGP(train_x, train_y[:, None])
    fresh.load_state_dict(model.state_dict())
    fresh.set_train_data(train_x, train_y, strict=False)
    fresh.eval()
    want = torch.cat(
        [laplacian_by_grad_of_grad(per_point_mean(fresh), x[i : i + 1]) for i in range(4)]
    )
    assert_close(torchdiv.laplacian(f, x), want.detach())
    assert (want - before).abs().min() > 0.1
