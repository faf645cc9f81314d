"""The API key and TLS end to end: `qwenserve launch --api-key KEY --ssl-certfile --ssl-keyfile`
with a certificate this test makes (openssl CLI). Every call but health needs
`authorization: Bearer KEY`; only TLS clients that trust the certificate connect; the Python
clients and `qwenserve generate` reach it with their --api-key / --ssl-root-cert options.
"""
import asyncio
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli_run import run_cli
from qwenserve.server import qwenserve_pb2 as pb
from qwenserve.server import qwenserve_pb2_grpc as pb_grpc
from qwenserve.server.auth import API_KEY_ENV
from qwenserve.server.client import AsyncQwenClient, QwenClient
from qwenserve.server.grpc_security import UNAUTHENTICATED_DETAILS
from test_server import GREEDY, Server

KEY = "s3cret-key_123"


def make_certificate(directory, name: str):
    """(certificate, key) paths: a self-signed EC certificate for 127.0.0.1 and localhost."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"), "server")


@pytest.fixture(scope="module")
def server(tmp_path_factory, certificate):
    cert, key = certificate
    srv = Server(tmp_path_factory.mktemp("secure"), "--api-key", KEY, "--ssl-certfile", str(cert),
                 "--ssl-keyfile", str(key))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def channel(server, certificate):
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[0].read_bytes())
    with grpc.secure_channel(server.address, credentials) as ch:
        yield ch


def _calls(channel):
    """Each method of the server (but health) as a function of the call's metadata."""
    stub = pb_grpc.GenerationStub(channel)
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    return {
        "Generate": lambda md: list(stub.Generate(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(
            max_tokens=1)), metadata=md, timeout=60)),
        "Tokenize": lambda md: stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=md, timeout=60),
        "GetModelInfo": lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md, timeout=60),
        "GetStats": lambda md: stub.GetStats(pb.GetStatsRequest(), metadata=md, timeout=60),
        "reflection": lambda md: list(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md, timeout=60)),
    }


@pytest.mark.parametrize("method", ["Generate", "Tokenize", "GetModelInfo", "GetStats", "reflection"])
def test_every_call_but_health_needs_the_key(channel, method):
    call = _calls(channel)[method]
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", KEY)],
                     [("authorization", f"Bearer {KEY}x")], [("x-api-key", KEY)]):
        with pytest.raises(grpc.RpcError) as err:
            call(metadata)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                           UNAUTHENTICATED_DETAILS), metadata
    assert call([("authorization", f"Bearer {KEY}")])
    assert call([("authorization", f"bearer {KEY}")])  # the scheme is case-insensitive


def test_health_needs_no_key(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "qwenserve.v1.Generation"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_a_refused_request_is_not_parsed(channel):
    """Malformed bytes without the key: UNAUTHENTICATED, not the parser's INVALID_ARGUMENT."""
    raw = channel.unary_stream("/qwenserve.v1.Generation/Generate", request_serializer=None,
                               response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(raw(b"\x12\x03\xff\xfe\xfd", timeout=60))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        list(raw(b"\x12\x03\xff\xfe\xfd", metadata=[("authorization", f"Bearer {KEY}")], timeout=60))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt: not valid UTF-8")


def test_only_tls_clients_that_trust_the_certificate_connect(server, tmp_path):
    assert "TLS, API key required)" in next(line for line in server.stdout_lines if "ready on" in line)
    other_cert, _ = make_certificate(tmp_path, "other")
    plaintext = grpc.insecure_channel(server.address)
    untrusted = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(other_cert.read_bytes()))
    for ch in (plaintext, untrusted):
        with ch, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_python_clients_with_key_and_root_certificate(server, certificate):
    root = certificate[0].read_bytes()
    with QwenClient(server.address, api_key=KEY, root_certificates=root) as c:
        result = c.generate("Hello", max_tokens=3, **GREEDY)
        assert len(result.token_ids) == 3 and c.tokenize("Hello") and c.model_info()["max_model_len"] == 256
        assert c.stats()["num_total_blocks"] > 0
    with QwenClient(server.address, root_certificates=root) as c, pytest.raises(grpc.RpcError) as err:
        c.generate("Hello", max_tokens=1)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def run():
        async with AsyncQwenClient(server.address, api_key=KEY, root_certificates=root) as c:
            return (await c.generate("Hello", max_tokens=3, **GREEDY)).token_ids, await c.stats()

    ids, stats = asyncio.run(run())
    assert ids == result.token_ids and stats["num_total_blocks"] > 0


def test_generate_command_with_api_key_and_root_cert(server, certificate, capsys, monkeypatch):
    base = ["generate", "--address", server.address, "--max-tokens", "3", "--temperature", "0", "Hello"]
    with QwenClient(server.address, api_key=KEY, root_certificates=certificate[0].read_bytes()) as c:
        expected = c.generate("Hello", max_tokens=3, temperature=0.0).text
    code, out, err = run_cli(capsys, *base, "--api-key", KEY, "--ssl-root-cert", str(certificate[0]))
    assert (code, out) == (0, expected + "\n"), err
    code, out, err = run_cli(capsys, *base, "--ssl-root-cert", str(certificate[0]))
    assert code == 1 and "qwenserve generate: error: UNAUTHENTICATED" in err, err
    monkeypatch.setenv(API_KEY_ENV, KEY)  # the server's variable serves the client too
    code, out, err = run_cli(capsys, *base, "--ssl-root-cert", str(certificate[0]))
    assert (code, out) == (0, expected + "\n"), err
    code, out, err = run_cli(capsys, *base)  # plaintext to a TLS port
    assert code == 1 and "UNAVAILABLE" in err, err
    code, out, err = run_cli(capsys, *base, "--ssl-root-cert", "/nonexistent.pem")
    assert code == 2 and "argument --ssl-root-cert: cannot read '/nonexistent.pem'" in err, err


def test_launch_takes_the_key_from_the_environment(monkeypatch):
    from qwenserve.cli import build_parser
    from qwenserve.server.commands import server_options_from_args

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert server_options_from_args(build_parser().parse_args(["launch"])).api_key == "from-env"
    assert server_options_from_args(build_parser().parse_args(["launch", "--api-key", "flag"])).api_key == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert server_options_from_args(build_parser().parse_args(["launch"])).api_key is None


def test_launch_with_bad_tls_files_fails_before_loading(capsys, certificate, tmp_path):
    cert, key = certificate
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for flags, message in [
        (["--ssl-certfile", str(cert)], "--ssl-certfile and --ssl-keyfile: give both (TLS) or neither"),
        (["--ssl-certfile", "/nonexistent.crt", "--ssl-keyfile", str(key)],
         "--ssl-certfile: cannot read '/nonexistent.crt': No such file or directory"),
        (["--ssl-certfile", str(cert), "--ssl-keyfile", str(not_pem)], f"--ssl-keyfile: '{not_pem}' holds no PEM private key"),
    ]:
        code, out, err = run_cli(capsys, "launch", "--port", "0", *flags)
        assert code == 2 and f"qwenserve launch: error: {message}" in err, err
        assert "loading" not in err
