"""The trace estimators on dense batches of matrices, through ``torchdiv.estimate_trace``.

Independent references: exact traces, closed-form variances, and plain single-matrix loop
implementations of each estimator written from the papers (``naive_*`` below), fed the same
probes. Statistical checks use many replicates at once: a batch of ``R`` copies of one matrix
gives ``R`` independent estimates in one call (every sample gets its own probes). Seeds are
fixed, so every statistical assertion is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchdiv

F64 = torch.float64
METHODS = ["hutchinson", "hutch++", "xtrace"]
PROBES = ["rademacher", "gaussian", "sphere"]


def batch_matmat(A: torch.Tensor):
    """``A`` of shape ``S + (n, n)``: ``V`` of shape ``(k,) + S + (n,)`` -> ``A V``."""
    return lambda V: torch.einsum("...ij,k...j->k...i", A, V)


def trace(A: torch.Tensor) -> torch.Tensor:
    return A.diagonal(dim1=-2, dim2=-1).sum(-1)


def decaying(n: int, seed: int = 0) -> torch.Tensor:
    """Symmetric, eigenvalues ``k^-2`` in a random basis."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return u @ torch.diag(torch.arange(1, n + 1, dtype=F64) ** -2.0) @ u.T


def nonsymmetric(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=F64) + 3 * torch.eye(n, dtype=F64)


def low_rank(n: int, rank: int, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, rank, generator=g, dtype=F64) @ torch.randn(
        batch, rank, n, generator=g, dtype=F64
    )


def replicates(A: torch.Tensor, R: int, method: str, m: int, probe: str, seed: int = 0):
    """``R`` independent estimates of ``tr(A)`` in one call."""
    like = torch.zeros(R, A.shape[-1], dtype=F64)
    g = torch.Generator().manual_seed(seed)
    return torchdiv.estimate_trace(
        lambda V: V @ A.T, like, method=method, num_probes=m, probe=probe, generator=g
    )


# --- naive single-matrix references (columns are vectors) -------------------------------------


def naive_hutchinson(A: torch.Tensor, V: torch.Tensor) -> tuple[float, float]:
    terms = [float(V[:, j] @ A @ V[:, j]) for j in range(V.shape[1])]
    mean = sum(terms) / len(terms)
    var = sum((t - mean) ** 2 for t in terms) / (len(terms) - 1)
    return mean, math.sqrt(var / len(terms))


def naive_hutchpp(A: torch.Tensor, V: torch.Tensor) -> tuple[float, float]:
    c = V.shape[1] // 2
    S, G = V[:, :c], V[:, c:]
    Q, _ = torch.linalg.qr(A @ S)
    P = torch.eye(A.shape[0], dtype=A.dtype) - Q @ Q.T
    low, (hutch, stderr) = float(torch.trace(Q.T @ A @ Q)), naive_hutchinson(P @ A @ P, G)
    return low + hutch, stderr


def naive_xtrace(A: torch.Tensor, V: torch.Tensor) -> tuple[float, float]:
    k, n = V.shape[1], A.shape[0]
    t = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        Qi, _ = torch.linalg.qr(A @ V[:, others])
        P = torch.eye(n, dtype=A.dtype) - Qi @ Qi.T
        w = V[:, i]
        t.append(float(torch.trace(Qi.T @ A @ Qi) + w @ P @ A @ P @ w))
    t = torch.tensor(t, dtype=F64)
    return float(t.mean()), float(t.std() / math.sqrt(k))


NAIVE = {"hutchinson": naive_hutchinson, "hutch++": naive_hutchpp, "xtrace": naive_xtrace}


def _independent_probes(like: torch.Tensor, method: str, probe: str) -> torch.Tensor:
    """12-product probes, for the sketching methods independent in every sample. Rademacher
    vectors of 10 entries repeat (up to sign) with probability ~3% per set; the sketching
    methods' batched code then clamps a zero pivot where the naive loop's QR does not, by
    design, so the comparison needs sets of full rank (the first seed from 3 that gives them)."""
    for seed in range(3, 100):
        g = torch.Generator().manual_seed(seed)
        probes = torchdiv.draw_probes(like, 12, method=method, probe=probe, generator=g)
        ranks = torch.linalg.matrix_rank(probes.transpose(0, 1))
        if method == "hutchinson" or (ranks == len(probes)).all():  # no sketch, no QR
            return probes
    raise AssertionError("no seed gave independent probes")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("probe", PROBES)
