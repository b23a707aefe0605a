"""One epoch of the smoke experiments' training losses, pinned (``tests/fixtures/training_losses.json``,
made by ``tests/fixtures/make_training_fixture.py`` with the code before the layer protocol): a change
to the bounds' structure must not change what training optimises."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_training_fixture as training  # noqa: E402


@pytest.mark.parametrize("experiment", training.EXPERIMENTS)
def test_one_epoch_of_training_losses_is_unchanged(experiment):
    expected = json.loads(training.HERE.read_text())[experiment]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture was made: summation order depends on the thread count
    try:
        got = training.epoch_losses(experiment)
    finally:
        torch.set_num_threads(threads)
    assert len(got) == len(expected) > 5
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
