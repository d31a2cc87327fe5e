"""Every validation error of the stochastic options: type, and a message naming the argument."""

from __future__ import annotations

import pytest
import torch

import torchdiv

x = torch.randn(4, 3)
xg = x.clone().requires_grad_(True)


def matmat(V):
    return 2 * V


CALLS = {
    "divergence": lambda **kw: torchdiv.divergence(torch.sin, x, **kw),
    "estimate_divergence": lambda **kw: torchdiv.estimate_divergence(torch.sin, x, **kw),
    "graph_divergence": lambda **kw: torchdiv.graph_divergence(xg.sin(), xg, **kw),
    "estimate_trace": lambda **kw: torchdiv.estimate_trace(matmat, x, **kw),
    "jacobian_diagonal": lambda **kw: torchdiv.jacobian_diagonal(torch.sin, x, **kw),
}


@pytest.fixture(params=list(CALLS))
def call(request):
    return request.param, CALLS[request.param]


def test_num_probes_required(call):
    fn, run = call
    with pytest.raises(ValueError, match=rf"{fn}: method='hutchinson' needs num_probes, the"):
        run(method="hutchinson")


@pytest.mark.parametrize("bad", [0, -2])
def test_num_probes_positive(call, bad):
    fn, run = call
    with pytest.raises(ValueError, match=rf"{fn}: num_probes must be a positive int, got {bad}"):
        run(method="hutchinson", num_probes=bad)


@pytest.mark.parametrize("bad", [2.0, True, "4"])
def test_num_probes_type(call, bad):
    fn, run = call
    with pytest.raises(TypeError, match=rf"{fn}: num_probes must be an int, got"):
        run(method="hutchinson", num_probes=bad)


@pytest.mark.parametrize(
    ("method", "bad", "hint"),
    [("hutch++", 10, "multiple of 3 .*got 10; use 9 or 12"), ("hutch++", 2, "got 2; use 3$")],
)
def test_hutchpp_needs_multiple_of_three(method, bad, hint):
    with pytest.raises(
        ValueError, match=rf"divergence: method='hutch\+\+' needs num_probes .*{hint}"
    ):
        torchdiv.divergence(torch.sin, x, method=method, num_probes=bad)


def test_xtrace_needs_even():
    with pytest.raises(
        ValueError,
        match=r"estimate_trace: method='xtrace' needs num_probes to be a multiple of 2 "
        r"\(half for the sketch, half for its basis\), got 5; use 4 or 6",
    ):
        torchdiv.estimate_trace(matmat, x, method="xtrace", num_probes=5)


def test_xtrace_sketch_wider_than_event():
    with pytest.raises(
        ValueError,
        match=r"divergence: method='xtrace' sketches with .* = 4 vectors, "
        r"more than the 3 elements",
    ):
        torchdiv.divergence(torch.sin, x, method="xtrace", num_probes=8)


def test_unknown_probe(call):
    fn, run = call
    with pytest.raises(
        ValueError,
        match=rf"{fn}: unknown probe 'normal'; valid probes are 'rademacher', 'gaussian', 'sphere'",
    ):
        run(method="hutchinson", num_probes=2, probe="normal")


def test_probes_shape_names_both_shapes(call):
    fn, run = call
    with pytest.raises(
        ValueError,
        match=rf"{fn}: probes must have shape \(r,\) \+ \w+.shape = \(r, 4, 3\) .*got probes of "
        r"shape \(2, 4, 2\) and \w+ of shape \(4, 3\)",
    ):
        run(method="hutchinson", probes=torch.ones(2, 4, 2))


def test_probes_not_a_tensor():
    with pytest.raises(TypeError, match=r"divergence: probes must be a torch.Tensor, got list"):
        torchdiv.divergence(torch.sin, x, method="hutchinson", probes=[1.0])


def test_probes_integer():
    with pytest.raises(TypeError, match=r"divergence: probes must have a floating dtype"):
        torchdiv.divergence(torch.sin, x, method="hutchinson", probes=torch.ones(2, 4, 3).long())


def test_probes_count_for_hutchpp():
    with pytest.raises(
        ValueError, match=r"divergence: method='hutch\+\+' uses 2 random vectors per 3 products"
    ):
        torchdiv.divergence(torch.sin, x, method="hutch++", probes=torch.ones(3, 4, 3))


