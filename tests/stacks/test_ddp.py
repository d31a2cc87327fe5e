"""Every public operator inside a DDP- or FSDP2-wrapped training loss: gradients equal to one
process (float64, 1e-10 relative), for every method, every DDP option and FSDP2 with and
without resharding after forward, on an MLP and a conv net (cases in ``tests/ddp_cases.py``;
``bench/ddp_matrix.py`` runs all combinations). Two gloo processes on localhost, spawned
here, bounded in time: a pair that crashes or stops reporting is killed."""

from __future__ import annotations

import ddp_cases
import pytest
import torch
from conftest import in_todays_sample, laplacian_by_grad_of_grad, loop_diagonal

import torchdiv

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def test_every_operator_under_ddp_and_fsdp_equals_one_process(pytestconfig):
    """Each operator's case in its second family, and the fault cases of
    ``ddp_cases.SECOND_CASES`` (one case of each fault always runs), are sampled as slow
    tests are (``--slow=all`` runs all 80 cases; one pair of processes runs them one after
    another). The same pair then runs ``torchdiv.distributed``'s two-rank cases
    (``ddp_cases.SHARDED``, all of them: ``test_distributed.py`` says what they check): one
    spawn, ~6 s of CPU, for both."""
    cases = ddp_cases.sample(lambda case: in_todays_sample(pytestconfig, "/".join(case)))
    todo = [("ddp", case) for case in cases] + [("sharded", case) for case in ddp_cases.SHARDED]
    outcomes = ddp_cases.run_pairs(list(enumerate(todo)), ddp_cases.run_either)
    assert sorted(outcomes) == list(range(len(todo)))
    verdicts = {cases[i]: ddp_cases.judge(cases[i], outcomes[i]) for i in range(len(cases))}
    failed = {"/".join(case): v for case, v in verdicts.items() if v[0] != "right"}
    assert not failed
    for i, case in enumerate(ddp_cases.SHARDED, start=len(cases)):
        ddp_cases.assert_sharded_equal_one_process(case, outcomes[i], 2)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_fsdp1_and_an_fsdp2_adjoint_solve_are_refused_with_the_way_out(one_process_group):
    """FSDP1 crashed inside its own hooks (``_all_handles``, ``setStorage``) in both forms;
    torchdiffeq's adjoint met FSDP2's sharded parameters in a ``cat`` with plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from torchdiv.flows import log_likelihood

    def net():
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    x = torch.randn(4, 3)
    legacy = FullyShardedDataParallel(net(), device_id=torch.device("cpu"))
    way_out = r"FSDP1\) is not supported.*fully_shard"
    with pytest.raises(TypeError, match=r"divergence: f\(x\) raised TypeError: .*" + way_out):
        torchdiv.divergence(legacy, x)
    z = x.clone().requires_grad_(True)
    with pytest.raises(TypeError, match=way_out):
        torchdiv.graph_divergence(legacy(z), z)
    sharded = fully_shard(net(), mesh=init_device_mesh("cpu", (1,)))
    normal = torch.distributions.Normal(0.0, 1.0)
    with pytest.raises(ValueError, match="log_likelihood: adjoint=True with parameters sharded"):
        log_likelihood(sharded, x, 0.0, 1.0, lambda z: normal.log_prob(z).sum(-1), adjoint=True)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("method", ["auto", "structured"])
@pytest.mark.parametrize("wrapper", ["none", "ddp", "fsdp"])
def test_calls_in_a_process_group_are_watched_once(one_process_group, watches, wrapper, method):
    """Under a process group every call was watched for sample mixing again: each call
    registered a global forward pre-hook of its own, which the structure key holds (a new
    structure at every call, any module, wrapped or not); and a watch saw FSDP2's unshard
    (``untyped_storage().size()`` of parameters resharded after the last forward) as values
    read by Python, so the pass held for those values only; ``"structured"`` recorded
    every call again (FSDP2's hooks' profiler handles, compared by nothing, kept it from a
    template: ``_taylor.cache.Handle``). Four calls: one watch (or recording), each
    value the trace of the float64 Jacobian of the module unwrapped (Glow's LU map); DDP's
    second call by "auto" too (its first forward sets ``_lazy_init_ran``: another structure key,
    once)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain, model = ddp_cases.make_model("glow", False), ddp_cases.make_model("glow", False)
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrapper == "fsdp":
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model.net, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    x = ddp_cases.batch("glow")
    one = torch.func.jacrev(lambda z: plain(z[None])[0])
    want = torch.stack([one(z).trace() for z in x])
    for _ in range(4):
        got = torchdiv.divergence(model, x, method=method)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(watches) == (2 if (wrapper, method) == ("ddp", "auto") else 1)


# Dynamo reads .grad of the non-leaf tensors it resumes with after the graph break at the call
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")
@pytest.mark.parametrize("method", ["auto", "reverse"])
def test_a_ddp_module_in_a_compiled_loss_equals_one_process(one_process_group, method):
    """Traced, the call skipped the one-forward handling of DDP: reverse mode met the buffer
    broadcast under its transforms (an error), and ``"auto"``'s plain-autograd fallback gave
    the divergence's value but none of its parameter gradients (silently)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    x = ddp_cases.batch("mlp")
    backend = CompileCounterWithBackend("aot_eager")

    def gradients(model: torch.nn.Module, compiled: bool) -> list[torch.Tensor]:
        def loss(z: torch.Tensor) -> torch.Tensor:
            div = torchdiv.divergence(model, z, method=method)
            return div.square().mean() + model(z).square().mean()

        torch._dynamo.reset()
        (torch.compile(loss, backend=backend) if compiled else loss)(x).backward()
        return [p.grad for p in model.parameters()]

    expected = gradients(ddp_cases.make_model("mlp", False), compiled=False)
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_cases.make_model("mlp", False))
    got = gradients(ddp, compiled=True)
    assert backend.frame_count > 0, "the loss ran eagerly: eager compared with eager"
    for g, want in zip(got, expected, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


class ClipLinear(torch.nn.Linear):
    """WGAN's weight clipping, written in ``forward``: ``.data`` clamped in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight.data.clamp_(-0.3, 0.3)
        return super().forward(x)


class Critic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.clipped, self.out = (
            torch.nn.Linear(4, 4),
            ClipLinear(4, 12),
            torch.nn.Linear(12, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.clipped(torch.tanh(self.pre(x)))))


def _hutchinson_loop(f, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``mean_k v_k^T J(x_b) v_k`` per sample: one ``autograd.grad`` per probe, a graph kept."""
    leaf = x.detach().requires_grad_(True)
    y = f(leaf)
    rows = [(torch.autograd.grad(y, leaf, v, create_graph=True)[0] * v).sum(-1) for v in probes]
    return torch.stack(rows).mean(0)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("operator", ["divergence-auto", "divergence-hutchinson", "laplacian"])
@pytest.mark.parametrize("wrap", ["layers", "root", "children"])
def test_a_weight_clipped_in_forward_under_fsdp2_gives_the_unwrapped_gradients(
    one_process_group, operator, wrap
):
    """A ``.data`` write in ``forward`` under FSDP2 resharding after forward: the write hit
    the unsharded copy only, and the caller's backward gathered the shard again, unclipped;
    torchdiv's graphs read the weights there (parameter gradients 2-30% off, values right).
    Without resharding (``wrap="root"``: ``fully_shard(model)`` alone, FSDP2's default root)
    the backward read the write, but the reshard after it dropped it: the parameter after
    the call was unclipped (the next step's values 0.5% off). ``wrap="children"``: ``f`` calls
    the sharded children, never the root; each became a root of its own, and only the first
    was unsharded for the call ("setStorage ... storage of size 0" in the caller's backward,
    clipped or not). Values, parameter gradients and the parameters after the call equal
    the module unwrapped (float64, per-sample grad-of-grad loops)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = Critic().double()
    with torch.no_grad():
        plain.clipped.weight.mul_(3.0)  # (most entries outside the clip)
    model = Critic().double()
    model.load_state_dict(plain.state_dict())
    mesh = init_device_mesh("cpu", (1,))
    if wrap == "root":
        fully_shard(model, mesh=mesh)
    else:
        for layer in model.children():
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    f = Critic.forward.__get__(model) if wrap == "children" else model  # (model's __call__ unused)
    x = torch.randn(6, 4, dtype=torch.float64)
    probes = torchdiv.draw_probes(x, 3)
    if operator == "divergence-auto":
        got = torchdiv.divergence(f, x)
        want = loop_diagonal(plain, x, create_graph=True).sum(-1)
    elif operator == "divergence-hutchinson":
        got = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
        want = _hutchinson_loop(plain, x, probes)
    else:
        got = torchdiv.laplacian(lambda z: f(z).sum(-1), x)
        want = laplacian_by_grad_of_grad(lambda z: plain(z).sum(-1), x)
    got.square().mean().backward()
    want.square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        zero = torch.zeros_like(theirs)
        grad = zero if mine.grad is None else mine.grad.full_tensor()
        want_grad = zero if theirs.grad is None else theirs.grad
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mine.full_tensor(), theirs, rtol=0, atol=0)
