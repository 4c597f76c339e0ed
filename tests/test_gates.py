"""Learned gates (momlp_lite.moe.gates) against explicit per-token loop references, outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momlp_lite.moe.gates import (
    ExpertChoiceMoE, TokenChoiceMoE, assign_slots, expert_capacity, expert_choice, load_balancing_loss,
    router_z_loss, top_k_gate,
)


# ------------------------------------------------------------------ independent references (plain loops)
def ref_expert(experts, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on one token ``v [n_in]``, written from the stacked tensors layer by layer."""
    h = v
    layers = len(experts.weights)
    for j in range(layers):
        h = h @ experts.weights[j][e] + experts.biases[j][e]
        if j < layers - 1:
            h = torch.where(h >= 0, h, experts.slopes[e, j] * h) if experts.prelu else torch.relu(h)
    return h


def ref_token_choice(layer: TokenChoiceMoE, x: torch.Tensor, noise: torch.Tensor | None = None):
    """Per token: logits, softmax, the k largest, capacity counters in (choice, token) order, weighted sum."""
    T, N, k = x.shape[0], layer.num_experts, layer.k
    choices, gates = [], []
    for t in range(T):
        logit = x[t] @ layer.router
        if noise is not None:
            logit = logit + noise[t] * torch.log1p(torch.exp(x[t] @ layer.noise))
        p = torch.exp(logit - logit.max())
        p = p / p.sum()
        order = sorted(range(N), key=lambda i: -float(p[i].detach()))[:k]
        w = [p[i] for i in order]
        if k > 1:
            s = sum(w)
            w = [wi / s for wi in w]
        choices.append(order)
        gates.append(w)
    if layer.capacity_factor is None:
        cap = T * k
    else:
        cap = math.ceil(layer.capacity_factor * k * T / N - 1e-9)
    count = [0] * N
    kept = [[False] * k for _ in range(T)]
    for j in range(k):
        for t in range(T):
            e = choices[t][j]
            if count[e] < cap:
                count[e] += 1
                kept[t][j] = True
    rows = []
    for t in range(T):
        y = torch.zeros(layer.n_out, dtype=x.dtype)
        for j in range(k):
            if kept[t][j]:
                y = y + gates[t][j] * ref_expert(layer.experts, choices[t][j], x[t])
        rows.append(y)
    dropped = 1 - sum(map(sum, kept)) / (T * k)
    return torch.stack(rows), dropped


def ref_expert_choice(layer: ExpertChoiceMoE, x: torch.Tensor):
    """Per expert: rank the tokens by its softmax score, keep the top c, add their weighted outputs."""
    T, N = x.shape[0], layer.num_experts
    c = min(T, math.ceil(layer.capacity_factor * T / N - 1e-9))
    probs = []
    for t in range(T):
        logit = x[t] @ layer.router
        p = torch.exp(logit - logit.max())
        probs.append(p / p.sum())
    rows = [torch.zeros(layer.n_out, dtype=x.dtype) for _ in range(T)]
    taken = [0] * T
    for i in range(N):
        for t in sorted(range(T), key=lambda t: -float(probs[t][i].detach()))[:c]:
            rows[t] = rows[t] + probs[t][i] * ref_expert(layer.experts, i, x[t])
            taken[t] += 1
    return torch.stack(rows), taken


def _grads(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params = [x] + [p for p in module.parameters() if p.requires_grad]
    g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum(),
                            params, allow_unused=True)
    return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]


