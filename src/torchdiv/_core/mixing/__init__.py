"""Sample mixing seen in what ``f`` computes: which dimensions of each tensor index samples.

Every operator probes the batched ``f`` with vectors broadcast across the batch (NOTE
[Batching over basis vectors] in ``torchdiv._core.basis``), which is right only if sample ``b`` of
``f(x)`` depends on sample ``b`` of ``x`` alone. ``BatchAxes`` follows the batch dimensions of
``x`` through the ATen calls ``f`` makes, inside dispatch modes that watch ``f`` anyway (the
structured recorder, ``_plan.OpSizes``), and raises ``BatchInteractionError`` when the result
of ``f`` depends on an op that positively combined one across samples (a sum that only seeds
a backward pass inside ``f``, as in ``grad(energy(x).sum(), x)``, does not count):

* a matrix product contracting it (``Linear`` applied to an unbatched ``x``, whose samples
  are then the features; ``batch_dims`` set too high);
* a reduction over it (``sum``, ``mean``, ``softmax``, ``var``, ... over dimension 0);
* a normalisation over it (train-mode batch norm; layer or group norm over batch dimensions);
* a convolution across it (a batch dimension among the channels or spatial dimensions).

A single sample picked out of the batch (``x[0]``, ``x[:1]``, ``for xi in x``) is followed
too: combined with the whole batch (``x - x[0]``, ``x * x[-1:]``) it mixes samples (sample
``b`` of the result depends on the picked one); stacked back in order with the other samples
(``torch.stack([g(xi) for xi in x])``, ``torch.cat`` of ``x[i:i + 1]`` pieces) it is a batch
again.

Samples an indexing op moves along the batch are followed as rows (``Axis.rows``: the sample
at each index): ``x[mask]`` (a mask computed from ``x``), ``x[perm]``, ``x[idx.nonzero()]``,
``index_select``, ``gather``/``take_along_dim``, ``masked_select``, ``flip``, ``roll``. Rows
that reach ``f``'s output out of place (``net(x[perm])``), are combined elementwise with other
rows (``x[perm] * x``) or reduced (``x[mask].sum(0)``) mix samples; values written back by
``index_put`` (``y[m] = g(x[m])``), ``index_copy``, ``index_add`` or ``scatter`` must land in
places of their own samples (into ``x``'s batch shape: ``torch.zeros_like(x)`` too), so a
selection written back in place, or a permutation undone, is per sample. Samples added into a
fresh tensor whose first dimension has ``k`` places per sample are checked as a flattened batch
(``x.reshape(B * k, ...)``'s layout: a message-passing net's ``(B * N, F)`` nodes, a mixture of
experts' ``(B * T, D)`` tokens): if every value lands in its own sample's places the result is
followed as one.

A slice of part of the batch (``x[1:]``, ``x[::2]``, ``split``, ``narrow``) holds its samples
in order, as rows (``x[1:] - x[:-1]`` combines two samples in each place); pieces joined back
along the batch (``cat([g(x[:1]), h(x[1:])])``, also with constants: ``cat([x, zeros(k, D)])``,
``F.pad`` along the batch) hold theirs one after the other, the batch again if in order. Two
different samples picked out and combined (``x[0] * x[1]``, a recurrence run over the samples:
``nn.GRU`` with ``batch_first=False`` fed ``(B, T, D)``) mix them; so do samples along the time
steps or features of a fused RNN kernel (cuDNN's, on a GPU).

Values written in place through a view of another tensor (``buf[:, :D] = g(x)``,
``buf.narrow(...).copy_(...)``; ``select_scatter``, ``slice_scatter`` out of place) are followed
into that tensor (``_overwrite``): along each of its dimensions, the samples written replace
those there, so a fresh buffer holds the batch where they were written, and samples written into
other samples' places (``y[1:] = g(x)[:-1]``) are moved rows. A reshape that splits the batch
digit across dimensions (``x.reshape(D, B)``) leaves the samples spread (``BatchAxes.spread``):
elementwise ops keep them apart and a reshape back follows them again; any other op reading them
mixes samples (a batch split in order, ``x.reshape(F, P, D)`` read by ``einsum``, too: the
message then names ``batch_dims=2`` with ``x`` in that shape, which is followed). A custom
``autograd.Function``'s ``forward`` runs without grad, like a ``no_grad`` block, but with
forward AD off too: it is followed, its results differentiable if ``apply`` makes them so
(``BatchAxes._settle``).

Each batch dimension of a tensor is recorded as ``(position, size)`` and the batch dimension of
``x`` it came from (with ``batch_dims=2`` and a square batch, ``x.transpose(0, 1)`` at the
output mixes samples): the samples are the outermost factor of that dimension (reshapes may
merge it with the dimensions after it, as ``matmul`` does with ``(B, T, D) -> (B*T, D)``).
Elementwise ops, broadcasts, reshapes that keep the batch factor, transposes, slices and
concatenations carry it, in complex tensors too (FFTs along event dimensions, ``view_as_real``;
``_spectral`` refuses an FFT over a batch dimension), and ``as_strided`` where its strides keep
each sample's elements along one dimension (``torch.stft``'s frames of each sample; frames along
the batch mix, ``_strided``). An op no table knows is judged from its
schema (``_unknown``): it combines samples if its ``dim`` argument names a batch dimension
(``sort``, ``topk``, ``median``/``mode``/``cummax`` along it, ``nansum``, ``unfold``), it pools
or resamples along one among its spatial dimensions (``grid_sample`` there at any grid), it
is a ``linalg`` function of matrices whose rows or columns are samples (``det``, ``svd``,
``matrix_exp``), its keys are samples (attention), or it reads different samples in one place
(``linalg_cross(x, x.flip(0))``); a result with no dimension that could hold the samples
(a scalar ``dist``, ``median()``, a mean loss) depends on all of them; a result shaped as a
tracked argument holds its samples in place, and one of an op that rearranges only some
dimensions (a pad, a pool, ``interpolate``, ``im2col``/``col2im``, ``pixel_shuffle``,
``diag_embed``, ``diagonal``, ``glu``) holds them along the others. Anything else
ends the tracking of its result, silently: the analysis does not raise on what it does not
understand (an op that combines samples without any of those signs, ...), so it misses some
mixing (``check_batch_independence`` tests any ``f``) but does not flag an independent ``f``
built from ops that keep samples apart; an indexing op whose indices have two or more dimensions
along the batch (not one broadcast along the others, as ``x[arange(B)[:, None], idx]``) is one
exception, refused if its result reaches the output; moved samples that a reshape spreads across
places (``x.reshape(-1)[perm].reshape(B, D)``), samples spread by a reshape read by an op other
than an elementwise one or a reshape, a roll of the flattened tensor by part of a sample, samples
added (or moved samples written) into a tensor neither of ``x``'s batch shape nor a flattened
batch in their own places (per-cluster sums ``zeros(K, D).index_add(0, cid, x)``), and values
written through views that put two samples in one place are the others.

The recorders (``torchdiv._taylor.capture``) record an op without a propagation rule as the
ops it decomposes into, but watch it as itself, as the other engines' watches see it: its
parts may combine samples with zero weights (an interpolation onto its own size).

``allow_batch_interaction()`` turns the detection off for code that means to mix samples.

The package, each module one concept, listed from the bottom up: a module imports (at run
time) only from those listed before it (no cycles; the rules name ``BatchAxes`` in annotations
only, under ``TYPE_CHECKING``):

* ``errors``: ``BatchInteractionError``, its message (``explain``), ``allow_batch_interaction``;
* ``transformed``: the numerical check under a caller's ``torch.func`` transform, where the
  dispatch modes see physical tensors only (``check_transformed``, ``public_call``);
* ``axes``: ``Axis``, ``Pick`` and the other records, the rule types ``Carry`` and ``Mixing``;
* ``reads``: which values decide what ``f`` does (``decides``, ``Reads``, ``VALUE_FREE``) and
  what a watch that passed says of later calls (``Verdict``);
* ``places``: where a tracked tensor holds its samples, the helpers the rules share;
* ``writes``: the rules carrying batch dimensions through writes into views and storage;
* ``carry``: through elementwise ops, views, permutes, slices, joins, products, reductions;
* ``indexing``: through indexing ops and puts (``index_put``, ``index_add``, ``scatter``);
* ``combining``: the rules deciding whether an op combines samples;
* ``unknown``: the rule for an op no table knows, read from its schema;
* ``tables``: the per-op tables ``_CARRY`` and ``_MIXING`` built from the rules;
* ``tracker``: ``BatchAxes``, the state of one watch, called around every ATen call;
* ``watch``: the entry points (``Watching``, ``watched``, ``watch_once``, ``tracker``,
  ``check_graph``).

Import each name from the module that defines it; this ``__init__`` re-exports nothing.
"""
