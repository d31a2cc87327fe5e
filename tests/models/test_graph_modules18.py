"""Models that are not plain eager modules: ``torch.fx.symbolic_trace``d GraphModules (and
graphs rewritten by passes: an activation replaced, conv-bn fused), TorchScript (script,
trace, ``torch.jit.freeze``), ``torch.export``ed programs' ``.module()``, modules fused by
``torch.nn.utils.fusion``, modules unpickled by ``torch.load``, ``torch.ao.quantization``
fake-quant (QAT) models, e3nn equivariant potentials (tensor products built by fx codegen,
scripted by ``e3nn.util.jit.compile``) and ``torch.compile`` in its other modes.

References, float64 unless the model is float32 only (fake quantization): each sample alone
(``laplacian_alone``, ``loop_diagonal``, ``reference_divergence``) through the eager module
the graph was made from, whose parameters a GraphModule shares; parameter gradients through the
same references.

Found here: a fused fake-quantize (``FusedMovingAvgObsFakeQuantize``, what
``get_default_qat_qconfig`` puts on every activation, as ``aten._fused_moving_avg_obs_fq_helper``)
writes its observer's statistics in place, and the mixing watch stopped following every result
of an op that writes in place: a train-mode batch norm after it (QAT's ``ConvBnReLU2d``) or a
mean over the batch went unrefused, the divergence silently the cross-sample one. The
watch now follows the op's fresh results (``_core.mixing.unknown``).
"""

from __future__ import annotations

import copy
import io
import operator
import warnings

import pytest
import torch
import torch.ao.quantization as tq
import torch.fx as fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

import torchdiv
from tests.conftest import (
    CentredMLP,
    assert_close,
    assert_gradients_as,
    assert_same_parameter_gradients,
    laplacian_alone,
    laplacian_by_grad_of_grad,
    loop_diagonal,
    reference_jacobian,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit's own
    pytest.mark.filterwarnings("ignore:Please use quant_min:UserWarning"),  # the x86 qconfig's
]

f64 = torch.float64


def _mlp(d_in: int = 3, d_out: int = 3, width: int = 8) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, width), torch.nn.Tanh(), torch.nn.Linear(width, d_out)
    ).double()


def _replace_tanh(gm: fx.GraphModule, fn) -> fx.GraphModule:
    """The pass people write to swap an activation: each ``Tanh`` call node becomes ``fn``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Tanh):
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(fn, (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _centre_after_tanh(gm: fx.GraphModule) -> None:
    """Edit the graph so that the hidden features are centred over the batch (mixes samples)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Tanh):
            with gm.graph.inserting_after(node):
                mean = gm.graph.call_method("mean", (node, 0), {"keepdim": True})
            with gm.graph.inserting_after(mean):
                centred = gm.graph.call_function(operator.sub, (node, mean))
            node.replace_all_uses_with(centred)
            centred.args, mean.args = (node, mean), (node, 0)
    gm.recompile()


def _divergence_alone(f, x: torch.Tensor) -> torch.Tensor:
    """Each sample's divergence, row by row, differentiable (parameters)."""
    return loop_diagonal(f, x, create_graph=True).flatten(1).sum(1)


def _check_divergence(model, x, eager, methods) -> None:
    """Values and parameter gradients of ``divergence(model)`` equal ``eager``'s per-sample
    ones, for each method, twice (a second call reuses whatever the first kept)."""
    want = _divergence_alone(eager, x)
    for method in methods:
        for _ in range(2):
            got = torchdiv.divergence(model, x, method=method)
            assert_close(got, want.detach())
            assert_same_parameter_gradients(eager, got.sum(), want.sum())


def _check_laplacian(model, x, eager, methods) -> None:
    want = laplacian_alone(lambda z: eager(z)[:, 0], x)
    for method in methods:
        for _ in range(2):
            got = torchdiv.laplacian(model, x, method=method)[:, 0]
            assert_close(got, want.detach())
            assert_same_parameter_gradients(eager, got.sum(), want.sum())


_DIVERGENCES = ["auto", "structured", "forward", "reverse"]
_LAPLACIANS = ["auto", "taylor", "forward-over-reverse", "grad-of-grad"]


