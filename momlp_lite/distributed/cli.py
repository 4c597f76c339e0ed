"""``momlp-train`` / ``python -m momlp_lite.distributed CONFIG``: a user's error exits 2 (a failed expert 1) with one
line ``error: …`` on stderr, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import ConfigError, load_run_config
from .train import load_training_data, run
from .workers import env_int, parse_shard

__all__ = ["main"]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m momlp_lite.distributed",
        description="Train the experts of a MoMLP from a YAML/TOML config; under torchrun each rank "
        "trains its share. Re-running resumes: finished experts are skipped.")
    p.add_argument("config", help="run config (.yaml, .yml or .toml)")
    p.add_argument("--output", help="output directory (overrides run.output_dir)")
    p.add_argument("--profile", choices=["smoke", "default", "paper"], help="profile for per-profile values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set experts.width=64 (VALUE is YAML)")
    p.add_argument("--shard", help="I/N: train shard I of N without a process group (job arrays)")
    p.add_argument("--prepare", action="store_true", help="only build and save the routing tree (before a job array)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: automatic)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check", action="store_true", help="validate the config and the data, then exit")
    return p.parse_args(argv)


def _check_device(text: str | None) -> str | None:
    kind, _, index = ("cpu" if text is None else text).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (not index.isdigit() or kind == "cpu")):
        raise ValueError(f"--device must be cpu, cuda, cuda:<index> or mps, got {text!r}")
    return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set needs KEY=VALUE (e.g. --set experts.width=64), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value {value!r} is not valid YAML ({first}); quote it") from None
    if args.output is not None:
        out["run.output_dir"] = args.output
    return out


def _check_output(text: str) -> None:
    """The output folder must be one this process can create or write into."""
    if not text.strip():
        raise ValueError(f"--output must name a folder, got {text!r}; pass a path or drop --output")
    probe = next((p for p in (Path(text), *Path(text).parents) if p.exists()), Path("."))
    if not probe.is_dir():
        raise ValueError(f"--output {text!r} cannot be a folder: {str(probe)!r} is a file; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--output {text!r} is not writable ({str(probe)!r} is read-only); choose another path")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; rank 0 prints the summary as one JSON line. Taught in: book/distributed_training."""
    args = _parse_args(argv)
    try:
        cfg = load_run_config(args.config, profile=args.profile, overrides=_overrides(args))
        _check_output(cfg.run.output_dir)
        device = _check_device(args.device)
        shard = parse_shard(args.shard) if args.shard else None
        if args.check:
            load_training_data(cfg)
            print(json.dumps({"valid": True, "fingerprint": cfg.fingerprint(), "config": dataclasses.asdict(cfg)}))
            return 0
        summary = run(cfg, shard=shard, device=device, progress=not args.no_progress, prepare_only=args.prepare)
    except (ValueError, RuntimeError, OSError) as err:  # ConfigError and StoreError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if shard is None and env_int("RANK", 0) != 0:
        return 0  # rank 0 reports for the whole group
    print(json.dumps(summary), flush=True)
    if summary.get("failed"):
        shown = ", ".join(f"{i} ({why})" for i, why in list(summary["failed"].items())[:5])
        print(f"error: {len(summary['failed'])} experts failed and were not recorded as trained: {shown}; "
              "check the data for NaN/inf or lower train.lr, then re-run", file=sys.stderr)
        return 1
    return 0 if summary.get("complete", True) or shard is not None else 1
