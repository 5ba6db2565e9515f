"""Ready this Python for the GPU check from carried wheels, and name what is still missing.

    python scripts/gpu_env.py WHEEL_DIR SITE

Run by scripts/gpu_check.sh with the Python that holds torch. No package index is asked (the lent GPU machine
has none): each wheel in WHEEL_DIR (filled by scripts/gpu_wheels.sh) whose distribution this Python lacks is
installed into SITE with ``pip install --no-index --no-deps --target``; a distribution it already has is kept,
whatever the wheel's version. SITE is emptied first, so it holds exactly this run's installs; the caller puts
it on PYTHONPATH. (A ``venv --system-site-packages`` made from the GPU image's Python would not do: that Python
is itself a venv, and a new venv sees its base interpreter's site-packages, not the image's torch.)

Then every requirement is checked against what this Python (with SITE) has:
- qmiss's own, from pyproject.toml: the dependencies and the ``test`` and ``bench`` extras, less
  import-linter (the layering lint of scripts/test.sh) and matplotlib (the benchmarks' plots; bench_gpu.py
  draws none), which the check does not run: missing, or outside qmiss's range, fails;
- each installed carried wheel's own Requires-Dist (no extras): missing fails; outside that package's range
  is printed as a warning (the image's version may still work, and the GPU tests will tell).

Exit status: 0 when nothing is missing, 1 otherwise, after one line naming each missing distribution and the
command that carries it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
#: qmiss requirements the GPU check does not use.
NOT_FOR_THE_GPU_CHECK = {"import-linter", "matplotlib"}  # the layering check and plots: neither runs in the GPU check
FILL = "bash scripts/gpu_wheels.sh on a machine with a package index, then carry .whl"


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def carried(wheel_dir: Path) -> dict[str, Path]:
    """{canonical distribution name: wheel file}; two wheels of one distribution are refused."""
    wheels: dict[str, Path] = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name = parse_wheel_filename(wheel.name)[0]
        if name in wheels:
            raise SystemExit(f"gpu_env: two wheels of {name} in {wheel_dir}: {wheels[name].name}, {wheel.name}; "
                             f"keep one ({FILL})")
        wheels[name] = wheel
    return wheels


def qmiss_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["test"],
             *project["optional-dependencies"]["bench"]]
    reqs = {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}
    return [req for name, req in reqs.items() if name not in NOT_FOR_THE_GPU_CHECK]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The Requires-Dist of a wheel that apply here without extras."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        meta = archive.read(name).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
            if line.startswith("Requires-Dist:")]
    return [req for req in reqs if req.marker is None or req.marker.evaluate({"extra": ""})]


def install(wheels: dict[str, Path], site: Path) -> list[str]:
    """Installs into ``site`` the carried wheels whose distribution is missing; returns their names."""
    shutil.rmtree(site, ignore_errors=True)
    wanted = [wheel for name, wheel in wheels.items() if installed_version(name) is None]
    if wanted and importlib.util.find_spec("pip") is not None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                        "--no-deps", "--no-compile", "--target", str(site), *map(str, wanted)], check=True)
    elif wanted:  # a Python without pip (a uv-made venv): a wheel is a zip of its files, laid out for site-packages
        for wheel in wanted:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
    sys.path.insert(0, str(site))  # what PYTHONPATH gives the check's later processes
    return [parse_wheel_filename(w.name)[0] for w in wanted]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    wheel_dir, site = Path(argv[0]), Path(argv[1])
    wheels = carried(wheel_dir) if wheel_dir.is_dir() else {}
    new = install(wheels, site)
    kept = [f"{name} {installed_version(name)}" for name in wheels if name not in new]
    print(f"gpu_env: installed from {wheel_dir}/ into {site}: {', '.join(new) or 'nothing'}"
          + (f"; already here, kept: {', '.join(kept)}" if kept else ""))

    missing, errors, warnings = {}, [], []
    checks = [("qmiss", req) for req in qmiss_requirements()]
    checks += [(name, req) for name in new for req in wheel_requirements(wheels[name])]
    for who, req in checks:
        version = installed_version(req.name)
        if version is None:
            missing.setdefault(canonicalize_name(req.name), []).append(f"{who} needs {req}")
        elif not req.specifier.contains(version, prereleases=True):
            line = f"{req.name} {version} is here; {who} needs {req}"
            (errors if who == "qmiss" else warnings).append(line)
    for line in warnings:
        print(f"gpu_env: warning: {line}")
    for line in errors:
        print(f"gpu_env: {line}", file=sys.stderr)
    if missing:
        named = "; ".join(f"{name} ({', '.join(why)})" for name, why in missing.items())
        print(f"gpu_env: missing: {named}; "
              f"no wheel for {'them' if len(missing) > 1 else 'it'} in {wheel_dir}/: {FILL}", file=sys.stderr)
    return 1 if missing or errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
