"""environment.yml (conda) and pyproject.toml (pip) list the same dependencies with the same bounds."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}
EXTRAS = ("book", "test", "vision")


def _pip_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    parsed = [Requirement(r) for r in reqs]
    return {r.name.lower(): str(r.specifier) for r in parsed}


def _conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if not isinstance(dep, str) or dep.split("=")[0] in {"python", "pip"}:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", dep)
        assert m, f"cannot parse conda dependency {dep!r}"
        name = CONDA_TO_PIP.get(m.group(1).lower(), m.group(1).lower())
        out[name] = str(Requirement(f"{name}{m.group(2)}").specifier)
    return out


def test_conda_and_pip_list_the_same_dependencies():
    pip, conda = _pip_requirements(), _conda_requirements()
    assert sorted(pip) == sorted(conda), f"only pip: {set(pip) - set(conda)}; only conda: {set(conda) - set(pip)}"
    for name in pip:
        assert pip[name] == conda[name], f"{name}: pip {pip[name]!r} vs conda {conda[name]!r}"


def test_environment_is_a_valid_conda_file_that_installs_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert set(env) == {"name", "channels", "dependencies"}
    assert "python=3.11" in env["dependencies"]
    pip_part = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert pip_part and any("--editable ." in line for line in pip_part[0]["pip"])


def test_torch_is_not_pinned_in_the_package_but_is_for_local_installs():
    assert not any("==" in spec for name, spec in _pip_requirements().items() if name in {"torch", "torchvision"})
    pins = (ROOT / "requirements" / "pins.txt").read_text()
    assert re.search(r"^torch==\d", pins, re.M) and re.search(r"^torchvision==\d", pins, re.M)
