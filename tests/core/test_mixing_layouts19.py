"""Two layouts of a fresh flattened buffer the watch refused though no sample met another
(leftovers19; found by rev-merges18a):

* with ``batch_dims=2``, a sequence-first router put-back: tokens ``x.permute(2, 0, 1, 3)
  .reshape(T * B1 * B2, F)`` routed by ``topk`` and written back, ``out[rows] = h[rows]``.
  The moved rows' own layout (``inner`` 1 for each batch dimension, their ``rows`` stripped)
  was guessed; the layout before the move holds batch dimension 0 in runs of ``B2``;
* sample-major values written into the second half of a ``2 * B * T``-row buffer and read
  ``out.reshape(2, B, T, F)[1]``: the samples-outermost guess took ``2 * T`` rows a sample;
  runs of ``T`` rows (a divisor of ``2 * T``) repeating every ``B * T`` rows fit.

Values against the diagonal blocks of the whole batch's float64 Jacobian (``jacrev``); the
put-backs that move a value into another sample's places stay refused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, reference_divergence

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
B, B1, B2, T, F = 3, 2, 2, 4, 2


def _nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(F, F).to(f64), torch.nn.Linear(F, 1).to(f64)


def _routed(kept: int, shift: int, put: str):
    """A Megatron-style expert over sequence-first tokens of two batch dimensions: the
    ``kept`` tokens a gate scores highest, put back ``shift`` rows on."""
    expert, gate = _nets()

    def f(x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(2, 0, 1, 3).reshape(T * B1 * B2, F)
        rows = gate(tokens)[:, 0].topk(kept).indices
        out = torch.zeros_like(tokens)
        at = (rows + shift) % len(tokens)
        values = torch.tanh(expert(tokens[rows]))
        out = out.index_add(0, at, values) if put == "index_add" else out.index_put((at,), values)
        return x + out.reshape(T, B1, B2, F).permute(1, 2, 0, 3)

    return f


def _second_half(shift: int, put: str):
    """Sample-major tokens (``x.reshape(B * T, F)``), five routed, written ``B * T + shift``
    rows on (cyclically) into a ``2 * B * T``-row buffer, read as its second half."""
    expert, gate = _nets()

    def f(x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(B * T, F)
        rows = gate(tokens)[:, 0].topk(5).indices
        out = torch.zeros(2 * B * T, F, dtype=x.dtype)
        at = (rows + B * T + shift) % len(out)
        values = torch.tanh(expert(tokens[rows]))
        out = out.index_add(0, at, values) if put == "index_add" else out.index_put((at,), values)
        return x + out.reshape(2, B, T, F)[1]

    return f


@pytest.mark.parametrize("put", ["index_put", "index_add"])
@pytest.mark.parametrize("kept, shift", [(16, 0), (12, 0), (5, 0), (5, B1 * B2)])
def test_a_sequence_first_put_back_with_two_batch_dimensions_is_followed(
    kept: int, shift: int, put: str
) -> None:
    """Every token, those an expert's capacity kept, or each put at its sample's next token
    (``B1 * B2`` rows on): no sample meets another, the divergence is each sample's."""
    f = _routed(kept, shift, put)
    x = torch.randn(B1, B2, T, F, dtype=f64)
    assert_close(torchdiv.divergence(f, x, batch_dims=2), reference_divergence(f, x, 2))


@pytest.mark.parametrize("put", ["index_put", "index_add"])
def test_sample_major_values_in_the_second_half_of_a_buffer_are_followed(put: str) -> None:
    f = _second_half(0, put)
    x = torch.randn(B, T, F, dtype=f64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))


@pytest.mark.parametrize("put", ["index_put", "index_add"])
@pytest.mark.parametrize("case", ["two batch dimensions, one row on", "second half, one row on"])
def test_a_put_back_into_other_samples_places_is_still_refused(case: str, put: str) -> None:
    """One row on, each value lands in another sample's places (its Jacobian has blocks
    across samples): refused under every layout guessed."""
    if case.startswith("two"):
        f, x, batch_dims = _routed(5, 1, put), torch.randn(B1, B2, T, F, dtype=f64), 2
    else:
        f, x, batch_dims = _second_half(1, put), torch.randn(B, T, F, dtype=f64), 1
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        torchdiv.divergence(f, x, batch_dims=batch_dims)
