"""Orchestration, not math: typed configuration (``config``), the results layout (``layout``),
the stage graph (``dag``), the command line (``cli``), file helpers (``files``) and
checkpoints (``checkpoints``). No module here imports torch at import time.
"""
