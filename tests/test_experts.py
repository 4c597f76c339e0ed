"""StackedMLP: stacked experts must compute exactly what L separate nn.Modules compute."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from momlp_lite.moe.experts import StackedMLP
from momlp_lite.moe.sizes import mlp_parameter_count

SHAPES = [
    dict(prelu=True, batchnorm=False),
    dict(prelu=False, batchnorm=False),
    dict(prelu=True, batchnorm=True),
]



def make(L=5, n_in=3, width=7, hidden=2, n_out=2, seed=0, **kw) -> StackedMLP:
    return StackedMLP(L, n_in, width, hidden, n_out, generator=torch.Generator().manual_seed(seed), **kw)


def perturb_(m: StackedMLP, seed: int = 1) -> None:
    """Move every parameter/buffer away from its init so that tests see all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.state_dict().values():  # state_dict tensors share the parameters' storage
            if t.is_floating_point():
                t.add_(0.1 * torch.rand(t.shape, generator=g))


@pytest.mark.parametrize("kw", SHAPES)
def test_forward_matches_expert_modules(kw):
    m = make(**kw)
    perturb_(m)
    x = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(2))
    for mode in ("train", "eval"):
        getattr(m, mode)()
        mods = [getattr(m.expert_module(i), mode)() for i in range(5)]
        y = m(x)
        want = torch.stack([mods[i](x[i]) for i in range(5)])
        assert y.shape == (5, 6, 2)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        if kw["batchnorm"] and mode == "train":
            # running statistics moved exactly as nn.BatchNorm1d moves them
            for i in range(5):
                torch.testing.assert_close(m.running_mean_0[i], mods[i][1].running_mean)
                torch.testing.assert_close(m.running_var_1[i], mods[i][4].running_var)
                assert int(m.num_batches_tracked[i]) == int(mods[i][1].num_batches_tracked)


@pytest.mark.parametrize("kw", SHAPES)
def test_parameter_count_matches_sizes(kw):
    m = make(L=4, **kw)
    per = mlp_parameter_count(3, 7, 2, 2, prelu=kw["prelu"], batchnorm=kw["batchnorm"])
    assert m.parameters_per_expert == per
    assert sum(p.numel() for p in m.parameters()) == 4 * per
    assert sum(p.numel() for p in m.expert_module(0).parameters()) == per


def test_experts_are_independent():
    m = make(batchnorm=True)
    x = torch.randn(5, 4, 3)
    m(x)[2].pow(2).sum().backward()
    for p in m.parameters():
        others = torch.cat([p.grad[:2].flatten(), p.grad[3:].flatten()])
        assert torch.count_nonzero(others) == 0
        assert torch.count_nonzero(p.grad[2]) > 0


@pytest.mark.parametrize("kw", SHAPES)
def test_forward_routed_in_input_order(kw):
    m = make(L=6, **kw).eval()
    perturb_(m)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g)
    leaf = torch.randint(0, 6, (40,), generator=g)
    leaf[:5] = 4  # an unbalanced leaf
    mods = [m.expert_module(i).eval() for i in range(6)]
    want = torch.stack([mods[int(l)](x[i : i + 1])[0] for i, l in enumerate(leaf)])
    for block in (1 << 24, 7, 1):  # one block, several, one row per block
        torch.testing.assert_close(m.forward_routed(x, leaf, max_block=block), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    leaves=st.lists(st.integers(0, 4), min_size=0, max_size=30),
    seed=st.integers(0, 1000),
)
def test_forward_routed_equals_lockstep(leaves, seed):
    """Routing rows one by one through the lockstep path gives the routed result."""
    m = make(L=5, seed=seed).eval()
    leaf = torch.tensor(leaves, dtype=torch.long)
    x = torch.randn(len(leaves), 3, generator=torch.Generator().manual_seed(seed))
    y = m.forward_routed(x, leaf)
    assert y.shape == (len(leaves), 2)
    for i in range(len(leaves)):
        full = m(x[i : i + 1])  # every expert on row i: [5, 1, 2]
        torch.testing.assert_close(y[i], full[leaf[i], 0], rtol=1e-5, atol=1e-6)


def test_forward_routed_on_subset_uses_global_ids():
    m = make(L=8).eval()
    sub = m.subset([6, 2]).eval()
    assert sub.expert_ids.tolist() == [6, 2] and sub.num_experts == 2
    x = torch.randn(9, 3)
    leaf = torch.tensor([2, 6, 6, 2, 2, 6, 2, 2, 6])
    torch.testing.assert_close(sub.forward_routed(x, leaf), m.forward_routed(x, leaf))
    with pytest.raises(ValueError, match=r"leaf ids \[3\]"):
        sub.forward_routed(x, torch.tensor([2, 3, 6, 2, 2, 6, 2, 2, 6]))
    with pytest.raises(ValueError, match="does not hold"):
        sub.forward_routed(x[:1], torch.tensor([-1]))


