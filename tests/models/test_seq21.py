"""Sequence models as users take them from HuggingFace ``transformers`` (tiny configs built
from their config classes, nothing downloaded) and as diffusion-LM codes write a score net
over continuous token embeddings: BERT/RoBERTa encoders on ``inputs_embeds`` ``(B, L, E)``
with a padding mask that differs between samples, GPT-2 and Llama decoders (causal masks,
rotary embeddings, RMSNorm; eager and SDPA attention), PatchTST with its per-sample std
scaling (RevIN-style: mean and std over each sample's time axis), Mamba's slow (pure torch)
path. Each is ``f`` over one sequence per sample (``batch_dims=1``); with ``batch_dims=2``
the positions would be samples, which attention (and the scaler, and Mamba's convolution)
mixes: refused.

References: ``conftest.reference_jacobian`` (``jacrev`` of the whole batch, its diagonal
blocks) in float64, differentiable in the parameters (``create_graph`` by ``jacrev``);
Hutchinson against ``mean_k v_k^T J v_k`` with the same probes. Float64 throughout; Llama and
Mamba run their RMSNorm (and Llama its eager softmax) in float32 whatever the model's dtype
(``hidden_states.to(torch.float32)``), so forward mode's tangents and the reverse-mode
reference differ by float32 round-off there: 1e-5 (≈ 100 eps_32 on values of order 10).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, sampled_daily
from conftest import reference_jacobian as jacrev_blocks
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv
from torchdiv import BatchInteractionError

transformers = pytest.importorskip("transformers")

f64 = torch.float64
B, L, E = 3, 3, 16
EXACT = ("auto", "reverse", "forward", "structured")
FLOAT32_INSIDE = {"rtol": 1e-5, "atol": 1e-5}  # RMSNorm in float32 (module docstring)


def reference_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """``conftest.reference_jacobian`` with attention on the math backend: SDPA's CPU flash
    backward has no derivative (the parameter gradients of a ``jacrev``) and no ``vmap``
    batching rule (a warning)."""
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        return jacrev_blocks(f, x)


def _mask() -> torch.Tensor:
    """Padding that differs between samples: none, the last position, the last two."""
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -1] = 0
    mask[2, -2:] = 0
    return mask


def _bert(impl: str = "eager", roberta: bool = False) -> torch.nn.Module:
    config_class = transformers.RobertaConfig if roberta else transformers.BertConfig
    model_class = transformers.RobertaModel if roberta else transformers.BertModel
    config = config_class(
        hidden_size=E,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=10,
        max_position_embeddings=16,
        pad_token_id=1,
        attn_implementation=impl,
    )
    return model_class(config).to(f64).eval()


def _gpt2(impl: str = "eager") -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_embd=E,
        n_layer=1,
        n_head=2,
        vocab_size=10,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=impl,
    )
    return transformers.GPT2Model(config).to(f64).eval()


def _llama(impl: str = "sdpa") -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=E,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=10,
        max_position_embeddings=16,
        attn_implementation=impl,
    )
    return transformers.LlamaModel(config).to(f64).eval()


def _embedded(model: torch.nn.Module, mask: torch.Tensor | None = None):
    return lambda x: model(inputs_embeds=x, attention_mask=mask).last_hidden_state


def _check_all(f, x: torch.Tensor, methods=EXACT, tol: dict[str, float] | None = None) -> None:
    """Divergence, Jacobian diagonal (each method) and Jacobian against the reference."""
    full = reference_jacobian(f, x)
    blocks = full.reshape(len(x), x[0].numel(), x[0].numel())
    diagonal = blocks.diagonal(dim1=1, dim2=2)
    close = assert_close if tol is None else lambda a, b: torch.testing.assert_close(a, b, **tol)
    for method in methods:
        close(torchdiv.divergence(f, x, method=method), diagonal.sum(1))
        close(torchdiv.jacobian_diagonal(f, x, method=method), diagonal.reshape(x.shape))
        if method != "structured":
            close(torchdiv.jacobian(f, x, method=method), full)


def _refused(f, x: torch.Tensor) -> None:
    """Positions taken for samples (``batch_dims=2``): every operator refuses."""
    for op in (torchdiv.divergence, torchdiv.jacobian_diagonal, torchdiv.jacobian):
        with pytest.raises(BatchInteractionError, match="mixes samples"):
            op(f, x, batch_dims=2)


def test_structured_cat_skips_a_legacy_empty_operand():
    """``torch.cat`` skips 1-D operands of shape ``(0,)`` (a key/value cache's first
    ``torch.cat([torch.tensor([]), keys], -2)``); the structured and Taylor engines
    concatenated their zero derivatives too and raised "Dimension out of range"
    (until rev-seq21), refusing every HF decoder with its default ``use_cache``."""
    empty = torch.tensor([], dtype=f64)
    f = lambda x: torch.cat([empty, x.sin(), x], -2)  # noqa: E731
    x = torch.randn(2, 3, 2, dtype=f64)
    full = reference_jacobian(f, x).reshape(2, 12, 6)
    want = full[:, :6].diagonal(dim1=1, dim2=2)
    got = torchdiv.jacobian_diagonal(lambda x: f(x)[:, :3], x, method="structured")
    assert_close(got, want.reshape(x.shape))
    g = lambda x: torch.cat([empty, x.sin()], -1).sum(-1)  # noqa: E731
    want = -x.sin().sum(-1)  # (Δ of each output component, its own row)
    assert_close(torchdiv.laplacian(g, x, method="taylor"), want)


@pytest.mark.parametrize("impl", sampled_daily(["eager", "sdpa"], {"eager", "sdpa"}))
def test_gpt2_decoder_every_method(impl: str):
    """Causal mask and a padding mask per sample; the default ``use_cache=True`` builds a
    ``DynamicCache`` in each forward (its first concatenation the case above)."""
    torch.manual_seed(0)
    model = _gpt2(impl)
    x = torch.randn(B, L, E, dtype=f64)
    _check_all(_embedded(model, _mask()), x)
    _refused(_embedded(model, _mask()), x)


@pytest.mark.parametrize("impl", sampled_daily(["eager", "sdpa"], {"eager", "sdpa"}))
def test_llama_decoder_rotary_rmsnorm(impl: str):
    """Rotary embeddings, grouped-query attention, RMSNorm (float32 inside)."""
    torch.manual_seed(1)
    model = _llama(impl)
    x = torch.randn(B, L, E, dtype=f64)
    _check_all(_embedded(model, _mask()), x, tol=FLOAT32_INSIDE)
    _refused(_embedded(model), x)


@pytest.mark.parametrize(
    "case",
    sampled_daily(
        ["bert-eager", "bert-sdpa", "roberta-eager", "roberta-sdpa"],
        {"bert-sdpa", "roberta-eager", "roberta-sdpa"},
    ),
)
def test_encoder_padding_per_sample_is_not_mixing(case: str):
    """Each sample's own padding (the extended mask ``(B, 1, 1, L)`` added to its scores)."""
    torch.manual_seed(2)
    name, impl = case.split("-")
    model = _bert(impl, name == "roberta")
    x = torch.randn(B, L, E, dtype=f64)
    _check_all(_embedded(model, _mask()), x)
    _refused(_embedded(model, _mask()), x)


