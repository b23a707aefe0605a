"""Orchestration, the top floor: the stage table (``table``), the graph of jobs and commands built
on it (``dag``), the command line (``cli``) and the DVC generator (``dvc``). No module here imports
torch at import time; the stages are imported only to run one.
"""
