"""The exact engines (forward, reverse, batched autograd, re-run) and their one dispatch."""
