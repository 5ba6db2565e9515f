"""The one-command GPU check and its carried wheels (scripts/gpu_check.sh, scripts/gpu_env.py,
scripts/gpu_wheels.sh), on this GPU-less machine.

- gpu_check.sh without a GPU says so and exits 0; with a GPU that nvidia-smi lists (a fake one here) and a torch
  that cannot see it, or no torch at all, it fails.
- gpu_env.py installs only the carried wheels this Python lacks, from files alone, and names what is missing.
- gpu_wheels.sh (needs the package index; skipped without it) leaves at most 60 MiB of wheels for CPython 3.12
  on manylinux x86_64 that install with ``pip install --no-index --no-deps`` into a fresh Python 3.12 venv
  holding what the GPU image holds (torch 2.11, transformers 5.17, …, no bitsandbytes), after which nothing
  qmiss needs is missing and a subset of the suite passes there: the lower bounds of pyproject.toml, tested.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from tests.helpers import index_unreachable

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_env", ROOT / "scripts/gpu_env.py")
gpu_env = importlib.util.module_from_spec(_spec)  # scripts/ is no package
_spec.loader.exec_module(gpu_env)

#: a GPU as ``nvidia-smi -L`` lists one.
H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-9a3b7c1e-0000-4000-8000-000000000000)"
#: what the lent GPU image holds of qmiss's requirements, beside the lower bounds of pyproject.toml (torch,
#: transformers, accelerate), at the versions its page lists where it gives one (KINDS.md, read 2026-11).
IMAGE_PINS = ["huggingface_hub==1.33.0", "numpy==2.5.2", "safetensors==0.8.0", "tokenizers==0.23.2"]
IMAGE_OTHERS = ["peft", "pytest", "matplotlib", "pandas", "pyarrow", "requests", "pyyaml", "tqdm", "xxhash", "fsspec",
                "psutil", "jinja2", "packaging"]
#: what the image lacks of qmiss's requirements: the carried wheels' reason to be.
IMAGE_LACKS = {"bitsandbytes", "trl", "datasets", "gguf"}
#: the suite's part that runs at the lower bounds (quick, no SmolLM2): layers, models, MoE, transformers' hooks.
LOWER_BOUND_TESTS = ["tests/test_layer.py", "tests/test_model.py", "tests/test_moe.py", "tests/test_hf.py"]


def run_check(*args: str, path: str, python: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("QMISS_PYTHON", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES")}
    environ.update(PATH=path, QMISS_PYTHON=python or sys.executable, **env)
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=300)


def path_without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())


def fake_nvidia_smi(folder: Path, output: str, status: int = 0) -> str:
    """A PATH whose nvidia-smi prints ``output`` and exits with ``status``."""
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {status}\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{path_without_nvidia_smi()}"


def test_sources_compile_without_warnings() -> None:
    """The GPU image runs Python 3.12, where an invalid escape in a docstring is a SyntaxWarning printed on first
    import (qmiss-train's stderr, which tests/test_quant.py asserts is empty); 3.11 raises a DeprecationWarning."""
    found = []
    for path in sorted([*ROOT.glob("qmiss/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
                        *ROOT.glob("scripts/*.py"), *ROOT.glob("examples/*.py")]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compile(path.read_text(), str(path), "exec")
        found += [f"{path.relative_to(ROOT)}:{w.lineno}: {w.message}" for w in caught]
    assert not found


# --- gpu_check.sh -------------------------------------------------------------------------------------------------


def test_without_nvidia_smi_it_says_no_gpu_and_exits_0() -> None:
    proc = run_check(path=path_without_nvidia_smi(), python="/nonexistent/python")  # no Python is even looked at
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout and "nothing was checked" in proc.stdout


def test_nvidia_smi_that_lists_no_gpu_is_no_gpu(tmp_path) -> None:
    proc = run_check(path=fake_nvidia_smi(tmp_path / "bin", "No devices were found", status=6),
                     python="/nonexistent/python")
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout and "No devices were found" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
def test_a_gpu_that_torch_does_not_see_fails(tmp_path) -> None:
    proc = run_check(path=fake_nvidia_smi(tmp_path / "bin", H100), CUDA_VISIBLE_DEVICES="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    assert f"torch {torch.__version__} ({build}" in proc.stderr
    assert "CUDA_VISIBLE_DEVICES='0'" in proc.stderr and H100 in proc.stderr
    assert "gpu_env" not in proc.stdout + proc.stderr  # failed before any install


def test_a_gpu_and_a_python_without_torch_fails(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv/bin/python")
    proc = run_check(path=fake_nvidia_smi(tmp_path / "bin", H100), python=python)
    assert proc.returncode == 1
    assert f"{python} has no torch" in proc.stderr and "never installs torch" in proc.stderr


# --- gpu_env.py ---------------------------------------------------------------------------------------------------


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel of one module."""
    folder.mkdir(exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                     *(f"Requires-Dist: {r}\n" for r in requires)]),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: qmiss-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for arcname, text in files.items():
            archive.writestr(arcname, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return wheel


def run_env(wheels: Path, site: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "scripts/gpu_env.py", str(wheels), str(site)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_gpu_env_installs_only_what_is_missing_and_names_what_still_is(tmp_path) -> None:
    wheels = tmp_path / "whl"
    make_wheel(wheels, "torch", "0.0.1")  # this Python has torch: kept, never replaced
    make_wheel(wheels, "qmiss_carried", "1.0", requires=("qmiss-nowhere>=2", "torch>=99", "pyyaml; extra == 'x'"))
    proc = run_env(wheels, tmp_path / "site")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "installed from" in proc.stdout and ": qmiss-carried;" in proc.stdout
    assert f"already here, kept: torch {torch.__version__}" in proc.stdout
    assert (tmp_path / "site/qmiss_carried/__init__.py").is_file() and not (tmp_path / "site/torch").exists()
    # (a test-only environment lacks qmiss's bench extras too, named first on the same line)
    assert "missing: " in proc.stderr and "qmiss-nowhere (qmiss-carried needs qmiss-nowhere>=2)" in proc.stderr
    assert f"warning: torch {torch.__version__} is here; qmiss-carried needs torch>=99" in proc.stdout
    assert "pyyaml" not in proc.stdout + proc.stderr  # an extra's requirement is not one

    (wheels / "qmiss_carried-1.0-py3-none-any.whl").unlink()
    make_wheel(wheels, "qmiss_carried", "1.1")  # its requirements met: nothing missing
    proc = run_env(wheels, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site/qmiss_carried/__init__.py").read_text() == "VERSION = '1.1'\n"


def test_gpu_env_installs_with_a_python_that_has_no_pip(tmp_path, monkeypatch) -> None:
    """An image's Python made by uv has no pip: the carried wheels are unpacked into the folder instead."""
    spec = importlib.util.spec_from_file_location("gpu_env", ROOT / "scripts/gpu_env.py")
    gpu_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_env)
    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_env.importlib.util, "find_spec", lambda name, *a: None if name == "pip" else real(name, *a))
    monkeypatch.setattr(sys, "path", list(sys.path))  # install() puts the folder first, as PYTHONPATH would
    make_wheel(tmp_path / "whl", "qmiss_carried", "1.0")
    assert gpu_env.install(gpu_env.carried(tmp_path / "whl"), tmp_path / "site") == ["qmiss-carried"]
    assert (tmp_path / "site/qmiss_carried/__init__.py").read_text() == "VERSION = '1.0'\n"
    assert gpu_env.installed_version("qmiss-carried") == "1.0"


def test_gpu_env_refuses_two_versions_of_one_package(tmp_path) -> None:
    make_wheel(tmp_path / "whl", "qmiss_carried", "1.0")
    make_wheel(tmp_path / "whl", "QMiss_Carried", "1.1")  # the same distribution, as PEP 503 compares names
    proc = run_env(tmp_path / "whl", tmp_path / "site")
    assert proc.returncode != 0 and "two wheels of qmiss-carried" in proc.stderr


def test_gpu_env_reads_qmiss_requirements_from_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {canonicalize_name(r.name) for r in gpu_env.qmiss_requirements()}
    declared = {canonicalize_name(Requirement(line).name) for line in
                [*project["dependencies"], *project["optional-dependencies"]["test"],
                 *project["optional-dependencies"]["bench"]]}
    assert names == declared - gpu_env.NOT_FOR_THE_GPU_CHECK and IMAGE_LACKS < names


# --- gpu_wheels.sh, and the lower bounds on the image's versions ---------------------------------------------------


def python312() -> str | None:
    """A CPython 3.12: $QMISS_PYTHON312, python3.12 on PATH, or pyenv's."""
    home = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [os.environ.get("QMISS_PYTHON312"), shutil.which("python3.12"),
                  *map(str, sorted(home.glob("versions/3.12*/bin/python3.12")))]
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 12))"],
                               capture_output=True)
        if check.returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def carried_wheels(tmp_path_factory) -> Path:
    if reason := index_unreachable():
        pytest.skip(reason)
    dest = tmp_path_factory.mktemp("whl")
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", str(dest)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


def lower_bounds() -> list[str]:
    """torch, transformers and accelerate at pyproject.toml's lowest versions (the GPU image's)."""
    pins = []
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(line)
        if req.name in ("torch", "transformers", "accelerate"):
            (low,) = [s.version for s in req.specifier if s.operator == ">="]
            pins.append(f"{req.name}=={low}.*")
    return pins


@pytest.fixture(scope="module")
def image_site(carried_wheels) -> Path:
    """The site-packages of a Python 3.12 venv holding what the GPU image holds, built once per pin set (minutes:
    torch's CUDA wheel and its libraries) and kept in $QMISS_CACHE (default ~/.cache/qmiss)."""
    python = python312()
    if python is None:
        pytest.skip("no CPython 3.12 here (pyenv install 3.12, or QMISS_PYTHON312=/path/to/python3.12)")
    spec = [*lower_bounds(), *IMAGE_PINS, *IMAGE_OTHERS]
    cache = Path(os.environ.get("QMISS_CACHE", Path.home() / ".cache" / "qmiss"))
    venv = cache / f"gpu-image-py312-{hashlib.sha256(' '.join(spec).encode()).hexdigest()[:12]}"
    if not (venv / "complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        proc = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               *spec], capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (venv / "complete").write_text(" ".join(spec) + "\n")
    (site,) = venv.glob("lib/python3.12/site-packages")
    return site


def test_gpu_wheels_fit_and_are_for_the_image(carried_wheels) -> None:
    wheels = sorted(carried_wheels.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    assert total <= 60 * 2**20, f"{total / 2**20:.1f} MiB"
    names = [parse_wheel_filename(w.name)[0] for w in wheels]
    assert len(set(names)) == len(names) and IMAGE_LACKS <= set(names)
    image_tags = {*cpython_tags((3, 12), platforms=["manylinux_2_28_x86_64", "manylinux_2_24_x86_64",
                                                     "manylinux_2_17_x86_64", "linux_x86_64"]),
                  *compatible_tags((3, 12), "cp312", platforms=["manylinux_2_28_x86_64", "manylinux_2_24_x86_64"])}
    for wheel in wheels:
        assert parse_wheel_filename(wheel.name)[3] & image_tags, wheel.name
    locked = {canonicalize_name(line.split("==")[0]): line.split("==")[1].strip()
              for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    for wheel in wheels:  # the tested versions
        name, version, *_ = parse_wheel_filename(wheel.name)
        assert str(version) == locked[name], wheel.name


@pytest.mark.image  # opt-in: PyPI has torch 2.11 only as a 5 GB CUDA build (the CPU one is on download.pytorch.org)
def test_the_wheels_install_offline_into_a_fresh_312_venv_with_the_image_packages(carried_wheels, image_site,
                                                                                   tmp_path) -> None:
    """A fresh venv that sees the image's packages (a .pth to them) and has no bitsandbytes; the wheels go in with
    ``pip install --no-index --no-deps``; then nothing is missing and a subset of the suite passes there."""
    python312_ = python312()
    venv = tmp_path / "venv"
    subprocess.run([python312_, "-m", "venv", str(venv)], check=True)
    (own_site,) = venv.glob("lib/python3.12/site-packages")
    (own_site / "gpu_image.pth").write_text(f"{image_site}\n")
    python = str(venv / "bin/python")
    probe = "import importlib.util, torch, transformers; print(torch.__version__, transformers.__version__, " \
            "importlib.util.find_spec('bitsandbytes') is None)"
    have = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    lows = {p.split("==")[0]: p.split("==")[1].removesuffix(".*") for p in lower_bounds()}
    assert have[0].startswith(lows["torch"] + ".") and have[1].startswith(lows["transformers"] + ".")
    assert have[2] == "True"  # no bitsandbytes yet

    empty = tmp_path / "empty"
    empty.mkdir()
    before = run_env(empty, tmp_path / "site", python)
    assert before.returncode == 1
    assert {name for name in IMAGE_LACKS if f"{name} (qmiss needs" in before.stderr} == IMAGE_LACKS, before.stderr

    install = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                              "--no-deps", *map(str, sorted(carried_wheels.glob("*.whl")))],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    after = run_env(empty, tmp_path / "site", python)
    assert after.returncode == 0, after.stdout + after.stderr
    imports = subprocess.run([python, "-c", "import bitsandbytes, trl, datasets, gguf, qmiss"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert imports.returncode == 0, imports.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *LOWER_BOUND_TESTS],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert tests.returncode == 0, tests.stdout[-5000:]
