"""Training the experts of one MoMLP on several processes (torchrun, gloo on CPU), resuming after a crash.

The torchrun tests launch real process groups: ``python -m torch.distributed.run --standalone
--nproc-per-node=2`` on CPU (gloo). Stores are compared tensor by tensor with ``torch.equal`` (bit
for bit): every expert's initialization and data order depend only on (seed, expert id), so a
2-process run must write exactly the bytes a 1-process run writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from momlp_lite.distributed.cli import main
from momlp_lite.distributed.config import load_run_config
from momlp_lite.distributed.train import CRASH_ENV, compare_stores, expert_status, init_experts, run
from momlp_lite.distributed.workers import parse_shard, shard_ids, torchrun_command
from momlp_lite.store.experts import MANIFEST_NAME, ExpertStore, expert_files
from momlp_lite.store.files import load_expert_file


def expert_path(out: Path, i: int) -> Path:
    """The one file of expert ``i`` in a run directory."""
    (path,) = expert_files(out, i)
    return path

ROOT = Path(__file__).resolve().parents[1]
NUM_EXPERTS = 16  # regular tree, n=2, depth 2, branching 2: 4**2 leaves

CONFIG = {
    "seed": 5,
    "profile": "smoke",
    "data": {"kind": "grid", "target": "sine", "n": 2, "s": 14},
    "routing": {"kind": "regular", "depth": 2, "branching": 2},
    "experts": {"width": 8, "hidden_layers": 2, "prelu": True},
    "train": {"optimizer": "adam", "lr": 3e-3, "max_epochs": 8, "batch_size": 8, "val_fraction": 0.2, "patience": 2},
    "run": {"output_dir": "unused", "experts_per_step": 3},
}


@pytest.fixture(autouse=True)
def one_cpu_thread(monkeypatch: pytest.MonkeyPatch):
    """Train on the CPU (even where a GPU exists) with one intra-op thread, as every torchrun worker here."""
    monkeypatch.setenv("MOMLP_DEVICE", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_config(folder: Path, **run_section) -> Path:
    raw = json.loads(json.dumps(CONFIG))
    raw["run"].update(run_section)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(config: Path, output: Path, env_extra: dict[str, str] | None = None, timeout: int = 120):
    """Launch the CLI on 2 CPU processes with torchrun; return the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MOMLP_PROFILE": "smoke"}
    env.pop(CRASH_ENV, None)
    env.update(env_extra or {})
    cmd = torchrun_command(config, 2, extra_args=["--output", str(output), "--device", "cpu", "--no-progress"])
    return subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True, timeout=timeout)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def file_stamps(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / "experts").glob("expert_*"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run (in this process, no process group)."""
    folder = tmp_path_factory.mktemp("reference")
    cfg = load_run_config(write_config(folder), overrides={"run.output_dir": str(folder / "out")})
    torch.set_num_threads(1)
    summary = run(cfg, device="cpu", progress=False)
    assert summary["complete"] and summary["mode"] == "single" and summary["world_size"] == 1
    assert summary["trained"] == list(range(NUM_EXPERTS)) and summary["skipped"] == []
    return folder / "out"


# ---------------------------------------------------------------------------- pure helpers
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), world=st.integers(1, 17))
def test_shards_partition_the_experts(n: int, world: int) -> None:
    shards = [shard_ids(range(n), r, world) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))  # every expert exactly once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_arguments_are_checked() -> None:
    assert parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "-1/4", "3", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_ids(range(4), 2, 2)


def test_expert_initialization_depends_only_on_seed_and_id(tmp_path: Path) -> None:
    cfg = load_run_config(write_config(tmp_path))
    shape = dict(n_in=2, width=8, hidden_layers=2, n_out=1, prelu=True, batchnorm=False)
    group = init_experts(cfg, shape, [3, 11, 5])
    alone = init_experts(cfg, shape, [5])
    for k, v in alone.expert_state(5).items():
        assert torch.equal(v, group.expert_state(5)[k]), k
    other_seed = init_experts(dataclasses.replace(cfg, seed=6), shape, [5])
    assert not torch.equal(other_seed.weights[0][0], alone.weights[0][0])
    assert not torch.equal(group.weights[0][0], group.weights[0][2])  # experts 3 and 5 differ


def test_torchrun_command_lines() -> None:
    single = torchrun_command("c.yaml", 4)
    assert "--standalone" in single and "--nproc-per-node=4" in single
    assert single[-3:] == ["-m", "momlp_lite.distributed", "c.yaml"]
    multi = torchrun_command("c.yaml", 8, nnodes=2, rdzv_endpoint="node0:29500")
    assert "--standalone" not in multi
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500"} <= set(multi)


# ---------------------------------------------------------------------------- the reference run
def test_single_process_run_is_an_expert_store(reference: Path) -> None:
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["complete"] and summary["num_experts"] == NUM_EXPERTS
    store = ExpertStore(reference)  # the manifest has ExpertStore's layout
    assert store.expert_ids == list(range(NUM_EXPERTS))
    x = torch.rand(200, 2, generator=torch.Generator().manual_seed(0))
    one_at_a_time = store.predict(x, device="cpu")
    all_loaded = store.predict_all_loaded(x, device="cpu")
    torch.testing.assert_close(one_at_a_time.outputs, all_loaded.outputs)
    assert bool(torch.isfinite(one_at_a_time.outputs).all())
    _, meta = load_expert_file(expert_path(reference, 0))
    assert meta["trained"] in {"yes", "no data"} and meta["fingerprint"] == summary["fingerprint"]


# ---------------------------------------------------------------------------- torchrun
def test_two_processes_write_the_same_store_as_one(reference: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = torchrun(config, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert summary["mode"] == "torchrun" and summary["backend"] == "gloo" and summary["world_size"] == 2
    ranks = {r["rank"]: r for r in summary["ranks"]}
    assert ranks[0]["trained"] == list(range(0, NUM_EXPERTS, 2))
    assert ranks[1]["trained"] == list(range(1, NUM_EXPERTS, 2))
    assert summary["complete"] and (tmp_path / "out" / MANIFEST_NAME).is_file()
    assert compare_stores(reference, tmp_path / "out") == []  # bit for bit


def test_killed_rank_then_rerun_loses_and_duplicates_nothing(reference: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, experts_per_step=2)
    out = tmp_path / "out"
    crashed = torchrun(config, out, {CRASH_ENV: "1:2"})  # rank 1 is SIGKILLed after its 2nd expert
    assert crashed.returncode != 0
    assert not (out / MANIFEST_NAME).exists()  # never committed
    cfg = load_run_config(config, overrides={"run.output_dir": str(out)})
    before = expert_status(out, range(NUM_EXPERTS), cfg.fingerprint())
    done_before = sorted(i for i, s in before.items() if s == "done")
    assert {1, 3} <= set(done_before) and len(done_before) < NUM_EXPERTS
    stamps = file_stamps(out)

    rerun = torchrun(config, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = last_json(rerun.stdout)
    assert summary["complete"]
    assert summary["skipped"] == done_before  # nothing valid was retrained...
    assert sorted(summary["trained"] + summary["skipped"]) == list(range(NUM_EXPERTS))  # ...nor lost or duplicated
    after = file_stamps(out)
    for i in done_before:
        name = expert_path(out, i).name
        assert after[name] == stamps[name], f"expert {i} was rewritten"
    assert sorted(after) == sorted(expert_path(out, i).name for i in range(NUM_EXPERTS))
    assert compare_stores(reference, out) == []


# ---------------------------------------------------------------------------- resume in one process
def test_partial_and_corrupted_files_are_detected_and_retrained(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / MANIFEST_NAME).unlink()
    p3 = expert_path(out, 3)
    p3.write_bytes(p3.read_bytes()[: p3.stat().st_size // 2])  # partial write
    p7 = expert_path(out, 7)
    raw = bytearray(p7.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the weights: same size, bad checksum
    p7.write_bytes(bytes(raw))
    expert_path(out, 9).unlink()  # never written
    stray = out / "experts" / ".expert_00011.safetensors.tmp-abc123"  # a temp name without an owner: older than the run
    stray.write_bytes(b"half a file")
    cfg = load_run_config(write_config(tmp_path), overrides={"run.output_dir": str(out)})
    summary = run(cfg, progress=False)
    assert summary["corrupt_retrained"] == [3, 7]
    assert summary["trained"] == [3, 7, 9]
    assert summary["skipped"] == [i for i in range(NUM_EXPERTS) if i not in (3, 7, 9)]
    assert summary["removed_temporary_files"] == [stray.name] and not stray.exists()
    assert compare_stores(reference, out) == []
    assert ExpertStore(out).num_experts == NUM_EXPERTS


def test_job_array_shards_need_the_prepared_tree_and_commit_when_complete(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = load_run_config(write_config(tmp_path), overrides={"run.output_dir": str(out)})
    with pytest.raises(RuntimeError, match="--prepare"):
        run(cfg, shard=(0, 2), progress=False)
    assert run(cfg, prepare_only=True)["prepared"]
    first = run(cfg, shard=(1, 2), progress=False)
    assert first["trained"] == list(range(1, NUM_EXPERTS, 2)) and not first["complete"]
    assert not (out / MANIFEST_NAME).exists()
    last = run(cfg, shard=(0, 2), progress=False)  # the last task to finish writes the manifest
    assert last["complete"] and (out / MANIFEST_NAME).is_file()
    assert compare_stores(reference, out) == []


def test_changed_settings_never_mix_with_old_experts(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    cfg = load_run_config(write_config(tmp_path), overrides={"run.output_dir": str(out), "experts.width": 9})
    with pytest.raises(RuntimeError, match="different settings"):
        run(cfg, progress=False)


# ---------------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    "change, message",
    [
        ({"experts": {"width": -3}}, "experts.width must be an integer >= 1, got -3"),
        ({"train": {"lerning_rate": 0.1}}, "unknown key 'train.lerning_rate'"),
        ({"data": {"kind": "file", "path": "missing.safetensors"}, "routing": {"kind": "kmeans"}},
         "data.path: file"),
        ({"data": {"kind": "file", "path": "only_x.safetensors"}, "routing": {"kind": "kmeans"}},
         "has no tensor 'y_train'"),
    ],
)
def test_bad_configs_fail_before_any_training(tmp_path: Path, capsys: pytest.CaptureFixture, change: dict,
                                              message: str) -> None:
    save_file({"x_train": torch.rand(40, 2)}, str(tmp_path / "only_x.safetensors"))
    raw = json.loads(json.dumps(CONFIG))
    for section, values in change.items():
        raw[section] = values if section == "data" else {**raw[section], **values}
    raw["run"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_cli_check_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(tmp_path)
    assert main([str(path), "--check", "--set", "experts.width=12", "--output", str(tmp_path / "o")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["valid"] and shown["config"]["experts"]["width"] == 12
    assert shown["config"]["run"]["output_dir"] == str(tmp_path / "o")


def test_cli_without_torchrun_shows_progress_and_prints_the_summary(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = write_config(tmp_path)
    assert main([str(config), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "rank 0/1 experts" in captured.err  # the progress bar
    summary = last_json(captured.out)  # machine-readable summary: the last stdout line
    assert summary["complete"] and summary["mode"] == "single"
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert compare_stores(reference, tmp_path / "out") == []


def test_prepare_cannot_combine_with_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(write_config(tmp_path)), "--prepare", "--shard", "0/2"]) == 2
    assert "--prepare runs in one process" in capsys.readouterr().err


def test_file_data_with_kmeans_routing_and_classes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(120, 3, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()  # 3 classes
    save_file({"x_train": x, "y_train": y}, str(tmp_path / "features.safetensors"))
    (tmp_path / "run.toml").write_text(
        "seed = 1\n"
        '[data]\nkind = "file"\npath = "features.safetensors"\n'
        '[routing]\nkind = "kmeans"\ndepth = 1\nbranching = 4\n'
        "[experts]\nwidth = 8\nhidden_layers = 1\nbatchnorm = true\n"
        '[train]\noptimizer = "adamw"\nlr = 1e-2\nmax_epochs = 20\nbatch_size = 8\nloss = "cross_entropy"\n'
        f'[run]\noutput_dir = "{tmp_path / "out"}"\nexperts_per_step = 2\n'
    )
    cfg = load_run_config(tmp_path / "run.toml")
    assert run(cfg, progress=False)["complete"]
    store = ExpertStore(tmp_path / "out")
    assert store.config["n_out"] == 3 and store.config["batchnorm"] and store.num_experts == 4
    accuracy = (store.predict(x, device="cpu").labels == y).float().mean()
    assert accuracy > 0.6  # well above the 1/3 of guessing


def test_backend_choice_without_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL when every local rank has its own GPU, gloo when ranks share one or there is none."""
    import torch.distributed as dist

    from momlp_lite.distributed.workers import start_workers

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("MOMLP_DEVICE", raising=False)
    for gpus, backend, device in ((0, "gloo", "cpu"), (2, "nccl", "cuda:1"), (1, "gloo", "cuda:0")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda g=gpus: g > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda g=gpus: g)
        w = start_workers()
        assert (w.backend, str(w.device), w.rank, w.world_size, w.mode) == (backend, device, 1, 4, "torchrun")
        assert calls[-1]["backend"] == backend
        assert (calls[-1]["device_id"] is not None) == (backend == "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert start_workers(device="cpu").backend == "gloo"  # --device cpu wins over the GPUs
