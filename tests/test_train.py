"""Algorithm 2: the lockstep trainer must train each expert exactly as the serial reference does."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from momlp_lite.moe.experts import StackedMLP
from momlp_lite.moe.fast import FastOptions, FastStep
from momlp_lite.moe.order import LockstepSampler, split_by_leaf
from momlp_lite.moe.reference import train_experts_serial
from momlp_lite.moe.routing import RoutingTree
from momlp_lite.moe.trainer import NonFiniteLossError, TrainConfig, per_expert_loss, train_experts



def regression_data(n=600, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g)
    y = torch.sin(4 * x[:, :1]) + x[:, 1:] ** 2
    leaf = torch.randint(0, L, (n,), generator=g)
    return x, y, leaf


def assert_same_experts(a: StackedMLP, b: StackedMLP, ids, atol=2e-5, skip=()):
    for gid in ids:
        sa, sb = a.expert_state(gid), b.expert_state(gid)
        for k in sa:
            if k not in skip:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=atol, msg=f"expert {gid} {k}")


CASES = {
    "mse-adam": dict(kw=dict(prelu=True), cfg=dict(loss="mse", optimizer="adam", lr=3e-3)),
    "ce-adamw-relu": dict(kw=dict(prelu=False), cfg=dict(loss="cross_entropy", optimizer="adamw", lr=3e-2)),
}


def class_labels(x, y):
    return (y[:, 0] > y.median()).long() + (x[:, 0] > 0.5).long()


@pytest.mark.parametrize("name", CASES)
def test_batched_training_equals_serial(name):
    case = CASES[name]
    x, y, leaf = regression_data()
    # a tiny leaf (no validation split) and an expert the data never reach
    leaf[leaf == 5] = 4
    leaf[:3] = 5
    L, n_out = 7, 1
    if case["cfg"]["loss"] == "cross_entropy":
        y, n_out = class_labels(x, y), 3
    model = StackedMLP(L, 2, 8, 2, n_out, generator=torch.Generator().manual_seed(1), **case["kw"])
    cfg = TrainConfig(batch_size=16, max_steps=60, eval_every=5, patience=1, val_fraction=0.2,
                      progress=False, seed=3, device="cpu", **case["cfg"])
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    results = []
    for train, m in ((train_experts, a), (train_experts_serial, b)):
        with pytest.warns(UserWarning) as caught:
            results.append(train(m, x, y, leaf, cfg))
        messages = " | ".join(str(w.message) for w in caught)
        assert "no training data" in messages and "ids [6]" in messages
        assert "too few samples for a validation split (ids [5])" in messages
    ra, rb = results
    assert ra.expert_ids == rb.expert_ids == [0, 1, 2, 3, 4, 5] and ra.skipped_ids == [6]
    # early stopping really happened for some experts, at different steps, and not for the tiny one
    stops = ra.stop_step[:5]
    assert (stops > 0).sum() >= 2 and len(set(stops[stops > 0])) >= 2
    assert ra.stop_step[5] == -1 and ra.best_step[5] == -1
    np.testing.assert_array_equal(ra.stop_step, rb.stop_step)
    np.testing.assert_array_equal(ra.best_step, rb.best_step)
    np.testing.assert_allclose(ra.val_loss, rb.val_loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ra.train_loss, rb.train_loss, rtol=1e-4, atol=1e-6)
    assert_same_experts(a, b, range(L))
    # and training changed the trained experts, not the skipped one
    assert not torch.equal(a.weights[0][0], model.weights[0][0])
    assert torch.equal(a.weights[0][6], model.weights[0][6])


def test_batched_training_equals_serial_with_batchnorm():
    """Per-expert BatchNorm in lockstep = nn.BatchNorm1d per expert.

    A bias right before BatchNorm has zero gradient in exact arithmetic (BN subtracts the batch
    mean); Adam divides its rounding noise by its own tiny RMS and walks it by about ``lr`` per step,
    differently in bmm and in mm. So those biases, and the running means that carry them, are not
    comparable between any two implementations; every other tensor is.
    """
    x, y, leaf = regression_data(L=4)
    y = class_labels(x, y)
    model = StackedMLP(4, 2, 8, 2, 3, batchnorm=True, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(loss="cross_entropy", optimizer="adamw", lr=1e-2, batch_size=16, max_steps=40,
                      eval_every=10, patience=None, progress=False, device="cpu")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra, rb = train_experts(a, x, y, leaf, cfg), train_experts_serial(b, x, y, leaf, cfg)
    np.testing.assert_allclose(ra.train_loss, rb.train_loss, rtol=1e-4, atol=1e-6)
    redundant = ("biases.0", "biases.1", "running_mean_0", "running_mean_1")
    assert_same_experts(a, b, range(4), skip=redundant)
    assert int(a.num_batches_tracked[0]) == 40


def test_subset_of_experts_reproduces_full_run():
    """What one process of a distributed run trains equals the full lockstep run for those ids."""
    x, y, leaf = regression_data(L=5)
    model = StackedMLP(5, 2, 8, 2, 1, generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(batch_size=8, max_steps=30, eval_every=10, lr=1e-3, progress=False, device="cpu")
    full, part = copy.deepcopy(model), copy.deepcopy(model)
    train_experts(full, x, y, leaf, cfg)
    res = train_experts(part, x, y, leaf, cfg, expert_ids=[3, 1])
    assert res.expert_ids == [3, 1]
    assert_same_experts(full, part, [3, 1], atol=1e-6)
    assert_same_experts(part, model, [0, 2, 4], atol=0)  # untouched


def test_training_lowers_loss_and_restores_best():
    x, y, leaf = regression_data(n=800, L=4)
    model = StackedMLP(4, 2, 16, 2, 1, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=32, max_steps=300, eval_every=20, lr=3e-3, patience=3, progress=False,
                      device="cpu", val_fraction=0.25)
    res = train_experts(model, x, y, leaf, cfg)
    assert res.val_loss.shape == (len(res.eval_steps), 4) and res.eval_steps[0] == 0
    first, best = res.val_loss[0], res.best_val
    assert np.all(best < 0.2 * first), (first, best)
    assert res.seconds > 0
    # the model holds the best-validation parameters: recompute the validation loss
    split = split_by_leaf(leaf, torch.arange(4), cfg.val_fraction, cfg.seed)
    model.eval()
    with torch.no_grad():
        pred = model.forward_routed(x[split.val_rows], leaf[split.val_rows])
    rows = per_expert_loss(pred[:, None], y[split.val_rows][:, None], "mse")
    per = torch.zeros(4).index_add_(0, torch.repeat_interleave(torch.arange(4), split.n_val), rows) / split.n_val
    np.testing.assert_allclose(per.numpy(), best, rtol=1e-4)
    assert res.expert_ids == [0, 1, 2, 3] and np.nanmin(res.val_loss[:, 2]) == pytest.approx(best[2])


def test_split_by_leaf_partitions_each_leaf():
    leaf = torch.tensor([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3] * 3)
    ids = torch.tensor([2, 0, 1])
    s = split_by_leaf(leaf, ids, 0.25, seed=4)
    rows = torch.cat([s.train_rows, s.val_rows])
    assert len(torch.unique(rows)) == len(rows)
    assert set(rows.tolist()) == set(torch.nonzero(leaf != 3).flatten().tolist())
    counts = torch.tensor([30, 3, 6])
    assert s.n_val.tolist() == torch.floor(counts * 0.25).long().tolist()
    assert (s.n_train + s.n_val).tolist() == counts.tolist()
    assert torch.equal(leaf[s.train_rows], torch.repeat_interleave(ids, s.n_train))
    # an expert's split does not depend on the other experts trained with it
    alone = split_by_leaf(leaf, torch.tensor([2]), 0.25, seed=4)
    assert torch.equal(alone.val_rows, s.val_rows[: int(s.n_val[0])])
    assert not torch.equal(split_by_leaf(leaf, ids, 0.25, seed=5).val_rows, s.val_rows)


def test_sampler_walks_permutations():
    n = torch.tensor([10, 3, 25])
    ids = torch.tensor([7, 0, 2])
    smp = LockstepSampler(n, ids, batch_size=4, seed=1)
    steps = [smp.indices(t) for t in range(12)]
    assert all(s.shape == (3, 4) for s in steps)
    # expert 2 (25 samples, 6 batches per epoch): each epoch's 24 samples are distinct
    epoch0 = torch.cat([s[2] for s in steps[:6]])
    assert len(torch.unique(epoch0)) == 24 and int(epoch0.max()) < 25
    epoch1 = torch.cat([s[2] for s in steps[6:12]])
    assert not torch.equal(epoch0, epoch1)
    # expert 0 (3 samples < batch): every batch holds all 3 samples, one repeated
    for s in steps:
        assert set(s[1].tolist()) == {0, 1, 2}
    # expert 7's stream is the same when sampled alone
    alone = LockstepSampler(n[:1], ids[:1], batch_size=4, seed=1)
    for t in range(12):
        assert torch.equal(alone.indices(t)[0], steps[t][0])
    with pytest.raises(ValueError, match="at least one sample"):
        LockstepSampler(torch.tensor([0]), torch.tensor([0]), 4, 0)


def test_dense_baseline_trains():
    x, y, _ = regression_data(n=400)
    dense = StackedMLP.dense_with_budget(4 * StackedMLP(4, 2, 8, 2, 1).parameters_per_expert, 2, 2, 1)
    one_leaf = RoutingTree.single(2).route(x)
    res = train_experts(dense, x, y, one_leaf, TrainConfig(batch_size=32, max_epochs=3, lr=3e-3, progress=False,
                                                           device="cpu"))
    assert res.expert_ids == [0] and res.steps_run == int(np.ceil(3 * res.n_train[0] / 32))
    assert res.best_val[0] < res.val_loss[0, 0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l1")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)
    x, y, leaf = regression_data(n=50)
    m = StackedMLP(6, 2, 4, 1)
    cfg = TrainConfig(progress=False, max_steps=2, device="cpu")
    with pytest.raises(ValueError, match=r"y\[:, None\]"):
        train_experts(m, x, y[:, 0], leaf, cfg)
    with pytest.raises(ValueError, match="does not hold"):
        train_experts(m, x, y, leaf, cfg, expert_ids=[9])
    with pytest.raises(ValueError, match=">= 0"):
        train_experts(m, x, y, leaf - 1, cfg)
    with pytest.raises(ValueError, match="class ids"):
        train_experts(m, x, y, leaf, TrainConfig(loss="cross_entropy", progress=False, device="cpu"))


def test_gpu_levers_are_safe_on_cpu():
    """bf16 autocast runs on a CPU; CUDA-only levers (graphs, compile) are ignored there."""
    x, y, leaf = regression_data(n=300, L=3)
    model = StackedMLP(3, 2, 8, 2, 1, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=16, max_steps=40, eval_every=20, lr=3e-3, progress=False, device="cpu")
    opts = FastOptions(bf16=True, cuda_graph=True, compile=True)
    res = train_experts(model, x, y, leaf, cfg, make_step=lambda net, cfg: FastStep(net, cfg, opts))
    assert np.all(res.best_val < res.val_loss[0])
    assert model.weights[0].dtype == torch.float32  # fp32 master weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("lever", ["cuda_graph", "bf16", "compile"])
def test_gpu_levers_match_eager_training(lever):
    """On a GPU: a CUDA-graph step (warm-up undone) trains exactly like the eager step; bf16 and
    torch.compile stay close to it."""
    dev = torch.device("cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    base = StackedMLP(8, 3, 32, 3, 1, seed=0, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [(torch.randn(8, 64, 3, device=dev, generator=g), torch.randn(8, 64, 1, device=dev, generator=g))
               for _ in range(6)]
    runs = {}
    for name in ("eager", lever):
        model = copy.deepcopy(base)
        opts = FastOptions(**({} if name == "eager" else {lever: True}))
        step = FastStep(model, TrainConfig(lr=1e-3, progress=False), opts, dev)
        losses = [step(x, y) for x, y in batches]
        runs[name] = (model, torch.stack(losses))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    tol = dict(rtol=1e-4, atol=1e-5) if lever != "bf16" else dict(rtol=0.1, atol=0.02)
    torch.testing.assert_close(runs[lever][1], runs["eager"][1], **tol)
    for (k, a), b in zip(runs["eager"][0].state_dict().items(), runs[lever][0].state_dict().values()):
        torch.testing.assert_close(b, a, **tol, msg=k)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_records_do_not_depend_on_the_lockstep_group(loss):
    """Issue 15 item 8: experts 0..7 in one group or in groups {0..3}, {4..7}: the same best_val_loss,
    best step, stop step and weights, bit for bit (validation runs in fixed-size chunks, no padding effect).
    Not covered: a group of ONE expert, whose batch-1 matmuls round differently on this CPU (last-bit
    differences in the weights)."""
    x, y, leaf = regression_data(n=2400, L=8, seed=5)
    n_out = 1
    if loss == "cross_entropy":
        y, n_out = class_labels(x, y), 3
    model = StackedMLP(8, 2, 16, 2, n_out, seed=3)
    cfg = TrainConfig(loss=loss, lr=3e-2, batch_size=16, max_steps=150, eval_every=5, patience=1,
                      val_fraction=0.3, progress=False, device="cpu")
    whole, parts = copy.deepcopy(model), copy.deepcopy(model)
    one = train_experts(whole, x, y, leaf, cfg)
    halves = [train_experts(parts, x, y, leaf, cfg, expert_ids=ids) for ids in ([0, 1, 2, 3], [4, 5, 6, 7])]
    best = np.concatenate([h.best_val for h in halves])
    assert best.tobytes() == one.best_val.tobytes()
    assert np.array_equal(np.concatenate([h.best_step for h in halves]), one.best_step)
    assert np.array_equal(np.concatenate([h.stop_step for h in halves]), one.stop_step)
    assert (one.stop_step > 0).any()  # early stopping took part
    assert_same_experts(whole, parts, range(8), atol=0)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, parts.state_dict()[k]), k


@pytest.mark.parametrize("train", [train_experts, train_experts_serial])
def test_a_loss_that_becomes_non_finite_stops_training_with_a_clear_error(train):
    """Issue 15 item 3: an expert whose loss overflows is never recorded as trained."""
    x, y, leaf = regression_data(n=400, L=4)
    y = torch.where(leaf[:, None] == 2, torch.full_like(y, 3e19), y)  # finite targets whose squares overflow
    model = StackedMLP(4, 2, 8, 2, 1, seed=0)
    before = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=30, eval_every=10, progress=False, device="cpu")
    with pytest.raises(NonFiniteLossError, match=r"experts \[2\].*step 0") as err:
        train(model, x, y, leaf, cfg)
    assert err.value.experts == [2] and isinstance(err.value, FloatingPointError)
    assert_same_experts(model, before, range(4), atol=0)  # nothing was written back


@pytest.mark.parametrize("train", [train_experts, train_experts_serial])
def test_divergence_during_training_names_the_expert_and_the_step(train):
    x, y, leaf = regression_data(n=400, L=3)
    model = StackedMLP(3, 2, 8, 2, 1, seed=0)
    cfg = TrainConfig(lr=1e17, batch_size=16, max_steps=40, eval_every=5, patience=None, progress=False,
                      device="cpu")
    with pytest.raises(NonFiniteLossError) as err:
        train(model, x, y, leaf, cfg)
    e = err.value
    assert e.experts and set(e.experts) <= {0, 1, 2} and e.step > 0
    assert f"experts {e.experts}" in str(e) and f"step {e.step}" in str(e)


def test_dense_baseline_is_a_one_leaf_momlp():
    """RoutingTree.single + a stack of one expert, trained by Algorithm 2, equals the plain serial reference."""
    x, y, _ = regression_data(n=300)
    tree = RoutingTree.single(2)
    assert tree.num_leaves == 1 and tree.depth == 0 and tree.path_parameter_count == 0
    model = StackedMLP(1, 2, 8, 2, 1, seed=4)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    cfg = TrainConfig(batch_size=32, max_steps=30, eval_every=10, lr=3e-3, progress=False, device="cpu")
    ra = train_experts(a, x, y, tree.route(x), cfg)
    rb = train_experts_serial(b, x, y, tree.route(x), cfg)
    assert ra.expert_ids == rb.expert_ids == [0]
    assert np.allclose(ra.best_val, rb.best_val, rtol=1e-5)
    assert_same_experts(a, b, [0], atol=1e-5)


def test_serial_reference_equals_lockstep_on_a_subset_of_experts():
    x, y, leaf = regression_data(L=5)
    model = StackedMLP(5, 2, 8, 2, 1, seed=2)
    cfg = TrainConfig(batch_size=8, max_steps=40, eval_every=5, patience=2, lr=3e-3, progress=False, device="cpu")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = train_experts(a, x, y, leaf, cfg, expert_ids=[4, 1])
    rb = train_experts_serial(b, x, y, leaf, cfg, expert_ids=[4, 1])
    assert ra.expert_ids == rb.expert_ids == [4, 1]
    np.testing.assert_array_equal(ra.stop_step, rb.stop_step)
    np.testing.assert_allclose(ra.best_val, rb.best_val, rtol=1e-5)
    assert_same_experts(a, b, [4, 1])
    assert_same_experts(b, model, [0, 2, 3], atol=0)