def test_fast_equals_naive_loop(method, probe):
    """Same probes -> the batched estimator equals the per-matrix loop, value and stderr."""
    A = torch.stack([nonsymmetric(10, seed) for seed in range(3)] + [decaying(10)])
    like = torch.zeros(4, 10, dtype=F64)
    probes = _independent_probes(like, method, probe)
    est = torchdiv.estimate_trace(batch_matmat(A), like, method=method, probes=probes)
    for b in range(4):
        value, stderr = NAIVE[method](A[b], probes[:, b].T)
        torch.testing.assert_close(est.value[b].item(), value, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(est.stderr[b].item(), stderr, rtol=1e-8, atol=1e-10)
    assert est.num_probes == 12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("kind", ["decaying", "nonsymmetric"])
def test_unbiased_and_stderr_calibrated(method, probe, kind):
    """Mean of 3000 estimates within 5 standard errors of tr(A); the reported standard error
    (root mean square over replicates) within 30% of the observed spread."""
    A = decaying(24) if kind == "decaying" else nonsymmetric(24)
    est = replicates(A, 3000, method, 12, probe)
    spread = est.value.std()
    assert abs(est.value.mean() - torch.trace(A)) <= 5 * spread / math.sqrt(3000)
    reported = est.stderr.square().mean().sqrt()
    assert 0.7 <= reported / spread <= 1.3, f"reported {reported:.4g}, observed {spread:.4g}"


def test_hutchinson_variance_matches_closed_form():
    """Rademacher probes, symmetric A: Var(v^T A v) = 2 (||A||_F^2 - sum_i A_ii^2)."""
    A = nonsymmetric(16)
    A = (A + A.T) / 2
    expected = 2 * (A.square().sum() - A.diagonal().square().sum()) / 4
    observed = replicates(A, 4000, "hutchinson", 4, "rademacher").value.var()
    # the sample variance of 4000 draws has a relative standard error of about 3%
    assert abs(observed / expected - 1) < 0.12


@pytest.mark.parametrize("probe", PROBES)
def test_hutchinson_variance_of_a_nonsymmetric_matrix(probe):
    """Any A enters by its symmetric part S: Var(v^T A v) = 2 ||S||_F^2 (Gaussian), minus
    2 sum_i S_ii^2 (Rademacher), and (2n/(n+2)) (||S||_F^2 - tr(A)^2/n) on the sphere of radius
    sqrt(n). The mean squared reported standard error matches it too (unbiased: the terms'
    sample variance over m)."""
    A, n, m, reps = nonsymmetric(8), 8, 4, 4000
    S = (A + A.T) / 2
    frobenius, t = S.square().sum(), torch.trace(A)
    expected = {
        "gaussian": 2 * frobenius,
        "rademacher": 2 * (frobenius - S.diagonal().square().sum()),
        "sphere": 2 * n / (n + 2) * (frobenius - t**2 / n),
    }[probe] / m
    est = replicates(A, reps, "hutchinson", m, probe)
    # the sample variance of 4000 draws: relative standard error about 3% (<= 5% for kurtosis)
    assert abs(est.value.var() / expected - 1) < 0.15
    assert abs(est.stderr.square().mean() / expected - 1) < 0.15


def test_decaying_spectrum_favours_hutchpp_and_xtrace():
    """The reason these methods exist: at 30 products, eigenvalues k^-2, n=64, far below a
    third of Hutchinson's relative RMS error."""
    A = decaying(64)
    rms = {
        m: (replicates(A, 500, m, 30, "rademacher").value - torch.trace(A)).square().mean().sqrt()
        for m in METHODS
    }
    assert rms["hutch++"] < rms["hutchinson"] / 3
    assert rms["xtrace"] < rms["hutchinson"] / 3


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("method", "m"), [("hutch++", 9), ("xtrace", 8), ("xtrace", 20)])
def test_exact_below_sketch_rank(method, m, dtype):
    """rank(A) = 3: Hutch++ with a sketch of m/3 >= 3 vectors, XTrace with m/2 > 3 vectors."""
    A = low_rank(12, 3, 5).to(dtype)
    est = torchdiv.estimate_trace(
        batch_matmat(A),
        torch.zeros(5, 12, dtype=dtype),
        method=method,
        num_probes=m,
        probe="gaussian",
        generator=torch.Generator().manual_seed(0),
    )
    scale = A.flatten(1).norm(dim=1)
    # float32: the products carry relative errors of ~1e-7, amplified by the sketch's conditioning
    tol = 1e-10 if dtype == F64 else 1e-4
    assert ((est.value - trace(A)).abs() / scale).max() < tol
    assert (est.stderr / scale).max() < tol


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_zero_operator(method):
    est = torchdiv.estimate_trace(lambda V: 0 * V, torch.zeros(3, 5), method=method, num_probes=6)
    assert torch.equal(est.value, torch.zeros(3)) and torch.equal(est.stderr, torch.zeros(3))


