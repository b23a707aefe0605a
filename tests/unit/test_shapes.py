"""Layer output shapes by formula (nn/shapes.py) agree with running the layer on the meta device."""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from torch import nn

from locallip.nn.blocks import ResidualConv2d
from locallip.nn.activations import ClippedMaxMin, ClippedReLU, MaxMin, ReLU
from locallip.nn.models import Normalize
from locallip.nn.shapes import output_shape


def _meta(m: nn.Module, shape):
    """The shape torch gives, or the exception type it raises."""
    with torch.device("meta"):
        m = m.to("meta")
        try:
            return tuple(m(torch.zeros(1, *shape)).shape[1:])
        except (RuntimeError, ValueError):
            return "refused"


def _formula(m: nn.Module, shape):
    try:
        return output_shape(m, shape)
    except ValueError:
        return "refused"


def _cases():
    for k, s, p, size, c in itertools.product((1, 3, 4), (1, 2), (0, 1), (2, 5, 8), (1, 2)):
        yield nn.Conv2d(2, 3, k, stride=s, padding=p), (c, size, size + 1)
    for shape in ((6,), (5,), (2, 3, 6), (2, 3, 5)):
        yield nn.Linear(6, 4), shape
        yield nn.Flatten(), shape
        yield ReLU(), shape
        yield MaxMin(), shape
    for theta, shape in (((4,), (4,)), ((4,), (3,)), ((2, 3, 3), (2, 3, 3)), ((2, 1, 1), (2, 3, 3)),
                         ((2, 3, 3), (2, 4, 4)), ((4,), (2, 3, 4))):
        yield ClippedReLU(theta), shape
        if theta[0] % 2 == 0:
            yield ClippedMaxMin(theta), shape
    yield Normalize([0.5, 0.2], [0.3, 0.1]), (2, 3, 3)
    for shape in ((2, 5, 5), (3, 5, 5), (2,), (2, 1, 1)):
        yield ResidualConv2d(2, 3), shape
        yield ResidualConv2d(2, 1), shape
    for shape in ((2, 5, 5), (3, 5, 5), (2,), (2, 4)):
        yield nn.BatchNorm2d(2).eval(), shape
        yield nn.BatchNorm1d(2).eval(), shape
    for k, s, p, size in itertools.product((1, 2, 3), (None, 1, 2), (0, 1), (1, 4, 7)):
        yield nn.AvgPool2d(k, stride=s, padding=p), (2, size, size + 1)


@pytest.mark.parametrize("case", range(len(list(_cases()))))
def test_formula_shape_is_the_shape_torch_gives(case):
    m, shape = list(_cases())[case]
    assert _formula(m, shape) == _meta(m, shape), (m, shape)


def test_unknown_modules_are_left_to_the_meta_run():
    assert output_shape(nn.Tanh(), (3,)) is None
    assert output_shape(nn.Flatten(start_dim=2), (2, 3, 4)) is None


def test_checking_an_architecture_does_not_import_the_compiler():
    """The check that made certify-model spend ~2 s importing torch._dynamo for a tiny MLP."""
    code = ("import sys\nfrom locallip.nn.describe import outline\n"
            "outline({'input_shape': [1, 28, 28], 'layers': [{'type': 'normalize', 'mean': [0.1], 'std': [0.3]},"
            "{'type': 'conv2d', 'in_channels': 1, 'out_channels': 4, 'kernel_size': 3, 'stride': 2},"
            "{'type': 'clipped_maxmin', 'shape': [4, 13, 13]}, {'type': 'flatten'},"
            "{'type': 'linear', 'in_features': 676, 'out_features': 128}, {'type': 'relu'},"
            "{'type': 'linear', 'in_features': 128, 'out_features': 10}]})\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
