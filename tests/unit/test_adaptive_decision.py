"""The training step's adaptive decision (``masked_norms=adaptive``): which samples get the masked solver.

It compares ||D W D' v|| with the global estimate ||W v|| at the shared warm-start vector v. Where a
sample's column mask D' keeps every column, W D' v = W v for every such sample, so W is applied once
for all of them; the decisions must be those of the per-sample products.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from locallip.bounds.layers import affine_layer
from locallip.bounds.layers.base import batch_norm2
from locallip.bounds.norm_solvers import _adaptive_choice
from locallip.bounds.settings import NormSettings

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def _case(batch=6, seed=0):
    """A conv layer, a warm start shared by the batch, column masks full for samples 0, 2, 3 only, row masks."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    op = affine_layer(nn.Conv2d(3, 4, 3, padding=1).double(), (3, 6, 6))
    v = torch.randn(1, 3, 6, 6, generator=gen, dtype=DT)
    v0 = v.expand(batch, 3, 6, 6)  # as _start_vectors gives it: one vector, a stride-0 batch
    col = (torch.rand(batch, 3, 6, 6, generator=gen, dtype=DT) > 0.3).to(DT)
    col[[0, 2, 3]] = 1.0
    row = (torch.rand(batch, 4, 6, 6, generator=gen, dtype=DT) > 0.2).to(DT)
    row[0] = 1.0  # sample 0 keeps everything: its masked norm is the global estimate
    return op, v0, col, row


def _reference(op, v0, col, row):
    return batch_norm2(op.linear(v0 * col) * row)


def _counting(op):
    """Record the batch size of every W v the layer is asked for."""
    rows, linear = [], op.linear

    def counted(v):
        rows.append(v.shape[0])
        return linear(v)

    op.linear = counted
    return rows


@pytest.mark.parametrize("tol", [0.01, 0.2, 0.5])
def test_adaptive_decision_equals_the_per_sample_products(tol):
    op, v0, col, row = _case()
    sigma_global = batch_norm2(op.linear(v0[:1]))[0]
    kept = _reference(op, v0, col, row)
    settings = NormSettings(level="estimate", method="krylov", steps=2, init="global", masked_norms="adaptive", adaptive_tol=tol)
    need, sigma = _adaptive_choice(settings, op, col, row, v0, sigma_global, sigma_global.expand(6))
    assert torch.equal(need, kept < (1 - tol) * sigma_global)
    assert torch.equal(sigma, sigma_global.expand(6))  # the others take the global estimate
    assert not need[0]  # nothing masked: no solver
    if tol == 0.2:  # the case decides both ways among the samples that share W v (0, 2, 3)
        assert need[[0, 2, 3]].tolist() == [False, False, True]


def test_adaptive_decision_applies_the_layer_only_where_columns_are_dropped():
    """Samples 0, 2, 3 keep every column: W is applied to the shared vector once and to the 3 others."""
    op, v0, col, row = _case()
    sigma_global = batch_norm2(op.linear(v0[:1]))[0]
    rows = _counting(op)
    settings = NormSettings(level="estimate", method="krylov", steps=2, init="global", masked_norms="adaptive", adaptive_tol=0.01)
    _adaptive_choice(settings, op, col, row, v0, sigma_global, sigma_global.expand(6))
    assert sum(rows) == 1 + 3


def test_adaptive_decision_with_a_start_per_sample_or_from_below_uses_every_product():
    """Distinct start vectors share nothing, and the certification's estimate from below takes kept / ||D' v||
    as its value: both keep the per-sample products."""
    op, v0, col, row = _case()
    sigma_global = batch_norm2(op.linear(v0[:1]))[0]
    own = v0.clone() + torch.linspace(0, 1, 6, dtype=DT).view(6, 1, 1, 1)
    rows = _counting(op)
    settings = NormSettings(level="estimate", method="krylov", steps=2, init="global", masked_norms="adaptive", adaptive_tol=0.01)
    need, _ = _adaptive_choice(settings, op, col, row, own, sigma_global, sigma_global.expand(6))
    assert rows == [6]
    assert torch.equal(need, _reference(op, own, col, row) < 0.99 * sigma_global)
    rows.clear()
    below = NormSettings(level="estimate", method="krylov", steps=2, init="global", masked_norms="adaptive", adaptive_tol=0.01,
                         adaptive_from_below=True)
    _, sigma = _adaptive_choice(below, op, col, row, v0, sigma_global, sigma_global.expand(6))
    assert rows == [6]
    assert torch.equal(sigma, _reference(op, v0, col, row) / batch_norm2(v0 * col))
