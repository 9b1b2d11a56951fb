"""The short soak that `make test` runs: a minute of mixed load with injected faults, through bench.soak itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_one_minute_soak_loses_and_leaks_nothing(engines_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "1", "--fault-every", "10",
                          "--engines-dir", str(engines_dir), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    outcomes = result["outcomes"]
    assert result["problems"] == [] and result["drain_exit_code"] == 0
    assert result["requests"] >= 300 and set(result["by_door"]) == {"grpc", "rest"}
    assert set(outcomes) <= {"ok", "cancelled", "invalid_argument", "deadline_exceeded", "internal"}, outcomes
    assert min(outcomes.get(k, 0) for k in ("ok", "cancelled", "invalid_argument", "deadline_exceeded")) > 0
    assert result["faults_injected"] >= 3 and 0 < outcomes.get("internal", 0) <= result["requests_hit_by_faults"]
    assert (result["end"]["running"], result["end"]["waiting"], result["end"]["kv_usage"]) == (0, 0, 0)
    assert out.with_suffix(".png").stat().st_size > 0
