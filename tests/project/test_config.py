"""One place for configuration: every setting is a flag, its LLMSERVE_* variable supplies the default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from service.config import add_config_arguments, config_from_args


def parse(argv: list[str]) -> object:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults() -> None:
    config = parse([])
    assert (config.server.grpc_port, config.server.http_port, config.server.host) == (50051, 8000, "127.0.0.1")
    assert config.server.engines_dir == Path("engines") and config.server.api_key == []
    assert config.engine.max_queue == 256 and config.engine.device == "cpu"


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_GRPC_PORT", "6000")
    monkeypatch.setenv("LLMSERVE_API_KEY", "a,b")
    monkeypatch.setenv("LLMSERVE_CLAMP_MAX_TOKENS", "true")
    monkeypatch.setenv("LLMSERVE_MAX_QUEUE", "9")
    config = parse([])
    assert config.server.grpc_port == 6000 and config.server.api_key == ["a", "b"]
    assert config.server.clamp_max_tokens is True and config.engine.max_queue == 9
    config = parse(["--grpc-port", "7000", "--api-key", "c", "--api-key", "d", "--no-clamp-max-tokens"])
    assert config.server.grpc_port == 7000 and config.server.api_key == ["c", "d"]
    assert config.server.clamp_max_tokens is False


def test_bad_values_are_refused_naming_the_flag(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        parse(["--grpc-port", "many"])
    assert "--grpc-port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--dtype", "int3"])
    assert "--dtype" in capsys.readouterr().err
    monkeypatch.setenv("LLMSERVE_GRPC_PORT", "abc")
    with pytest.raises(SystemExit, match="LLMSERVE_GRPC_PORT"):
        parse([])
    monkeypatch.setenv("LLMSERVE_GRPC_PORT", "1")
    monkeypatch.setenv("LLMSERVE_CLAMP_MAX_TOKENS", "perhaps")
    with pytest.raises(SystemExit, match="LLMSERVE_CLAMP_MAX_TOKENS"):
        parse([])