def test_probes_disagree_with_num_probes():
    with pytest.raises(
        ValueError,
        match=r"divergence: probes of shape \(4, 4, 3\) are 4 random vectors, which method="
        r"'hutch\+\+' spends as num_probes=6 products, but num_probes=9 was given",
    ):
        torchdiv.divergence(
            torch.sin, x, method="hutch++", probes=torch.ones(4, 4, 3), num_probes=9
        )


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"probe": "gaussian"}, "probe"), ({"generator": torch.Generator()}, "generator")],
)
def test_probes_exclude_probe_and_generator(kw, name):
    with pytest.raises(ValueError, match=rf"divergence: {name} is not used with probes="):
        torchdiv.divergence(torch.sin, x, method="hutchinson", probes=torch.ones(1, 4, 3), **kw)


def test_probes_exclude_tolerance():
    with pytest.raises(ValueError, match=r"estimate_divergence: probes= fixes the number of"):
        torchdiv.estimate_divergence(torch.sin, x, probes=torch.ones(2, 4, 3), rtol=0.1)


@pytest.mark.parametrize(
    ("kw", "shown"),
    [
        ({"num_probes": 4}, "num_probes=4"),
        ({"probe": "gaussian"}, "probe=gaussian"),
        ({"probes": torch.ones(1, 4, 3)}, r"probes=a tensor of shape \(1, 4, 3\)"),
    ],
)
@pytest.mark.parametrize("fn", ["divergence", "jacobian_diagonal", "graph_divergence"])
def test_exact_method_rejects_probe_options(fn, kw, shown):
    run = CALLS[fn]
    with pytest.raises(
        ValueError,
        match=rf"{fn}: \w+ is only used by stochastic methods; method='auto' is exact, got {shown}",
    ):
        run(**kw)


def test_exact_method_rejects_generator():
    with pytest.raises(ValueError, match=r"divergence: generator is only used by stochastic"):
        torchdiv.divergence(torch.sin, x, generator=torch.Generator())


def test_generator_type_for_stochastic():
    with pytest.raises(TypeError, match=r"estimate_trace: generator must be a torch.Generator"):
        torchdiv.estimate_trace(matmat, x, num_probes=2, generator=3)


def test_jacobian_diagonal_methods():
    with pytest.raises(
        ValueError,
        match=r"jacobian_diagonal: unknown method 'xtrace'; valid methods are 'auto', 'forward', "
        r"'reverse', 'structured', 'hutchinson'",
    ):
        torchdiv.jacobian_diagonal(torch.sin, x, method="xtrace", num_probes=4)


def test_estimate_divergence_methods():
    with pytest.raises(
        ValueError,
        match=r"estimate_divergence: unknown method 'auto'; valid methods are 'hutchinson', "
        r"'hutch\+\+', 'xtrace'",
    ):
        torchdiv.estimate_divergence(torch.sin, x, method="auto", num_probes=4)


class TestTolerance:
    @pytest.mark.parametrize("name", ["rtol", "atol"])
    def test_negative(self, name):
        with pytest.raises(ValueError, match=rf"estimate_divergence: {name} must be a finite"):
            torchdiv.estimate_divergence(torch.sin, x, **{name: -0.1})

    def test_type(self):
        with pytest.raises(TypeError, match=r"estimate_divergence: rtol must be a float or None"):
            torchdiv.estimate_divergence(torch.sin, x, rtol="0.1")

    def test_max_probes_below_one_block(self):
        with pytest.raises(
            ValueError,
            match=r"estimate_divergence: max_probes=10 is below one block of num_probes=16",
        ):
            torchdiv.estimate_divergence(torch.sin, x, rtol=0.1, max_probes=10)

    def test_max_probes_type(self):
        with pytest.raises(TypeError, match=r"estimate_divergence: max_probes must be an int"):
            torchdiv.estimate_divergence(torch.sin, x, rtol=0.1, max_probes=100.0)

    @pytest.mark.parametrize(("method", "least"), [("hutchinson", 2), ("hutch++", 6)])
    def test_block_too_small_for_a_spread(self, method, least):
        with pytest.raises(
            ValueError,
            match=rf"estimate_divergence: with rtol/atol every block must measure its own spread, "
            rf"so method='{method.replace('+', '.')}' needs num_probes >= {least} per block",
        ):
            torchdiv.estimate_divergence(
                torch.sin, x, method=method, num_probes=least // 2, rtol=0.1
            )