@pytest.mark.parametrize("rewritten", [False, True])
def test_symbolic_traced_module(rewritten: bool) -> None:
    """A traced MLP, and one whose ``Tanh`` a pass replaced by ``torch.sin``: divergence,
    Jacobian and Laplacian as the eager module computing the same (parameters shared)."""
    torch.manual_seed(0)
    net, scalar = _mlp(), _mlp(d_out=1)
    gm, gm1 = fx.symbolic_trace(net), fx.symbolic_trace(scalar)
    if rewritten:
        gm, gm1 = _replace_tanh(gm, torch.sin), _replace_tanh(gm1, torch.sin)
        net[1], scalar[1] = _Sin(), _Sin()
    x = torch.randn(4, 3, dtype=f64)
    _check_divergence(gm, x, net, _DIVERGENCES)
    assert_close(torchdiv.jacobian(gm, x), reference_jacobian(net, x))
    _check_laplacian(gm1, x, scalar, _LAPLACIANS)


class _Sin(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sin(h)


@pytest.mark.parametrize(
    ("op", "methods"),
    [("divergence", ["auto", "structured", "forward"]), ("laplacian", ["auto", "taylor"])],
)
def test_graph_edited_and_recompiled_between_calls(op: str, methods: list[str]) -> None:
    """A GraphModule whose graph a pass edits in place and ``recompile()``s between two calls
    (the same object, the same parameters and shapes): the second call computes the new graph,
    never a plan kept from the first; an edit that centres over the batch is refused. Sizes
    where ``"auto"`` records ``f`` (event x elements above 2**12)."""
    torch.manual_seed(0)
    x = torch.randn(32, 16, dtype=f64)
    d_out = 16 if op == "divergence" else 1
    for method in methods:
        net = _mlp(16, d_out, 12)
        gm = fx.symbolic_trace(net)
        call = getattr(torchdiv, op)
        call(gm, x, method=method)
        _replace_tanh(gm, torch.sin)
        net[1] = _Sin()
        if op == "divergence":
            assert_close(call(gm, x, method=method), _divergence_alone(net, x).detach())
        else:
            want = laplacian_alone(lambda z, net=net: net(z)[:, 0], x)
            assert_close(call(gm, x, method=method)[:, 0], want.detach())
        if method == "forward":
            continue  # (an explicit forward or reverse method watches nothing)
        gm = fx.symbolic_trace(_mlp(16, d_out, 12))
        call(gm, x, method=method)
        _centre_after_tanh(gm)
        with pytest.raises(torchdiv.BatchInteractionError, match=f"^{op}: f mixes samples"):
            call(gm, x, method=method)


def test_two_graph_modules_with_the_same_code() -> None:
    """Two GraphModules whose generated code is the same text (their submodules differ: Tanh
    and Sigmoid; their constants differ): each call computes its own module."""
    torch.manual_seed(0)
    x = torch.randn(32, 16, dtype=f64)
    first, second = _mlp(16, 16, 12), _mlp(16, 16, 12)
    second[1] = torch.nn.Sigmoid()
    g1, g2 = fx.symbolic_trace(first), fx.symbolic_trace(second)
    assert g1.code == g2.code
    for method in ["auto", "structured"]:
        for gm, net in [(g1, first), (g2, second), (g1, first)]:
            assert_close(torchdiv.divergence(gm, x, method=method), _divergence_alone(net, x))


def _scripted(net: torch.nn.Module, how: str, x: torch.Tensor) -> torch.nn.Module:
    """``net`` as TorchScript (script, trace, frozen script), exported, or pickled and
    loaded; run a few times first (the profiling executor's optimized plans)."""
    net = copy.deepcopy(net)
    if how == "export":
        return torch.export.export(net, (x,)).module()
    if how == "load":
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    model = torch.jit.trace(net, x) if how == "trace" else torch.jit.script(net)
    if how == "freeze":
        model = torch.jit.freeze(model.eval())
    for _ in range(3):
        model(x)
    return model


_HOWS = ["script", "trace", "freeze", "export", "load"]


@pytest.mark.parametrize("how", _HOWS)
def test_scripted_exported_and_loaded_models(how: str) -> None:
    """Values as the eager module's, and parameter gradients where the model keeps parameters
    (a frozen module folds them into constants: values only)."""
    torch.manual_seed(0)
    net, scalar = _mlp(), _mlp(d_out=1)
    x = torch.randn(4, 3, dtype=f64)
    model, model1 = _scripted(net, how, x), _scripted(scalar, how, x)
    want, lap = _divergence_alone(net, x), laplacian_alone(lambda z: scalar(z)[:, 0], x)
    params = list(model.parameters()) + list(model1.parameters())
    for method in _DIVERGENCES:
        got = torchdiv.divergence(model, x, method=method)
        assert_close(got, want.detach())
        if params:
            assert_gradients_as(model, got.sum(), net, want.sum())
    for method in _LAPLACIANS:
        got = torchdiv.laplacian(model1, x, method=method)[:, 0]
        assert_close(got, lap.detach())
        if params:
            assert_gradients_as(model1, got.sum(), scalar, lap.sum())


@pytest.mark.parametrize("how", ["fx", *_HOWS])
@pytest.mark.parametrize("op", ["divergence", "laplacian"])
def test_model_that_centres_over_the_batch_is_refused(how: str, op: str) -> None:
    """``h - h.mean(0)`` inside a traced, scripted, frozen, exported or loaded model: the watch
    sees the ATen ops these run (``"auto"`` and the stochastic methods watch)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=f64)
    net = CentredMLP().double()
    model = fx.symbolic_trace(net) if how == "fx" else _scripted(net, how, x)
    f = model if op == "divergence" else (lambda z: model(z)[:, 0])
    for options in [{}, {"method": "hutchinson", "num_probes": 2}]:
        with pytest.raises(torchdiv.BatchInteractionError, match=f"^{op}: f mixes samples"):
            getattr(torchdiv, op)(f, x, **options)


def _batch_norm_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()


@pytest.mark.parametrize("decomposed", [False, True])
def test_exported_train_mode_batch_norm_is_refused_by_every_method(decomposed: bool) -> None:
    """Fails without the fix: an exported train-mode model calls ``aten.batch_norm`` (after
    ``run_decompositions``, ``aten._native_batch_norm_legit_functional``) directly, not
    ``F.batch_norm``, whose call inside ``torch.func``'s transforms torchdiv refuses: the
    explicit ``"forward"`` returned zeros, ``"reverse"`` the batch-coupled diagonal. Now the
    ATen batch norms are refused there too; ``"auto"`` refused already."""
    x = torch.randn(4, 3, dtype=f64)
    program = torch.export.export(_batch_norm_mlp().train(), (x,))
    model = (program.run_decompositions() if decomposed else program).module()
    for method in ["forward", "reverse", "auto"]:
        with pytest.raises(torchdiv.BatchInteractionError, match="batch norm in train mode"):
            torchdiv.divergence(model, x, method=method)
    for method in ["forward-over-reverse", "hessian"]:
        with pytest.raises(torchdiv.BatchInteractionError, match="batch norm in train mode"):
            torchdiv.laplacian(lambda z: model(z)[:, 0], x, method=method)


@pytest.mark.slow  # torch.export and four methods: about 0.5 s
def test_exported_eval_mode_batch_norm() -> None:
    """The same model exported in eval mode (running statistics): every method, values and
    parameter gradients as the eager model's."""
    net = _batch_norm_mlp().eval()
    with torch.no_grad():
        net[1].running_mean.normal_(), net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, dtype=f64)
    model = torch.export.export(copy.deepcopy(net), (x,)).module()
    want = _divergence_alone(net, x)
    for method in _DIVERGENCES:
        got = torchdiv.divergence(model, x, method=method)
        assert_close(got, want.detach())
        assert_gradients_as(model, got.sum(), net, want.sum())


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.conv(x))))


