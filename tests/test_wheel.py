"""The built wheel carries the catalog and the schemas, and pefref installed from it works outside the checkout.

The wheel is built from a copy of the package's sources (so the checkout gets no
``build/`` folder), installed with ``--no-deps --no-index`` into a fresh virtual
environment that sees the current environment's packages through a ``.pth``
line (torch, transformers, ... are not installed again), and the commands run
from an empty folder with no ``PYTHONPATH``: nothing can come from the checkout.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about a minute and a half on a quiet 2-core machine, most of it `pefref site`

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pefref", "catalog", "schemas", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md")
"""What a build reads (pyproject.toml names README.md as the long description)."""


def _data_files(folder: str) -> set[str]:
    """The files of the repository's ``folder`` that a wheel must carry (caches and byte code left out)."""
    base = ROOT / folder
    return {p.relative_to(base).as_posix() for p in base.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(p, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (found,) = dist.glob("pefref-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel) -> Path:
    """A virtual environment with pefref installed from the wheel (its bin folder); other packages come from ours."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    (purelib,) = env.glob("lib/python*/site-packages")
    (purelib / "_parent_env.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return env / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PEFREF_CATALOG")}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


def test_wheel_carries_every_catalog_and_schema_file(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("catalog", "schemas"):
        inside = {n.removeprefix(f"pefref/{folder}/") for n in names if n.startswith(f"pefref/{folder}/")}
        assert inside == _data_files(folder), folder
    yaml = [n for n in names if n.endswith(".yaml")]
    assert len(yaml) >= 40 and any(n.startswith("pefref/catalog/techniques/") for n in yaml)
    assert any(n.startswith("pefref/catalog/experiments/data/") and n.endswith(".jsonl") for n in names)
    assert len([n for n in names if n.startswith("pefref/schemas/") and n.endswith(".schema.json")]) >= 8
    assert not any(n.startswith(("catalog/", "schemas/", "tests/")) for n in names)  # only inside the package


def test_installed_pefref_reads_its_own_catalog(installed, tmp_path) -> None:
    probe = ("import pefref; from pefref.language.bundled import bundled_data; d = bundled_data(); "
             "print(pefref.__file__); print(d.catalog); print(d.checkout); print(len(pefref.default_catalog().techniques))")
    run = _run(installed, tmp_path, "python", "-c", probe)
    assert run.returncode == 0, run.stderr
    module, catalog, checkout, count = run.stdout.split()
    env = installed.parent.resolve()
    assert Path(module).resolve().is_relative_to(env) and Path(catalog).resolve().is_relative_to(env)
    assert Path(catalog).name == "catalog" and Path(catalog).parent.name == "pefref"
    assert checkout == "None"
    assert int(count) == len(list((ROOT / "catalog" / "techniques").glob("*.yaml")))


def test_installed_commands_work_outside_the_checkout(installed, tmp_path) -> None:
    run = _run(installed, tmp_path, "pefref", "validate")
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout + run.stderr
    run = _run(installed, tmp_path, "pefref", "list", "--json")
    assert run.returncode == 0 and '"id": "lora"' in run.stdout, run.stderr
    run = _run(installed, tmp_path, "pefref", "apply", "lora", "--model", "tiny-llama", "--json")
    assert run.returncode == 0 and '"trainable": 1792' in run.stdout, run.stdout + run.stderr
    run = _run(installed, tmp_path, "pefref", "diagram", "lora", "-o", "x.svg")
    assert run.returncode == 0 and (tmp_path / "x.svg").read_text().lstrip().startswith(("<?xml", "<svg")), run.stderr
    run = _run(installed, tmp_path, "pefref", "schema", "--check")
    assert run.returncode == 0, run.stdout + run.stderr
    run = _run(installed, tmp_path, "pefref", "schema")  # no repository to write schemas/ into
    assert run.returncode == 1 and "--out" in run.stderr and "Traceback" not in run.stderr
    run = _run(installed, tmp_path, "pefref", "site", "-o", "out")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "out" / "techniques" / "lora.html").is_file() and (tmp_path / "out" / "index.html").is_file()