class TestEstimateTrace:
    def test_matmat_not_callable(self):
        with pytest.raises(TypeError, match=r"estimate_trace: matmat must be callable, got Tensor"):
            torchdiv.estimate_trace(x, x, num_probes=2)

    def test_like_not_a_tensor(self):
        with pytest.raises(TypeError, match=r"estimate_trace: like must be a torch.Tensor"):
            torchdiv.estimate_trace(matmat, [1.0], num_probes=2)

    def test_batch_dims(self):
        with pytest.raises(
            ValueError, match=r"estimate_trace: batch_dims must be in \[0, like.dim\(\)\]"
        ):
            torchdiv.estimate_trace(matmat, x, batch_dims=3, num_probes=2)

    def test_matmat_changes_shape(self):
        with pytest.raises(
            ValueError,
            match=r"estimate_trace: matmat\(V\) must return a tensor shaped like V .*V has shape "
            r"\(2, 4, 3\) but matmat\(V\) has shape \(2, 4\)",
        ):
            torchdiv.estimate_trace(lambda V: V.sum(-1), x, num_probes=2)

    def test_matmat_returns_non_tensor(self):
        with pytest.raises(TypeError, match=r"estimate_trace: matmat\(V\) must return a torch"):
            torchdiv.estimate_trace(lambda V: V.tolist(), x, num_probes=2)

    def test_chunk_size(self):
        with pytest.raises(ValueError, match=r"estimate_trace: chunk_size must be at least 1"):
            torchdiv.estimate_trace(matmat, x, num_probes=2, chunk_size=0)


class TestDrawProbes:
    def test_unknown_method(self):
        with pytest.raises(ValueError, match=r"draw_probes: unknown method 'auto'; valid methods"):
            torchdiv.draw_probes(x, 2, method="auto")

    def test_num_probes_multiple(self):
        with pytest.raises(ValueError, match=r"draw_probes: method='xtrace' needs num_probes to"):
            torchdiv.draw_probes(x, 3, method="xtrace")

    def test_unknown_probe(self):
        with pytest.raises(ValueError, match=r"draw_probes: unknown probe 'uniform'"):
            torchdiv.draw_probes(x, 2, probe="uniform")

    def test_x(self):
        with pytest.raises(TypeError, match=r"draw_probes: x must have a floating dtype"):
            torchdiv.draw_probes(torch.ones(2, 3).long(), 2)


def test_max_probes_is_checked_without_a_tolerance_too():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="estimate_divergence: max_probes must be an int"):
        torchdiv.estimate_divergence(lambda z: z, x, num_probes=2, max_probes="x")
    with pytest.raises(ValueError, match="max_probes=-3 is below"):
        torchdiv.estimate_divergence(lambda z: z, x, num_probes=2, max_probes=-3)


def test_probes_on_another_device_are_refused():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="divergence: probes are on meta but x is on cpu"):
        torchdiv.divergence(
            lambda z: z, x, method="hutchinson", probes=torch.empty(1, 2, 3, device="meta")
        )


def test_xtrace_tolerance_needs_room_for_three_blocks():
    x = torch.randn(4, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"at least 3 blocks .* max_probes must be at least 48"):
        torchdiv.estimate_divergence(lambda z: 3 * z, x, method="xtrace", rtol=0.5, max_probes=32)


def test_hutchpp_tolerance_averages_three_blocks():
    """Hutch++'s own standard error rests on its residual's few terms (2 of 6 products): one
    block whose error happens to look small must not end the tolerance mode. On a 2-D linear
    map the sketch is exact (error 0) at the first block, and 3 blocks are still drawn."""
    x = torch.randn(4, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    e = torchdiv.estimate_divergence(
        lambda z: 3 * z, x, method="hutch++", num_probes=6, rtol=0.1, generator=g
    )
    assert e.num_probes == 18
    torch.testing.assert_close(e.value, torch.full((4,), 6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"at least 3 blocks .* max_probes must be at least 18"):
        torchdiv.estimate_divergence(
            lambda z: 3 * z, x, method="hutch++", num_probes=6, rtol=0.1, max_probes=12
        )
