"""hotpatch's benchmark suite: ``python -m benchmarks [--quick] [--only NAME]``.

Not timed tests: each series measures side by side with its peers in one run
and writes ``benchmarks/results/`` and ``benchmarks/README.md``.  See
``benchmarks/__main__.py`` for the series and how to add one.
"""
