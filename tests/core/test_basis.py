"""One-hot basis vectors broadcast across the batch, and chunking."""

from __future__ import annotations

import pytest
import torch
from torch._C._functorch import maybe_current_level
from torch.func import vmap

import torchdiv._core.basis as basis_module
from torchdiv._core.basis import WHOLE, Share, as_blocks, basis, batched, chunks


def test_chunks_cover_the_range_once():
    assert list(chunks(7, 3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(chunks(3, 10)) == [(0, 3)]
    assert list(chunks(0, 4)) == []
    assert list(chunks(7, 3, first=2)) == [(2, 5), (5, 7)]


def test_shares_cover_every_direction_once_in_their_chunks():
    for n in (0, 1, 5, 16):
        for count in (1, 2, 3, 8):
            pieces = [p for i in range(count) for p in Share(i, count).chunks(n, 2)]
            covered = [j for start, stop in pieces for j in range(start, stop)]
            assert covered == list(range(n))
            assert all(stop - start <= 2 for start, stop in pieces)
    assert Share(1, 2).of(5) == (2, 5)
    assert WHOLE.of(7) == (0, 7)


def test_basis_is_one_hot_in_every_sample():
    like = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    v = basis(1, 4, like, batch_dims=2)
    assert v.shape == (3, 2, 3, 2, 2) and v.dtype == torch.float64 and v.is_contiguous()
    flat = v.reshape(3, 6, 4)
    expected = torch.eye(4, dtype=torch.float64)[1:4].unsqueeze(1).expand(3, 6, 4)
    assert torch.equal(flat, expected)


def test_basis_unbatched_and_as_blocks():
    like = torch.randn(5)
    v = basis(0, 5, like, batch_dims=0)
    assert torch.equal(v, torch.eye(5))
    assert as_blocks(torch.randn(3, 4, 2, 5), batch_dims=1).shape == (3, 4, 10)
    assert as_blocks(torch.randn(3, 0, 2), batch_dims=1).shape == (3, 0, 2)


def _one_hot(start: int, stop: int, like: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``basis`` written out element by element (the reference)."""
    samples = like.shape[:batch_dims].numel()
    n = like[(0,) * batch_dims].numel() if samples else like.shape[batch_dims:].numel()
    out = torch.zeros(stop - start, samples, n, dtype=like.dtype, device=like.device)
    for j in range(stop - start):
        for b in range(samples):
            out[j, b, start + j] = 1
    return out.reshape(stop - start, *like.shape)


def test_basis_is_a_new_tensor_at_every_call():
    """Small whole bases are copies of one kept per shape: writing into a block handed out (as
    a caller, a backward hook or a product aliasing its cotangent may) changes no later one."""
    like = torch.randn(5, 3)
    first = basis(0, 3, like, 1)
    first.fill_(7.0)
    second = basis(0, 3, like, 1)
    assert torch.equal(second, _one_hot(0, 3, like, 1))
    assert second.data_ptr() != first.data_ptr() and not second.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_basis_follows_everything_it_depends_on(dtype: torch.dtype):
    """One shape after another, the kept blocks never answer for another size, shape, batch
    dimensions, dtype or device (``like`` requiring grad or not: the same); chunks of a
    basis are made, not kept (all of them kept would hold the whole basis)."""
    calls = [
        (0, 3, torch.randn(4, 3), 1),
        (1, 3, torch.randn(4, 3), 1),
        (0, 2, torch.randn(4, 3), 1),
        (0, 3, torch.randn(4, 3, dtype=dtype), 1),
        (0, 4, torch.randn(3, 4, dtype=dtype), 1),
        (0, 1, torch.randn(4, 3, dtype=dtype), 2),
        (0, 12, torch.randn(4, 3, dtype=dtype), 0),
        (0, 3, torch.randn(2, 2, 3, dtype=dtype, requires_grad=True), 2),
        (0, 3, torch.randn(4, 3, dtype=dtype, device="meta"), 1),
        (0, 3, torch.randn(4, 3, dtype=dtype), 1),
    ]
    for start, stop, like, batch_dims in calls * 2:
        got = basis(start, stop, like, batch_dims)
        assert got.dtype == like.dtype and got.device == like.device and got.is_contiguous()
        assert got.shape == (stop - start, *like.shape) and not got.requires_grad
        if like.device.type != "meta":
            assert torch.equal(got, _one_hot(start, stop, like, batch_dims))


def test_blocks_are_kept_on_the_cpu_only():
    """Off the CPU a block made on one stream and copied on another could be read before it
    is filled (nothing orders the two): made at every call there ('meta' stands in for an
    accelerator here)."""
    kept = dict(basis_module._KEPT)
    basis_module._KEPT.clear()
    try:
        basis(0, 3, torch.empty(4, 3, device="meta"), 1)
        assert basis_module._KEPT == {}
        basis(0, 3, torch.empty(4, 3), 1)
        assert len(basis_module._KEPT) == 1
    finally:
        basis_module._KEPT.clear()
        basis_module._KEPT.update(kept)


def test_kept_bases_from_several_threads():
    """Threads asking for more shapes than are kept (each miss drops the oldest) all get
    their own right blocks, and none raises."""
    import threading

    likes = [torch.randn(3, d) for d in range(1, 13)]
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            for _ in range(20):
                for like in likes:
                    n = like.shape[1]
                    assert torch.equal(basis(0, n, like, 1), _one_hot(0, n, like, 1))
        except BaseException as error:  # (reported by the main thread)
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and not any(thread.is_alive() for thread in threads)


def test_basis_under_modes_and_transforms_is_made_there():
    """Under a fake-tensor mode and a transform the block is made there: a fake tensor of that
    mode (none kept for later eager calls), one-hot under ``vmap``."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    like = torch.randn(4, 3)
    basis(0, 3, like, 1)  # kept
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(like)
        assert isinstance(basis(0, 3, fake, 1), FakeTensor)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert isinstance(basis(0, 3, like, 1), FakeTensor)
    after = basis(0, 3, like, 1)
    assert type(after) is torch.Tensor and torch.equal(after, _one_hot(0, 3, like, 1))
    got = vmap(lambda z: basis(0, 3, z, 1), in_dims=0)(torch.randn(3, 4, 3))
    assert torch.equal(got, _one_hot(0, 3, like, 1).expand(3, 3, 4, 3))


def _pushed(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batched product and an output that does not depend on ``v`` (``out_dims`` None)."""
    a = torch.arange(6.0).reshape(2, 3)
    return torch.ones(2), torch.tanh(v @ a).cumsum(-1)


def test_batched_is_vmap():
    """functorch's own level calls give what ``vmap`` gives, leave no level open (after an
    error too), and raise its errors."""
    v = torch.randn(4, 5, 2)
    want = vmap(_pushed, out_dims=(None, 0))(v)
    for _ in range(2):
        got = batched(_pushed, v, out_dims=(None, 0))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        (summed,) = batched(lambda w: (w.sum(-1),), v)
        assert torch.equal(summed, v.sum(-1))
        assert maybe_current_level() is None
    with pytest.raises(ValueError, match="BatchedTensor"):
        batched(lambda w: (w,), v, out_dims=(None,))
    with pytest.raises(RuntimeError, match="boom"):
        batched(lambda w: (_ for _ in ()).throw(RuntimeError("boom")), v)
    assert maybe_current_level() is None
    with pytest.raises(RuntimeError, match="randomness"):  # vmap's default: "error"
        batched(lambda w: (torch.rand_like(w),), v)
    same = batched(lambda w: (w + torch.rand(()),), torch.zeros(3, 2), randomness="same")[0]
    assert torch.equal(same, same[:1].expand(3, 2))


def test_batched_under_the_callers_vmap_passes_outputs_batched_only_there():
    """Inside the caller's ``vmap`` (an ensemble), an output that does not depend on the
    vectors is still batched at the caller's level: ``out_dims=None`` takes it as it is
    (``vmap``'s own check refused it: forward mode under an outer ``vmap`` raised)."""
    v = torch.randn(4, 5, 2)
    scales = torch.tensor([1.0, -2.0, 3.0])

    def inner(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batched(lambda w: (s * 2, (w * s).sum(-1)), v, out_dims=(None, 0))

    const, products = vmap(inner)(scales)
    assert torch.equal(const, scales * 2)
    torch.testing.assert_close(products, scales[:, None, None] * v.sum(-1))
    with pytest.raises(ValueError, match="BatchedTensor"):  # batched here: still refused
        vmap(lambda s: batched(lambda w: (w * s,), v, out_dims=(None,)))(scales)
    assert maybe_current_level() is None
