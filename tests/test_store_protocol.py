"""Issue 15 at the store and the CLI: concurrent writers, abandoned temp files, byte-identical records, failed experts.

Each test names the numbered failure of issue 15 it guards against (each failed before the fix).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from momlp_lite.distributed.cli import main
from momlp_lite.moe.experts import StackedMLP
from momlp_lite.moe.routing import RoutingTree
from momlp_lite.store.experts import MANIFEST_NAME, ExpertStore, expert_files
from momlp_lite.store.files import HOST, is_temporary_file, save_expert_file

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 20
SRC = str(ROOT)


def _model(writer: int, round_: int) -> StackedMLP:
    return StackedMLP(4, 2, 8, 2, 1, seed=1000 * writer + round_).eval()


def _tree() -> RoutingTree:
    return RoutingTree.regular(2, 1, 2)


def _writer(folder: str, writer: int, errors: "mp.Queue") -> None:
    torch.set_num_threads(1)
    for r in range(ROUNDS):
        try:
            ExpertStore.save(folder, _model(writer, r), _tree(), info={"writer": writer, "round": r})
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.put(f"writer {writer} round {r}: {type(exc).__name__}: {exc}")


def _reader(folder: str, stop: "mp.Event", out: "mp.Queue") -> None:
    torch.set_num_threads(1)
    loads = failures = 0
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(0))
    while not (Path(folder) / MANIFEST_NAME).exists():
        time.sleep(0.005)
    while not stop.is_set() or loads < ROUNDS:
        try:
            store = ExpertStore(folder)
            model = store.load_all()  # each read sees one version: the one store.info then describes
            want = _model(store.info["writer"], store.info["round"])
            same = all(torch.equal(model.expert_state(i)[k], want.expert_state(i)[k])
                       for i in range(4) for k in want.expert_state(i))
            pred = store.predict(x, device="cpu", measure_memory=False)
            want = _model(store.info["writer"], store.info["round"])
            if not same or not torch.allclose(pred.outputs, want.forward_routed(x, _tree().route(x)), atol=1e-6):
                failures += 1
        except Exception:  # noqa: BLE001 - a failed load is what the test counts
            failures += 1
        loads += 1
    out.put((loads, failures))


def test_two_writers_and_a_reader_never_lose_or_break_the_store(tmp_path: Path) -> None:
    """Issue 15, failure 1: two saves into one folder destroyed the store; a reader failed most loads."""
    folder = str(tmp_path / "store")
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")  # fork: no re-import
    errors, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(folder, w, errors)) for w in (0, 1)]
    reader = ctx.Process(target=_reader, args=(folder, stop, results))
    for p in (*writers, reader):
        p.start()
    for p in writers:
        p.join(120)
    stop.set()
    reader.join(120)
    assert all(p.exitcode == 0 for p in (*writers, reader))
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []  # every one of the 2 x 20 saves committed
    loads, failures = results.get(timeout=5)
    assert loads >= ROUNDS and failures == 0
    final = ExpertStore(folder)
    w, r = final.info["writer"], final.info["round"]
    assert r == ROUNDS - 1  # the last commit of either writer
    serial = ExpertStore.save(tmp_path / "serial", _model(w, r), _tree(), info={"writer": w, "round": r})
    assert (Path(folder) / MANIFEST_NAME).read_bytes() == (serial.directory / MANIFEST_NAME).read_bytes()
    for i in range(4):
        assert final.expert_path(i).read_bytes() == serial.expert_path(i).read_bytes()  # 0 lost experts
    assert not [p for p in Path(folder).rglob("*") if is_temporary_file(p)]


# ---------------------------------------------------------------------------- a CLI run next to a live writer
CONFIG = {
    "seed": 2, "profile": "smoke",
    "data": {"kind": "grid", "target": "sine", "n": 2, "s": 8},
    "routing": {"kind": "regular", "depth": 1, "branching": 2},
    "experts": {"width": 4, "hidden_layers": 1},
    "train": {"lr": 1e-2, "max_epochs": 2, "batch_size": 8},
    "run": {"output_dir": "unused", "experts_per_step": 2},
}

# Another writer in the middle of its work, following the store's protocol by hand (no torch import: starts fast):
# registered in .writers/, one finished expert file not yet committed, one temp file still open.
_MID_WRITE = """
import os, sys, time
from pathlib import Path
out, host, ready, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
(out / ".writers").mkdir(exist_ok=True)
entry = out / ".writers" / f"{os.getpid()}@{host}@{time.time_ns()}"
entry.touch()
(out / "experts" / "expert_00100.0123456789abcdef.safetensors").write_bytes(b"finished, not committed")
with open(out / "experts" / f".expert_00101.y.safetensors.tmp-{os.getpid()}@{host}@live", "wb") as fh:
    fh.write(b"half")
    fh.flush()
    ready.touch()
    while not go.exists():
        time.sleep(0.02)
