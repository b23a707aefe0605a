"""The training losses (``locallip.losses``) on hand-computed tiny inputs, and their use in the training step.

* EMMA (LiResNet's ``emma_loss``): with shares t_j = 1/2 the logits it builds are all 0 (loss log 3),
  and the shares carry no gradient (d loss / d m_j = -t_j / 3); it reduces to CE(z, y) where the bound
  takes nothing and to CE of the worst-case logits where every t_j = 1.
* TRADES-KL as the GloRo reference's ``sparse_trades_kl`` (``trades_kl``): its value on a misclassified
  point by hand (⊥ at the prediction, Keras' clipping); it equals the project's ``gloro_trades`` where
  the label is the prediction and no probability is clipped.
* Both run in the training step with the global and the local bound (a small LiResNet).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locallip.bounds import bottom_logit
from locallip.foundation.compose import from_plain
from locallip.foundation.schema import TrainConfig
from locallip.losses import emma_loss, gloro_trades_loss, trades_kl_loss
from locallip.nn.models import build_model
from locallip.training import margin_anchor, robust_loss

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def test_emma_by_hand_half_shares_give_zero_logits_and_no_gradient_through_the_shares():
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=DT)
    y = torch.tensor([0])
    # clean margins d = [0, 1, 2]; the bound takes g = d - m = [0, 2, 4]; t = d / g = 1/2.
    margins = torch.tensor([[0.0, -1.0, -2.0]], dtype=DT, requires_grad=True)
    loss = emma_loss(logits, margins, y)
    assert math.isclose(float(loss.detach()), math.log(3), rel_tol=1e-12)  # logits -d + t g = [0, 0, 0]
    loss.backward()
    # d CE / d logit_j = 1/3 for j != y; d logit_j / d m_j = -t_j = -1/2 (t held constant).
    assert torch.allclose(margins.grad, torch.tensor([[0.0, -1 / 6, -1 / 6]], dtype=DT), atol=1e-12)


def test_emma_shares_are_clipped_to_between_a_hundredth_and_one():
    logits = torch.tensor([[0.0, 1.0, -3.0]], dtype=DT)  # class 1 beats the label: d_1 = -1 -> t = 0.01
    y = torch.tensor([0])
    margins = torch.tensor([[0.0, -2.0, 2.5]], dtype=DT)  # g = [0, 1, 0.5]; d_2 / g_2 = 6 -> t = 1
    expected = torch.tensor([[0.0, 1.0 + 0.01 * 1.0, -3.0 + 0.5]], dtype=DT)
    assert math.isclose(float(emma_loss(logits, margins, y)), float(F.cross_entropy(expected, y)), rel_tol=1e-12)


def test_emma_reduces_to_cross_entropy_and_to_the_worst_case_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, dtype=DT)
    y = logits.argmax(1)
    clean = logits.gather(1, y[:, None]) - logits  # the bound takes nothing: margins = clean margins
    assert torch.allclose(emma_loss(logits, clean, y), F.cross_entropy(logits, y), rtol=1e-12)
    small = clean * 0.6  # every t_j = d_j / (0.4 d_j) > 1 -> 1: CE of the worst-case logits z_y - m
    worst = logits.gather(1, y[:, None]) - small
    assert torch.allclose(emma_loss(logits, small, y), F.cross_entropy(worst, y), rtol=1e-12)


def _kl(p, q):
    p = [min(max(a, 1e-7), 1.0) for a in p]
    q = [min(max(a, 1e-7), 1.0) for a in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_trades_kl_by_hand_takes_the_bottom_logit_at_the_prediction():
    logits = torch.tensor([[1.0, 0.0]], dtype=DT)  # predicts 0, label 1
    y = torch.tensor([1])
    margins_pred = torch.tensor([[0.0, 1.0]], dtype=DT)  # z_0 - z_1 >= 1 on the ball -> z_bot = 1 - 1 = 0
    e = math.e
    ce = math.log(1 + e)  # CE([1, 0], 1)
    p = [e / (e + 1), 1 / (e + 1), 0.0]
    q = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    lam = 1.5
    assert math.isclose(float(trades_kl_loss(logits, margins_pred, y, lam)), ce + lam * _kl(p, q), rel_tol=1e-12)


def test_trades_kl_matches_gloro_trades_where_the_label_is_the_prediction_and_nothing_is_clipped():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 4, generator=g, dtype=DT)
    y = logits.argmax(1)
    margins = (logits.gather(1, y[:, None]) - logits) - 0.3 * torch.rand(16, 4, generator=g, dtype=DT)
    margins = margins.scatter(1, y[:, None], 0.0)
    q_bot = F.softmax(bottom_logit(logits, margins, y), dim=1)[:, -1]
    assert (q_bot > 1e-4).all()  # the ⊥ column's 1e-7 in the reference is then below 1e-6 of the loss
    ours, ref = gloro_trades_loss(logits, margins, y, 1.5), trades_kl_loss(logits, margins, y, 1.5)
    assert torch.allclose(ours, ref, rtol=1e-5)
    y_other = (y + 1) % 4  # a wrong label: the reference's ⊥ stays at the prediction, gloro_trades' moves
    assert not torch.allclose(gloro_trades_loss(logits, margins, y_other, 1.5),
                              trades_kl_loss(logits, margins, y_other, 1.5), rtol=1e-3)


@pytest.mark.parametrize("bound", ["global", "local"])
@pytest.mark.parametrize("loss", ["emma", "trades_kl", "gloro_trades"])
def test_losses_train_a_block_network_with_either_bound(bound, loss):
    torch.manual_seed(0)
    net = build_model("liresnet", "clipped_maxmin", (1, 12, 12), 3, depth=2, width=4)
    tc = from_plain(TrainConfig, {"bound": bound, "loss": loss, "eps": 0.3, "solver_steps": 4}, "train")
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    value, _ = robust_loss(net, x, y, 0.3, 0.0, tc)
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net[2].parameters())
    anchor = margin_anchor(net(x), y, tc)
    assert torch.equal(anchor, net(x).argmax(1) if loss == "trades_kl" else y)
