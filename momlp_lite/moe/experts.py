"""Many experts as stacked weights, run with batched matmuls.

A MoMLP holds ``L`` independent MLP experts of the same shape. Instead of ``L`` separate
``nn.Module`` objects (and a Python loop over them), :class:`StackedMLP` stores layer ``k`` of
every expert in one tensor of shape ``[L, in, out]`` and runs all experts at once with
``torch.baddbmm``. Two ways to call it:

* :meth:`StackedMLP.forward` — *lockstep* batches ``[L, B, in] -> [L, B, out]``: row ``l`` of the
  batch goes through expert ``l`` (training; each expert sees only its own ``B`` samples);
* :meth:`StackedMLP.forward_routed` — routed inputs ``x [N, in]`` with a leaf id per row
  ``[N] -> [N, out]`` in the input order (inference). Rows are sorted by leaf, padded to
  ``[L', rows, in]`` (``L'`` = experts that received rows) and run in blocks of bounded size.

Each expert is one MLP ``n_in -> width (x hidden_layers) -> n_out`` with biases, a learnable
PReLU slope per hidden layer (one per expert and layer, like ``nn.PReLU()``) and optionally a
BatchNorm1d before each PReLU with its own running statistics. Expert ``l`` is exactly the
``nn.Sequential`` returned by :meth:`StackedMLP.expert_module`.

A stack may hold any subset of the experts of a larger model: ``expert_ids`` names the global
id of each row (``0..L-1`` by default). :meth:`expert_state`, :meth:`subset`,
:meth:`from_expert_states` and :meth:`load_experts_` move experts between stacks, single
modules and files (one file per expert).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int
from .sizes import dense_width_for_parameters, mlp_parameter_count

__all__ = ["StackedMLP", "ExpertConfig"]

PRELU_INIT = 0.25  # nn.PReLU's default slope
# Upper bound on elements of one padded activation block in forward_routed.
_ROUTED_BLOCK = 1 << 24

ExpertConfig = dict[str, Any]  # keys: {"n_in", "width", "hidden_layers", "n_out", "prelu", "batchnorm", "bn_eps", "bn_momentum"}


class StackedMLP(nn.Module):
    """``L`` independent MLP experts stored as stacked weights.

    Parameters
    ----------
    num_experts : int
        Number of experts ``L`` in this stack.
    n_in, width, hidden_layers, n_out : int
        Every expert is ``n_in -> width (x hidden_layers) -> n_out``.
    prelu : bool
        Learnable PReLU (one slope per expert and hidden layer, init 0.25); ``False`` gives ReLU.
    batchnorm : bool
        BatchNorm1d before each activation, per expert, with its own running statistics.
    bn_eps, bn_momentum : float
        As in ``nn.BatchNorm1d``.
    expert_ids : sequence of int, optional
        Global id of each expert in the stack (distinct, >= 0); default ``0..L-1``.
    generator : torch.Generator, optional
        For the initialisation (``nn.Linear``'s: uniform in ``±1/sqrt(fan_in)``).
    seed : int, optional
        Instead of ``generator``: initialise expert ``e`` from ``(seed, e)`` alone, so that a stack of
        any subset of experts (one per process, say) starts exactly as the full stack would.
    device, dtype
        Where and in what precision the parameters live.

    Examples
    --------
    >>> m = StackedMLP(4, n_in=2, width=8, hidden_layers=2, n_out=1)
    >>> m(torch.zeros(4, 5, 2)).shape
    torch.Size([4, 5, 1])
    >>> m.forward_routed(torch.zeros(3, 2), torch.tensor([3, 0, 3])).shape
    torch.Size([3, 1])
    """

    def __init__(
        self,
        num_experts: int,
        n_in: int,
        width: int,
        hidden_layers: int,
        n_out: int = 1,
        *,
        prelu: bool = True,
        batchnorm: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        expert_ids: Sequence[int] | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        L = check_positive_int("num_experts", num_experts)
        self.n_in = check_positive_int("n_in", n_in)
        self.width = check_positive_int("width", width)
        self.hidden_layers = check_positive_int("hidden_layers", hidden_layers)
        self.n_out = check_positive_int("n_out", n_out)
        self.prelu = bool(prelu)
        self.batchnorm = bool(batchnorm)
        self.bn_eps = float(bn_eps)
        self.bn_momentum = float(bn_momentum)
        factory = dict(device=device, dtype=dtype or torch.get_default_dtype())
        ids = torch.arange(L) if expert_ids is None else torch.as_tensor(expert_ids, dtype=torch.long).flatten()
        if ids.numel() != L:
            raise ValueError(f"expert_ids must name {L} experts, got {ids.numel()}")
        if ids.numel() and (int(ids.min()) < 0 or len(torch.unique(ids)) != L):
            raise ValueError(f"expert_ids must be distinct integers >= 0, got {ids.tolist()}")
        if seed is not None and generator is not None:
            raise ValueError("give either seed (per-expert initialisation) or generator, not both")

        dims = [self.n_in] + [self.width] * self.hidden_layers + [self.n_out]
        shapes = list(zip(dims[:-1], dims[1:]))
        # nn.Linear's initialisation: uniform in +-1/sqrt(fan_in) for weights and biases
        init_device = generator.device if generator is not None else (torch.device("cpu") if seed is not None else device)
        ws = [torch.empty(L, i, o, device=init_device, dtype=factory["dtype"]) for i, o in shapes]
        bs = [torch.empty(L, o, device=init_device, dtype=factory["dtype"]) for _, o in shapes]
        with torch.no_grad():
            if seed is None:
                for (fan_in, _), w, b in zip(shapes, ws, bs):
                    w.uniform_(-fan_in**-0.5, fan_in**-0.5, generator=generator)
                    b.uniform_(-fan_in**-0.5, fan_in**-0.5, generator=generator)
            else:  # initialisation only (not a hot path): expert e's numbers depend on (seed, e) alone
                for j, e in enumerate(ids.tolist()):
                    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + e)
                    for (fan_in, _), w, b in zip(shapes, ws, bs):
                        w[j].uniform_(-fan_in**-0.5, fan_in**-0.5, generator=g)
                        b[j].uniform_(-fan_in**-0.5, fan_in**-0.5, generator=g)
        self.weights = nn.ParameterList(nn.Parameter(w.to(device)) for w in ws)
        self.biases = nn.ParameterList(nn.Parameter(b.to(device)) for b in bs)
        if self.prelu:
            self.slopes = nn.Parameter(torch.full((L, self.hidden_layers), PRELU_INIT, **factory))
        else:
            self.register_parameter("slopes", None)
        self.bn_weight = nn.ParameterList()
        self.bn_bias = nn.ParameterList()
        if self.batchnorm:
            for k in range(self.hidden_layers):
                self.bn_weight.append(nn.Parameter(torch.ones(L, self.width, **factory)))
                self.bn_bias.append(nn.Parameter(torch.zeros(L, self.width, **factory)))
                self.register_buffer(f"running_mean_{k}", torch.zeros(L, self.width, **factory))
                self.register_buffer(f"running_var_{k}", torch.ones(L, self.width, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.zeros(L, dtype=torch.long, device=device)
            )
        self.register_buffer("expert_ids", ids.to(device))

    # ------------------------------------------------------------------ description
    @property
    def num_experts(self) -> int:
        """Number of experts ``L`` in this stack."""
        return int(self.weights[0].shape[0])

    @property
    def config(self) -> ExpertConfig:
        """The shape of one expert: enough to rebuild it with :meth:`from_expert_states`."""
        return dict(
            n_in=self.n_in,
            width=self.width,
            hidden_layers=self.hidden_layers,
            n_out=self.n_out,
            prelu=self.prelu,
            batchnorm=self.batchnorm,
            bn_eps=self.bn_eps,
            bn_momentum=self.bn_momentum,
        )

    @property
    def parameters_per_expert(self) -> int:
        """Trainable parameters of one expert (what a forward pass of one input loads)."""
        return mlp_parameter_count(
            self.n_in, self.width, self.hidden_layers, self.n_out, self.prelu, self.batchnorm
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, {self.n_in} -> {self.width} x {self.hidden_layers} -> "
            f"{self.n_out}, prelu={self.prelu}, batchnorm={self.batchnorm}"
        )

    @classmethod
    def dense_with_budget(
        cls,
        budget: int,
        n_in: int,
        hidden_layers: int,
        n_out: int = 1,
        **kwargs: Any,
    ) -> "StackedMLP":
        """One dense MLP (a stack of one) with as many parameters as ``budget`` allows.

        The equal-parameter baseline: pass ``budget = L * experts.parameters_per_expert``; the
        width is the largest whose parameter count is at most the budget.
        """
        width = dense_width_for_parameters(
            budget,
            n_in,
            hidden_layers,
            n_out,
            prelu=kwargs.get("prelu", True),
            batchnorm=kwargs.get("batchnorm", False),
        )
        return cls(1, n_in, width, hidden_layers, n_out, **kwargs)

    # ------------------------------------------------------------------ forward
    def _layer_tensors(self, idx: torch.Tensor | None) -> list[dict[str, torch.Tensor]]:
        """Per-layer tensors, restricted to the experts ``idx`` (local rows) when given."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if idx is None else t.index_select(0, idx)

        layers = []
        for k in range(len(self.weights)):
            entry = {"w": pick(self.weights[k]), "b": pick(self.biases[k])}
            if k < self.hidden_layers:
                if self.prelu:
                    entry["slope"] = pick(self.slopes[:, k])
                if self.batchnorm:
                    entry["gamma"] = pick(self.bn_weight[k])
                    entry["beta"] = pick(self.bn_bias[k])
                    entry["mean"] = pick(getattr(self, f"running_mean_{k}"))
                    entry["var"] = pick(getattr(self, f"running_var_{k}"))
            layers.append(entry)
        return layers

    def _run(self, h: torch.Tensor, layers: list[dict[str, torch.Tensor]], k_update: bool) -> torch.Tensor:
        """Run ``h [L', B, in]`` through the given layer tensors; update BN stats when ``k_update``."""
        for k, p in enumerate(layers):
            h = torch.baddbmm(p["b"].unsqueeze(1), h, p["w"])
            if k == len(layers) - 1:
                break
            if self.batchnorm:
                h = self._batchnorm(h, k, p, k_update)
            if self.prelu:
                # one fused kernel each way: F.prelu with the experts as the channel dimension
                h = F.prelu(h.unsqueeze(0), p["slope"].to(h.dtype)).squeeze(0)
            else:
                h = torch.relu(h)
        return h

    def _batchnorm(self, h: torch.Tensor, k: int, p: dict[str, torch.Tensor], update: bool) -> torch.Tensor:
        """Per-expert BatchNorm1d over the ``B`` samples of each expert (dim 1)."""
        if self.training:
            batch = h.shape[1]
            if batch < 2:
                raise ValueError(
                    f"BatchNorm in training mode needs at least 2 samples per expert, got {batch}; "
                    "raise the batch size or call .eval()"
                )
            var, mean = torch.var_mean(h.float(), dim=1, correction=0)
            if update:
                with torch.no_grad():
                    m = self.bn_momentum
                    rm = getattr(self, f"running_mean_{k}")
                    rv = getattr(self, f"running_var_{k}")
                    rm.mul_(1 - m).add_(mean.to(rm.dtype), alpha=m)
                    rv.mul_(1 - m).add_((var * (batch / (batch - 1))).to(rv.dtype), alpha=m)
            mean, var = mean.to(h.dtype), var.to(h.dtype)
        else:
            mean, var = p["mean"].to(h.dtype), p["var"].to(h.dtype)
        scale = p["gamma"].to(h.dtype) * torch.rsqrt(var + self.bn_eps)
        return (h - mean[:, None, :]) * scale[:, None, :] + p["beta"].to(h.dtype)[:, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Lockstep forward: ``x [L, B, n_in] -> [L, B, n_out]``, row ``l`` through expert ``l``.

        A ``[B, n_in]`` input is sent through every expert (``-> [L, B, n_out]``). In training mode
        with BatchNorm each expert normalises over its own ``B`` samples.
        """
        L = self.num_experts
        self._check_dtype(x)
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(L, *x.shape)
        if x.ndim != 3 or x.shape[0] != L or x.shape[2] != self.n_in:
            raise ValueError(
                f"forward expects x of shape [{L}, B, {self.n_in}] (or [B, {self.n_in}]), got {tuple(x.shape)}; "
                "for one leaf id per row use forward_routed"
            )
        if self.batchnorm and self.training:
            self.num_batches_tracked.add_(1)
        return self._run(x, self._layer_tensors(None), k_update=True)

    def _check_dtype(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}; use torch.as_tensor(x)")
        dtype = self.weights[0].dtype
        if x.dtype != dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"x has dtype {x.dtype} but the experts are {dtype}; pass x.to({dtype}) "
                             "(or build the experts with that dtype)")

    def local_index(self, leaf: torch.Tensor) -> torch.Tensor:
        """Map global expert ids to rows of this stack.

        Raises
        ------
        ValueError
            If a leaf id names an expert this stack does not hold.
        """
        leaf = torch.as_tensor(leaf, device=self.expert_ids.device).long()
        ids = self.expert_ids
        table = torch.full((int(ids.max()) + 2,), -1, dtype=torch.long, device=ids.device)
        table[ids] = torch.arange(len(ids), device=ids.device)
        # ids outside [0, max id] look up the table's last entry, which is always -1
        inside = (leaf >= 0) & (leaf < len(table))
        local = table[torch.where(inside, leaf, torch.full_like(leaf, len(table) - 1))]
        if leaf.numel() and bool((local < 0).any()):
            missing = torch.unique(leaf[local < 0])[:10].tolist()
            raise ValueError(
                f"leaf ids {missing} name experts this stack does not hold (it holds "
                f"{len(ids)} experts, ids {ids[:10].tolist()}{'...' if len(ids) > 10 else ''}); "
                "route only to held experts or load them first"
            )
        return local

    def forward_routed(
        self, x: torch.Tensor, leaf: torch.Tensor, max_block: int = _ROUTED_BLOCK
    ) -> torch.Tensor:
        """Routed forward: row ``i`` of ``x [N, n_in]`` through expert ``leaf[i]`` (a global id).

        Returns ``[N, n_out]`` in the input order. Rows are grouped by leaf (one sort), padded to
        ``[L', rows, n_in]`` and run with batched matmuls in blocks of at most ``max_block``
        activation elements — no loop over experts. ``L'`` is the number of experts that received
        rows when that is at most half the stack (their weights are gathered), else all experts.
        Training-mode BatchNorm is refused (padding would enter the statistics): call ``.eval()``
        or train with :meth:`forward`.
        """
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
        sorted_local = local[order]
        present, counts = torch.unique_consecutive(sorted_local, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(present), device=x.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(order), device=x.device) - starts[group]
        # few experts hit: gather just their weights; most hit: run all (a weight copy would cost more)
        compact = 2 * len(present) <= self.num_experts
        layers = self._layer_tensors(present if compact else None)
        rows = len(present) if compact else self.num_experts
        if not compact:
            group = sorted_local
        max_count = int(counts.max())
        widest = max(self.n_in, self.width, self.n_out)
        chunk = max(1, min(max_count, max_block // max(1, rows * widest)))
        x_sorted = x[order]
        y_sorted = out.new_empty(len(order), self.n_out)
        for lo in range(0, max_count, chunk):  # loop over row blocks, not experts
            hi = min(lo + chunk, max_count)
            sel = (pos >= lo) & (pos < hi)
            padded = x.new_zeros(rows, hi - lo, self.n_in)
            padded[group[sel], pos[sel] - lo] = x_sorted[sel]
            y = self._run(padded, layers, k_update=False)
            y_sorted[sel] = y[group[sel], pos[sel] - lo].to(out.dtype)
        out[order] = y_sorted
        return out

    def fold_affine_(
        self,
        in_shift: torch.Tensor | None = None,
        in_scale: torch.Tensor | None = None,
        out_shift: torch.Tensor | None = None,
        out_scale: torch.Tensor | None = None,
    ) -> "StackedMLP":
        """Fold per-expert input/output standardisation into the first and last layers.

        Before: expert ``l`` computes ``g_l``, trained on standardised data. After:
        ``f_l(x) = out_scale[l] * g_l((x - in_shift[l]) / in_scale[l]) + out_shift[l]`` on raw
        inputs, with no extra parameters. Shapes ``[L, n_in]`` and ``[L, n_out]`` (or broadcastable).
        """
        with torch.no_grad():
            w0, b0 = self.weights[0], self.biases[0]
            if in_scale is not None:
                w0.div_(in_scale.to(w0).expand(self.num_experts, self.n_in)[:, :, None])
            if in_shift is not None:
                shift = in_shift.to(w0).expand(self.num_experts, self.n_in)
                b0.sub_(torch.einsum("li,lio->lo", shift, w0))
            wl, bl = self.weights[-1], self.biases[-1]
            if out_scale is not None:
                scale = out_scale.to(wl).expand(self.num_experts, self.n_out)
                wl.mul_(scale[:, None, :])
                bl.mul_(scale)
            if out_shift is not None:
                bl.add_(out_shift.to(bl).expand(self.num_experts, self.n_out))
        return self

    # ------------------------------------------------------------------ moving experts around
    def _stacked_state(self) -> dict[str, torch.Tensor]:
        """state_dict entries with a leading expert dimension (all but ``expert_ids``)."""
        return {k: v for k, v in self.state_dict().items() if k != "expert_ids"}

    def expert_state(self, expert_id: int) -> dict[str, torch.Tensor]:
        """The tensors of one expert (global id), without the expert dimension (cloned).

        The keys are this class's ``state_dict`` keys; save them with safetensors for one file per
        expert and rebuild with :meth:`from_expert_states`.
        """
        row = int(self.local_index(torch.tensor([expert_id]))[0])
        return {k: v[row].detach().clone() for k, v in self._stacked_state().items()}

    @classmethod
    def from_expert_states(
        cls,
        states: Sequence[Mapping[str, torch.Tensor]],
        config: ExpertConfig,
        expert_ids: Sequence[int] | torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> "StackedMLP":
        """Build a stack from per-expert states (as returned by :meth:`expert_state`).

        Raises
        ------
        ValueError
            If no state is given or a state's keys/shapes do not match ``config``.
        """
        if len(states) == 0:
            raise ValueError("from_expert_states needs at least one expert state, got none")
        dtype = next(iter(states[0].values())).dtype
        dtype = dtype if dtype.is_floating_point else None
        stack = cls(len(states), expert_ids=expert_ids, device=device, dtype=dtype, **config)
        want = stack._stacked_state()
        for i, st in enumerate(states):
            if set(st) != set(want):
                raise ValueError(
                    f"expert state {i} has keys {sorted(st)} but this config needs {sorted(want)}"
                )
        stacked = {k: torch.stack([st[k] for st in states]) for k in want}
        stack.load_state_dict({**stacked, "expert_ids": stack.expert_ids}, strict=True)
        return stack

    def subset(self, expert_ids: Sequence[int] | torch.Tensor) -> "StackedMLP":
        """A new stack holding copies of the experts with these global ids (in this order)."""
        ids = torch.as_tensor(expert_ids, dtype=torch.long).flatten()
        rows = self.local_index(ids)
        dev = self.weights[0].device
        stack = type(self)(
            len(ids), expert_ids=ids, device=dev, dtype=self.weights[0].dtype, **self.config
        )
        with torch.no_grad():
            for k, v in self._stacked_state().items():
                stack._stacked_tensor(k).copy_(v.index_select(0, rows.to(v.device)))
        stack.train(self.training)
        return stack

    def load_experts_(self, other: "StackedMLP") -> "StackedMLP":
        """Copy every expert of ``other`` into the rows of this stack with the same global ids."""
        if other.config != self.config:
            raise ValueError(f"cannot load experts of shape {other.config} into a stack of shape {self.config}")
        rows = self.local_index(other.expert_ids.to(self.expert_ids.device))
        with torch.no_grad():
            for k, v in other._stacked_state().items():
                dst = self._stacked_tensor(k)
                dst.index_copy_(0, rows.to(dst.device), v.to(dst.device, dst.dtype))
        return self

    def _stacked_tensor(self, key: str) -> torch.Tensor:
        """The live parameter/buffer behind a state_dict key."""
        obj: Any = self
        for part in key.split("."):
            obj = obj[int(part)] if isinstance(obj, nn.ParameterList) else getattr(obj, part)
        return obj

    # ------------------------------------------------------------------ plain nn.Module view
    def expert_module(self, expert_id: int) -> nn.Sequential:
        """Expert ``expert_id`` (global id) as a plain ``nn.Sequential`` of Linear/BatchNorm1d/PReLU.

        The module computes exactly what this stack computes for that expert; it holds copies.
        """
        st = self.expert_state(expert_id)
        dev, dtype = self.weights[0].device, self.weights[0].dtype
        mods: list[nn.Module] = []
        for k in range(len(self.weights)):
            w = st[f"weights.{k}"]
            lin = nn.Linear(w.shape[0], w.shape[1], device=dev, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(w.T)
                lin.bias.copy_(st[f"biases.{k}"])
            mods.append(lin)
            if k == self.hidden_layers:
                break
            if self.batchnorm:
                bn = nn.BatchNorm1d(self.width, eps=self.bn_eps, momentum=self.bn_momentum, device=dev, dtype=dtype)
                with torch.no_grad():
                    bn.weight.copy_(st[f"bn_weight.{k}"])
                    bn.bias.copy_(st[f"bn_bias.{k}"])
                    bn.running_mean.copy_(st[f"running_mean_{k}"])
                    bn.running_var.copy_(st[f"running_var_{k}"])
                    bn.num_batches_tracked.copy_(st["num_batches_tracked"])
                mods.append(bn)
            if self.prelu:
                act = nn.PReLU(device=dev, dtype=dtype)
                with torch.no_grad():
                    act.weight.fill_(st["slopes"][k])
                mods.append(act)
            else:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)

    def load_expert_module_(self, expert_id: int, module: nn.Sequential) -> "StackedMLP":
        """Write a module built by :meth:`expert_module` back into row ``expert_id`` (global id)."""
        row = int(self.local_index(torch.tensor([expert_id]))[0])
        linears = [m for m in module if isinstance(m, nn.Linear)]
        bns = [m for m in module if isinstance(m, nn.BatchNorm1d)]
        acts = [m for m in module if isinstance(m, nn.PReLU)]
        if len(linears) != len(self.weights) or len(bns) != (self.hidden_layers if self.batchnorm else 0):
            raise ValueError("module does not have this stack's layout; build it with expert_module()")
        with torch.no_grad():
            for k, lin in enumerate(linears):
                self.weights[k][row] = lin.weight.T
                self.biases[k][row] = lin.bias
            for k, bn in enumerate(bns):
                self.bn_weight[k][row] = bn.weight
                self.bn_bias[k][row] = bn.bias
                getattr(self, f"running_mean_{k}")[row] = bn.running_mean
                getattr(self, f"running_var_{k}")[row] = bn.running_var
                self.num_batches_tracked[row] = bn.num_batches_tracked
            for k, act in enumerate(acts):
                self.slopes[row, k] = act.weight.reshape(())
        return self
