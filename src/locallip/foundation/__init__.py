"""The foundation everything else stands on, torch-free: the configuration's schema (``schema``,
``choices``, ``catalog``), its composition and ranges (``compose``, ``ranges``), the results layout
(``layout``), files written atomically (``files``), checkpoints without pickled code
(``checkpoints``) and the code a stage's results depend on (``provenance``).
"""
