"""Time every chapter under a profile, and write the course guide's table of times.

    python scripts/time_chapters.py --profile default            # execute each chapter with nbclient
    python scripts/time_chapters.py --profile default --from-build-log build.log   # reuse a book build's timings

Writes ``momlp_lite/results/chapter_times_<profile>.json`` (with device, torch version, date and commit) and regenerates
``book/_course_times.md`` from every recorded profile.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.runtime import PROFILES, get_device, get_profile  # noqa: E402
from momlp_lite.runtime import load_results, write_results  # noqa: E402

TABLE = ROOT / "book" / "_course_times.md"
BUILD_LINE = re.compile(r"book/(\w+)\.ipynb: Executed notebook in ([\d.]+) seconds")


def chapters() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def execute_all(profile: str, only: list[str] | None) -> dict[str, float]:
    os.environ["MOMLP_PROFILE"] = profile
    times = {}
    for path in chapters():
        if only and path.stem not in only:
            continue
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        nbclient.NotebookClient(
            nb,
            timeout=get_profile(profile).cell_timeout_s,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
        times[path.stem] = round(time.perf_counter() - t0, 1)
        print(f"{path.stem:32s} {times[path.stem]:8.1f} s", flush=True)
    return times


def from_build_log(log: Path) -> dict[str, float]:
    times = {m.group(1): float(m.group(2)) for m in BUILD_LINE.finditer(log.read_text())}
    if not times:
        raise ValueError(f"no 'Executed notebook in' lines in {log}; pass the output of scripts/build_book.py")
    return times


def write_table() -> None:
    """Markdown table of every recorded profile's chapter times (minutes), for the course guide."""
    recorded = {p: load_results(f"chapter_times_{p}") for p in PROFILES}
    recorded = {p: r for p, r in recorded.items() if r}
    titles = {p.stem: _title(p) for p in chapters()}
    lines = ["| chapter | " + " | ".join(f"`{p}` profile" for p in recorded) + " |",
             "| --- |" + " --- |" * len(recorded)]
    for stem, title in titles.items():
        cells = [_fmt(r["chapters"].get(stem)) for r in recorded.values()]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines.append("")
    for p, r in recorded.items():
        meta = r.get("meta", {})
        commit = r.get("measured_commit") or meta.get("commit", "?")
        note = f" {r['note']}" if r.get("note") else ""
        lines.append(f"`{p}`: measured on {meta.get('device', '?')}, {meta.get('date_utc', '?')[:10]}, "
                     f"commit `{commit[:10]}`.{note}  ")
    TABLE.write_text("\n".join(lines) + "\n")


def _title(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        m = re.search(r"^# (.+)$", cell.source, re.M) if cell.cell_type == "markdown" else None
        if m:
            return m.group(1).strip()
    return path.stem


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--only", nargs="*", help="chapter stems to time (default: all)")
    parser.add_argument("--from-build-log", type=Path, help="read the times from a book build's output")
    parser.add_argument("--commit", help="with --from-build-log: the commit that build ran (default: HEAD)")
    parser.add_argument("--note", default="", help="a remark stored with the times (e.g. machine load)")
    args = parser.parse_args()
    profile = get_profile(args.profile).name
    name = f"chapter_times_{profile}"
    times = (load_results(name) or {}).get("chapters", {})
    new = from_build_log(args.from_build_log) if args.from_build_log else execute_all(profile, args.only)
    times.update(new)
    payload = {"profile": profile, "chapters": times, "note": args.note}
    if args.commit:
        payload["measured_commit"] = args.commit
    print("wrote", write_results(name, payload, device=get_device()))
    write_table()
    print("wrote", TABLE)


if __name__ == "__main__":
    main()
