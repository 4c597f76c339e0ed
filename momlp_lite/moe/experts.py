"""Many MLP experts as stacked weights, run with batched matmuls. Taught in: book/momlp_grid_regression."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int
from .sizes import dense_width_for_parameters, mlp_parameter_count

__all__ = ["StackedMLP"]

_ROUTED_BLOCK = 1 << 24  # upper bound on elements of one padded activation block in forward_routed


class StackedMLP(nn.Module):
    """``L`` independent MLP experts ``n_in -> width (x hidden_layers) -> n_out``; layer ``k`` is one ``[L, in, out]``.
    With ``seed``, expert ``e`` is initialized from ``(seed, e)`` alone. Taught in: book/momlp_grid_regression."""

    def __init__(self, num_experts: int, n_in: int, width: int, hidden_layers: int, n_out: int = 1, *,
                 prelu: bool = True, batchnorm: bool = False, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 expert_ids: Sequence[int] | torch.Tensor | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        L = check_positive_int("num_experts", num_experts)
        self.n_in = check_positive_int("n_in", n_in)
        self.width = check_positive_int("width", width)
        self.hidden_layers = check_positive_int("hidden_layers", hidden_layers)
        self.n_out = check_positive_int("n_out", n_out)
        self.prelu, self.batchnorm = bool(prelu), bool(batchnorm)
        self.bn_eps, self.bn_momentum = float(bn_eps), float(bn_momentum)
        factory = dict(device=device, dtype=dtype or torch.get_default_dtype())
        ids = torch.arange(L) if expert_ids is None else torch.as_tensor(expert_ids, dtype=torch.long).flatten()
        if ids.numel() != L:
            raise ValueError(f"expert_ids must name {L} experts, got {ids.numel()}")
        if ids.numel() and (int(ids.min()) < 0 or len(torch.unique(ids)) != L):
            raise ValueError(f"expert_ids must be distinct integers >= 0, got {ids.tolist()}")
        if seed is not None and generator is not None:
            raise ValueError("give either seed (per-expert initialization) or generator, not both")

        dims = [self.n_in] + [self.width] * self.hidden_layers + [self.n_out]
        shapes = list(zip(dims[:-1], dims[1:]))
        init_device = generator.device if generator is not None else ("cpu" if seed is not None else device)
        ws = [torch.empty(L, i, o, device=init_device, dtype=factory["dtype"]) for i, o in shapes]
        bs = [torch.empty(L, o, device=init_device, dtype=factory["dtype"]) for _, o in shapes]
        # nn.Linear's initialization, from one generator or with seed one per expert (not a hot path)
        gens = [(slice(None), generator)] if seed is None else [
            (j, torch.Generator().manual_seed(int(seed) * 1_000_003 + e)) for j, e in enumerate(ids.tolist())]
        with torch.no_grad():
            for rows, g in gens:
                for (fan_in, _), w, b in zip(shapes, ws, bs):
                    w[rows].uniform_(-fan_in**-0.5, fan_in**-0.5, generator=g)
                    b[rows].uniform_(-fan_in**-0.5, fan_in**-0.5, generator=g)
        self.weights = nn.ParameterList(nn.Parameter(w.to(device)) for w in ws)
        self.biases = nn.ParameterList(nn.Parameter(b.to(device)) for b in bs)
        if self.prelu:
            self.slopes = nn.Parameter(torch.full((L, self.hidden_layers), 0.25, **factory))  # nn.PReLU's default
        else:
            self.register_parameter("slopes", None)
        bn_layers = range(self.hidden_layers if self.batchnorm else 0)
        self.bn_weight = nn.ParameterList(nn.Parameter(torch.ones(L, self.width, **factory)) for _ in bn_layers)
        self.bn_bias = nn.ParameterList(nn.Parameter(torch.zeros(L, self.width, **factory)) for _ in bn_layers)
        for k in bn_layers:
            self.register_buffer(f"running_mean_{k}", torch.zeros(L, self.width, **factory))
            self.register_buffer(f"running_var_{k}", torch.ones(L, self.width, **factory))
        if self.batchnorm:
            self.register_buffer("num_batches_tracked", torch.zeros(L, dtype=torch.long, device=device))
        self.register_buffer("expert_ids", ids.to(device))
        self.num_experts = L
        self.parameters_per_expert = mlp_parameter_count(self.n_in, self.width, self.hidden_layers, self.n_out,
                                                         self.prelu, self.batchnorm)  # what one forward loads

    @property
    def config(self) -> dict[str, Any]:
        """The shape of one expert: the keyword arguments that rebuild a stack like this one."""
        return {k: getattr(self, k) for k in ("n_in", "width", "hidden_layers", "n_out", "prelu", "batchnorm",
                                              "bn_eps", "bn_momentum")}

    @classmethod
    def dense_with_budget(cls, budget: int, n_in: int, hidden_layers: int, n_out: int = 1,
                          **kwargs: Any) -> "StackedMLP":
        """One dense MLP (a stack of one) of the largest width whose parameters fit ``budget``: the baseline."""
        width = dense_width_for_parameters(budget, n_in, hidden_layers, n_out, prelu=kwargs.get("prelu", True),
                                           batchnorm=kwargs.get("batchnorm", False))
        return cls(1, n_in, width, hidden_layers, n_out, **kwargs)

    def _run(self, h: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``h [L', B, in]`` through every expert, or through the experts of the local rows ``idx``."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if idx is None else t.index_select(0, idx)
        for k in range(len(self.weights)):
            h = torch.baddbmm(pick(self.biases[k]).unsqueeze(1), h, pick(self.weights[k]))
            if k == self.hidden_layers:
                break
            if self.batchnorm:
                h = self._batchnorm(h, k, pick)
            # PReLU: one fused kernel each way, with the experts as F.prelu's channel dimension
            h = F.prelu(h.unsqueeze(0), pick(self.slopes[:, k]).to(h.dtype)).squeeze(0) if self.prelu else torch.relu(h)
        return h

    def _batchnorm(self, h: torch.Tensor, k: int, pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Per-expert BatchNorm1d over the ``B`` samples of each expert (dim 1); training mode updates the stats."""
        rm, rv = getattr(self, f"running_mean_{k}"), getattr(self, f"running_var_{k}")
        if self.training:
            batch = h.shape[1]
            if batch < 2:
                raise ValueError(f"BatchNorm in training mode needs at least 2 samples per expert, got {batch}; "
                                 "raise the batch size or call .eval()")
            var, mean = torch.var_mean(h.float(), dim=1, correction=0)
            with torch.no_grad():
                m = self.bn_momentum
                rm.mul_(1 - m).add_(mean.to(rm.dtype), alpha=m)
                rv.mul_(1 - m).add_((var * (batch / (batch - 1))).to(rv.dtype), alpha=m)
            mean, var = mean.to(h.dtype), var.to(h.dtype)
        else:
            mean, var = pick(rm).to(h.dtype), pick(rv).to(h.dtype)
        scale = pick(self.bn_weight[k]).to(h.dtype) * torch.rsqrt(var + self.bn_eps)
        return (h - mean[:, None, :]) * scale[:, None, :] + pick(self.bn_bias[k]).to(h.dtype)[:, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Lockstep forward: ``x [L, B, n_in]`` (or one ``[B, n_in]`` for all) -> ``[L, B, n_out]``."""
        L = self.num_experts
        self._check_dtype(x)
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(L, *x.shape)
        if x.ndim != 3 or x.shape[0] != L or x.shape[2] != self.n_in:
            raise ValueError(f"forward expects x of shape [{L}, B, {self.n_in}] (or [B, {self.n_in}]), got "
                             f"{tuple(x.shape)}; for one leaf id per row use forward_routed")
        if self.batchnorm and self.training:
            self.num_batches_tracked.add_(1)
        return self._run(x)

    def _check_dtype(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}; use torch.as_tensor(x)")
        dtype = self.weights[0].dtype
        if x.dtype != dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"x has dtype {x.dtype} but the experts are {dtype}; pass x.to({dtype}) "
                             "(or build the experts with that dtype)")

    def local_index(self, leaf: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> rows of this stack (ValueError for ids it lacks)."""
        leaf = torch.as_tensor(leaf, device=self.expert_ids.device).long()
        ids = self.expert_ids
        table = torch.full((int(ids.max()) + 2,), -1, dtype=torch.long, device=ids.device)
        table[ids] = torch.arange(len(ids), device=ids.device)
        local = table[leaf.clamp(-1, len(table) - 1)]  # ids outside [0, max id] read an entry that is -1
        if leaf.numel() and bool((local < 0).any()):
            missing = torch.unique(leaf[local < 0])[:10].tolist()
            raise ValueError(f"leaf ids {missing} name experts this stack does not hold (it holds {len(ids)} "
                             f"experts, ids {ids[:10].tolist()}{'...' if len(ids) > 10 else ''}); "
                             "route only to held experts or load them first")
        return local

    def forward_routed(self, x: torch.Tensor, leaf: torch.Tensor, max_block: int = _ROUTED_BLOCK) -> torch.Tensor:
        """Routed forward (inference): row ``i`` of ``x [N, n_in]`` through expert ``leaf[i]`` (a global id), grouped by
        leaf (one sort) and padded to ``[L', rows, n_in]`` blocks of at most ``max_block`` elements."""
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"forward_routed expects x of shape [N, {self.n_in}], got {tuple(x.shape)}")
        self._check_dtype(x)
        leaf = torch.as_tensor(leaf, device=x.device).long().flatten()
        if leaf.shape[0] != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} rows but {leaf.shape[0]} leaf ids; give one leaf id per row")
        if self.batchnorm and self.training:
            raise ValueError("forward_routed with BatchNorm needs eval mode; call .eval() first")
        out = x.new_empty(x.shape[0], self.n_out)
        if x.shape[0] == 0:
            return out
        local = self.local_index(leaf)
        order = torch.argsort(local, stable=True)
        present, group, counts = torch.unique_consecutive(local[order], return_inverse=True, return_counts=True)
        pos = torch.arange(len(order), device=x.device) - (torch.cumsum(counts, 0) - counts)[group]
        # few experts hit: gather just their weights; most hit: run all (a weight copy would cost more)
        idx = present if 2 * len(present) <= self.num_experts else None
        rows = self.num_experts if idx is None else len(present)
        if idx is None:
            group = local[order]
        max_count = int(counts.max())
        chunk = max(1, min(max_count, max_block // max(1, rows * max(self.n_in, self.width, self.n_out))))
        for lo in range(0, max_count, chunk):  # loop over row blocks, not experts
            sel = (pos >= lo) & (pos < lo + chunk)
            padded = x.new_zeros(rows, min(chunk, max_count - lo), self.n_in)
            padded[group[sel], pos[sel] - lo] = x[order[sel]]
            y = self._run(padded, idx)  # never training-mode BatchNorm (refused above)
            out[order[sel]] = y[group[sel], pos[sel] - lo].to(out.dtype)
        return out

    def fold_affine_(self, in_shift: torch.Tensor | None = None, in_scale: torch.Tensor | None = None,
                     out_shift: torch.Tensor | None = None, out_scale: torch.Tensor | None = None) -> "StackedMLP":
        """Fold per-expert standardization into the first and last layers: expert ``l`` then computes
        ``out_scale[l] * g_l((x - in_shift[l]) / in_scale[l]) + out_shift[l]`` on raw ``x``."""
        w0, b0, wl, bl, L = self.weights[0], self.biases[0], self.weights[-1], self.biases[-1], self.num_experts
        with torch.no_grad():
            if in_scale is not None:
                w0.div_(in_scale.to(w0).expand(L, self.n_in)[:, :, None])
            if in_shift is not None:
                b0.sub_(torch.einsum("li,lio->lo", in_shift.to(w0).expand(L, self.n_in), w0))
            if out_scale is not None:
                scale = out_scale.to(wl).expand(L, self.n_out)
                wl.mul_(scale[:, None, :])
                bl.mul_(scale)
            if out_shift is not None:
                bl.add_(out_shift.to(bl).expand(L, self.n_out))
        return self

    def expert_state(self, expert_id: int) -> dict[str, torch.Tensor]:
        """The tensors of one expert (global id), cloned, without the expert dimension: one file per expert."""
        row = int(self.local_index(torch.tensor([expert_id]))[0])
        return {k: v[row].clone() for k, v in self.state_dict().items() if k != "expert_ids"}

    def subset(self, expert_ids: Sequence[int] | torch.Tensor) -> "StackedMLP":
        """A new stack with copies of the experts with these global ids, in this order."""
        ids = torch.as_tensor(expert_ids, dtype=torch.long).flatten()
        rows = self.local_index(ids)
        stack = type(self)(len(ids), expert_ids=ids, device=self.weights[0].device, dtype=self.weights[0].dtype,
                           **self.config)
        stack.load_state_dict({k: v.index_select(0, rows.to(v.device)) for k, v in self.state_dict().items()})
        return stack.train(self.training)

    def load_experts_(self, other: "StackedMLP") -> "StackedMLP":
        """Copy every expert of ``other`` into this stack's rows of the same ids."""
        if other.config != self.config:
            raise ValueError(f"cannot load experts of shape {other.config} into a stack of shape {self.config}")
        rows = self.local_index(other.expert_ids.to(self.expert_ids.device))
        mine = self.state_dict()  # its tensors share the storage; other's expert_ids are copied onto themselves
        with torch.no_grad():
            for k, v in other.state_dict().items():
                mine[k].index_copy_(0, rows.to(mine[k].device), v.to(mine[k].device, mine[k].dtype))
        return self

    def _pairs(self, module: nn.Sequential, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(view of this stack's row, the same tensor of an expert_module)``, in the module's state_dict order."""
        st, mine = self.state_dict(), []  # state_dict tensors share the storage
        for k in range(len(self.weights)):
            mine += [st[f"weights.{k}"][row].T, st[f"biases.{k}"][row]]
            if k < self.hidden_layers and self.batchnorm:
                mine += [st[f"{name}{k}"][row] for name in ("bn_weight.", "bn_bias.", "running_mean_", "running_var_")]
                mine.append(st["num_batches_tracked"][row])
            if k < self.hidden_layers and self.prelu:
                mine.append(st["slopes"][row, k : k + 1])
        return list(zip(mine, module.state_dict().values()))

    def expert_module(self, expert_id: int) -> nn.Sequential:
        """Expert ``expert_id`` (global id) as a plain ``nn.Sequential`` of Linear/BatchNorm1d/PReLU (copies)."""
        mods: list[nn.Module] = []
        for k, w in enumerate(self.weights):
            mods.append(nn.Linear(w.shape[1], w.shape[2]))
            if k < self.hidden_layers:
                if self.batchnorm:
                    mods.append(nn.BatchNorm1d(self.width, eps=self.bn_eps, momentum=self.bn_momentum))
                mods.append(nn.PReLU() if self.prelu else nn.ReLU())
        seq = nn.Sequential(*mods).to(self.weights[0].device, self.weights[0].dtype)
        with torch.no_grad():
            for mine, theirs in self._pairs(seq, int(self.local_index(torch.tensor([expert_id]))[0])):
                theirs.copy_(mine)
        return seq

    def load_expert_module_(self, expert_id: int, module: nn.Sequential) -> "StackedMLP":
        """Write an :meth:`expert_module` back into row ``expert_id``."""
        want = {k: v.shape for k, v in self.expert_module(expert_id).state_dict().items()}
        if {k: v.shape for k, v in module.state_dict().items()} != want:
            raise ValueError("module does not have this stack's layout; build it with expert_module()")
        with torch.no_grad():
            for mine, theirs in self._pairs(module, int(self.local_index(torch.tensor([expert_id]))[0])):
                mine.copy_(theirs)
        return self