def test_patchtst_std_scaling_is_per_sample():
    """PatchTST's ``scaling="std"``: each sample (and channel) scaled by its own mean and
    std over time, not refused; with time steps as samples the scaler's sum mixes them."""
    torch.manual_seed(3)
    config = transformers.PatchTSTConfig(
        num_input_channels=2,
        context_length=8,
        patch_length=4,
        patch_stride=4,
        prediction_length=8,
        d_model=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        ffn_dim=32,
        scaling="std",
    )
    model = transformers.PatchTSTForPrediction(config).to(f64).eval()
    level = torch.tensor([0.0, 3.0, -1.0], dtype=f64)[:, None, None]
    spread = torch.tensor([1.0, 5.0, 0.2], dtype=f64)[:, None, None]
    x = level + spread * torch.randn(B, 8, 2, dtype=f64)
    f = lambda x: model(past_values=x).prediction_outputs  # noqa: E731
    _check_all(f, x)
    with pytest.raises(BatchInteractionError, match="PatchTSTStdScaler"):
        torchdiv.divergence(f, x, batch_dims=2)


@pytest.mark.slow
def test_mamba_slow_path():
    """``MambaModel`` without its CUDA kernels: the reference scan and causal ``Conv1d``."""
    torch.manual_seed(4)
    config = transformers.MambaConfig(
        hidden_size=E, state_size=4, num_hidden_layers=1, vocab_size=10, expand=2, conv_kernel=3
    )
    model = transformers.MambaModel(config).to(f64).eval()
    x = torch.randn(B, L, E, dtype=f64)
    _check_all(_embedded(model), x, tol=FLOAT32_INSIDE)
    _refused(_embedded(model), x)