@pytest.mark.slow  # the references' double backward through convolutions: about 1 s
@pytest.mark.parametrize("how", ["fx fuse", "nn.utils.fusion"])
def test_conv_batch_norm_fused_for_inference(how: str) -> None:
    """An eval-mode conv net whose batch norm is folded into its convolution, by the fx pass
    or by ``fuse_conv_bn_eval``: values as the unfused net's, parameter gradients of the fused
    weights as per-sample references of the fused model."""
    torch.manual_seed(0)
    net = _ConvNet().double()
    with torch.no_grad():
        net.bn.running_mean.normal_(), net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.normal_(), net.bn.bias.normal_()
    net.eval()
    if how == "fx fuse":
        with warnings.catch_warnings():  # its import scripts torch.utils.mkldnn (deprecated)
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse as fx_fuse
        fused = fx_fuse(copy.deepcopy(net))
    else:
        fused = copy.deepcopy(net)
        fused.conv, fused.bn = fuse_conv_bn_eval(fused.conv, fused.bn), torch.nn.Identity()
    x = torch.randn(2, 2, 3, 3, dtype=f64)
    want = _divergence_alone(fused, x)
    assert_close(want, _divergence_alone(net, x).detach(), scale=10)  # the fold's round-off
    for method in ["structured", "reverse"]:  # (the others: the MLPs above)
        got = torchdiv.divergence(fused, x, method=method)
        assert_close(got, want.detach())
        assert_same_parameter_gradients(fused, got.sum(), want.sum())


