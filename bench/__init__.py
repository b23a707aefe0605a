"""Benchmarks of locallip, run by hand (``python -m bench.<name>`` or ``python bench/run_all.py``).

Not tests: ``pytest`` collects ``tests/`` only (``testpaths``), and no module here is named ``test_*``.
"""
