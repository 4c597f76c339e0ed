"""Plain serial Algorithm 2, sharing only the data order and checks. Taught in: book/momlp_grid_regression."""

from __future__ import annotations

import copy
import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .experts import StackedMLP
from .order import LockstepSampler
from .trainer import NonFiniteLossError, TrainConfig, TrainResult, plan_training

__all__ = ["train_experts_serial"]


def train_experts_serial(model: StackedMLP, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor,
                         config: TrainConfig | None = None,
                         expert_ids: Sequence[int] | torch.Tensor | None = None) -> TrainResult:
    """Each expert alone, with its own Adam; arguments as ``train_experts``. Taught in: book/momlp_grid_regression."""
    cfg = config or TrainConfig()
    ids, skipped, s, steps, every, dev = plan_training(model, x, y, leaf, cfg, expert_ids)
    crit = F.mse_loss if cfg.loss == "mse" else F.cross_entropy
    evals = list(range(0, steps, every)) + [steps]
    hist = np.full((2, len(evals), len(ids)), np.nan)  # train and validation loss at every evaluation
    best_val, best_step, stop_step = np.full(len(ids), np.inf), np.where(s.n_val > 0, 0, -1), np.full(len(ids), -1)
    t0, last, trained = time.perf_counter(), 0, []
    for j, gid in enumerate(ids.tolist()):
        net = model.expert_module(gid).to(dev)
        opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW)(
            net.parameters(), lr=cfg.lr, **({} if cfg.weight_decay is None else {"weight_decay": cfg.weight_decay}))
        tr, va = s.rows_of(j)
        xt, yt, xv, yv = x[tr].to(dev), y[tr].to(dev), x[va].to(dev), y[va].to(dev)
        order = LockstepSampler(s.n_train[j : j + 1], ids[j : j + 1], cfg.batch_size, cfg.seed, dev)
        best, bad, losses = copy.deepcopy(net.state_dict()), 0, []
        for step in range(steps + 1):
            if step in evals:
                net.eval()
                with torch.no_grad():
                    val = crit(net(xv), yv).item() if len(va) else math.nan
                net.train()
                train = float(np.mean(losses)) if losses else math.nan
                if (losses and not math.isfinite(train)) or (len(va) and not math.isfinite(val)):
                    raise NonFiniteLossError([gid], step)
                hist[:, evals.index(step), j] = train, val
                losses = []
                if len(va) and val < best_val[j] - cfg.min_delta:
                    best, best_val[j], best_step[j], bad = copy.deepcopy(net.state_dict()), val, step, 0
                elif len(va):
                    bad += 1
                if len(va) and cfg.patience is not None and bad >= cfg.patience:
                    stop_step[j] = step
                    break
            if step == steps:
                break
            i = order.indices(step)[0]
            loss = crit(net(xt[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        last = max(last, step)
        if len(va):
            net.load_state_dict(best)
        trained.append((gid, net))
    for gid, net in trained:  # written back only once every expert trained without error
        model.load_expert_module_(gid, net.to(model.weights[0].device))
    rows = [e for e, st in enumerate(evals) if st <= last]
    return TrainResult(ids.tolist(), skipped, s.n_train.numpy(), s.n_val.numpy(), [evals[e] for e in rows],
                       hist[0][rows], hist[1][rows], best_val, best_step, stop_step, last, time.perf_counter() - t0,
                       str(dev))
