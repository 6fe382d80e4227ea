"""The lock of the two README commands: write it on purpose, check an environment against it.

    python .ci/lock.py write LOCK PIN... -- BUILD...   resolve the newest versions that pyproject.toml's
        ranges allow (with the PINs, e.g. torch==2.14.1, and the BUILD tools the editable build needs),
        without installing or building anything, and write every distribution as name==version.
    python .ci/lock.py check LOCK                      does this interpreter hold exactly the locked versions?
    python .ci/lock.py diff LOCK                       print where this interpreter differs from the lock.
    python .ci/lock.py pins LOCK NAME...               print NAME==version for each NAME, from the lock.

The lock holds one platform: the CPython minor version and the machine it was written on (its header
says which). `check` fails there on a distribution that is missing from the lock or at another
version; on another platform it only warns, since a lock cannot pin what it never resolved.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed by pip or the venv itself, not by the project: never locked, never checked.
UNLOCKED = {"pip", "setuptools", "wheel", "medvl"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def this_platform() -> str:
    return f"cpython-{sys.version_info[0]}.{sys.version_info[1]}-{platform.system().lower()}-{platform.machine()}"


def read_lock(path: str):
    pins, locked_platform = {}, None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith("# platform:"):
                locked_platform = line.split(":", 1)[1].strip()
            elif line and not line.startswith("#"):
                name, version = line.split("==")
                pins[canonical(name)] = version.strip()
    return pins, locked_platform


def write(path: str, pins, build) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "report.json")
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", report, *pins, *build, "-e", f"{REPOSITORY}[test]"], check=True)
        with open(report, encoding="utf-8") as handle:
            resolved = json.load(handle)["install"]
    versions = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in resolved}
    pip_version = importlib.metadata.version("pip")
    lines = [
        "# The exact versions that `make demo` and `make test` install: every distribution, transitive",
        "# dependencies and the build tools included. Written by `make lock` from pyproject.toml's ranges",
        f"# and the pins {' '.join(pins)}; regenerate it on purpose, never by hand.",
        f"# written: {datetime.date.today().isoformat()} with pip {pip_version}",
        f"# platform: {this_platform()}",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(versions.items()) if name not in UNLOCKED]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"{path}: {len(lines) - 5} distributions locked for {this_platform()}")


def differences(path: str):
    pins, locked_platform = read_lock(path)
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    problems = [f"{name} {version} is installed but not in {path}" for name, version in sorted(installed.items())
                if name not in UNLOCKED and name not in pins]
    problems += [f"{name} is {installed[name]}, {path} says {pins[name]}" for name in sorted(pins)
                 if name in installed and installed[name] != pins[name]]
    return problems, installed, locked_platform


def check(path: str) -> int:
    problems, installed, locked_platform = differences(path)
    if not problems:
        print(f"{path}: all {len(installed) - len(UNLOCKED & set(installed))} installed distributions as locked")
        return 0
    if locked_platform != this_platform():
        print(f"warning: {path} was written for {locked_platform}, this is {this_platform()}; unlocked here:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 0
    print(f"{path} does not describe this environment:\n  " + "\n  ".join(problems)
          + "\nRun `make clean setup` for a fresh venv, or `make lock` to re-resolve on purpose.", file=sys.stderr)
    return 1


def main(argv) -> int:
    if len(argv) >= 2 and argv[0] == "write":
        rest = argv[2:]
        split = rest.index("--") if "--" in rest else len(rest)
        write(argv[1], rest[:split], rest[split + 1:])
        return 0
    if len(argv) == 2 and argv[0] == "check":
        return check(argv[1])
    if len(argv) >= 2 and argv[0] == "pins":
        pins = read_lock(argv[1])[0]
        missing = [name for name in argv[2:] if canonical(name) not in pins]
        if missing:
            print(f"not in {argv[1]}: {' '.join(missing)}", file=sys.stderr)
            return 1
        print(" ".join(f"{name}=={pins[canonical(name)]}" for name in argv[2:]))
        return 0
    if len(argv) == 2 and argv[0] == "diff":
        print("\n".join(differences(argv[1])[0]) or f"as {argv[1]}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