class ScoreNet(torch.nn.Module):
    """A diffusion-LM score net over continuous embeddings (Diffusion-LM, CDCD style): a
    sinusoidal time embedding added to every position, a BERT encoder on ``inputs_embeds``
    with each sample's padding mask, a linear readout back to the embedding space."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _bert("sdpa")
        self.time = torch.nn.Linear(E, E, dtype=f64)
        self.out = torch.nn.Linear(E, E, dtype=f64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(E // 2, dtype=f64) * 0.5)
        angles = t[:, None] * freqs
        emb = self.time(torch.cat([angles.sin(), angles.cos()], -1))
        h = self.encoder(inputs_embeds=x + emb[:, None], attention_mask=mask).last_hidden_state
        return self.out(h)


def _score_problem():
    torch.manual_seed(5)
    net = ScoreNet().eval()
    x, t = torch.randn(B, L, E, dtype=f64), torch.rand(B, dtype=f64)
    return net, x, t, _mask()


@pytest.mark.parametrize("method", sampled_daily(EXACT, {"reverse", "forward", "structured"}))
def test_score_net_parameter_gradients(method: str):
    """``sum(w * div)`` and ``sum(W * diag)``: the parameter gradients of the reference's."""
    net, x, t, mask = _score_problem()
    f = lambda z: net(z, t, mask)  # noqa: E731
    blocks = reference_jacobian(f, x).reshape(B, L * E, L * E).diagonal(dim1=1, dim2=2)
    w, W = torch.randn(B, dtype=f64), torch.randn(B, L, E, dtype=f64)
    div = torchdiv.divergence(f, x, method=method)
    assert_same_parameter_gradients(net, (w * div).sum(), (w * blocks.sum(1)).sum())
    diag = torchdiv.jacobian_diagonal(f, x, method=method)
    assert_same_parameter_gradients(net, (W * diag).sum(), (W.flatten(1) * blocks).sum())


def test_score_net_frozen_and_hutchinson():
    """Frozen parameters (``requires_grad_(False)``): the values, nothing to differentiate.
    Hutchinson with given probes: ``mean_k v_k^T J v_k``, whose gradients too."""
    net, x, t, mask = _score_problem()
    f = lambda z: net(z, t, mask)  # noqa: E731
    full = reference_jacobian(f, x).reshape(B, L * E, L * E)
    probes = torchdiv.draw_probes(x, 3, generator=torch.Generator().manual_seed(0))
    v = probes.flatten(2)
    want = torch.einsum("rbi,bij,rbj->rb", v, full, v).mean(0)
    got = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.sum(), want.sum())
    net.requires_grad_(False)
    got = torchdiv.divergence(f, x)
    assert_close(got, full.diagonal(dim1=1, dim2=2).sum(1).detach())
    assert not got.requires_grad


@pytest.mark.slow
def test_nothing_of_the_caller_changes():
    """``training``, the config (``use_cache``, the attention implementation, every field)
    and the prefix cache a closure copies per evaluation stay as they were; a second call
    with another prefix and another padding is served its own values."""
    torch.manual_seed(6)
    model = _gpt2("sdpa")
    config = model.config.to_dict()
    with torch.no_grad():
        prefixes = [
            model(inputs_embeds=torch.randn(B, 2, E, dtype=f64), use_cache=True).cache
            for _ in range(2)
        ]
    x = torch.randn(B, L, E, dtype=f64)
    for method in EXACT:
        for cache in prefixes:
            mask = _mask()[torch.randperm(B)]
            mask = torch.cat([torch.ones(B, 2, dtype=torch.long), mask], 1)

            def f(z, cache=cache, mask=mask):
                copied = copy.deepcopy(cache)
                return model(inputs_embeds=z, attention_mask=mask, cache=copied)[0]

            full = reference_jacobian(f, x).reshape(B, L * E, L * E)
            assert_close(torchdiv.divergence(f, x, method=method), full.diagonal(0, 1, 2).sum(1))
            assert cache.get_seq_length() == 2
    assert not model.training
    assert model.config.to_dict() == config
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_live_cache_grows_once_per_call():
    """A ``DynamicCache`` passed to every evaluation as it is (``update`` rebinds its
    ``keys`` to a longer tensor: no module's attribute, no in-place write) is grown by each
    evaluation. SDPA's model had, from the second call of a structure on, its recording
    checked by one evaluation, which failed (a lean check: fused attention), and recorded
    again by a second from the grown cache: the divergence of an 8-key attention where the
    call's ``f`` had 5 keys, the cache grown twice. Now a recording with attention is checked
    under capture's modes, and a check that misses records from its own evaluation."""
    torch.manual_seed(7)
    model = _gpt2("sdpa")
    x = torch.randn(B, L, E, dtype=f64)
    with torch.no_grad():
        prefix = model(inputs_embeds=torch.randn(B, 2, E, dtype=f64)).cache

    def fresh(z):
        return model(inputs_embeds=z, cache=copy.deepcopy(prefix))[0]

    want = reference_jacobian(fresh, x).reshape(B, L * E, L * E).diagonal(0, 1, 2).sum(1)
    for _ in range(2):
        cache = copy.deepcopy(prefix)
        got = torchdiv.divergence(lambda z: model(inputs_embeds=z, cache=cache)[0], x)  # noqa: B023
        assert cache.get_seq_length() == 2 + L
        assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["auto", "structured"])
