"""Run configurations: one YAML or TOML file that says how to train a MoMLP.

A config file has a top-level ``seed`` and ``profile`` and five tables::

    seed: 0
    profile: smoke            # optional: else $MOMLP_PROFILE (default "default")
    data:      {kind: grid, target: sine, n: 2, s: 32}
    routing:   {kind: regular, depth: 2, branching: 2}
    experts:   {width: 32, hidden_layers: 3, prelu: true}
    optimiser: {name: adam, lr: 1.0e-3, epochs: 50, batch_size: 64}
    run:       {output_dir: runs/sine, experts_per_step: 4}

Any single value may instead be a table with exactly the keys ``smoke``, ``default`` and ``paper``
(``width: {smoke: 8, default: 64, paper: 1000}``): the run's profile picks one, as
:func:`momlp_lite.config.choose` does in the chapters.

:func:`load_run_config` validates everything **before any training starts**: an unknown key, a
wrong type, a size below its minimum or a missing data file raises :class:`ConfigError` (a
``ValueError``) whose message names the key, e.g.
``experts.width must be an integer >= 1, got -3``.
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

from ..runtime import PROFILES, get_profile
from ..data import TARGETS

__all__ = [
    "ConfigError",
    "DataSection",
    "RoutingSection",
    "ExpertSection",
    "OptimiserSection",
    "RunSection",
    "RunConfig",
    "load_run_config",
    "parse_run_config",
    "read_config_file",
]


class ConfigError(ValueError):
    """A config file is invalid; the message names the offending key and the fix."""


def _spec(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, choices: tuple[str, ...] | None = None,
          doc: str = "") -> Any:
    """A dataclass field with the constraints the validator checks."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "doc": doc}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataSection:
    """Where the training data comes from.

    ``kind: grid`` samples ``target`` on the ``s**n`` grid over ``[a, b]**n`` with a seeded
    ``test_fraction`` split (:func:`momlp_lite.data.make_grid_data`). ``kind: file`` reads a
    safetensors file ``path`` holding ``x_train [N, n]``, ``y_train [N, k]`` (and optionally
    ``x_test``, ``y_test``).
    """

    kind: str = _spec("grid", choices=("grid", "file"), doc="grid or file")
    target: str | None = _spec(None, choices=tuple(sorted(TARGETS)), doc="grid target function")
    n: int | None = _spec(None, ge=1, doc="input dimension (grid)")
    s: int | None = _spec(None, ge=2, doc="grid points per axis (grid)")
    a: float = _spec(0.0, doc="left end of the box (grid)")
    b: float = _spec(1.0, doc="right end of the box (grid)")
    test_fraction: float = _spec(0.2, gt=0.0, lt=1.0, doc="share of points held out for testing (grid)")
    path: str | None = _spec(None, doc="safetensors file with x_train, y_train (file)")


@dataclass(frozen=True)
class RoutingSection:
    """The routing tree: ``regular`` (nested sub-boxes of the grid's box) or ``kmeans`` (recursive k-means)."""

    kind: str = _spec("regular", choices=("regular", "kmeans"))
    depth: int = _spec(2, ge=1)
    branching: int = _spec(2, ge=2, doc="pieces per axis (regular) or children per node (kmeans)")
    iters: int = _spec(25, ge=1, doc="Lloyd iterations per level (kmeans)")


@dataclass(frozen=True)
class ExpertSection:
    """The size of every expert MLP: ``n -> width (x hidden_layers) -> outputs``."""

    width: int = _spec(32, ge=1)
    hidden_layers: int = _spec(3, ge=1)
    prelu: bool = _spec(True, doc="learnable PReLU (else ReLU)")
    batchnorm: bool = _spec(False, doc="BatchNorm1d before each activation")


@dataclass(frozen=True)
class OptimiserSection:
    """How each expert is trained (Algorithm 2: every expert on its own leaf's data).

    ``epochs`` counts passes over the *largest* expert's training shard, so every expert runs the
    same number of steps whichever process trains it. ``patience`` (evaluations without
    improvement on the expert's own validation split) stops an expert early; ``null`` never does.
    """

    name: str = _spec("adam", choices=("adam", "adamw"))
    lr: float = _spec(1e-3, gt=0.0)
    weight_decay: float | None = _spec(None, ge=0.0, doc="null: the optimiser's default (Adam 0, AdamW 0.01)")
    epochs: float = _spec(50.0, gt=0.0)
    batch_size: int = _spec(64, ge=1)
    val_fraction: float = _spec(0.1, ge=0.0, lt=1.0)
    patience: int | None = _spec(10, ge=1)
    loss: str = _spec("mse", choices=("mse", "cross_entropy"))