def test_sketch_wider_than_event():
    """Hutch++ with a sketch of more vectors than the event has elements: exact."""
    A = nonsymmetric(4).expand(3, 4, 4)
    est = torchdiv.estimate_trace(
        batch_matmat(A), torch.zeros(3, 4, dtype=F64), method="hutch++", num_probes=15
    )
    torch.testing.assert_close(est.value, trace(A))


@pytest.mark.parametrize("method", METHODS)
def test_generator_and_probes_reproduce(method):
    A = torch.stack([nonsymmetric(8, s) for s in range(4)])
    like = torch.zeros(4, 8, dtype=F64)

    def run(**kw):
        return torchdiv.estimate_trace(batch_matmat(A), like, method=method, **kw).value

    same = [run(num_probes=6, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], run(num_probes=6, generator=torch.Generator().manual_seed(8)))
    probes = torchdiv.draw_probes(like, 6, method=method)
    assert torch.equal(run(probes=probes), run(probes=probes, num_probes=6))
    # the same draw as drawing inside with the same generator state
    g_state = torch.Generator().manual_seed(7)
    drawn = torchdiv.draw_probes(like, 6, method=method, generator=g_state)
    assert torch.equal(run(probes=drawn), same[0])


def test_each_sample_gets_its_own_probes():
    """Identical matrices in every sample must still give different (independent) estimates."""
    est = replicates(nonsymmetric(6), 8, "hutchinson", 2, "rademacher")
    assert est.value.unique().numel() > 1