def test_a_live_cache_kept_across_calls_grows_once_per_call(method):
    """One ``DynamicCache`` passed as it is to every call (generation's loop): each call
    evaluates ``f`` once, grows the cache by ``L`` keys once, and gives the divergence and
    parameter gradients of the cache it found (a check that misses, the cache longer than
    the kept recording's, records from its own evaluation; before livecache22 the cache grew
    twice from the second call on, the divergence 0.1-0.3 off)."""
    torch.manual_seed(7)
    model = _gpt2("sdpa")
    x = torch.randn(B, L, E, dtype=f64)
    with torch.no_grad():
        cache = model(inputs_embeds=torch.randn(B, 2, E, dtype=f64)).cache
    empty = copy.deepcopy(cache)  # (a cache grown with grad is no graph leaf: not copied)
    evaluations = []

    def f(z):
        evaluations.append(1)
        return model(inputs_embeds=z, cache=cache)[0]

    for call in range(3):
        found = [(layer.keys, layer.values) for layer in cache.layers]  # (graphs kept)

        def fresh(z, found=found):
            copied = copy.deepcopy(empty)
            for layer, (keys, values) in zip(copied.layers, found, strict=True):
                layer.keys, layer.values = keys, values
            return model(inputs_embeds=z, cache=copied)[0]

        evaluations.clear()
        got = torchdiv.divergence(f, x, method=method)
        assert (len(evaluations), cache.get_seq_length()) == (1, 2 + L * (call + 1))
        want = reference_jacobian(fresh, x).reshape(B, L * E, L * E).diagonal(0, 1, 2).sum(1)
        assert_close(got, want)
        w = torch.randn(B, dtype=f64)
        assert_same_parameter_gradients(model, (w * got).sum(), (w * want).sum())


@pytest.mark.slow
def test_train_mode_dropout_is_one_evaluation():
    """BERT in train mode (dropout 0.1 on attention and hidden states): the divergence of the
    function one evaluation drew, as plain autograd rows of one ``f(x)`` give it, and the
    generator left where that evaluation left it. (``jacrev`` draws other masks under its
    transform: not a reference here.)"""
    torch.manual_seed(8)
    model = _bert("eager").train()
    x = torch.randn(B, L, E, dtype=f64)
    f = _embedded(model, _mask())
    torch.manual_seed(11)
    leaf = x.clone().requires_grad_(True)
    y = f(leaf).reshape(B, -1)
    state = torch.get_rng_state()
    rows = (torch.autograd.grad(y[:, i].sum(), leaf, retain_graph=True)[0] for i in range(L * E))
    want = sum(row.reshape(B, -1)[:, i] for i, row in enumerate(rows))
    for method in ("auto", "structured"):
        torch.manual_seed(11)
        assert_close(torchdiv.divergence(f, x, method=method), want)
        assert torch.equal(torch.get_rng_state(), state)
    assert model.training


FORECASTERS = ("TimeSeriesTransformer", "Informer")


@pytest.mark.parametrize("name", sampled_daily(FORECASTERS, set(FORECASTERS)))
def test_forecasters_std_scaling_is_per_sample(name: str):
    """``TimeSeriesTransformerModel`` and ``InformerModel`` (lags, time features, a
    ``StdScaler`` over each sample's observed past): the decoder's states as ``f`` of the past
    values (its first ``past`` entries, for a square Jacobian), not refused."""
    torch.manual_seed(9)
    config = getattr(transformers, name + "Config")(
        prediction_length=3,
        context_length=5,
        lags_sequence=[1, 2],
        num_time_features=1,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        scaling="std",
    )
    model = getattr(transformers, name + "Model")(config).to(f64).eval()
    past = 5 + 2  # context and the largest lag
    times = torch.arange(past + 3, dtype=f64).expand(B, -1)[..., None] / 10
    future = torch.randn(B, 3, dtype=f64)
    level = torch.tensor([0.0, 2.0, -1.0], dtype=f64)[:, None]
    x = level + torch.tensor([1.0, 4.0, 0.3], dtype=f64)[:, None] * torch.randn(B, past, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        out = model(
            past_values=z,
            past_time_features=times[:, :past],
            past_observed_mask=torch.ones_like(z),
            future_values=future,
            future_time_features=times[:, past:],
        )
        return out.last_hidden_state.reshape(B, -1)[:, :past]

    _check_all(f, x)
