"""Demo and test helpers, outside the installed ``ttfs`` package.

The counting origin (``demo.origin``: a scriptable, fault-injecting HTTP origin), the model
generator (``demo.model``) and ``make run``'s driver (``demo.run``). They serve the demo, the test
suite and the benchmarks from a source checkout; an installed ttfs neither ships nor needs them
(``pyproject.toml`` installs ``ttfs*`` and ``truss_transfer*`` only).
"""
