"""Fails, naming the package, when pyproject.toml and requirements.lock disagree (or requirements-models.in and
requirements-models.lock do).

`make install` installs exactly what the lock pins, so a dependency added to
pyproject.toml, or a lower bound raised there, means nothing until `make lock`
has been run; this check makes `make test` say so instead of testing a stale
environment. Both directions count: every direct requirement (with the dev
extra) must be pinned at a version its range admits, and every package the lock
says came from pyproject.toml must still be asked for there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_DIRECT = "llmserve (pyproject.toml)"


def _lock(path: Path) -> tuple[dict[str, str], set[str]]:
    """Pinned versions by name, and the names the lock says pyproject.toml asked for."""
    pins: dict[str, str] = {}
    direct: set[str] = set()
    current = ""
    for line in path.read_text().splitlines():
        if match := _PIN.match(line):
            current = canonicalize_name(match.group(1))
            pins[current] = match.group(2)
        elif line.strip().lstrip("#").strip().removeprefix("via ").strip() == _DIRECT and current:
            direct.add(current)
    return pins, direct


def problems(pyproject: Path, lock: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins, direct = _lock(lock)
    out = []
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
            continue
        name = canonicalize_name(req.name)
        pinned = pins.get(name)
        if pinned is None:
            out.append(f"{req.name} is required by pyproject.toml but not pinned in {lock.name}")
        elif not req.specifier.contains(pinned, prereleases=True):
            out.append(f"{req.name}: {lock.name} pins {pinned}, outside pyproject.toml's range {req.specifier}")
    for name in sorted(direct - {canonicalize_name(r.name) for r in wanted}):
        out.append(f"{name} is pinned in {lock.name} for pyproject.toml, which no longer asks for it")
    return out


def model_problems(wanted_file: Path, lock: Path) -> list[str]:
    """The model packages are pinned exactly in the .in file; the lock must hold those pins, nothing else."""
    wanted = {}
    for line in wanted_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            wanted[canonicalize_name(req.name)] = req
    pins, _ = _lock(lock)
    out = []
    for name, req in wanted.items():
        if name not in pins:
            out.append(f"{req.name} is asked for by {wanted_file.name} but not pinned in {lock.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            out.append(f"{req.name}: {lock.name} pins {pins[name]}, outside {wanted_file.name}'s {req.specifier}")
    out += [f"{name} is pinned in {lock.name}, which {wanted_file.name} no longer asks for"
            for name in sorted(pins.keys() - wanted.keys())]
    return out


def main() -> int:
    checks = [(problems(ROOT / "pyproject.toml", ROOT / "requirements.lock"), "pyproject.toml", "requirements.lock"),
              (model_problems(ROOT / "requirements-models.in", ROOT / "requirements-models.lock"),
               "requirements-models.in", "requirements-models.lock")]
    failed = False
    for found, wanted, lock in checks:
        if found:
            print(f"{wanted} and {lock} disagree:", *(f"  - {p}" for p in found),
                  f"Run `make lock` and commit {lock}.", sep="\n", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
