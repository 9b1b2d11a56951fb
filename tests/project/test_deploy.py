"""deploy/: the Kubernetes manifests parse and agree with the Dockerfile, the config and the exported metrics."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from service.config import ENV_PREFIX, EngineConfig, ServerConfig, TrtllmConfig
from service.gen.llmserve.v1 import chat_pb2
from service.metrics import ENGINE_GAUGES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def documents() -> dict[str, Any]:
    docs: dict[str, Any] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc.get("kind", path.stem)] = doc
    return docs


def container() -> dict[str, Any]:
    return documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def exposed_ports() -> set[int]:
    ports: set[int] = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("EXPOSE"):
            ports |= {int(p) for p in line.split()[1:]}
    return ports


def test_every_file_parses_into_the_expected_kinds() -> None:
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(documents())


def test_probes_are_native_grpc_on_an_exposed_port() -> None:
    c = container()
    ports = exposed_ports()
    assert ports == {50051, 8000}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] in ports, probe
    assert c["readinessProbe"]["grpc"]["service"] == chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    assert {p["containerPort"] for p in c["ports"]} == ports
    service_ports = {p["port"]: p["name"] for p in documents()["Service"]["spec"]["ports"]}
    assert service_ports == {50051: "grpc", 8000: "http"}


def test_termination_grace_outlasts_the_drain() -> None:
    args = container()["args"]
    grace = float(args[args.index("--grace-period") + 1])
    pod = documents()["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > grace


def test_environment_names_real_settings() -> None:
    fields = {f.name for section in (ServerConfig, EngineConfig, TrtllmConfig) for f in dataclasses.fields(section)}
    for env in container()["env"]:
        assert env["name"].removeprefix(ENV_PREFIX).lower() in fields, env["name"]


def test_hpa_scales_on_the_exported_waiting_gauge() -> None:
    exported = {family.name for family in ENGINE_GAUGES.collect()}
    assert "vllm:num_requests_waiting" in exported
    adapter = documents()["prometheus-adapter"]["rules"]["custom"][0]
    series = re.match(r"[\w:]+", adapter["seriesQuery"]).group(0)  # type: ignore[union-attr]
    assert series in exported
    hpa_metric = documents()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert adapter["name"]["as"] == hpa_metric
