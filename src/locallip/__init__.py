"""locallip: certifiably robust (l2) training with local Lipschitz bounds, GloRo as baseline."""

__version__ = "0.1.0"
