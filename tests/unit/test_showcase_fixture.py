"""The showcase model's certificates and radii, pinned: a refactor that changes a certificate is a bug.

``tests/fixtures/showcase`` holds the calibrated ``mnist5k_r158`` model, its 500 test digits and what
certification computed on them (radii 0.5 / 1.0 / 1.58, the per-point certified radii, and the exact
and probabilistic levels on 64 points without the cascade), made by
``tests/fixtures/make_showcase_fixture.py`` with the code before the layer protocol. Everything is
compared bit for bit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_showcase_fixture as showcase  # noqa: E402


@pytest.fixture(scope="module")
def model_and_points():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture was made: the last bits depend on the summation order
    yield showcase.load_showcase()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "showcase" / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def _assert_same(got: dict, expected: dict, keys) -> None:
    for k in keys:
        assert got[k].dtype == expected[k].dtype, k
        assert np.array_equal(got[k], expected[k]), f"{k}: {int((got[k] != expected[k]).sum())} points differ"


def test_showcase_certificates_are_unchanged(model_and_points, expected):
    model, x, y = model_and_points
    with torch.no_grad():
        got = showcase.certify_all(model, x, y)
    _assert_same(got, expected, got)
    for r in showcase.RADII:  # the fixture exercises the cascade: something certified at every radius
        assert got[f"r{r}_certified"].sum() > 100


def test_showcase_single_levels_are_unchanged(model_and_points, expected):
    model, x, y = model_and_points
    with torch.no_grad():
        got = showcase.single_levels(model, x, y)
    _assert_same(got, expected, got)


@pytest.mark.slow
def test_showcase_radii_are_unchanged(model_and_points, expected):
    model, x, y = model_and_points
    with torch.no_grad():
        got = showcase.radii_all(model, x, y)
    _assert_same(got, expected, got)
