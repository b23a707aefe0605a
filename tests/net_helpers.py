"""Small-network helpers shared by the bound-core tests."""
import torch
import torch.nn.functional as F

from locallip.nn.activations import clamp_thresholds


def fit_briefly(model, x, y, steps, lr):
    """A few full-batch Adam steps of cross-entropy, thresholds kept >= 0 as in training."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        clamp_thresholds(model)
    return model