class _FoldedBatch(torch.nn.Module):
    """A batch folded into the channels of one convolution with ``groups=1``: mixes samples."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2 * batch, 2 * batch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return torch.tanh(self.conv(x.reshape(1, b * c, h, w))).reshape(b, c, h, w)


class _ScalarConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(3, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x))).flatten(1).sum(1)


def test_traced_convolution_across_samples_is_refused() -> None:
    """Fails without the fix: ``torch.jit.trace`` records ``nn.Conv2d`` as
    ``aten._convolution``, which the mixing watch did not know: a batch folded into the
    channels passed ``"auto"`` and Hutchinson unrefused. It now has ``aten.convolution``'s
    rules (the same first nine arguments)."""
    x = torch.randn(3, 2, 4, 4, dtype=f64)
    folded = torch.jit.trace(_FoldedBatch(3).double(), x)
    for options in [{}, {"method": "structured"}, {"method": "hutchinson", "num_probes": 2}]:
        with pytest.raises(torchdiv.BatchInteractionError, match="convolution across samples"):
            torchdiv.divergence(folded, x, **options)


@pytest.mark.slow  # the references' double backward through convolutions: about 1 s
def test_traced_conv_net_in_the_recording_engines() -> None:
    """Failed before the fix with ``UnsupportedOp`` (``aten._convolution`` had no rule): the
    structured divergence and the Taylor Laplacian of traced conv nets, now recorded as
    ``aten.convolution``; values and parameter gradients as the eager nets'."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 3, 3, dtype=f64)
    net, scalar = _ConvNet().double().eval(), _ScalarConvNet().double()
    traced, traced1 = torch.jit.trace(net, x), torch.jit.trace(scalar, x)
    want, lap = _divergence_alone(net, x), laplacian_alone(scalar, x)
    got = torchdiv.divergence(traced, x, method="structured")
    assert_close(got, want.detach())
    assert_gradients_as(traced, got.sum(), net, want.sum())
    got = torchdiv.laplacian(traced1, x, method="taylor")
    assert_close(got, lap.detach())
    assert_gradients_as(traced1, got.sum(), scalar, lap.sum())