def test_state_roundtrip_one_file_per_expert(tmp_path):
    m = make(L=4, batchnorm=True)
    perturb_(m)
    for i in range(4):
        save_file(m.expert_state(i), tmp_path / f"expert_{i}.safetensors")
    states = [load_file(tmp_path / f"expert_{i}.safetensors") for i in (3, 1)]
    back = StackedMLP(2, expert_ids=[3, 1], **m.config)
    back.load_state_dict({**{k: torch.stack([s[k] for s in states]) for k in states[0]},
                          "expert_ids": torch.tensor([3, 1])}, strict=True)
    m.eval(), back.eval()
    x = torch.randn(10, 3)
    leaf = torch.tensor([1, 3] * 5)
    torch.testing.assert_close(back.forward_routed(x, leaf), m.forward_routed(x, leaf))


def test_subset_then_load_back():
    m = make(L=5, batchnorm=True)
    sub = m.subset([4, 0])
    perturb_(sub, seed=9)
    before = m.expert_state(2)
    m.load_experts_(sub)
    for gid in (4, 0):
        for k, v in sub.expert_state(gid).items():
            assert torch.equal(m.expert_state(gid)[k], v)
    for k, v in m.expert_state(2).items():  # untouched expert unchanged
        assert torch.equal(before[k], v)
    with pytest.raises(ValueError, match="shape"):
        m.load_experts_(make(L=1, width=3))


def test_module_roundtrip():
    m = make(batchnorm=True)
    mod = m.expert_module(3)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(1.0)
    m.load_expert_module_(3, mod)
    torch.testing.assert_close(m.expert_module(3)[0].weight, mod[0].weight)
    assert float(m.slopes[3, 0].detach()) == pytest.approx(0.25 + 1.0)
    with pytest.raises(ValueError, match="layout"):
        m.load_expert_module_(3, nn.Sequential(nn.Linear(3, 2)))


def test_dense_with_budget():
    experts = make(L=16, n_in=2, width=10, hidden=3, n_out=1)
    budget = experts.num_experts * experts.parameters_per_expert
    dense = StackedMLP.dense_with_budget(budget, n_in=2, hidden_layers=3, n_out=1)
    assert dense.num_experts == 1
    assert dense.parameters_per_expert <= budget
    bigger = StackedMLP(1, 2, dense.width + 1, 3, 1)
    assert bigger.parameters_per_expert > budget


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_experts"):
        StackedMLP(0, 2, 3, 1)
    with pytest.raises(ValueError, match="distinct"):
        StackedMLP(2, 2, 3, 1, expert_ids=[1, 1])
    m = make()
    with pytest.raises(ValueError, match=r"\[5, B, 3\]"):
        m(torch.zeros(4, 2, 3))
    with pytest.raises(ValueError, match="one leaf id per row"):
        m.forward_routed(torch.zeros(3, 3), torch.zeros(2, dtype=torch.long))
    bn = make(batchnorm=True)
    with pytest.raises(ValueError, match="eval"):
        bn.forward_routed(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 samples"):
        bn(torch.zeros(5, 1, 3))
    assert m.forward_routed(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).shape == (0, 2)


def test_broadcast_input_and_bf16_autocast():
    m = make()
    x = torch.randn(4, 3)
    torch.testing.assert_close(m(x), m(x.expand(5, 4, 3)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kw", SHAPES)
def test_fold_affine_matches_standardized_experts(kw):
    m = make(**kw).eval()
    perturb_(m)
    g = torch.Generator().manual_seed(5)
    shift, scale = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.5
    oshift, oscale = torch.randn(5, 2, generator=g), torch.rand(5, 2, generator=g) + 0.5
    x = torch.randn(5, 4, 3, generator=g)
    want = oscale[:, None] * m((x - shift[:, None]) / scale[:, None]) + oshift[:, None]
    m.fold_affine_(shift, scale, oshift, oscale)
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)


def test_seeded_init_does_not_depend_on_the_other_experts():
    full = StackedMLP(8, 3, 5, 2, 1, seed=3, batchnorm=True)
    part = StackedMLP(2, 3, 5, 2, 1, seed=3, batchnorm=True, expert_ids=[5, 1])
    for gid in (5, 1):
        for k, v in full.expert_state(gid).items():
            assert torch.equal(part.expert_state(gid)[k], v), k
    assert not torch.equal(full.weights[0][0], full.weights[0][1])
    assert not torch.equal(StackedMLP(8, 3, 5, 2, 1, seed=4).weights[0], full.weights[0])
    with pytest.raises(ValueError, match="not both"):
        StackedMLP(2, 3, 5, 2, 1, seed=3, generator=torch.Generator())
