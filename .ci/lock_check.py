"""Fails, naming the package, when pyproject.toml and requirements.lock disagree.

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


def main() -> int:
    found = problems(ROOT / "pyproject.toml", ROOT / "requirements.lock")
    if found:
        print("pyproject.toml and requirements.lock disagree:", *(f"  - {p}" for p in found),
              "Run `make lock` and commit requirements.lock.", sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