def _tokens(T: int, n_in: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


# ------------------------------------------------------------------ token choice
@pytest.mark.parametrize("k, cf", [(1, None), (1, 1.0), (2, 1.25), (2, None), (3, 0.5)])
def test_token_choice_equals_per_token_loop_outputs_and_gradients(k, cf):
    layer = TokenChoiceMoE(3, 2, 5, 6, 2, k=k, capacity_factor=cf, generator=torch.Generator().manual_seed(1)).double()
    x = _tokens(23, 3).requires_grad_(True)
    y = layer(x)
    y_ref, dropped_ref = ref_token_choice(layer, x)
    torch.testing.assert_close(y, y_ref)
    assert layer.last_aux["dropped"] == pytest.approx(dropped_ref)
    for a, b in zip(_grads(layer, x, y), _grads(layer, x, y_ref)):
        torch.testing.assert_close(a, b)
    if cf == 1.0 and k == 1:
        assert dropped_ref > 0, "the test case must exercise dropping"


def test_noisy_top_k_equals_per_token_loop_in_training():
    layer = TokenChoiceMoE(4, 1, 6, 5, 1, k=2, noisy=True, generator=torch.Generator().manual_seed(2)).double()
    with torch.no_grad():
        layer.noise.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    x = _tokens(17, 4, seed=4).requires_grad_(True)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    eps = torch.randn(17, 6, dtype=torch.float64)
    y_ref, _ = ref_token_choice(layer, x, noise=eps)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(_grads(layer, x, y), _grads(layer, x, y_ref)):
        torch.testing.assert_close(a, b)
    layer.eval()  # no noise at evaluation
    torch.testing.assert_close(layer(x), ref_token_choice(layer, x)[0])


def test_top_k_gate_weights():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    w, idx, probs = top_k_gate(logits, 1)
    assert idx[:, 0].tolist() == [2, 0]
    torch.testing.assert_close(w[:, 0], probs.max(dim=1).values)  # Switch: raw probability for k = 1
    w2, idx2, _ = top_k_gate(logits, 2)
    assert idx2[0].tolist() == [2, 1]
    torch.testing.assert_close(w2.sum(dim=1), torch.ones(2))  # renormalized for k > 1
    torch.testing.assert_close(w2[0, 0], torch.tensor(math.e / (math.e + 1)))


def test_load_balancing_loss_equals_hand_computed_value():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    index = torch.tensor([[0], [0], [1], [0]])
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert float(load_balancing_loss(probs, index)) == pytest.approx(1.15)
    uniform = torch.full((8, 4), 0.25)
    assert float(load_balancing_loss(uniform, torch.arange(8).remainder(4)[:, None])) == pytest.approx(1.0)


def test_router_z_loss_equals_loop_and_hand_value():
    assert float(router_z_loss(torch.zeros(3, 2))) == pytest.approx(math.log(2.0) ** 2)
    logits = _tokens(9, 5)
    ref = sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / 9
    assert float(router_z_loss(logits)) == pytest.approx(ref)


def test_expert_capacity_values():
    assert expert_capacity(10, 4, 1.25) == 4  # ceil(3.125)
    assert expert_capacity(8, 4, 1.0) == 2
    assert expert_capacity(8, 4, 2.0) == 4
    assert expert_capacity(8, 4, 1.0, k=2) == 4
    assert expert_capacity(3, 8, 0.1) == 1


def test_capacity_factor_at_worst_load_gives_zero_drops():
    layer = TokenChoiceMoE(3, 1, 4, 5, 1, k=1, generator=torch.Generator().manual_seed(5)).double()
    x = _tokens(40, 3, seed=6)
    y_free = layer(x)
    load = layer.last_aux["expert_load"] * 40
    worst = int(load.max())
    assert worst > 10  # uneven: the balanced load would be 10
    layer.capacity_factor = worst * 4 / 40
    torch.testing.assert_close(layer(x), y_free)
    assert layer.last_aux["dropped"] == 0.0
    layer.capacity_factor = (worst - 1) * 4 / 40
    layer(x)
    assert layer.last_aux["dropped"] > 0.0


def test_assign_slots_priority_first_choices_first():
    index = torch.tensor([[0, 1], [0, 1], [1, 0]])
    position, keep, cap = assign_slots(index, 2, capacity=2)
    assert position.tolist() == [[0, 1], [1, 2], [0, 2]]
    assert keep.tolist() == [[True, True], [True, False], [True, False]]
    assert cap == 2
    assert assign_slots(index, 2, None)[2] == 3


# ------------------------------------------------------------------ expert choice
@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_expert_choice_equals_per_expert_loop_outputs_and_gradients(cf):
    layer = ExpertChoiceMoE(3, 2, 4, 6, 2, capacity_factor=cf, generator=torch.Generator().manual_seed(7)).double()
    x = _tokens(19, 3, seed=8).requires_grad_(True)
    y = layer(x)
    y_ref, taken = ref_expert_choice(layer, x)
    torch.testing.assert_close(y, y_ref)
    assert layer.last_aux["experts_per_token"].tolist() == taken
    assert layer.last_aux["dropped"] == pytest.approx(sum(t == 0 for t in taken) / 19)
    for a, b in zip(_grads(layer, x, y), _grads(layer, x, y_ref)):
        torch.testing.assert_close(a, b)


def test_expert_choice_never_exceeds_capacity_and_combines_each_kept_token_once():
    layer = ExpertChoiceMoE(3, 1, 5, 4, 1, capacity_factor=1.5, generator=torch.Generator().manual_seed(9))
    x = _tokens(21, 3, seed=10).float()
    cap = expert_capacity(21, 5, 1.5)
    weights, tokens, _ = expert_choice(layer.logits(x), cap)
    assert tokens.shape == (5, cap)
    for row in tokens:
        assert len(set(row.tolist())) == cap  # an expert takes a token at most once, never more than cap
    # constant experts (output 1): each token's output is the sum of the weights of the experts that took it
    with torch.no_grad():
        for w in layer.experts.weights:
            w.zero_()
        for b in layer.experts.biases:
            b.zero_()
        layer.experts.biases[-1].fill_(1.0)
    y = layer(x)
    torch.testing.assert_close(y[:, 0], torch.zeros(21).index_add(0, tokens.flatten(), weights.flatten()))
    counts = torch.bincount(tokens.flatten(), minlength=21)
    assert torch.equal(layer.last_aux["experts_per_token"], counts) and int(counts.sum()) == 5 * cap


# ------------------------------------------------------------------ shapes (hypothesis)
@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 24), N=st.integers(1, 6), k_frac=st.floats(0, 1),
       cf=st.sampled_from([None, 0.5, 1.0, 1.25, 2.0]), n_in=st.integers(1, 4), n_out=st.integers(1, 3),
       seed=st.integers(0, 100))
