"""Opt-in GPU levers for the lockstep step (CUDA-only ones ignored elsewhere). Taught in: book/momlp_grid_regression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .experts import StackedMLP
from .trainer import TrainConfig, make_optimizer, per_expert_loss

__all__ = ["FastOptions", "FastStep"]


@dataclass(frozen=True)
class FastOptions:
    """GPU levers (``fused=None``: on CUDA; ``compile``: True or a mode). Taught in: book/momlp_grid_regression."""

    bf16: bool = False
    fused: bool | None = None
    compile: bool | str = False
    cuda_graph: bool = False


class FastStep:
    """``LockstepStep`` with the levers of ``options``, for ``train_experts(make_step=...)``; a CUDA graph records the
    whole step on the first call, after undone warm-up steps. Taught in: book/momlp_grid_regression."""

    def __init__(self, net: StackedMLP, cfg: TrainConfig, options: FastOptions = FastOptions(),
                 device: torch.device | str | None = None) -> None:
        self.net, self.cfg, self.opts = net, cfg, options
        self.device = torch.device(device) if device is not None else net.weights[0].device
        cuda = self.device.type == "cuda"
        self.use_graph = bool(options.cuda_graph) and cuda
        fused = cuda if options.fused is None else bool(options.fused)
        self.opt = make_optimizer(net.parameters(), cfg, fused=fused, foreach=not fused, capturable=self.use_graph)
        mode = None if options.compile is True else str(options.compile)
        self._loss = torch.compile(self._eager_loss, mode=mode) if options.compile and cuda else self._eager_loss
        self._graph: Any = None

    def _eager_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opts.bf16,
                            cache_enabled=not self.use_graph):  # no weight-cast cache under CUDA graphs
            pred = self.net(xb)
        return per_expert_loss(pred, yb, self.cfg.loss)

    def _eager_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        losses = self._loss(xb, yb)
        self.opt.zero_grad(set_to_none=not self.use_graph)
        losses.sum().backward()
        self.opt.step()
        return losses.detach()

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if not self.use_graph:
            return self._eager_step(xb, yb)
        if self._graph is None:
            self._capture(xb, yb)
        self._x.copy_(xb)
        self._y.copy_(yb)
        self._graph.replay()
        return self._losses.clone()

    def _capture(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Warm up on a side stream, undo the warm-up, then record one whole step."""
        saved = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self._x, self._y = xb.clone(), yb.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager_step(self._x, self._y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.net.load_state_dict(saved)  # back to the state before warm-up (in place): parameters, buffers
        with torch.no_grad():  # and a fresh optimizer
            for state in self.opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        t.zero_()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._losses = self._eager_step(self._x, self._y)