@pytest.mark.parametrize("method", METHODS)
def test_chunk_size_does_not_change_the_estimate(method):
    A = torch.stack([nonsymmetric(8, s) for s in range(3)])
    like, calls = torch.zeros(3, 8, dtype=F64), []

    def matmat(V):
        calls.append(len(V))
        return batch_matmat(A)(V)

    kw = {"method": method, "num_probes": 12}
    a = torchdiv.estimate_trace(matmat, like, generator=torch.Generator().manual_seed(1), **kw)
    calls.clear()
    b = torchdiv.estimate_trace(
        matmat, like, generator=torch.Generator().manual_seed(1), chunk_size=2, **kw
    )
    assert max(calls) <= 2
    torch.testing.assert_close(a.value, b.value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("method", METHODS)
def test_batch_dims(batch_shape, method):
    """batch_dims 0, 1, 2 with an image-shaped event (2, 2, 2): exact on rank-1 operators."""
    u = torch.randn(*batch_shape, 8, 1, dtype=F64)
    A = u @ torch.randn(*batch_shape, 1, 8, dtype=F64)

    def matmat(V):  # V: (k,) + batch + (2, 2, 2)
        flat = V.reshape(*V.shape[: 1 + len(batch_shape)], 8)
        return batch_matmat(A)(flat).reshape(V.shape)

    like = torch.zeros(*batch_shape, 2, 2, 2, dtype=F64)
    est = torchdiv.estimate_trace(
        matmat,
        like,
        batch_dims=len(batch_shape),
        method=method,
        num_probes=6 if method != "hutchinson" else 1,
        probe="gaussian",
    )
    assert est.value.shape == batch_shape and est.stderr.shape == batch_shape
    if method != "hutchinson":
        torch.testing.assert_close(est.value, trace(A))


def test_float32_in_float32_out():
    A = nonsymmetric(6).float().expand(2, 6, 6)
    est = torchdiv.estimate_trace(batch_matmat(A), torch.zeros(2, 6), method="xtrace", num_probes=4)
    assert est.value.dtype == torch.float32 and est.stderr.dtype == torch.float32


def test_one_hutchinson_probe_has_no_stderr():
    est = replicates(nonsymmetric(6), 3, "hutchinson", 1, "rademacher")
    assert torch.isnan(est.stderr).all() and torch.isfinite(est.value).all()


@pytest.mark.parametrize("method", METHODS)
def test_gradients_are_unbiased(method):
    """d tr(A) / dA = I. Hutchinson's gradient is v v^T; Hutch++ and XTrace hold the sketch
    basis constant, giving Q Q^T + P g g^T P, whose mean given Q is I too. 4000 replicates
    (samples of one batch) of one matrix: the mean gradient within 5 standard errors of I."""
    reps = 4000
    A = nonsymmetric(6).expand(reps, 6, 6).clone().requires_grad_(True)
    like = torch.zeros(reps, 6, dtype=F64)
    g = torch.Generator().manual_seed(0)
    est = torchdiv.estimate_trace(
        batch_matmat(A), like, method=method, num_probes=6, probe="gaussian", generator=g
    )
    (grad,) = torch.autograd.grad(est.value.sum(), A)
    mean, se = grad.mean(0), grad.std(0) / math.sqrt(reps)
    assert ((mean - torch.eye(6, dtype=F64)).abs() <= 5 * se + 1e-12).all()


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_gradients_are_finite_when_the_sketch_loses_rank(method):
    """A rank-1 A: the sketch has rank 1 < its size, and differentiating through the QR of a
    rank-deficient matrix would give NaN."""
    u = torch.randn(2, 6, 1, dtype=F64)
    A = (u @ u.transpose(1, 2)).requires_grad_(True)
    like = torch.zeros(2, 6, dtype=F64)
    est = torchdiv.estimate_trace(batch_matmat(A), like, method=method, num_probes=6)
    (grad,) = torch.autograd.grad(est.value.sum(), A)
    assert grad.isfinite().all()
    torch.testing.assert_close(est.value, A.detach().diagonal(dim1=1, dim2=2).sum(-1))


@pytest.mark.parametrize("method", METHODS)
def test_a_non_finite_sample_leaves_the_others_alone(method):
    """A diverged sample (nan or inf in its products) gets a non-finite estimate and the others
    what they get alone with the same probes. XTrace's per-sample SVD raised for the whole batch
    (LAPACK: "the input matrix contained non-finite values")."""
    A = torch.stack([nonsymmetric(6, seed) for seed in range(4)])
    A[1, 2, 3], A[3, 0, 0] = math.nan, math.inf
    like = torch.zeros(4, 6, dtype=F64)
    g = torch.Generator().manual_seed(0)
    V = torchdiv.draw_probes(like, 6, method=method, probe="gaussian", generator=g)
    est = torchdiv.estimate_trace(batch_matmat(A), like, method=method, probes=V)
    assert not est.value[[1, 3]].isfinite().any()
    for b in (0, 2):
        alone = torchdiv.estimate_trace(
            batch_matmat(A[b : b + 1]), like[:1], method=method, probes=V[:, b : b + 1]
        )
        torch.testing.assert_close(est.value[b], alone.value[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(est.stderr[b], alone.stderr[0], rtol=1e-12, atol=1e-12)


class TestTolerance:
    @pytest.mark.parametrize("method", METHODS)
    def test_reaches_target(self, method):
        """rtol=0.05: every sample's stderr meets it, and >= 90% land within 2 rtol |tr|."""
        A = nonsymmetric(20) + 10 * torch.eye(20, dtype=F64)
        est = replicates_tol(A, 300, method, rtol=0.05)
        assert (est.stderr <= 0.05 * est.value.abs()).all()
        within = (est.value - torch.trace(A)).abs() <= 2 * 0.05 * torch.trace(A).abs()
        assert within.float().mean() >= 0.9
        assert est.num_probes <= 1000

    def test_absolute_target_and_blocks(self):
        A = nonsymmetric(20)
        est = replicates_tol(A, 50, "hutchinson", atol=2.0, num_probes=8)
        assert (est.stderr <= 2.0).all() and est.num_probes % 8 == 0

    @pytest.mark.parametrize("method", METHODS)
    def test_a_non_finite_sample_is_not_waited_for(self, method):
        """A diverged sample's estimate never meets a target; the others stop as without it,
        where every sample drew max_probes products (and a warning of a "nan times" miss)."""
        A = (nonsymmetric(20) + 10 * torch.eye(20, dtype=F64)).expand(6, 20, 20).clone()
        A[2, 0, 0] = math.nan
        like = torch.zeros(6, 20, dtype=F64)
        g = torch.Generator().manual_seed(0)
        est = torchdiv.estimate_trace(
            batch_matmat(A), like, method=method, rtol=0.05, generator=g, max_probes=2000
        )
        assert est.value[2].isnan() and est.value[[0, 1, 3, 4, 5]].isfinite().all()
        assert (est.stderr[[0, 1, 3, 4, 5]] <= 0.05 * est.value[[0, 1, 3, 4, 5]].abs()).all()
        assert est.num_probes < 1000

    def test_stops_at_max_probes_with_a_warning(self):
        A = nonsymmetric(20)
        with pytest.warns(UserWarning, match=r"estimate_trace: stopped at max_probes=40 \(32 "):
            est = replicates_tol(A, 50, "hutchinson", rtol=1e-6, max_probes=40)
        assert est.num_probes == 32


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_one_sample_at_a_time_lands_within_two_rtol(method):
    """One sample per call, so that no sample keeps drawing while a slower one converges (a
    batch hides a low error estimate): eigenvalues 1/k, n=16, rtol=0.02, 200 seeds. XTrace's
    own per-block error runs 25-50% low here; with the spread between blocks it meets 90%."""
    n = 16
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=F64))
    A = u @ torch.diag(1 / torch.arange(1.0, n + 1, dtype=F64)) @ u.T
    like, exact = torch.zeros(1, n, dtype=F64), torch.trace(A)
    within = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        est = torchdiv.estimate_trace(
            lambda V: V @ A.T, like, method=method, rtol=0.02, generator=g, max_probes=20000
        )
        within.append(bool((est.value - exact).abs() <= 2 * 0.02 * exact.abs()))
    assert sum(within) >= 0.9 * len(within)


def replicates_tol(A, R, method, **kw):
    like = torch.zeros(R, A.shape[-1], dtype=F64)
    g = torch.Generator().manual_seed(0)
    return torchdiv.estimate_trace(lambda V: V @ A.T, like, method=method, generator=g, **kw)


@pytest.mark.parametrize("shape", [(3, 0), (3, 2, 0)])
def test_hutch_plus_plus_on_an_empty_event_is_zero(shape):
    """An empty event has trace 0 (as every exact method and Hutchinson give); Hutch++'s
    sketch basis has no columns there, whose products are none."""
    x = torch.randn(*shape, dtype=torch.float64)
    zeros = torch.zeros(shape[0], dtype=torch.float64)
    options = {"method": "hutch++", "num_probes": 3}
    assert torch.equal(torchdiv.divergence(lambda z: 2 * z, x, **options).reshape(-1), zeros)
    est = torchdiv.estimate_divergence(lambda z: 2 * z, x, **options)
    assert torch.equal(est.value.reshape(-1), zeros)
    assert torch.equal(torchdiv.estimate_trace(lambda v: v, x, **options).value.reshape(-1), zeros)
    leaf = x.clone().requires_grad_(True)
    assert torch.equal(torchdiv.graph_divergence(2 * leaf, leaf, **options).reshape(-1), zeros)


# --- XTrace with repeated probes: Rademacher vectors of a small event coincide -----------------


def exact_xtrace(A: torch.Tensor, V: torch.Tensor) -> float:
    """XTrace from its definition, the left-out sketch's basis by a rank-revealing SVD: ``Q_i``
    spans exactly the ``A w_j``, ``j != i``, whatever their rank."""
    k, n = V.shape[1], A.shape[0]
    t = []
    for i in range(k):
        u, s, _ = torch.linalg.svd(A @ V[:, [j for j in range(k) if j != i]], full_matrices=False)
        Qi = u[:, s > 1e-10 * s.max()]
        P = torch.eye(n, dtype=A.dtype) - Qi @ Qi.T
        w = V[:, i]
        t.append(float(torch.trace(Qi.T @ A @ Qi) + w @ P @ A @ P @ w))
    return sum(t) / k


@pytest.mark.parametrize("rank", [None, 2])
def test_xtrace_with_repeated_probes_is_the_exact_left_out_estimate(rank):
    """Sketch vectors repeated up to sign (``w_1 = -w_0``, ``w_2 = w_0``, all three): the
    left-out sketch of ``w_2`` keeps ``A w_0`` only, that of ``w_0`` all of ``range(A W)``.
    Each sample's estimate equals the definition's. A rank-2 ``A``: exact where every left-out
    sketch keeps two independent vectors (all but the sample whose three repeat)."""
    n = 10
    A = nonsymmetric(n) if rank is None else low_rank(n, rank, 1)[0]
    like = torch.zeros(4, n, dtype=F64)
    V = torchdiv.draw_probes(like, 8, method="xtrace", generator=torch.Generator().manual_seed(0))
    V[1, 0], V[2, 1], V[1, 2], V[2, 2] = -V[0, 0], V[0, 1], -V[0, 2], V[0, 2]  # sample 3: none
    est = torchdiv.estimate_trace(lambda W: W @ A.T, like, method="xtrace", probes=V)
    expected = torch.tensor([exact_xtrace(A, V[:, b].T) for b in range(4)], dtype=F64)
    torch.testing.assert_close(est.value, expected, rtol=1e-10, atol=1e-10)
    if rank is not None:
        exact = torch.trace(A).expand(3)
        torch.testing.assert_close(est.value[[0, 1, 3]], exact, rtol=1e-10, atol=1e-10)


def test_xtrace_is_unbiased_with_rademacher_probes_of_a_small_event():
    """n = 4, 3 sketch vectors: a pair repeats up to sign in 3/8 of the samples. 20000
    estimates: the mean within 4 standard errors of tr(A), and the mean gradient within 4 of
    d tr(A) / dA = I (a sketch that kept ``A w_i`` in the basis ``w_i`` probes was 8 standard
    errors high, its gradient 4.7)."""
    R = 20000
    A = nonsymmetric(4).expand(R, 4, 4).clone().requires_grad_(True)
    like = torch.zeros(R, 4, dtype=F64)
    g = torch.Generator().manual_seed(0)
    est = torchdiv.estimate_trace(batch_matmat(A), like, method="xtrace", num_probes=6, generator=g)
    value = est.value.detach()
    assert abs(value.mean() - torch.trace(A[0].detach())) <= 4 * value.std() / math.sqrt(R)
    (grad,) = torch.autograd.grad(est.value.sum(), A)
    mean, se = grad.mean(0), grad.std(0) / math.sqrt(R)
    assert ((mean - torch.eye(4, dtype=F64)).abs() <= 4 * se).all()


@pytest.mark.parametrize(("dtype", "ratio"), [(torch.float32, 2.0**-13), (F64, 2.0**-30)])
def test_xtrace_is_exact_when_a_sketch_vector_is_short(dtype, ratio):
    """A rank-1 ``A`` and two sketch vectors ``A w_1 = ratio A w_0`` (exactly, in any dtype):
    each left-out sketch spans ``range(A)``, so XTrace is exact. Column 0 of ``R`` lies in
    the span of column 1 by ``ratio``, far above round-off, though below ``sqrt(eps)``: an
    absolute threshold took it for independent, and ``t_0`` became plain Hutchinson (-0.25
    for -3.5)."""
    A = torch.outer(torch.tensor([1.0, 2.0, -1.0]), torch.tensor([-3.5, 0.0, 0.0])).to(dtype)
    like = torch.zeros(1, 3, dtype=dtype)
    V = torch.tensor([[[1.0, 1.0, 1.0]], [[ratio, 2.0, -1.0]]], dtype=dtype)
    est = torchdiv.estimate_trace(lambda W: W @ A.T, like, method="xtrace", probes=V)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(est.value, torch.trace(A).reshape(1), rtol=100 * eps, atol=0)