class _QuantNet(torch.nn.Module):
    """A QAT-ready conv net as the quantization tutorials write it: stubs around the float
    model, conv-bn-relu fused for QAT (``ConvBnReLU2d``: batch statistics in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.bn, self.relu = (
            torch.nn.Conv2d(2, 3, 3, padding=1),
            torch.nn.BatchNorm2d(3),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.head(torch.tanh(self.relu(self.bn(self.conv(self.quant(x)))))))


def _prepared() -> torch.nn.Module:
    torch.manual_seed(0)
    net = tq.fuse_modules_qat(_QuantNet().train(), [["conv", "bn", "relu"]])
    net.qconfig = tq.get_default_qat_qconfig("x86")
    prepared = tq.prepare_qat(net)
    for _ in range(3):
        prepared(torch.randn(4, 2, 5, 5))  # the observers' statistics
    return prepared


def test_qat_model_in_train_mode_is_refused() -> None:
    """Fails without the fix: the fused fake-quantize on the input ended the watch's tracking,
    and the train-mode batch norm of ``ConvBnReLU2d`` after it went unrefused."""
    prepared, x = _prepared(), torch.randn(4, 2, 5, 5)
    for options in [{}, {"method": "hutchinson", "num_probes": 2}]:
        with pytest.raises(torchdiv.BatchInteractionError, match="batch norm in train mode"):
            torchdiv.divergence(prepared, x, **options)


def _rrelu(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rrelu(z, training=True)


@pytest.mark.parametrize("op", ["divergence", "laplacian"])
@pytest.mark.parametrize("layer", ["fused fake-quantize", "train-mode rrelu"])
def test_an_op_writing_a_buffer_then_a_mean_over_the_batch_is_refused(op: str, layer: str) -> None:
    """Fails without the fix: ops whose result is fresh while they write another argument in
    place (the observer's statistics; ``rrelu_with_noise``'s noise) ended the watch's tracking
    of their result, and a mean over the batch after them passed."""
    act = tq.FusedMovingAvgObsFakeQuantize() if layer == "fused fake-quantize" else _rrelu
    f = lambda z: torch.tanh(act(z) - act(z).mean(0))  # noqa: E731
    x = torch.randn(4, 3)
    for options in [{}, {"method": "hutchinson", "num_probes": 2}]:
        with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
            getattr(torchdiv, op)(f, x, **options)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_qat_fake_quantized_mlp(mode: str) -> None:
    """A fake-quantized MLP (no batch norm) in train and eval mode: divergence and Laplacian as
    autograd (the straight-through estimator) computes them from one evaluation of the batch at
    the same observer state (in train mode the scales follow the batch's range: a
    non-differentiable dependence, 0 in every derivative), the observers' state after the call
    as after one evaluation; float32, the only dtype fake quantization takes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        tq.QuantStub(), torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    net.qconfig = tq.get_default_qat_qconfig("x86")
    prepared = tq.prepare_qat(net.train())
    x = torch.randn(5, 3)
    prepared(x)
    getattr(prepared, mode)()
    state = copy.deepcopy(prepared.state_dict())
    prepared(x)
    once = copy.deepcopy(prepared.state_dict())
    prepared.load_state_dict(state)
    want = laplacian_by_grad_of_grad(lambda z: prepared(z)[:, 0], x)
    prepared.load_state_dict(state)
    got = torchdiv.laplacian(lambda z: prepared(z)[:, 0], x)
    after = prepared.state_dict()
    assert all(torch.equal(once[k], after[k]) for k in once)
    assert_close(got, want.detach())
    assert_same_parameter_gradients(prepared, got.sum(), want.sum())
    prepared.load_state_dict(state)
    divergence = torchdiv.divergence(prepared, x)
    prepared.load_state_dict(state)
    assert_close(divergence, _one_forward_divergence(prepared, x))


def _one_forward_divergence(f, x: torch.Tensor) -> torch.Tensor:
    """``sum_i d f(x)[:, i] / d x[:, i]`` from one evaluation of ``f`` on the whole batch (an
    ``f`` whose state moves at each evaluation: QAT's moving-average observers in train mode),
    one gradient per column (blockwise: each sample's row depends on that sample alone)."""
    leaf = x.detach().requires_grad_(True)
    y = f(leaf)
    columns = [
        torch.autograd.grad(y[:, i].sum(), leaf, retain_graph=True)[0][:, i]
        for i in range(x.shape[1])
    ]
    return torch.stack(columns, 1).sum(1)


