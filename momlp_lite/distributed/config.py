"""Run configs: a YAML or TOML file (``seed``, ``profile``, tables ``data``, ``routing``, ``experts``, ``train``,
``run``; see ``configs/grid_sine.yaml``), validated before any training."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import operator
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..data import TARGETS
from ..moe.trainer import TrainConfig
from ..runtime import PROFILES, get_profile

__all__ = ["ConfigError", "RunConfig", "load_run_config", "parse_run_config"]

#: TrainConfig fields a run sets elsewhere: where to set them instead.
RUN_LEVEL = {"seed": "the top-level 'seed'", "device": "--device", "progress": "--no-progress"}
_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "lt": ("<", operator.lt)}
_READERS = {".yaml": (yaml.safe_load, yaml.YAMLError, "YAML"), ".yml": (yaml.safe_load, yaml.YAMLError, "YAML"),
            ".toml": (tomllib.loads, tomllib.TOMLDecodeError, "TOML")}
_KINDS = {int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a finite number",
                  lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
          bool: ("true or false", lambda v: isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str))}


class ConfigError(ValueError):
    """A config is invalid; the message names the key and the fix. Taught in: book/distributed_training."""


def _spec(default: Any, **rules: Any) -> Any:
    """A dataclass field with the constraints (``ge``, ``gt``, ``lt``, ``choices``) that the validator checks."""
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class DataSection:
    """``grid``: ``target`` on the ``s**n`` grid over ``[a, b]**n``; ``file``: ``x_train``, ``y_train`` in ``path``."""

    kind: str = _spec("grid", choices=("grid", "file"))
    target: str | None = _spec(None, choices=tuple(sorted(TARGETS)))
    n: int | None = _spec(None, ge=1)
    s: int | None = _spec(None, ge=2)
    a: float = 0.0
    b: float = 1.0
    test_fraction: float = _spec(0.2, gt=0.0, lt=1.0)
    path: str | None = None


@dataclass(frozen=True)
class RoutingSection:
    """A ``regular`` tree (nested sub-boxes of the grid's box) or a ``kmeans`` one (recursive k-means)."""

    kind: str = _spec("regular", choices=("regular", "kmeans"))
    depth: int = _spec(2, ge=1)
    branching: int = _spec(2, ge=2)
    iters: int = _spec(25, ge=1)


@dataclass(frozen=True)
class ExpertSection:
    """Every expert MLP: ``n -> width (x hidden_layers) -> outputs``."""

    width: int = _spec(32, ge=1)
    hidden_layers: int = _spec(3, ge=1)
    prelu: bool = True
    batchnorm: bool = False


@dataclass(frozen=True)
class RunSection:
    """Where the store goes and how many experts train in lockstep (neither changes the weights)."""

    output_dir: str = "momlp_run"
    experts_per_step: int = _spec(8, ge=1)


@dataclass(frozen=True)
class RunConfig:
    """A validated run config; ``train`` is the trainer's ``TrainConfig``. Taught in: book/distributed_training."""

    data: DataSection
    seed: int = _spec(0, ge=0)
    profile: str = _spec("default", choices=tuple(PROFILES))
    routing: RoutingSection = field(default_factory=RoutingSection)
    experts: ExpertSection = field(default_factory=ExpertSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSection = field(default_factory=RunSection)

    def fingerprint(self) -> str:
        """sha256 of everything that determines the experts' weights (not ``run`` nor ``profile``)."""
        d = dataclasses.asdict(self)
        d.pop("run"), d.pop("profile")
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def with_output_dir(self, output_dir: str | os.PathLike[str]) -> RunConfig:
        """A copy that writes to ``output_dir`` (same fingerprint)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, output_dir=str(output_dir)))


_SECTIONS: dict[str, type] = {"data": DataSection, "routing": RoutingSection, "experts": ExpertSection,
                              "train": TrainConfig, "run": RunSection}


def load_run_config(path: str | os.PathLike[str], profile: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read and validate a ``.yaml``/``.yml``/``.toml`` file (``data.path`` relative to it).
    Taught in: book/distributed_training."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a .yaml or .toml file")
    if p.suffix.lower() not in _READERS:
        raise ConfigError(f"config file {str(p)!r} must end in .yaml, .yml or .toml, got {p.suffix.lower()!r}")
    loads, error, kind = _READERS[p.suffix.lower()]
    try:
        raw = loads(p.read_text())
    except error as err:
        raise ConfigError(f"{p}: not valid {kind}: {err}") from None
    return parse_run_config({} if raw is None else raw, profile, overrides, base_dir=p.resolve().parent)


def parse_run_config(raw: Mapping[str, Any], profile: str | None = None, overrides: Mapping[str, Any] | None = None,
                     base_dir: str | os.PathLike[str] | None = None) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`, else ConfigError naming the key; ``profile`` (else the file's,
    else ``$MOMLP_PROFILE``) picks per-profile values; ``overrides`` are dotted keys.
    Taught in: book/distributed_training."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the top level must be a table of keys, got {type(raw).__name__}")
    raw = _apply_overrides(dict(raw), overrides or {})
    if "optimiser" in raw:  # the legacy (British) table name of earlier configs
        raise ConfigError("unknown key 'optimiser': the table is now 'train', the trainer's TrainConfig "
                          "(optimiser.name -> train.optimizer, optimiser.epochs -> train.max_epochs); rename it")
    _reject_unknown(raw, ("seed", "profile", *_SECTIONS), prefix="")
    in_file = raw.get("profile")
    if in_file is not None:  # checked even when the argument overrides it
        _check_value(RunConfig, "profile", in_file, "profile")
    prof = get_profile(profile or in_file).name
    values: dict[str, Any] = {"profile": prof}
    if "seed" in raw:
        values["seed"] = _check_value(RunConfig, "seed", _pick(raw["seed"], "seed", prof), "seed")
    if "data" not in raw:
        raise ConfigError("data: missing table; add one, e.g. 'data: {kind: grid, target: sine, n: 2, s: 32}'")
    for name, cls in _SECTIONS.items():
        if name in raw:
            values[name] = _parse_section(cls, raw[name], name, prof)
    cfg = RunConfig(**values)
    if cfg.data.path is not None:
        full = str((Path(base_dir or os.getcwd()) / cfg.data.path).resolve())
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=full))
    _check_cross_fields(cfg)
    return cfg


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        *tables, key = dotted.split(".")
        if not all([*tables, key]):
            raise ConfigError(f"override key {dotted!r} is not a dotted key like 'experts.width'")
        node = raw
        for part in tables:
            nxt = node.get(part)
            if not isinstance({} if nxt is None else nxt, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a table")
            node[part] = dict(nxt or {})
            node = node[part]
        node[key] = value
    return raw


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")


def _pick(value: Any, key: str, profile: str) -> Any:
    """Resolve a ``{smoke:, default:, paper:}`` table to the profile's value."""
    if not isinstance(value, Mapping):
        return value
    missing, extra = sorted(set(PROFILES) - set(value)), sorted(set(value) - set(PROFILES))
    if missing or extra:
        raise ConfigError(f"{key}: a per-profile value needs exactly the keys smoke, default, paper"
                          + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
    return value[profile]


def _parse_section(cls: type, table: Any, name: str, profile: str) -> Any:
    if not isinstance(table if table is not None else {}, Mapping):
        raise ConfigError(f"{name} must be a table of keys, got {table!r}")
    table = table or {}
    for key in table:
        if cls is TrainConfig and key in RUN_LEVEL:
            raise ConfigError(f"train.{key} is set by {RUN_LEVEL[key]}, not in the train table; remove it")
    known = tuple(f.name for f in dataclasses.fields(cls) if f.name not in RUN_LEVEL)
    _reject_unknown(table, known, prefix=f"{name}.")
    values = {k: _check_value(cls, k, _pick(v, f"{name}.{k}", profile), f"{name}.{k}") for k, v in table.items()}
    try:  # TrainConfig checks its own bounds: they are declared there, once
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{name}.{err}" if str(err).split(" ", 1)[0] in known else f"{name}: {err}") from None


def _check_value(cls: type, key: str, value: Any, where: str) -> Any:
    """Check one value against its field's type and constraints; return it converted (``float`` for numbers)."""
    hint, rules = typing.get_type_hints(cls)[key], next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
    types = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in types:
            return None
        raise ConfigError(f"{where} must be set (got an empty value)")
    bounds = " and ".join(f"{op} {rules[k]:g}" for k, (op, _) in _OPS.items() if k in rules)
    for t in types:
        v = value
        if t is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` as a string
            with contextlib.suppress(ValueError):
                v = float(value)
        if t in _KINDS and _KINDS[t][1](v):
            break
    else:
        want = " or ".join(_KINDS[t][0] for t in types if t in _KINDS)
        raise ConfigError(f"{where} must be {want}{' ' + bounds if bounds else ''}, got {value!r}")
    v = float(v) if t is float else v
    if "choices" in rules and v not in rules["choices"]:
        raise ConfigError(f"{where} must be one of {list(rules['choices'])}, got {value!r}")
    if not all(test(v, rules[k]) for k, (_, test) in _OPS.items() if k in rules):
        raise ConfigError(f"{where} must be {'an integer' if t is int else 'a number'} {bounds}, got {value!r}")
    return v


def _check_cross_fields(cfg: RunConfig) -> None:
    d, r, t = cfg.data, cfg.routing, cfg.train
    for kind, keys in (("grid", ("target", "n", "s")), ("file", ("path",))):
        for key in keys:
            if d.kind == kind and getattr(d, key) is None:
                raise ConfigError(f"data.{key} is required when data.kind is '{kind}'")
            if d.kind != kind and getattr(d, key) is not None:
                raise ConfigError(f"data.{key} is only used when data.kind is '{kind}'; remove it")
    if d.kind == "grid":
        if not d.a < d.b:
            raise ConfigError(f"data.a must be < data.b, got a={d.a}, b={d.b}; swap them")
        if d.s**d.n > 50_000_000:
            raise ConfigError(f"data.s**data.n = {d.s**d.n} grid points is too many; lower data.s or data.n")
        if t.loss != "mse":
            raise ConfigError(f"train.loss must be 'mse' for grid regression data (data.kind: grid), got {t.loss!r}")
    elif r.kind == "regular":
        raise ConfigError("routing.kind 'regular' needs the box of a grid (data.kind: grid); use routing.kind: kmeans")
    elif not Path(d.path).is_file():
        raise ConfigError(f"data.path: file {d.path!r} does not exist; write x_train/y_train there first")
    if cfg.experts.batchnorm and t.batch_size < 2:
        raise ConfigError(f"train.batch_size must be >= 2 when experts.batchnorm is true, got {t.batch_size}")
    leaves = r.branching ** (r.depth * (d.n or 1)) if r.kind == "regular" else r.branching**r.depth
    if leaves > 1 << 22:
        raise ConfigError(f"routing gives {leaves} experts, too many; lower routing.depth or routing.branching")
