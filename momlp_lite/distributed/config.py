"""Run configurations: one YAML or TOML file that says how to train a MoMLP.

Taught in: book/distributed_training. A config has a top-level ``seed`` and ``profile`` and five tables::

    seed: 0
    profile: smoke            # optional: else $MOMLP_PROFILE (default "default")
    data:    {kind: grid, target: sine, n: 2, s: 32}
    routing: {kind: regular, depth: 2, branching: 2}
    experts: {width: 32, hidden_layers: 3, prelu: true}
    train:   {optimizer: adam, lr: 1.0e-3, max_epochs: 50, batch_size: 64}   # the trainer's TrainConfig
    run:     {output_dir: runs/sine, experts_per_step: 4}

``train`` *is* :class:`momlp_lite.moe.trainer.TrainConfig` (same field names; its constraints are
checked by TrainConfig itself). Any value may be a table ``{smoke: …, default: …, paper: …}`` that
the profile resolves. :func:`load_run_config` validates everything before any training starts:
errors are :class:`ConfigError` naming the key, e.g. ``experts.width must be an integer >= 1, got -3``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..data import TARGETS
from ..moe.trainer import TrainConfig
from ..runtime import PROFILES, get_profile

__all__ = ["ConfigError", "DataSection", "RoutingSection", "ExpertSection", "RunSection", "RunConfig",
           "load_run_config", "parse_run_config", "read_config_file"]

#: TrainConfig fields a run sets elsewhere: where to set them instead.
RUN_LEVEL = {"seed": "the top-level 'seed'", "device": "--device", "progress": "--no-progress"}


class ConfigError(ValueError):
    """A config file is invalid; the message names the offending key and the fix. Taught in: book/distributed_training."""


def _spec(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
          lt: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with the constraints the validator checks."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "lt": lt, "choices": choices})


@dataclass(frozen=True)
class DataSection:
    """``kind: grid`` samples ``target`` on the ``s**n`` grid over ``[a, b]**n`` (``test_fraction`` held out);
    ``kind: file`` reads ``x_train [N, n]``, ``y_train`` from the safetensors file ``path``.
    Taught in: book/distributed_training.
    """

    kind: str = _spec("grid", choices=("grid", "file"))
    target: str | None = _spec(None, choices=tuple(sorted(TARGETS)))
    n: int | None = _spec(None, ge=1)
    s: int | None = _spec(None, ge=2)
    a: float = _spec(0.0)
    b: float = _spec(1.0)
    test_fraction: float = _spec(0.2, gt=0.0, lt=1.0)
    path: str | None = _spec(None)


@dataclass(frozen=True)
class RoutingSection:
    """``regular`` (nested sub-boxes of the grid's box) or ``kmeans`` (recursive k-means) trees.
    Taught in: book/distributed_training.
    """

    kind: str = _spec("regular", choices=("regular", "kmeans"))
    depth: int = _spec(2, ge=1)
    branching: int = _spec(2, ge=2)
    iters: int = _spec(25, ge=1)


@dataclass(frozen=True)
class ExpertSection:
    """Every expert MLP: ``n -> width (x hidden_layers) -> outputs``. Taught in: book/distributed_training."""

    width: int = _spec(32, ge=1)
    hidden_layers: int = _spec(3, ge=1)
    prelu: bool = _spec(True)
    batchnorm: bool = _spec(False)


@dataclass(frozen=True)
class RunSection:
    """Where the store goes and how the work is cut into lockstep groups (does not change the weights).
    Taught in: book/distributed_training.
    """

    output_dir: str = _spec("momlp_run")
    experts_per_step: int = _spec(8, ge=1)


@dataclass(frozen=True)
class RunConfig:
    """A whole, validated run configuration (profile-dependent values already resolved). Taught in: book/distributed_training."""

    data: DataSection
    seed: int = _spec(0, ge=0)
    profile: str = _spec("default", choices=tuple(PROFILES))
    routing: RoutingSection = field(default_factory=RoutingSection)
    experts: ExpertSection = field(default_factory=ExpertSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-able) of the resolved config."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 of everything that determines the experts' weights (not ``run`` nor ``profile``)."""
        d = self.to_dict()
        d.pop("run"), d.pop("profile")
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some top-level fields replaced (sections as dataclasses)."""
        return dataclasses.replace(self, **changes)

    def with_output_dir(self, output_dir: str | os.PathLike[str]) -> "RunConfig":
        """A copy that writes to ``output_dir`` (same fingerprint)."""
        return self.replace(run=dataclasses.replace(self.run, output_dir=str(output_dir)))


_SECTIONS: dict[str, type] = {"data": DataSection, "routing": RoutingSection, "experts": ExpertSection,
                              "train": TrainConfig, "run": RunSection}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml`` or ``.toml`` file into a dict (no validation).
    Taught in: book/distributed_training.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a .yaml or .toml file")
    suffix, text = p.suffix.lower(), p.read_text()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
    elif suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML: {err}") from None
    else:
        raise ConfigError(f"config file {str(p)!r} must end in .yaml, .yml or .toml, got {suffix!r}")
    if not isinstance(raw if raw is not None else {}, dict):
        raise ConfigError(f"{p}: the top level must be a table of keys, got {type(raw).__name__}")
    return raw or {}


def load_run_config(path: str | os.PathLike[str], profile: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read and validate a config file (a relative ``data.path`` is relative to the file's folder).
    Taught in: book/distributed_training.
    """
    raw = read_config_file(path)
    return parse_run_config(raw, profile=profile, overrides=overrides, base_dir=Path(path).resolve().parent)


def parse_run_config(raw: Mapping[str, Any], profile: str | None = None, overrides: Mapping[str, Any] | None = None,
                     base_dir: str | os.PathLike[str] | None = None) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`.

    ``profile`` (else the file's ``profile``, else ``$MOMLP_PROFILE``) resolves per-profile values;
    ``overrides`` are dotted keys (``{"run.output_dir": "/scratch/run1"}``); ``base_dir`` anchors a
    relative ``data.path``. Raises :class:`ConfigError` naming the key.
    Taught in: book/distributed_training.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a table of keys, got {type(raw).__name__}")
    raw = _apply_overrides(dict(raw), overrides or {})
    if "optimiser" in raw:  # the legacy (British) table name of earlier configs
        raise ConfigError("unknown key 'optimiser': the table is now 'train', the trainer's TrainConfig "
                          "(optimiser.name -> train.optimizer, optimiser.epochs -> train.max_epochs); rename it")
    _reject_unknown(raw, ("seed", "profile", *_SECTIONS), prefix="")
    prof = _resolve_profile(profile, raw.get("profile"))
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
        full = Path(base_dir or os.getcwd()) / cfg.data.path
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, path=str(full.resolve())))
    _check_cross_fields(cfg)
    return cfg


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override key {dotted!r} is not a dotted key like 'experts.width'")
        node = raw
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is not None and not isinstance(nxt, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a table")
            node[part] = nxt = dict(nxt or {})
            node = nxt
        node[parts[-1]] = value
    return raw


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")


def _resolve_profile(arg: str | None, in_file: Any) -> str:
    if in_file is not None and (not isinstance(in_file, str) or in_file not in PROFILES):
        raise ConfigError(f"profile must be one of {sorted(PROFILES)}, got {in_file!r}")
    if arg is not None:
        return get_profile(arg).name
    return in_file if in_file is not None else get_profile().name


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
    known = tuple(f.name for f in dataclasses.fields(cls) if not (cls is TrainConfig and f.name in RUN_LEVEL))
    for key in table:
        if cls is TrainConfig and key in RUN_LEVEL:
            raise ConfigError(f"train.{key} is set by {RUN_LEVEL[key]}, not in the train table; remove it")
    _reject_unknown(table, known, prefix=f"{name}.")
    values = {k: _check_value(cls, k, _pick(v, f"{name}.{k}", profile), f"{name}.{k}") for k, v in table.items()}
    if cls is not TrainConfig:
        return cls(**values)
    try:  # the trainer's config checks its own constraints, once
        return TrainConfig(**values)
    except (ValueError, TypeError) as err:
        text = str(err)
        head = text.split(" ", 1)[0]
        raise ConfigError(f"train.{text}" if head in known else f"train: {text}") from None


_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}


def _as_kind(value: Any, kind: str) -> tuple[bool, Any]:
    if kind == "int":
        return (not isinstance(value, bool) and isinstance(value, int)), value
    if kind == "float":
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` as a string; accept numeric text
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        return ok, float(value) if ok else value
    if kind == "bool":
        return isinstance(value, bool), value
    return isinstance(value, str), value


def _check_value(cls: type, key: str, value: Any, where: str) -> Any:
    """Type-check one value against the field's declared type (and, for this module's sections, its bounds)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    kinds = [k.strip() for k in str(f.type).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{where} must be set (got an empty value)")
    meta = f.metadata
    bounds = " and ".join(f"{op} {meta[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("lt", "<"))
                          if meta.get(k) is not None)
    want = " or ".join(_KINDS.get(k, k) for k in kinds if k != "None") + (f" {bounds}" if bounds else "")
    for kind in kinds:
        ok, converted = _as_kind(value, kind) if kind in _KINDS else (False, value)
        if ok:
            break
    else:
        raise ConfigError(f"{where} must be {want}, got {value!r}")
    if meta.get("choices") and converted not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
    if isinstance(converted, (int, float)) and not isinstance(converted, bool) and _out_of_bounds(converted, meta):
        noun = "an integer" if kind == "int" else "a number"
        raise ConfigError(f"{where} must be {noun} {bounds}, got {value!r}")
    return converted


def _out_of_bounds(v: float, meta: Mapping[str, Any]) -> bool:
    return any(b is not None and not test(v, b) for b, test in (
        (meta.get("ge"), lambda x, y: x >= y), (meta.get("gt"), lambda x, y: x > y), (meta.get("lt"), lambda x, y: x < y)))


def _check_cross_fields(cfg: RunConfig) -> None:
    d, r, t = cfg.data, cfg.routing, cfg.train
    if d.kind == "grid":
        for key in ("target", "n", "s"):
            if getattr(d, key) is None:
                raise ConfigError(f"data.{key} is required when data.kind is 'grid'")
        if not d.a < d.b:
            raise ConfigError(f"data.a must be < data.b, got a={d.a}, b={d.b}; swap them")
        if d.s**d.n > 50_000_000:  # type: ignore[operator]
            raise ConfigError(f"data.s**data.n = {d.s**d.n} grid points is too many; lower data.s or data.n")  # type: ignore[operator]
        if d.path is not None:
            raise ConfigError("data.path is only read when data.kind is 'file'; remove it or set data.kind: file")
        if t.loss != "mse":
            raise ConfigError(f"train.loss must be 'mse' for grid regression data (data.kind: grid), got {t.loss!r}")
    else:
        if d.path is None:
            raise ConfigError("data.path is required when data.kind is 'file' (a safetensors file)")
        for key in ("target", "n", "s"):
            if getattr(d, key) is not None:
                raise ConfigError(f"data.{key} is only used when data.kind is 'grid'; remove it")
        if r.kind == "regular":
            raise ConfigError("routing.kind 'regular' needs the box of a grid (data.kind: grid); use routing.kind: kmeans")
        if not Path(d.path).is_file():
            raise ConfigError(f"data.path: file {d.path!r} does not exist; write x_train/y_train there first")
    if cfg.experts.batchnorm and t.batch_size < 2:
        raise ConfigError(f"train.batch_size must be >= 2 when experts.batchnorm is true, got {t.batch_size}")
    leaves = r.branching ** (r.depth * (d.n or 1)) if r.kind == "regular" else r.branching**r.depth
    if leaves > 1 << 22:
        raise ConfigError(f"routing gives {leaves} experts, too many; lower routing.depth or routing.branching")
