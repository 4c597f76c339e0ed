"""Build the book under one run profile: ``python scripts/build_book.py --profile smoke --out _build/smoke``.

Copies plotly.js (from the plotly package), MathJax and reveal.js (from the npm packages that
``scripts/ensure_web_assets.sh`` installs) into the book's static folder, so every page and deck works with no
network; writes a copy of ``_config.yml`` whose cell timeout is the profile's; runs ``jupyter-book build`` with
``MOMLP_PROFILE`` and ``MOMLP_BOOK_BUILD=1`` set so every chapter executes under that profile; then builds one
reveal.js deck per chapter into ``_build/html/slides/`` (``scripts/build_slides.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import plotly
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.runtime import get_profile  # noqa: E402
from momlp_lite.viz.figures import BOOK_BUILD_ENV  # noqa: E402


def ship_plotly_js() -> Path:
    """Copy the installed plotly.min.js into book/_static (the page loads it from there)."""
    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    dst = ROOT / "book" / "_static" / "plotly.min.js"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        shutil.copyfile(src, dst)
    return dst


WEB = ROOT / "scripts" / "web" / "node_modules"
# The parts of MathJax 3's es5 bundle the pages use: the TeX+MathML -> CommonHTML component, its fonts,
# the TeX extensions it may autoload, and the menu/assistive parts it loads lazily.
MATHJAX_PARTS = ["tex-mml-chtml.js", "output/chtml", "input/tex/extensions", "ui", "a11y", "adaptors"]
REVEAL_PARTS = ["dist", "plugin/notes"]


def _copy_parts(src: Path, dst: Path, parts: list[str]) -> Path:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is missing: run `bash scripts/ensure_web_assets.sh` (make does it)")
    for part in parts:
        s, d = src / part, dst / part
        if s.is_dir():
            shutil.copytree(s, d, dirs_exist_ok=True)
        elif s.is_file():
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s, d)
    return dst


def ship_web_assets() -> None:
    """Copy MathJax and reveal.js from the installed npm packages into book/_static (served with the book)."""
    if not (WEB / "mathjax").is_dir():
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure_web_assets.sh")], check=True)
    _copy_parts(WEB / "mathjax" / "es5", ROOT / "book" / "_static" / "mathjax", MATHJAX_PARTS)
    _copy_parts(WEB / "reveal.js", ROOT / "book" / "_static" / "revealjs", REVEAL_PARTS)


def profile_config(profile: str, out: Path) -> Path:
    """Write ``_config.yml`` with the profile's cell timeout into ``out`` and return its path."""
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    cfg["execute"]["timeout"] = get_profile(profile).cell_timeout_s
    # Jupyter Book resolves local extension folders against the config file's folder.
    local = cfg.get("sphinx", {}).get("local_extensions") or {}
    for name, folder in local.items():
        local[name] = str((ROOT / folder).resolve())
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"_config.{profile}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def build(profile: str, out: Path) -> Path:
    """Build the HTML book into ``out/_build/html`` and return that folder."""
    get_profile(profile)  # fail early on a bad name
    ship_plotly_js()
    ship_web_assets()
    config = profile_config(profile, out)
    env = dict(os.environ, MOMLP_PROFILE=profile, **{BOOK_BUILD_ENV: "1"})
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", "--all", str(ROOT), "--config", str(config), "--path-output", str(out)]
    print("+", " ".join(cmd), f"(MOMLP_PROFILE={profile})", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    html = out / "_build" / "html"
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_course import toc_chapters
    from build_slides import build_decks

    counts = build_decks(toc_chapters(), html, out / "_build" / "jupyter_execute" / "book")
    print(f"{len(counts)} decks in {html / 'slides'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return html


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=os.environ.get("MOMLP_PROFILE", "default"))
    parser.add_argument("--out", type=Path, default=ROOT, help="folder that receives _build/html")
    args = parser.parse_args()
    html = build(args.profile, args.out.resolve())
    print(f"\nThe book is at {html / 'index.html'}")


if __name__ == "__main__":
    main()
