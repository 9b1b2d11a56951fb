"""`make test` refuses a lock that no longer agrees with pyproject.toml, naming the package and the way out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / ".ci"))
import lock_check  # noqa: E402


def test_the_committed_lock_agrees_with_pyproject() -> None:
    assert lock_check.problems(ROOT / "pyproject.toml", ROOT / "requirements.lock") == []


def test_every_pin_has_hashes_and_torch_is_the_cpu_wheel() -> None:
    text = (ROOT / "requirements.lock").read_text()
    entries = [e for e in text.split("\n") if e and not e.startswith((" ", "#"))]
    assert all(e.endswith("\\") and "==" in e for e in entries)  # every pin is followed by its hashes
    assert "torch==2.13.0+cpu \\" in entries


@pytest.mark.parametrize(("change", "complaint"), [
    (('"xgrammar>=0.1.20"', '"xgrammar>=99"'), "xgrammar: requirements.lock pins"),
    (('"tqdm>=4.66",', '"tqdm>=4.66", "left-pad>=1",'), "left-pad is required by pyproject.toml but not pinned"),
    (('  "tqdm>=4.66",\n', ""), "tqdm is pinned in requirements.lock for pyproject.toml, which no longer asks"),
])
def test_a_disagreement_fails_naming_the_package(tmp_path: Path, change: tuple[str, str], complaint: str) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert change[0] in pyproject
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "lock_check.py").write_text((ROOT / ".ci" / "lock_check.py").read_text())
    (tmp_path / "pyproject.toml").write_text(pyproject.replace(*change))
    (tmp_path / "requirements.lock").write_text((ROOT / "requirements.lock").read_text())
    run = subprocess.run([sys.executable, str(tmp_path / ".ci" / "lock_check.py")], capture_output=True, text=True)
    assert run.returncode == 1
    assert complaint in run.stderr and "make lock" in run.stderr
