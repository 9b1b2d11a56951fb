"""`build_engine.py --model FOLDER --name NAME`: a Hugging Face checkpoint joins the repository as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import build_engine
from service.repository.manifest import load_manifest


@pytest.mark.parametrize(("key", "owner"), [("_name_or_path", "meta-llama/Llama-3.1-8B-Instruct"),
                                            ("_model_name_or_path", "meta-llama/Llama-3.1-8B-Instruct"),
                                            (None, "local")],
                         ids=["transformers-4", "transformers-5", "unrecorded"])
def test_owned_by_is_where_the_config_says_the_checkpoint_came_from(tmp_path: Path, engines_dir: Path,
                                                                    key: str | None, owner: str) -> None:
    demo = engines_dir / "demo" / "checkpoint"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for file in demo.iterdir():
        if file.name != "config.json":
            (checkpoint / file.name).symlink_to(file.resolve())
    config = json.loads((demo / "config.json").read_text())
    if key:
        config[key] = owner
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert build_engine.main(["--model", str(checkpoint), "--name", "imported",
                              "--engines-dir", str(tmp_path / "engines")]) == 0
    manifest = load_manifest(tmp_path / "engines" / "imported")
    assert (manifest.owned_by, manifest.backend) == (owner, "reference")
