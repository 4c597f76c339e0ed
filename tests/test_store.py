"""Checked expert files, atomic saves, manifests (and the expert store built on them)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momlp_lite.moe.routing import RoutingTree
from momlp_lite.store import files
from momlp_lite.store.experts import MANIFEST_NAME, read_manifest, write_manifest
from momlp_lite.store.files import (CHECKSUM_KEY, StoreError, expert_file_ok, is_temporary_file, load_expert_file,
                                  save_expert_file)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w0": torch.randn(5, 7, generator=g),
        "b0": torch.randn(7, generator=g).to(torch.float64),
        "slope": torch.tensor(0.25),
        "count": torch.arange(4, dtype=torch.int64),
        "half": torch.randn(3, 2, generator=g).to(torch.bfloat16),
    }


def _plant_pickle(path: Path, key: str) -> Path:
    """Write a torch.save (pickle) file at ``path`` that would touch the returned marker if it were unpickled."""
    marker = path.parent / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({key: Evil()}, path)
    return marker


def _data_start(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


# ---------------------------------------------------------------------------- round trip
def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    t = _tensors()
    digest = save_expert_file(tmp_path / "e.safetensors", t, {"leaf": "3", "width": "16"})
    back, meta = load_expert_file(tmp_path / "e.safetensors")
    assert meta == {"leaf": "3", "width": "16"}
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
        assert torch.equal(back[k], t[k])
    assert len(digest) == 64 and digest == files.tensor_checksum(t, meta)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int32, torch.uint8]),
)
def test_round_trip_any_shape_and_dtype(tmp_path_factory: pytest.TempPathFactory, shape: list[int], dtype: torch.dtype) -> None:
    path = tmp_path_factory.mktemp("rt") / "x.safetensors"
    x = (torch.arange(int(torch.tensor(shape).prod()) if shape else 1) % 7).reshape(shape).to(dtype)
    save_expert_file(path, {"x": x})
    back, meta = load_expert_file(path)
    assert meta == {} and back["x"].dtype == dtype and torch.equal(back["x"], x)


def test_saving_leaves_no_temporary_files(tmp_path: Path) -> None:
    save_expert_file(tmp_path / "a.safetensors", _tensors())
    save_expert_file(tmp_path / "a.safetensors", _tensors(1))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({}, None, "tensors is empty"),
        ({"x": [1.0]}, None, "must be a torch.Tensor"),
        ({"x": torch.ones(1)}, {"n": 3}, "str to str"),
        ({"x": torch.ones(1)}, {CHECKSUM_KEY: "x"}, "reserved"),
    ],
)
def test_bad_payloads_are_refused(tmp_path: Path, tensors, metadata, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        save_expert_file(tmp_path / "x.safetensors", tensors, metadata)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- corrupted files
def test_missing_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        load_expert_file(tmp_path / "nope.safetensors")
    assert isinstance(StoreError("x"), ValueError)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_file_is_a_store_error(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "e.safetensors"
    save_expert_file(path, _tensors())
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) - 3])
    with pytest.raises(StoreError, match="not a readable safetensors"):
        load_expert_file(path)
    assert not expert_file_ok(path)


def test_flipped_tensor_byte_fails_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_expert_file(path, _tensors(), {"leaf": "0"})
    assert expert_file_ok(path)
    data = bytearray(path.read_bytes())
    data[_data_start(path) + 3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="fails its checksum"):
        load_expert_file(path)


def test_tampered_metadata_fails_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_expert_file(path, _tensors(), {"leaf": "3"})
    data = path.read_bytes()
    assert data.count(b'"leaf":"3"') == 1
    path.write_bytes(data.replace(b'"leaf":"3"', b'"leaf":"4"'))  # same length: still valid safetensors
    with pytest.raises(StoreError, match="fails its checksum"):
        load_expert_file(path)


def test_file_without_checksum_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(2)}, str(path))
    with pytest.raises(StoreError, match="no 'momlp_sha256' checksum"):
        load_expert_file(path)


def test_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    """A torch.save (pickle) file renamed to .safetensors is refused without being unpickled."""
    path = tmp_path / "e.safetensors"
    marker = _plant_pickle(path, "x")
    with pytest.raises(StoreError):
        load_expert_file(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- interrupted saves
@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_interrupted_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    path = tmp_path / "e.safetensors"
    old = _tensors(0)
    save_expert_file(path, old, {"v": "old"})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(files.os, fail_at, boom)
    with pytest.raises(KeyboardInterrupt):
        save_expert_file(path, _tensors(1), {"v": "new"})
    monkeypatch.undo()
    back, meta = load_expert_file(path)
    assert meta == {"v": "old"} and all(torch.equal(back[k], old[k]) for k in old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]


def test_crash_leftover_temp_file_is_recognizable(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    save_expert_file(path, _tensors())
    leftover = tmp_path / f".e.safetensors{files.TMP_MARK}abc123"
    leftover.write_bytes(path.read_bytes()[:50])  # what a killed process leaves behind
    assert is_temporary_file(leftover) and not is_temporary_file(path)
    assert expert_file_ok(path) and not expert_file_ok(leftover)


# ---------------------------------------------------------------------------- manifest
def _tree() -> RoutingTree:
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    return RoutingTree.from_data(x, depth=2, branching=3, seed=0)


def _tree_file(folder: Path) -> Path:
    return folder / json.loads((folder / MANIFEST_NAME).read_text())["routing_tree"]["file"]


def test_manifest_round_trip_rebuilds_the_tree(tmp_path: Path) -> None:
    tree = _tree()
    write_manifest(tmp_path, {"experts": ["a", "b"], "note": "hi"}, tree)
    doc, back = read_manifest(tmp_path)
    assert doc["experts"] == ["a", "b"] and doc["note"] == "hi"
    assert back is not None and back.num_leaves == tree.num_leaves and back.kind == tree.kind
    x = torch.randn(500, 3)
    assert torch.equal(back.route(x), tree.route(x))
    regular = RoutingTree.regular(2, depth=2, branching=4, a=-1.0, b=2.0)
    first = _tree_file(tmp_path)
    write_manifest(tmp_path, {}, regular)
    assert not first.exists()  # the replaced tree file is cleaned up
    _, back = read_manifest(tmp_path)
    assert back is not None and back.bounds == (-1.0, 2.0) and torch.equal(back.leaf_cells()[0], regular.leaf_cells()[0])


def test_a_manifest_always_names_its_tree(tmp_path: Path) -> None:
    write_manifest(tmp_path, {"a": 1}, RoutingTree.single(3))
    doc, tree = read_manifest(tmp_path)
    assert tree.num_leaves == 1 and doc["a"] == 1 and doc["format"] == "momlp-store"
    doc.pop("routing_tree")
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="names no routing tree"):
        read_manifest(tmp_path)


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(StoreError, match="not a momlp-store manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="JSON-serializable"):
        write_manifest(tmp_path, {"x": float("nan")}, _tree())


def test_manifest_detects_a_swapped_or_corrupted_tree(tmp_path: Path) -> None:
    write_manifest(tmp_path, {}, _tree())
    other = tmp_path / "other"
    write_manifest(other, {}, RoutingTree.from_data(torch.randn(200, 3), depth=2, branching=3, seed=1))
    mine, theirs = _tree_file(tmp_path), _tree_file(other)
    assert mine.name != theirs.name  # named by content
    mine.write_bytes(theirs.read_bytes())
    with pytest.raises(StoreError, match="not the one the manifest names"):
        read_manifest(tmp_path)
    mine.write_bytes(b"\x00" * 5)
    with pytest.raises(StoreError, match="not a readable safetensors"):
        read_manifest(tmp_path)


def test_interrupted_manifest_write_keeps_the_previous_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _tree()
    write_manifest(tmp_path, {"v": 1}, old)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == MANIFEST_NAME:
            raise KeyboardInterrupt("killed before the manifest")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(tmp_path, {"v": 2}, RoutingTree.regular(3, depth=1, branching=8))
    monkeypatch.undo()
    doc, tree = read_manifest(tmp_path)
    x = torch.randn(100, 3)
    assert doc["v"] == 1 and tree is not None and torch.equal(tree.route(x), old.route(x))


# ---------------------------------------------------------------------------- the expert store
from momlp_lite.moe.experts import StackedMLP  # noqa: E402
from momlp_lite.store.experts import ExpertStore  # noqa: E402
from momlp_lite.store.memory import TensorMemoryMeter, measure_peak_memory  # noqa: E402


def _model(num_experts: int = 8, width: int = 16, seed: int = 0, n_in: int = 3) -> StackedMLP:
    g = torch.Generator().manual_seed(seed)
    m = StackedMLP(num_experts, n_in, width, 4, 5, batchnorm=True, generator=g)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for k in range(m.hidden_layers):
            getattr(m, f"running_mean_{k}").normal_(0, 0.1, generator=g)
            getattr(m, f"running_var_{k}").uniform_(0.5, 2.0, generator=g)
    return m.eval()


def _store(tmp_path: Path, seed: int = 0) -> tuple[ExpertStore, StackedMLP, RoutingTree]:
    tree = RoutingTree.from_data(torch.randn(400, 3, generator=torch.Generator().manual_seed(1)), depth=3, branching=2, seed=0)
    model = _model(tree.num_leaves, seed=seed)
    return ExpertStore.save(tmp_path / "store", model, tree, info={"note": "test"}), model, tree


def test_one_expert_at_a_time_equals_all_loaded(tmp_path: Path) -> None:
    st, model, tree = _store(tmp_path)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(2))
    one = st.predict(x, device="cpu")
    ref = st.predict_all_loaded(x, device="cpu")
    direct = model.forward_routed(x, tree.route(x))
    assert torch.equal(one.leaves, tree.route(x))
    assert torch.equal(one.labels, ref.labels) and torch.equal(one.labels, direct.argmax(1))
    assert torch.allclose(one.outputs, direct, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ref.outputs, direct, atol=1e-5, rtol=1e-5)
    assert one.experts_loaded == len(torch.unique(one.leaves)) <= 8 and ref.experts_loaded == 8
    assert st.info == {"note": "test"} and st.num_experts == 8
    assert st.parameters_per_expert == model.parameters_per_expert


def test_peak_memory_of_one_at_a_time_is_about_one_expert(tmp_path: Path) -> None:
    tree = RoutingTree.from_data(torch.randn(2000, 3, generator=torch.Generator().manual_seed(1)), depth=4, branching=2, seed=0)
    model = _model(tree.num_leaves, width=64)
    st = ExpertStore.save(tmp_path / "s", model, tree)
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(3))
    one, all_ = st.predict(x, device="cpu"), st.predict_all_loaded(x, device="cpu")
    expert_bytes = sum(v.numel() * v.element_size() for v in model.expert_state(0).values())
    assert one.experts_loaded == 16
    # one expert (the file's tensors are used without copies) + a few activations of its rows [rows, width]
    activation_bytes = int(tree.leaf_counts(x).max()) * 64 * 4
    assert expert_bytes <= one.peak_bytes < expert_bytes + 8 * activation_bytes
    assert all_.peak_bytes >= 16 * expert_bytes
    assert one.peak_bytes * 4 < all_.peak_bytes
    assert "live torch tensors" in one.memory_measure


def test_tensor_memory_meter_counts_live_tensors() -> None:
    with TensorMemoryMeter() as m:
        a = torch.zeros(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: same storage, not counted again
        c = torch.ones(500, dtype=torch.float64)  # 4000 bytes
        assert m.current_bytes == 8000
        del a, b, c
        d = torch.zeros(10)
        assert m.current_bytes == 40
    assert m.peak_bytes == 8000
    with measure_peak_memory("cpu") as rep:
        torch.empty(256, dtype=torch.uint8)
    assert rep.peak_bytes == 256 and "cpu" in rep.how
    del d


def test_dense_store_is_one_expert_under_a_one_leaf_tree(tmp_path: Path) -> None:
    dense = _model(1, width=32)
    st = ExpertStore.save(tmp_path / "dense", dense, RoutingTree.single(3))
    x = torch.randn(50, 3)
    p = st.predict(x, device="cpu")
    assert p.experts_loaded == 1 and torch.allclose(p.outputs, dense(x.unsqueeze(0))[0], atol=1e-6)
    assert st.tree.num_leaves == 1 and st.num_experts == 1
    with pytest.raises(ValueError, match=r"one expert per leaf: ids 0\.\.0 for this tree, got \[0, 1\]"):
        ExpertStore.save(tmp_path / "bad", _model(2), RoutingTree.single(3))


def test_corrupted_or_swapped_expert_files_are_refused(tmp_path: Path) -> None:
    st, _, _ = _store(tmp_path)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(2))
    p0, p1 = st.expert_path(0), st.expert_path(1)
    good = p0.read_bytes()
    p0.write_bytes(p1.read_bytes())  # a valid file, but of the wrong expert
    with pytest.raises(StoreError, match="not the expert 0"):
        st.predict(x, device="cpu")
    p0.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(StoreError, match="not a readable safetensors"):
        ExpertStore(st.directory).predict(x, device="cpu")
    marker = _plant_pickle(p0, "weights.0")  # a pickle in place of an expert
    with pytest.raises(StoreError):
        st.load_expert(0)
    assert not marker.exists()
    (st.directory / MANIFEST_NAME).write_text("{}")
    with pytest.raises(StoreError):
        ExpertStore(st.directory)


@pytest.mark.parametrize("fail_after", [0, 3, 8])
def test_interrupted_store_save_leaves_the_previous_store_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_after: int
) -> None:
    """Kill the second save after ``fail_after`` file writes (8 = all experts, before tree/manifest)."""
    st, old_model, tree = _store(tmp_path, seed=0)
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(2))
    before = st.predict(x, device="cpu").outputs
    real = files.atomic_write_bytes
    writes = []

    def flaky(path, data):
        if len(writes) >= fail_after:
            raise KeyboardInterrupt("power cut")
        writes.append(path)
        return real(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", flaky)  # every store file goes through it
    with pytest.raises(KeyboardInterrupt):
        ExpertStore.save(st.directory, _model(8, seed=5), tree)
    monkeypatch.undo()
    after = ExpertStore(st.directory).predict(x, device="cpu").outputs
    assert torch.equal(before, after)
    # a completed save replaces the store and removes the old files
    new = ExpertStore.save(st.directory, _model(8, seed=5), tree)
    experts = sorted(p.name for p in (st.directory / "experts").iterdir())
    trees = sorted(p.name for p in st.directory.glob("routing_tree.*"))
    assert len(experts) == 8 and len(trees) == 1 and not torch.equal(new.predict(x, device="cpu").outputs, before)
    assert not [p for p in st.directory.rglob("*") if is_temporary_file(p)]


def test_predict_without_memory_meter(tmp_path: Path) -> None:
    st, _, _ = _store(tmp_path)
    p = st.predict(torch.randn(20, 3), device="cpu", measure_memory=False)
    assert p.peak_bytes is None and p.memory_measure == "not measured"
