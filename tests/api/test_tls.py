"""TLS and mutual TLS from the certificate flags, on both ports and to a TLS upstream, with certificates made here;
settings that would secure less than asked refuse to start."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.config import ServerConfig
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.rest.app import RestServer
from service.rest.upstream import UpstreamBackend
from service.worker_pool import WorkerPool
from tests.helpers import ROOT, free_port, running_server, server_config


def _cert(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None = None,
          issuer: x509.Name | None = None, ca: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _pem(obj: object) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _cert("llmserve test CA", ca=True)
    files = {"ca": ca}
    for who in ("server", "client"):
        key, cert = _cert(who, ca_key, ca.subject)
        files[f"{who}_key"], files[f"{who}_cert"] = key, cert
    paths = {}
    for name, obj in files.items():
        paths[name] = d / f"{name}.pem"
        paths[name].write_bytes(_pem(obj))
    return paths


async def _list(port: int, credentials: grpc.ChannelCredentials) -> chat_pb2.ListModelsResponse:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as ch:
        return await chat_pb2_grpc.ChatServiceStub(ch).ListModels(chat_pb2.ListModelsRequest(), timeout=10)


async def test_tls(engines_dir: Path, pki: dict[str, Path]) -> None:
    config = server_config(engines_dir, tls_cert=pki["server_cert"], tls_key=pki["server_key"], http_port=0)
    async with running_server(config) as srv:
        ca = pki["ca"].read_bytes()
        assert (await _list(srv.grpc_port, grpc.ssl_channel_credentials(ca))).data[0].id == "demo"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await chat_pb2_grpc.ChatServiceStub(plain).ListModels(chat_pb2.ListModelsRequest(), timeout=5)


async def test_mutual_tls_requires_a_client_certificate(engines_dir: Path, pki: dict[str, Path]) -> None:
    config = server_config(engines_dir, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                           tls_client_ca=pki["ca"], http_port=0)
    async with running_server(config) as srv:
        ca = pki["ca"].read_bytes()
        with_cert = grpc.ssl_channel_credentials(ca, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes())
        assert (await _list(srv.grpc_port, with_cert)).data[0].id == "demo"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _list(srv.grpc_port, grpc.ssl_channel_credentials(ca))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_rest_port_takes_the_same_tls(engines_dir: Path, pki: dict[str, Path]) -> None:
    """The certificate flags secure REST too: no plaintext answer, and under mTLS no answer without a certificate."""
    config = server_config(engines_dir, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    async with running_server(config) as srv:
        port = srv.config.server.http_port
        ca = ssl.create_default_context(cafile=str(pki["ca"]))
        async with httpx.AsyncClient(verify=ca, timeout=30) as https:
            assert (await https.get(f"https://127.0.0.1:{port}/v1/models")).json()["data"][0]["id"] == "demo"
        async with httpx.AsyncClient(timeout=30) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/v1/models")


async def test_the_rest_port_requires_a_client_certificate_under_mtls(engines_dir: Path, pki: dict[str, Path]) -> None:
    config = server_config(engines_dir, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                           tls_client_ca=pki["ca"])
    async with running_server(config) as srv:
        url = f"https://127.0.0.1:{srv.config.server.http_port}/v1/models"
        anonymous = ssl.create_default_context(cafile=str(pki["ca"]))
        async with httpx.AsyncClient(verify=anonymous, timeout=30) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(url)
        with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
        with_cert.load_cert_chain(pki["client_cert"], pki["client_key"])
        async with httpx.AsyncClient(verify=with_cert, timeout=30) as client:
            assert (await client.get(url)).status_code == 200

        # `llmserve rest --upstream` in front of this mTLS server: TLS to it, with the client certificate.
        shim_config = ServerConfig(http_port=free_port(), upstream=f"127.0.0.1:{srv.grpc_port}",
                                   upstream_ca=pki["ca"], upstream_cert=pki["client_cert"],
                                   upstream_key=pki["client_key"])
        backend = UpstreamBackend(shim_config)
        shim = RestServer(shim_config, backend, WorkerPool(1))
        await shim.start()
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.get(f"http://127.0.0.1:{shim_config.http_port}/v1/models")
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "demo"
        finally:
            await shim.stop()
            await backend.close()


def start_refused(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", "serve", "--engines-dir", "/nonexistent",
                           "--grpc-port", "0", "--http-port", "0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "named"), [
    (["--tls-client-ca", "ca.pem"], "--tls-cert"),
    (["--tls-cert", "cert.pem"], "--tls-key"),
    (["--api-key", ""], "--api-key"),
    (["--api-key", "good", "--api-key", " "], "--api-key"),
])
def test_settings_that_would_serve_less_than_asked_refuse_to_start(args: list[str], named: str) -> None:
    """mTLS without a certificate would serve plaintext; an empty key (`--api-key "$KEY"`, KEY unset) would accept
    an empty bearer token. Both stop the server before it binds anything, naming the flag."""
    done = start_refused(*args)
    assert done.returncode != 0 and named in done.stderr, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
