"""Nothing in the repository may stand in for a package that a dependency imports.

The repository root is on sys.path whenever Python runs from it (`python -m medvl`, pytest), and the
editable install's .pth adds it for every interpreter of the venv. Its top-level folder `kernels/`
(installed as medvl.kernels) once shadowed the PyPI package `kernels` that transformers >= 5.2x
imports, and every text tower failed to build.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from tests.utils import REPO_ROOT


def run_from_root(code: str, *, isolated_path: bool = False) -> subprocess.CompletedProcess:
    if isolated_path:  # the interpreter's own library and the repository root: no installed packages
        code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p and "
                "'dist-packages' not in p]\n" + code)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def is_repository_entry(location: str, name: str) -> bool:
    """Is this file the repository's own top-level `name` (the folder or the module)?"""
    own = os.path.join(os.path.realpath(REPO_ROOT), name)
    location = os.path.realpath(location)
    return location.startswith(own + os.sep) or location == own + ".py"


def top_level_names_in_repository():
    """Names `import <name>` could find at the repository root: packages with __init__.py, modules."""
    for entry in sorted(os.listdir(REPO_ROOT)):
        path = os.path.join(REPO_ROOT, entry)
        if entry.endswith(".py"):
            yield entry[:-3]
        elif os.path.isfile(os.path.join(path, "__init__.py")) and entry.isidentifier():
            yield entry


def test_transformers_finds_the_real_kernels_package_from_the_repository_root():
    pytest.importorskip("transformers")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("this transformers does not depend on the PyPI package `kernels`")
    done = run_from_root("import transformers.integrations.hub_kernels, kernels, json; "
                         "print(json.dumps(kernels.__file__))")
    assert done.returncode == 0, done.stderr[-2000:]
    location = json.loads(done.stdout.strip().splitlines()[-1])
    assert not is_repository_entry(location, "kernels"), f"`import kernels` found the repository's folder {location}"


def test_no_repository_folder_shadows_an_installed_package():
    # Every name that is both a top-level entry of the repository and a top-level package of an
    # installed distribution must resolve to the distribution, from the repository root.
    installed = importlib.metadata.packages_distributions()
    for name in top_level_names_in_repository():
        if name == "medvl" or name not in installed:
            continue
        done = run_from_root(f"import {name}, json; print(json.dumps(getattr({name}, '__file__', None)))")
        assert done.returncode == 0, f"import {name} from the repository root failed:\n{done.stderr[-2000:]}"
        location = json.loads(done.stdout.strip().splitlines()[-1]) or ""
        assert not is_repository_entry(location, name), (
            f"`import {name}` found the repository's {location}, not {installed[name]}'s package")


def test_the_kernels_folder_is_not_a_top_level_package():
    # With no installed `kernels` anywhere, the folder must not answer to that name either.
    done = run_from_root("import kernels", isolated_path=True)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, done.stdout + done.stderr
    assert "importable only as medvl.kernels" in done.stderr


def test_medvl_kernels_imports_under_its_own_name():
    pytest.importorskip("triton")
    done = run_from_root("import medvl.kernels.triplet_mining as m; print(m.__name__)")
    assert done.returncode == 0 and done.stdout.strip().endswith("medvl.kernels.triplet_mining"), done.stderr
