"""The built wheel, installed outside the checkout, migrates and runs the demo.

A container image is built with `pip install .`: nothing of the repository is there but
what the wheel carries. The wheel is built offline (`--no-build-isolation`, hatchling from
the test extra) and installed with `--no-deps` into a fresh venv whose dependencies come
from this project's venv through a `.pth` path line (path lines are added to sys.path as
they are; the editable install's own hook in that folder is not run), so the package and
its sql/ come from the wheel alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow
PROJECT_FILES = ("pyproject.toml", "dg.toml", "setup.py", "setup.cfg")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from this checkout without the network."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("renderqueue-*.whl")
    return built


@pytest.fixture(scope="module")
def outside() -> Iterator[Path]:
    """A folder outside the checkout, with no project file in any parent (pytest's own
    temp folders are under the checkout here, where dagster would find pyproject.toml)."""
    folder = Path(tempfile.mkdtemp(prefix="rq-wheel-"))
    found = [p for p in (folder, *folder.parents) for n in PROJECT_FILES if (p / n).exists()]
    assert not found, f"a project file above {folder}: {found}"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(wheel: Path, outside: Path) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from this venv."""
    venv = outside / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv


def test_wheel_ships_every_sql_file_of_the_repository_in_its_subfolders(wheel: Path) -> None:
    in_repo = {p.relative_to(REPO / "sql").as_posix() for p in (REPO / "sql").rglob("*.sql")}
    with zipfile.ZipFile(wheel) as archive:
        prefix = "renderqueue_pipeline/_sql/"
        shipped = {n.removeprefix(prefix) for n in archive.namelist() if n.startswith(prefix)}
    assert in_repo, "no sql/ files found in the checkout"
    assert in_repo <= shipped, sorted(in_repo - shipped)


@pytest.mark.timeout(400)
def test_installed_wheel_runs_the_headless_demo_from_an_empty_directory(
    installed: Path, outside: Path, make_database: Callable[[], str]
) -> None:
    workdir = outside / "empty"
    workdir.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "VIRTUAL_ENV", "FAL_KEY", "DAGSTER_HOME"}
        and not key.startswith(("RENDERQUEUE_", "FAL_"))
    }
    env |= {
        "DATABASE_URL": make_database(),  # empty: the wheel's own sql/ migrates it
        "RENDERQUEUE_HOME": str(outside / "home"),
        "RENDERQUEUE_DAGSTER_DATABASE": os.environ["RENDERQUEUE_DAGSTER_DATABASE"],
        "PATH": f"{installed / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    }
    where = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import renderqueue_pipeline as r; print(r.__file__)",
        ],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert Path(where.strip()).is_relative_to(installed), where  # not this checkout
    run = subprocess.run(
        [str(installed / "bin" / "renderqueue"), "demo", "--headless"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "ledger matches the simulator's ground truth" in run.stdout
    assert list(workdir.iterdir()) == []  # nothing written to the directory it ran from