@dataclass(frozen=True)
class RunSection:
    """Where the store goes and how the work is cut into pieces (does not change the weights)."""

    output_dir: str = _spec("momlp_run", doc="shared output directory (relative to the working directory)")
    experts_per_step: int = _spec(8, ge=1, doc="experts trained together in lockstep, then saved")


@dataclass(frozen=True)
class RunConfig:
    """A whole, validated run configuration (profile-dependent values already resolved)."""

    data: DataSection
    seed: int = _spec(0, ge=0)
    profile: str = _spec("default", choices=tuple(PROFILES))
    routing: RoutingSection = field(default_factory=RoutingSection)
    experts: ExpertSection = field(default_factory=ExpertSection)
    optimiser: OptimiserSection = field(default_factory=OptimiserSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-able) of the resolved config."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """sha256 of everything that determines the experts' weights.

        Excludes ``run`` (where the files go, how the work is chunked) and ``profile`` (already
        resolved into the values). Stored in every expert file, so a resumed run never mixes
        experts trained under different settings.
        """
        d = self.to_dict()
        d.pop("run")
        d.pop("profile")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some top-level fields replaced (sections as dataclasses)."""
        return dataclasses.replace(self, **changes)

    def with_output_dir(self, output_dir: str | os.PathLike[str]) -> "RunConfig":
        """A copy that writes to ``output_dir`` (same fingerprint: the weights do not change)."""
        return self.replace(run=dataclasses.replace(self.run, output_dir=str(output_dir)))


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "routing": RoutingSection,
    "experts": ExpertSection,
    "optimiser": OptimiserSection,
    "run": RunSection,
}
_TOP_SCALARS = ("seed", "profile")
_PROFILE_KEYS = frozenset(PROFILES)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.yaml``/``.yml`` or ``.toml`` file into a dict (no validation)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a .yaml or .toml file")
    suffix = p.suffix.lower()
    text = p.read_text()
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
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ConfigError("reading TOML on Python 3.10 needs 'pip install tomli'; or use YAML") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML: {err}") from None
    else:
        raise ConfigError(f"config file {str(p)!r} must end in .yaml, .yml or .toml, got {suffix!r}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a table of keys, got {type(raw).__name__}")
    return raw


def load_run_config(
    path: str | os.PathLike[str],
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read and validate a config file; see :func:`parse_run_config` for ``profile`` and ``overrides``.

    A relative ``data.path`` is taken relative to the config file's folder.
    """
    raw = read_config_file(path)
    return parse_run_config(raw, profile=profile, overrides=overrides, base_dir=Path(path).resolve().parent)


def parse_run_config(
    raw: Mapping[str, Any],
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> RunConfig:
    """Validate a nested dict and return a :class:`RunConfig`.

    Parameters
    ----------
    raw : mapping
        The file's contents.
    profile : str, optional
        Profile that resolves ``{smoke:, default:, paper:}`` values. Precedence: this argument, then
        the config's ``profile`` key, then ``$MOMLP_PROFILE``.
    overrides : mapping, optional
        Dotted keys replacing values after reading, e.g. ``{"run.output_dir": "/scratch/run1"}``.
    base_dir : path, optional
        Folder a relative ``data.path`` is taken from (default: the working directory); the
        returned config holds the absolute path.

    Raises
    ------
    ConfigError
        Naming the key for unknown keys, wrong types, out-of-range values, a missing ``data``
        table or a missing data file.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a table of keys, got {type(raw).__name__}")
    raw = _apply_overrides(dict(raw), overrides or {})
    _reject_unknown(raw, (*_TOP_SCALARS, *_SECTIONS), prefix="")
    prof_name = _resolve_profile(profile, raw.get("profile"))
    values: dict[str, Any] = {"profile": prof_name}
    if "seed" in raw:
        values["seed"] = _check_value(RunConfig, "seed", _pick(raw["seed"], "seed", prof_name), "seed")
    if "data" not in raw:
        raise ConfigError(
            "data: missing table; add one, e.g. 'data: {kind: grid, target: sine, n: 2, s: 32}'"
        )
    for name, cls in _SECTIONS.items():
        if name in raw:
            values[name] = _parse_section(cls, raw[name], name, prof_name)
    cfg = RunConfig(**values)
    if cfg.data.path is not None:
        full = Path(base_dir or os.getcwd()) / cfg.data.path
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, path=str(full.resolve())))
    _check_cross_fields(cfg)
    return cfg


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = raw
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a table")
            else:
                nxt = node[part] = dict(nxt)
            node = nxt
        node[parts[-1]] = value
    return raw


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in known:
            where = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key '{where}'{hint}")


