"""The pipeline's stages: each reads its inputs, calls the library, writes its outputs.

download -> train -> calibrate -> certify (one job per radius) -> export -> report, and
calibrate -> radii -> report. Nothing is imported here, so that a stage depends only on the modules it uses.
"""
