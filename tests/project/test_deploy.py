"""deploy/: the Kubernetes manifests parse and agree with the Dockerfile, the config, the CLI and each other."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from service.backends.workers.address import parse_model_workers
from service.config import ENV_PREFIX, EngineConfig, ServerConfig, TrtllmConfig, WorkersConfig
from service.gen.llmserve.v1 import chat_pb2

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS = {f.name for section in (ServerConfig, WorkersConfig, EngineConfig, TrtllmConfig)
            for f in dataclasses.fields(section)}


def documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def dockerfile_targets() -> dict[str, set[int]]:
    """Each build target's EXPOSEd ports."""
    targets: dict[str, set[int]] = {}
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM"):
            current = line.split()[-1]
            targets[current] = set()
        elif line.startswith("EXPOSE"):
            targets[current] |= {int(p) for p in line.split()[1:]}
    return targets


GATEWAY = one("Deployment", "llmserve")
WORKERS = one("StatefulSet")


def test_every_file_parses_into_the_expected_kinds() -> None:
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "Service", "Service", "StatefulSet"]


def test_gateway_probes_are_native_grpc_on_its_exposed_ports() -> None:
    c = pod(GATEWAY)["containers"][0]
    assert c["image"].endswith(":cpu")
    ports = dockerfile_targets()["cpu"]
    assert ports == {50051, 8000} and {p["containerPort"] for p in c["ports"]} == ports
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] in ports, probe
    assert "service" not in c["livenessProbe"]["grpc"], "liveness is the process: a worker outage must not restart it"
    assert c["readinessProbe"]["grpc"]["service"] == chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
    service = one("Service", "llmserve")
    assert service["spec"]["selector"] == GATEWAY["spec"]["selector"]["matchLabels"]
    assert {p["port"]: p["name"] for p in service["spec"]["ports"]} == {50051: "grpc", 8000: "http"}


def test_gateway_workers_are_the_statefulsets_pods() -> None:
    workers = parse_model_workers(env(pod(GATEWAY)["containers"][0])["LLMSERVE_WORKERS"].split(","))
    model = WORKERS["metadata"]["labels"]["llmserve/model"]
    assert list(workers) == [model]
    headless = one("Service", WORKERS["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == WORKERS["spec"]["selector"]["matchLabels"]
    port = headless["spec"]["ports"][0]["port"]
    names = [f"{WORKERS['metadata']['name']}-{i}.{headless['metadata']['name']}" for i in range(WORKERS["spec"]
                                                                                                ["replicas"])]
    assert [(w.kind, w.host, w.port) for w in workers[model]] == [("trtllm", n, port) for n in names]


def test_workers_run_the_launcher_on_their_gpus_and_probe_its_health() -> None:
    c = pod(WORKERS)["containers"][0]
    assert c["image"].endswith(":trtllm") and dockerfile_targets()["trtllm"] == {50051}
    args = c["args"]
    assert args[0] == WORKERS["metadata"]["labels"]["llmserve/model"]
    port = int(args[args.index("--port") + 1])
    assert [p["containerPort"] for p in c["ports"]] == [port] and args[args.index("--host") + 1] == "0.0.0.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] >= 1
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:3] == ["llmserve", "healthcheck", "--worker"], probe
        assert command[3] == f"trtllm://127.0.0.1:{port}", probe
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600


def test_termination_grace_outlasts_the_drain() -> None:
    args = pod(GATEWAY)["containers"][0]["args"]
    grace = float(args[args.index("--grace-period") + 1])
    assert pod(GATEWAY)["terminationGracePeriodSeconds"] > grace


def test_environment_names_real_settings() -> None:
    for doc in (GATEWAY, WORKERS):
        for name in env(pod(doc)["containers"][0]):
            assert name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX).lower() in SETTINGS, name


def test_hpa_scales_the_gateway_on_the_cpu_it_requests() -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == GATEWAY["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"   # utilisation is measured against the pod's CPU request
    assert re.fullmatch(r"\d+", str(pod(GATEWAY)["containers"][0]["resources"]["requests"]["cpu"]))
