"""Datasets: ``catalog`` (names, shapes; no torch), ``sources`` (loaders and cutting into
splits, used by the download stage) and ``splits`` (the splits file every stage reads).

Nothing is imported here, so that a stage depends only on the modules it uses.
"""
