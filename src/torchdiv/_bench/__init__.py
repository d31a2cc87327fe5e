"""``python -m torchdiv bench``: time, memory and accuracy of every method against the recipes.

One concept per module: ``timing`` (torch.utils.benchmark, interleaved rounds), ``memory``
(peak allocator memory), ``operators`` (the registry: what is timed per operator), ``suite``
(the problems: built-in nets or the user's model), ``runner`` (check, measure, time),
``report`` (table, JSON, machine), ``plot`` (the PNG) and ``cli`` (the argparse subcommand).
Only ``cli`` and ``report``/``plot`` need the ``bench`` extra (rich, matplotlib).
"""