entry.unlink()
"""


def test_cli_run_keeps_a_live_writers_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 15, failure 2: every `momlp-train` start deleted every temp file, including a live writer's."""
    out = tmp_path / "out"
    (out / "experts").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = out / "experts" / f".expert_00007.x.safetensors.tmp-{int(dead.stdout)}@{HOST}@zz"
    abandoned.write_bytes(b"left by a killed writer")
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": SRC}
    other = subprocess.Popen([sys.executable, "-c", _MID_WRITE, str(out), HOST, str(ready), str(go)], env=env)
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        assert ready.exists()
        mine = [p for p in (out / "experts").iterdir() if is_temporary_file(p) and p != abandoned]
        theirs = sorted(p.name for p in (out / "experts").iterdir() if p != abandoned)
        cfg = tmp_path / "run.yaml"
        cfg.write_text(yaml.safe_dump(CONFIG))
        assert main([str(cfg), "--output", str(out), "--device", "cpu", "--no-progress"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["complete"] and summary["removed_temporary_files"] == [abandoned.name]
        left = {p.name for p in (out / "experts").iterdir()}
        assert set(theirs) <= left and all(p.exists() for p in mine)  # nothing of the live writer's is removed
        assert not abandoned.exists()  # a dead pid's temp file is provably abandoned
        assert ExpertStore(out).num_experts == 4
    finally:
        go.touch()
        other.wait(30)


def test_temp_files_name_their_writer_and_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temp files carry their writer's pid and host, so a cleaner can prove them abandoned."""
    real, seen = os.replace, []

    def spy(src, dst):
        seen.append(Path(src).name)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    save_expert_file(tmp_path / "e.safetensors", {"w": torch.zeros(2)})
    assert seen and f".tmp-{os.getpid()}@{HOST}@" in seen[0]


# ---------------------------------------------------------------------------- byte-identical records
def test_metadata_is_written_in_a_fixed_order(tmp_path: Path) -> None:
    """Issue 15, failure 8 (second half): safetensors metadata came out in a random key order."""
    meta = {f"key{i}": str(i) for i in range(12)}
    tensors = {"b": torch.arange(6.0), "a": torch.ones(2, 3, dtype=torch.float64)}
    blobs = set()
    for i in range(6):  # safetensors' own writer used a fresh hash map (a fresh order) for every file
        save_expert_file(tmp_path / f"{i}.safetensors", tensors, dict(reversed(meta.items())) if i % 2 else meta)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "experts").glob("expert_*.safetensors"))}


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (no manifest), the files written so far stay."""


def test_resumed_run_writes_byte_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15, failure 8: a crash in the middle of a lockstep group, then a resume, writes the same bytes."""
    import momlp_lite.distributed.train as dtrain
    from momlp_lite.distributed.config import parse_run_config

    raw = {**CONFIG, "seed": 5, "data": {"kind": "grid", "target": "sine", "n": 2, "s": 14},
           "routing": {"kind": "regular", "depth": 2, "branching": 2}, "experts": {"width": 8, "hidden_layers": 2},
           "train": {"lr": 3e-3, "max_epochs": 8, "batch_size": 8, "val_fraction": 0.2, "patience": 2},
           "run": {"output_dir": "unused", "experts_per_step": 3}}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    torch.set_num_threads(1)
    assert dtrain.run(parse_run_config(raw, overrides={"run.output_dir": str(whole)}), progress=False)["complete"]

    def crash(workers, saved):
        if saved >= 4:  # after the first expert of the second group of 3
            raise _Killed

    cfg = parse_run_config(raw, overrides={"run.output_dir": str(resumed)})
    monkeypatch.setattr(dtrain, "_maybe_crash", crash)
    with pytest.raises(_Killed):
        dtrain.run(cfg, progress=False)
    monkeypatch.undo()
    assert len(_files(resumed)) == 4 and not (resumed / MANIFEST_NAME).exists()
    summary = dtrain.run(cfg, progress=False)
    assert summary["complete"] and summary["skipped"] == [0, 1, 2, 3]  # then groups [4, 5, 6], ...: not as before
    a, b = _files(whole), _files(resumed)
    assert sorted(a) == sorted(b) and a == b  # byte for byte, metadata (best_val_loss, ...) included
    strip = [(p / MANIFEST_NAME).read_bytes().replace(str(p).encode(), b"") for p in (whole, resumed)]
    assert strip[0] == strip[1]


# ---------------------------------------------------------------------------- non-finite numbers
def test_nan_in_the_data_file_stops_the_cli_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 15, failure 3: one NaN in y trained silently and the expert's file said it was trained."""
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)
    y[17] = float("nan")
    save_file({"x_train": x, "y_train": y}, str(tmp_path / "d.safetensors"))
    raw = {**CONFIG, "data": {"kind": "file", "path": str(tmp_path / "d.safetensors")},
           "routing": {"kind": "kmeans", "depth": 1, "branching": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main([str(tmp_path / "run.yaml"), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "y_train has NaN or inf" in err and "first row 17" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_expert_that_diverges_is_failed_not_trained(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 15, failure 3: non-finite training is marked failed in the store and the run reports failure."""
    raw = {**CONFIG, "train": {"lr": 1e30, "max_epochs": 2, "batch_size": 8, "val_fraction": 0.2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    code = main([str(tmp_path / "run.yaml"), "--output", str(out), "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 1 and not summary["complete"] and summary["failed"]
    assert "failed and were not recorded as trained" in captured.err and "Traceback" not in captured.err
    assert not (out / MANIFEST_NAME).exists()
    for i in map(int, summary["failed"]):
        assert expert_files(out, i) == [] and (out / "experts" / f"expert_{i:05d}.failed.json").is_file()
        assert i not in summary["trained"]