def _resolve_profile(arg: str | None, in_file: Any) -> str:
    if in_file is not None and (not isinstance(in_file, str) or in_file not in PROFILES):
        raise ConfigError(f"profile must be one of {sorted(PROFILES)}, got {in_file!r}")
    if arg is not None:
        return get_profile(arg).name
    return in_file if in_file is not None else get_profile().name


def _pick(value: Any, key: str, profile: str) -> Any:
    """Resolve a ``{smoke:, default:, paper:}`` table to the profile's value."""
    if isinstance(value, Mapping):
        keys = set(value)
        if keys != _PROFILE_KEYS:
            missing = sorted(_PROFILE_KEYS - keys)
            extra = sorted(keys - _PROFILE_KEYS)
            raise ConfigError(
                f"{key}: a per-profile value needs exactly the keys smoke, default, paper"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
            )
        return value[profile]
    return value


def _parse_section(cls: type, table: Any, name: str, profile: str) -> Any:
    if table is None:
        table = {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{name} must be a table of keys, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(table, tuple(fields), prefix=f"{name}.")
    values = {
        key: _check_value(cls, key, _pick(value, f"{name}.{key}", profile), f"{name}.{key}")
        for key, value in table.items()
    }
    return cls(**values)


def _check_value(cls: type, key: str, value: Any, where: str) -> Any:
    """Type- and range-check one value against the field's declared type and constraints."""
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    meta = f.metadata
    kind = str(f.type)
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must be set (got an empty value)")
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer{_bounds_text(meta)}, got {value!r}")
    elif kind.startswith("float"):
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` as a string; accept numeric text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number{_bounds_text(meta)}, got {value!r}")
        value = float(value)
    elif kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif kind.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = all(
            bound is None or test(value, bound)
            for bound, test in (
                (meta["ge"], lambda v, b: v >= b),
                (meta["gt"], lambda v, b: v > b),
                (meta["le"], lambda v, b: v <= b),
                (meta["lt"], lambda v, b: v < b),
            )
        )
        if not ok:
            noun = "an integer" if kind.startswith("int") else "a number"
            raise ConfigError(f"{where} must be {noun}{_bounds_text(meta)}, got {value!r}")
    return value


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = [f"{op} {meta[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
             if meta[k] is not None]
    return (" " + " and ".join(parts)) if parts else ""


def _check_cross_fields(cfg: RunConfig) -> None:
    d = cfg.data
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
    else:
        if d.path is None:
            raise ConfigError("data.path is required when data.kind is 'file' (a safetensors file)")
        for key in ("target", "n", "s"):
            if getattr(d, key) is not None:
                raise ConfigError(f"data.{key} is only used when data.kind is 'grid'; remove it")
        if cfg.routing.kind == "regular":
            raise ConfigError(
                "routing.kind 'regular' needs the box of a grid (data.kind: grid); use routing.kind: kmeans"
            )
        if not Path(d.path).is_file():
            raise ConfigError(f"data.path: file {d.path!r} does not exist; write x_train/y_train there first")
    if cfg.experts.batchnorm and cfg.optimiser.batch_size < 2:
        raise ConfigError(
            f"optimiser.batch_size must be >= 2 when experts.batchnorm is true, got {cfg.optimiser.batch_size}"
        )
    if d.kind == "grid" and cfg.optimiser.loss != "mse":
        raise ConfigError("optimiser.loss must be 'mse' for grid regression data (data.kind: grid)")
    if cfg.routing.kind == "regular":
        leaves = cfg.routing.branching ** (cfg.routing.depth * (d.n or 1))
    else:
        leaves = cfg.routing.branching**cfg.routing.depth
    if leaves > 1 << 22:
        raise ConfigError(f"routing gives {leaves} experts, too many; lower routing.depth or routing.branching")