def _e3nn_potential(n_atoms: int, scripted: bool) -> torch.nn.Module:
    """An equivariant potential as e3nn's examples write one (its tensor products' code
    generated by fx; ``e3nn.util.jit.compile`` scripts it): spherical harmonics of the edge
    vectors of a complete graph, a Gaussian radial basis into a radial MLP giving the weights
    of a ``FullyConnectedTensorProduct``, messages ``index_add``-ed per atom, a scalar readout
    summed over atoms. ``E(pos)``: ``(B, N, 3) -> (B,)``, float64."""
    o3 = pytest.importorskip("e3nn.o3")
    from e3nn.math import soft_one_hot_linspace
    from e3nn.nn import FullyConnectedNet
    from e3nn.util.jit import compile as e3nn_compile

    class Potential(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sh = o3.Irreps.spherical_harmonics(2)
            hidden = o3.Irreps("4x0e + 2x1o + 2x2e")
            self.tp = o3.FullyConnectedTensorProduct("4x0e", self.sh, hidden, shared_weights=False)
            self.radial = FullyConnectedNet([8, 16, self.tp.weight_numel], torch.nn.functional.silu)
            self.readout = o3.FullyConnectedTensorProduct(hidden, hidden, "0e")
            pairs = [(a, b) for a in range(n_atoms) for b in range(n_atoms) if a != b]
            src, dst = torch.tensor(pairs).T
            self.register_buffer("src", src)
            self.register_buffer("dst", dst)
            self.species = torch.nn.Parameter(torch.randn(n_atoms, 4))

        def forward(self, pos: torch.Tensor) -> torch.Tensor:
            vec = pos[:, self.dst] - pos[:, self.src]
            sh = o3.spherical_harmonics(self.sh, vec, True, normalization="component")
            basis = soft_one_hot_linspace(vec.norm(dim=-1), 0.0, 3.0, 8, "gaussian", False)
            nodes = self.species[self.src].expand(len(pos), -1, -1)
            messages = self.tp(nodes, sh, self.radial(basis * 8**0.5))
            atoms = pos.new_zeros(pos.shape[:2] + messages.shape[-1:])
            atoms = atoms.index_add(1, self.dst, messages)
            return self.readout(atoms, atoms).sum((1, 2))

    default = torch.get_default_dtype()
    torch.set_default_dtype(f64)  # e3nn's constants (Clebsch-Gordan, normalizations)
    try:
        torch.manual_seed(0)
        model = Potential()
        return e3nn_compile(model) if scripted else model
    finally:
        torch.set_default_dtype(default)


@pytest.mark.slow  # about 1.5 s each: e3nn's import and codegen, second derivatives
@pytest.mark.parametrize("scripted", [False, True])
def test_e3nn_potential_laplacian_and_force_divergence(scripted: bool) -> None:
    """``ΔE`` per molecule (``(B, N, 3)``, batch_dims=1) and the divergence of the force
    field ``F = -∇E`` computed inside ``f`` (``= -ΔE``): values and parameter gradients as
    each molecule alone by grad of grad; centring over the batch is refused, centring each
    molecule on its centroid is not (and is right)."""
    model = _e3nn_potential(3, scripted)
    pos = torch.randn(3, 3, 3, dtype=f64)
    for _ in range(3):
        model(pos)  # the executor's optimized plans, where scripted
    want = laplacian_alone(model, pos)
    for method in ["auto", "taylor", "forward-over-reverse"]:
        got = torchdiv.laplacian(model, pos, method=method)
        assert_close(got, want.detach(), scale=1e3)  # |E''| ~ 1e3: float64 round-off
        assert_gradients_as(model, got.sum(), model, want.sum())

    def forces(p: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            p = p if p.requires_grad else p.requires_grad_(True)
            (g,) = torch.autograd.grad(model(p).sum(), p, create_graph=True)
        return -g

    for method in ["auto", "reverse"]:
        got = torchdiv.divergence(forces, pos, method=method)
        assert_close(got, -want.detach(), scale=1e3)
        assert_gradients_as(model, -got.sum(), model, want.sum())
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^laplacian: f mixes samples"):
        torchdiv.laplacian(lambda p: model(p - p.mean(0)), pos)
    centred = lambda p: model(p - p.mean(1, keepdim=True))  # noqa: E731
    assert_close(torchdiv.laplacian(centred, pos), laplacian_alone(centred, pos), scale=1e3)


@pytest.mark.slow  # inductor's compilation: seconds
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compiled_in_other_modes(mode: str) -> None:
    """``torch.compile(net, mode=...)`` on CPU (``"reduce-overhead"`` has no CUDA graphs to
    capture here): divergence and Laplacian as the eager net's, with parameter gradients; a
    compiled model that centres over the batch is refused."""
    torch.manual_seed(0)
    net, scalar = _mlp(), _mlp(d_out=1)
    x = torch.randn(4, 3, dtype=f64)
    _check_divergence(torch.compile(net, mode=mode), x, net, ["auto", "reverse"])
    _check_laplacian(torch.compile(scalar, mode=mode), x, scalar, ["auto"])
    centred = torch.compile(CentredMLP().double(), mode=mode)
    with pytest.raises(torchdiv.BatchInteractionError, match=r"^divergence: f mixes samples"):
        torchdiv.divergence(centred, x)