def test_token_choice_shapes_and_reference(T, N, k_frac, cf, n_in, n_out, seed):
    k = 1 + int(k_frac * (N - 1))
    layer = TokenChoiceMoE(n_in, n_out, N, 3, 1, k=k, capacity_factor=cf,
                           generator=torch.Generator().manual_seed(seed)).double()
    x = _tokens(T, n_in, seed)
    y = layer(x)
    assert y.shape == (T, n_out)
    y_ref, dropped = ref_token_choice(layer, x)
    torch.testing.assert_close(y, y_ref)
    assert layer.last_aux["dropped"] == pytest.approx(dropped)
    assert float(layer.last_aux["expert_load"].sum()) == pytest.approx(1.0)
    if cf is None:
        assert dropped == 0


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 24), N=st.integers(2, 6), cf=st.sampled_from([0.25, 1.0, 2.0, 10.0]), seed=st.integers(0, 100))
def test_expert_choice_shapes_and_reference(T, N, cf, seed):
    # N >= 2: with one expert every score is 1 and the order among tied tokens is not defined
    layer = ExpertChoiceMoE(2, 1, N, 3, 1, capacity_factor=cf, generator=torch.Generator().manual_seed(seed)).double()
    x = _tokens(T, 2, seed)
    y = layer(x)
    assert y.shape == (T, 1)
    torch.testing.assert_close(y, ref_expert_choice(layer, x)[0])
    assert int(layer.last_aux["experts_per_token"].sum()) == N * min(T, math.ceil(cf * T / N - 1e-9))


# ------------------------------------------------------------------ parameter counts
def test_parameter_counts_equal_hand_count():
    layer = TokenChoiceMoE(6, 3, 8, 10, 2, k=2, noisy=True)
    per_expert = (6 * 10 + 10) + (10 * 10 + 10) + (10 * 3 + 3) + 2  # two PReLU slopes
    router = 2 * 6 * 8  # W_g and W_noise
    assert layer.params_total == router + 8 * per_expert
    assert layer.params_active == router + 2 * per_expert
    ec = ExpertChoiceMoE(6, 3, 8, 10, 2, capacity_factor=2.0)
    assert ec.params_active == 6 * 8 + 2 * per_expert


