"""The learned soft tree (fast feedforward style) against a plain per-node, per-leaf loop reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from momlp_lite.moe.sizes import mlp_parameter_count
from momlp_lite.moe.soft_tree import SoftTreeMoE


def _tree(depth: int = 3, n_in: int = 3, n_out: int = 2, seed: int = 0) -> SoftTreeMoE:
    torch.manual_seed(seed)
    tree = SoftTreeMoE(n_in, n_out, depth, width=5, hidden_layers=2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # PReLU slopes differ per expert and layer, so a wrong expert index shows
        tree.experts.slopes.uniform_(0.05, 0.6, generator=torch.Generator().manual_seed(seed + 1))
    return tree


def _expert_ref(tree: SoftTreeMoE, j: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``j`` written out layer by layer from the stack's own parameter tensors (so gradients land there)."""
    st = tree.experts
    h = x
    for k in range(len(st.weights)):
        h = h @ st.weights[k][j] + st.biases[k][j]
        if k < st.hidden_layers:
            h = torch.where(h >= 0, h, st.slopes[j, k] * h)
    return h


def _reference(tree: SoftTreeMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input, per leaf, per node: the path probability, the mixed output, and the leaf probabilities."""
    D, L = tree.depth, tree.num_leaves
    outs, probs = [], []
    for i in range(len(x)):
        xi = x[i : i + 1]
        y = torch.zeros(1, tree.n_out)
        row = []
        for leaf in range(L):
            p = torch.ones(())
            node = 0
            for level in range(D):
                bit = (leaf >> (D - 1 - level)) & 1
                heap = 2**level - 1 + node
                c = torch.sigmoid(xi[0] @ tree.node_weight[heap] + tree.node_bias[heap])
                p = p * (c if bit else 1 - c)
                node = 2 * node + bit
            row.append(p)
            y = y + p * _expert_ref(tree, leaf, xi)
        outs.append(y)
        probs.append(torch.stack(row))
    return torch.cat(outs), torch.stack(probs)


def _greedy_leaf(tree: SoftTreeMoE, x: torch.Tensor) -> list[int]:
    out = []
    for i in range(len(x)):
        node = 0
        for level in range(tree.depth):
            heap = 2**level - 1 + node
            z = float((x[i] @ tree.node_weight[heap] + tree.node_bias[heap]).detach())
            node = 2 * node + (1 if z > 0 else 0)
        out.append(node)
    return out


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_soft_forward_and_gradients_equal_the_per_node_loop(depth):
    tree = _tree(depth)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))
    w = torch.randn(7, 2, generator=torch.Generator().manual_seed(6))
    tree.train()
    fast = tree(x)
    probs, _ = tree.route_soft(x)
    grads_fast = torch.autograd.grad((fast * w).sum(), list(tree.parameters()))
    ref, ref_probs = _reference(tree, x)
    grads_ref = torch.autograd.grad((ref * w).sum(), list(tree.parameters()))
    assert torch.allclose(fast, ref, atol=1e-5)
    assert torch.allclose(probs, ref_probs, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(7))
    for name_param, gf, gr in zip(tree.named_parameters(), grads_fast, grads_ref):
        assert torch.allclose(gf, gr, atol=1e-5), name_param[0]
        assert gr.abs().sum() > 0, name_param[0]  # every parameter gets a gradient in soft mode


def test_hardening_loss_is_the_entropy_of_the_leaf_distribution_and_has_its_gradient():
    tree = _tree(3)
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(1))
    _, ref_probs = _reference(tree, x)
    direct = -(ref_probs * ref_probs.log()).sum(1)
    _, chain = tree.route_soft(x)
    assert torch.allclose(chain, direct, atol=1e-5)
    g_chain = torch.autograd.grad(chain.sum(), [tree.node_weight, tree.node_bias])
    g_direct = torch.autograd.grad(direct.sum(), [tree.node_weight, tree.node_bias])
    for a, b in zip(g_chain, g_direct):
        assert torch.allclose(a, b, atol=1e-5)
    tree.train()
    tree(x)
    assert torch.allclose(tree.last_aux["hardening"], direct.mean(), atol=1e-5)
    assert 0 < float(direct.max().detach()) <= 3 * math.log(2) + 1e-6  # at most log(#leaves)


def test_node_entropy_is_stable_and_correct():
    tree = SoftTreeMoE(1, 1, 1, width=2, hidden_layers=1)
    with torch.no_grad():  # one node with logit z = x
        tree.node_weight.fill_(1.0)
        tree.node_bias.zero_()
    z = torch.tensor([-200.0, -3.0, 0.0, 2.5, 200.0])
    c = torch.sigmoid(z[1:4])
    want = -(c * c.log() + (1 - c) * (1 - c).log())
    got = tree.route_soft(z[:, None])[1].detach()
    assert torch.allclose(got[1:4], want, atol=1e-6)
    assert torch.isfinite(got).all() and got[0] < 1e-30 and got[-1] < 1e-30
    assert torch.isclose(got[2], torch.tensor(math.log(2)))


def test_hardening_gives_exactly_one_leaf_per_input_and_the_greedy_path():
    tree = _tree(4).eval()
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(2))
    leaf = tree.hard_leaf(x)
    assert leaf.shape == (200,) and leaf.dtype == torch.long
    assert int(leaf.min()) >= 0 and int(leaf.max()) < tree.num_leaves
    assert leaf.tolist() == _greedy_leaf(tree, x)
    one_hot = F.one_hot(leaf, tree.num_leaves)
    assert (one_hot.sum(1) == 1).all()
    assert len(torch.unique(leaf)) > 1  # the tree does split the data
    # eval mode runs exactly that one leaf
    y = tree(x)
    want = torch.stack([_expert_ref(tree, int(j), x[i : i + 1])[0] for i, j in enumerate(leaf)])
    assert torch.allclose(y, want, atol=1e-5)
    load = tree.last_aux["expert_load"]
    assert torch.allclose(load, torch.bincount(leaf, minlength=16).float() / 200)


def test_sharp_nodes_make_soft_and_hard_routing_agree():
    tree = _tree(3)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tree.node_weight.mul_(1e4)
        tree.node_bias.mul_(1e4)
    probs, entropy = tree.route_soft(x)
    leaf = tree.hard_leaf(x)
    assert torch.equal(probs.argmax(1), leaf)
    assert torch.allclose(tree.hard_leaf_mass(x), torch.ones(50), atol=1e-4)
    assert float(entropy.max()) < 1e-3
    soft = tree.train()(x)
    hard = tree.eval()(x)
    assert torch.allclose(soft, hard, atol=1e-3)


def test_minimizing_the_hardening_penalty_drives_the_hard_leaf_mass_to_one():
    tree = _tree(3)
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(4))
    before = float(tree.hard_leaf_mass(x).mean())
    opt = torch.optim.Adam([tree.node_weight, tree.node_bias], lr=0.05)
    for _ in range(300):
        _, entropy = tree.route_soft(x)
        opt.zero_grad()
        entropy.mean().backward()
        opt.step()
    after = float(tree.hard_leaf_mass(x).mean())
    assert before < 0.5 and after > 0.9, (before, after)


def test_parameter_counts_by_hand():
    tree = SoftTreeMoE(3, 2, depth=4, width=6, hidden_layers=2)
    per_expert = mlp_parameter_count(3, 6, 2, 2, prelu=True)
    assert tree.params_total == sum(p.numel() for p in tree.parameters())
    assert tree.params_total == 15 * 4 + 16 * per_expert
    assert tree.params_active == 4 * 4 + per_expert


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        SoftTreeMoE(2, 1, depth=0, width=4, hidden_layers=1)
    with pytest.raises(ValueError, match="depth must be <= 16"):
        SoftTreeMoE(2, 1, depth=17, width=4, hidden_layers=1)
    tree = SoftTreeMoE(2, 1, depth=2, width=4, hidden_layers=1)
    with pytest.raises(ValueError, match=r"shape \[N, 2\], got \(5, 3\)"):
        tree(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        tree.hard_leaf(torch.zeros(2))