# ------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match=r"k must be an integer >= 1.*got 0"):
        TokenChoiceMoE(2, 1, 4, 3, 1, k=0)
    with pytest.raises(ValueError, match=r"k = 5 is larger than num_experts = 4; use 1 <= k <= 4"):
        TokenChoiceMoE(2, 1, 4, 3, 1, k=5)
    for cf in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"capacity_factor must be a number > 0, got .*None for no dropping"):
            TokenChoiceMoE(2, 1, 4, 3, 1, capacity_factor=cf)
    for cf in (0.0, None):  # expert choice and expert_capacity have no "None drops nothing"
        with pytest.raises(ValueError, match=r"capacity_factor must be a number > 0, got .*token choice only"):
            ExpertChoiceMoE(2, 1, 4, 3, 1, capacity_factor=cf)
        with pytest.raises(ValueError, match=r"capacity_factor must be a number > 0, got .*token choice only"):
            expert_capacity(8, 4, cf)
    layer = TokenChoiceMoE(2, 1, 4, 3, 1)
    for bad in (torch.zeros(3, 5), torch.zeros(2, 3, 2), torch.zeros(0, 2)):
        with pytest.raises(ValueError, match=r"expects tokens of shape \[T, 2\].*got .*reshape"):
            layer(bad)
    x = torch.zeros(3, 2)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"router logits contain \d+ NaN/inf values \(tokens \[1\].*z-loss"):
        layer(x)
    with pytest.raises(ValueError, match="k = 3 is larger than num_experts = 2"):
        top_k_gate(torch.zeros(4, 2), 3)
    for bad in ([[0.0, 1.0]], torch.zeros(3), torch.zeros(0, 2)):
        for route in (lambda z: top_k_gate(z, 1), lambda z: expert_choice(z, 1)):
            with pytest.raises(ValueError, match=r"router logits must have shape \[tokens, experts\] .*got"):
                route(bad)
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 1, got 0"):
        expert_capacity(0, 4, 1.0)


# ------------------------------------------------------------------ the tiny ViT (momlp_lite.moe.transformer)
@pytest.mark.parametrize("kind", ["dense", "top1", "top2", "expert_choice", "soft"])
def test_tiny_vit_counts_and_trains_every_ffn_kind(kind):
    from momlp_lite.moe.transformer import TinyViT, ffn_parameters, make_ffn

    d, h, n = 8, 12, 4
    g = torch.Generator().manual_seed(0)
    ffn = make_ffn(kind, d, h, n, generator=g)
    model = TinyViT([make_ffn("dense", d, h, generator=g), ffn], d, heads=2, patch=7)
    expert = 2 * d * h + h + d
    want = {"dense": (expert, expert), "top1": (d * n + n * expert, d * n + expert),
            "top2": (d * n + n * expert, d * n + 2 * expert), "expert_choice": (d * n + n * expert, d * n + expert),
            "soft": (d * n + 1 + n * 2 * d * h,) * 2}[kind]
    assert ffn_parameters(ffn) == want
    total, active = model.parameter_counts()
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == want[0] - want[1]
    images = torch.rand(3, 1, 28, 28, generator=g)
    out = model(images)
    assert out.shape == (3, 10)
    (out.square().mean() + model.aux_loss(alpha=0.01, beta=0.001)).backward()
    router = getattr(ffn, "router", getattr(ffn, "phi", None))
    if router is not None:
        assert router.grad is not None and float(router.grad.abs().sum()) > 0


def test_dropped_tokens_pass_through_the_residual():
    from momlp_lite.moe.transformer import _Block, make_ffn

    ffn = make_ffn("top1", 6, 5, 3, capacity_factor=0.34, generator=torch.Generator().manual_seed(1))
    block = _Block(6, 2, ffn)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(2))
    y = block(x)
    h = block.ln1(x)
    after_attn = x + block.attn(h, h, h, need_weights=False)[0]
    ffn_out = (y - after_attn).reshape(-1, 6)
    dropped = ffn_out.abs().sum(dim=1) == 0
    assert ffn.last_aux["dropped"] > 0 and int(dropped.sum()) == round(ffn.last_aux["dropped"] * 18)


def test_make_ffn_rejects_unknown_kind():
    from momlp_lite.moe.transformer import make_ffn

    with pytest.raises(ValueError, match=r"kind must be one of .*got 'top3'"):
        make_ffn("top3", 4, 4, 2)
