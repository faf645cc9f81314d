"""The `qwenserve` CLI and the Python client on bad input: a clear error naming the flag or
field, exit code 2 (usage) or 1 (runtime), never a traceback; nothing here needs a server."""
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import run_cli  # tests/ is on sys.path
from qwenserve import cli
from qwenserve.server.client import AsyncQwenClient, InvalidRequest, QwenClient, build_request

REPO = Path(__file__).resolve().parents[1]
NO_SERVER = "127.0.0.1:1"  # connection refused at once


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], "argument --port: must be an integer in [0, 65535], got 70000"),
    (["--port", "-5"], "argument --port: must be an integer in [0, 65535], got -5"),
    (["--port", "x"], "argument --port: not an integer: 'x'"),
    (["--log-level", "foo"], "argument --log-level: invalid choice: 'FOO'"),
    (["--seed", str(2 ** 70)], "argument --seed: must be an integer in [0, 2**64)"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got -1"),
    (["--tp", "0"], "argument --tp: must be an integer >= 1, got 0"),
    (["--max-model-len", "-1"], "argument --max-model-len: must be an integer >= 1"),
    (["--max-num-seqs", "0"], "argument --max-num-seqs: must be an integer >= 1"),
    (["--max-num-batched-tokens", "0"], "argument --max-num-batched-tokens: must be an integer >= 1"),
    (["--max-waiting-requests", "-3"], "argument --max-waiting-requests: must be an integer >= 1"),
    (["--block-size", "24"], "argument --block-size: must be a power of two, got 24"),
    (["--block-size", "0"], "argument --block-size: must be an integer >= 1"),
    (["--gpu-memory-utilization", "0"], "argument --gpu-memory-utilization: must be a finite number in (0, 1]"),
    (["--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization: must be a finite number in (0, 1]"),
    (["--gpu-memory-utilization", "nan"], "argument --gpu-memory-utilization: must be a finite number"),
    (["--shutdown-grace", "-1"], "argument --shutdown-grace: must be a finite number >= 0"),
    (["--shutdown-grace", "inf"], "argument --shutdown-grace: must be a finite number >= 0"),
    (["--kv-cache-memory", "0"], "argument --kv-cache-memory: must be at least 1 byte"),
    (["--kv-cache-memory", "lots"], "argument --kv-cache-memory: not a size in bytes"),
])
def test_launch_rejects_bad_flags_before_starting(capsys, monkeypatch, flags, message):
    from qwenserve.server import app

    def must_not_start(*args, **kwargs):  # a flag that slips through would start a real server
        raise AssertionError(f"launch started a server with {flags}")

    monkeypatch.setattr(app, "run_server", must_not_start)
    code, out, err = run_cli(capsys, "launch", *flags)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and out == ""


def test_launch_accepts_the_edges():
    parser = cli.build_parser()
    for port in ("0", "65535"):  # 0: any free port (the tests' servers)
        assert parser.parse_args(["launch", "--port", port]).port == int(port)
    args = parser.parse_args(["launch", "--log-level", "debug", "--seed", str(2 ** 64 - 1),
                              "--gpu-memory-utilization", "1", "--block-size", "32", "--shutdown-grace", "0"])
    assert (args.log_level, args.seed, args.gpu_memory_utilization, args.block_size) == ("DEBUG", 2 ** 64 - 1, 1.0, 32)


@pytest.mark.parametrize("flags,message", [
    (["--max-tokens", "-1"], "argument --max-tokens: must be an integer in [0, 2**32), got -1"),
    (["--max-tokens", "99999999999"], "argument --max-tokens: must be an integer in [0, 2**32), got 99999999999"),
    (["--top-k", "-2"], "argument --top-k: must be an integer >= 0 (0 or -1 = off), got -2"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got -1"),
    (["--seed", str(2 ** 64)], "argument --seed: must be an integer in [0, 2**64)"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number, got nan"),
    (["--top-p", "inf"], "argument --top-p: must be a finite number, got inf"),
    (["--timeout", "-1"], "argument --timeout: must be a finite number > 0, got -1"),
    (["--stop", ""], "argument --stop: must be a non-empty string"),
    (["--system", "be brief"], "argument --system: only applies with --chat"),
    (["--address", "127.0.0.1:99999"], "argument --address: port must be in [1, 65535]"),
    (["--address", ""], "argument --address: must be a non-empty HOST:PORT string"),
])
def test_generate_rejects_bad_flags_before_connecting(capsys, flags, message):
    code, out, err = run_cli(capsys, "generate", "--address", NO_SERVER, *flags, "Hello")
    assert code == 2 and message in err, err
    assert "Traceback" not in err and out == ""


def test_generate_without_a_server_is_a_runtime_error(capsys):
    code, out, err = run_cli(capsys, "generate", "--address", NO_SERVER, "--timeout", "10",
                              "--top-k", "-1", "--chat", "--system", "be brief", "Hello")
    assert code == 1 and "qwenserve generate: error: UNAVAILABLE" in err, err
    assert out == ""


@pytest.mark.parametrize("argv,message", [
    (["launch", "--port", "70000"], "argument --port: must be an integer in [0, 65535]"),
    (["generate", "--address", NO_SERVER, "--max-tokens", "-1", "Hello"], "argument --max-tokens"),
])
def test_the_console_script_prints_no_traceback(argv, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "qwenserve.cli", *argv], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_version(capsys):
    from qwenserve import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out == f"qwenserve {__version__}\n"


def test_launch_passes_the_http_flags_to_the_server(monkeypatch):
    from qwenserve.server import app

    seen = {}
    monkeypatch.setattr(app, "run_server", lambda config, options: seen.update(options=options) or 0)
    assert cli.main(["launch", "--http-port", "0", "--served-model-name", "my-qwen", "--disable-log-requests"]) == 0
    options = seen["options"]
    assert (options.http_port, options.served_model_name, options.disable_log_requests) == (0, "my-qwen", True)
    assert cli.main(["launch"]) == 0
    assert (seen["options"].http_port, seen["options"].served_model_name, seen["options"].disable_log_requests) == \
        (8000, None, False)


def test_launch_help_shows_the_defaults_that_apply(capsys):
    with pytest.raises(SystemExit):
        cli.main(["launch", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    for text in ("--http-port", "default: 8000", "default: 256", "default: 8192", "default: 16", "default: 0.9",
                 "default: 512MiB", "default: 4096", "Qwen/Qwen-7B-Chat", "generation_config.json", "max_new_tokens"):
        assert text in out, text


@pytest.mark.parametrize("finish,code", [("length", 0), ("stop", 0), ("abort", 1)])
def test_generate_exits_non_zero_when_its_request_is_aborted(capsys, finish, code):
    """Against a stand-in server whose stream ends with `finish`: an aborted request (e.g. the
    server shut down under it) is a failure of the command, after the text it got."""
    from concurrent import futures

    import grpc

    from qwenserve.server import qwenserve_pb2 as pb
    from qwenserve.server import qwenserve_pb2_grpc as pb_grpc

    class Ending(pb_grpc.GenerationServicer):
        def Generate(self, request, context):
            yield pb.GenerateResponse(text="Hel", token_ids=[1])
            yield pb.GenerateResponse(text="lo", token_ids=[2], finish_reason=finish)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_GenerationServicer_to_server(Ending(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        got, out, err = run_cli(capsys, "generate", "--address", f"127.0.0.1:{port}", "--timeout", "30", "Hi")
    finally:
        server.stop(None)
    assert (got, out) == (code, "Hello\n"), err
    assert ("finish_reason 'abort'" in err) == (code == 1) and "Traceback" not in err


# --- the client: checked before anything is sent ------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": -1}, r"max_tokens must be an integer in \[0, 2\*\*32\), got -1"),
    ({"max_tokens": 2 ** 32}, r"max_tokens must be an integer in \[0, 2\*\*32\)"),
    ({"max_tokens": 8.0}, r"max_tokens must be an integer"),
    ({"n": True}, r"n must be an integer"),
    ({"top_k": -5}, r"top_k must be an integer >= 0 \(0 or -1 = off\), got -5"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
    ({"seed": 2 ** 64}, r"seed must be an integer in \[0, 2\*\*64\)"),
    ({"logprobs": -1}, r"logprobs must be an integer in \[0, 2\*\*32\)"),
    ({"min_tokens": -1}, r"min_tokens must be an integer in \[0, 2\*\*32\)"),
    ({"stop_token_ids": [151643, -1]}, r"stop_token_ids must be an integer in \[0, 2\*\*32\), got -1"),
    ({"stop_token_ids": 5}, r"stop_token_ids must be a list of integers"),
    ({"temperature": "0.5"}, r"temperature must be a finite number, got '0.5'"),
    ({"temperature": float("inf")}, r"temperature must be a finite number"),
    ({"top_p": 1e300}, r"top_p must be a finite number"),  # float32 would carry inf
    ({"ignore_eos": 1}, r"ignore_eos must be a bool, got 1"),
    ({"stop": ""}, r"stop must be a non-empty string"),
    ({"stop": [1]}, r"stop must be a non-empty string or a list of them"),
    ({"timeout": -1}, r"timeout must be a positive number of seconds or None, got -1"),
    ({"timeout": float("nan")}, r"timeout must be a positive number"),
    ({"system": "be brief"}, r"system only applies to chat input"),
    ({"request_id": 7}, r"request_id must be a string"),
])
def test_client_rejects_what_the_request_cannot_carry(kwargs, message):
    client = QwenClient(NO_SERVER)  # nothing is sent: the error comes first
    with pytest.raises(InvalidRequest, match=message):
        client.generate_stream("Hello", **kwargs)
    with pytest.raises(ValueError, match=message):  # InvalidRequest is a ValueError
        client.generate("Hello", **kwargs)
    client.close()


def test_async_client_rejects_before_sending():
    async def main():
        async with AsyncQwenClient(NO_SERVER) as client:
            with pytest.raises(InvalidRequest, match="max_tokens"):
                client.generate_stream("Hello", max_tokens=-1)
            with pytest.raises(InvalidRequest, match="seed"):
                await client.generate("Hello", seed=2 ** 64)
    asyncio.run(main())


@pytest.mark.parametrize("call,message", [
    (lambda: build_request(b"Hello"), "prompt must be a string or a list of token ids"),
    (lambda: build_request(5), "prompt must be a string or a list of token ids"),
    (lambda: build_request([1, -2]), r"prompt_token_ids must be an integer in \[0, 2\*\*32\), got -2"),
    (lambda: build_request(prompt_token_ids="12"), "prompt_token_ids must be a list of token ids"),
    (lambda: build_request("\udcff"), "prompt is not valid text"),
    (lambda: build_request(messages=[{"role": "user"}]), r"messages\[0\] must be a"),
    (lambda: build_request(messages=[("user", 5)]), "role and content must be strings"),
    (lambda: build_request(messages="hi"), "messages must be a list of messages"),
    (lambda: build_request(messages=[("user", "hi")], system=3), "system must be a string or None"),
    (lambda: QwenClient("127.0.0.1:70000"), r"address port must be in \[1, 65535\]"),
    (lambda: QwenClient(None), "address must be a non-empty HOST:PORT string"),
    (lambda: QwenClient(NO_SERVER).tokenize(b"x"), "text must be a string"),
    (lambda: QwenClient(NO_SERVER).model_info(timeout=0), "timeout must be a positive number"),
])
def test_client_inputs_named(call, message):
    with pytest.raises(InvalidRequest, match=message):
        call()


def test_client_top_k_minus_one_is_off_like_sampling_params():
    from qwenserve.sampling_params import SamplingParams

    assert SamplingParams(top_k=-1).top_k == 0
    params = build_request("Hello", top_k=-1, seed=2 ** 64 - 1, max_tokens=2 ** 32 - 1, stop="x").params
    assert params.HasField("top_k") and params.top_k == 0  # sent explicitly: "off", not the server default
    assert (params.seed, params.max_tokens, list(params.stop)) == (2 ** 64 - 1, 2 ** 32 - 1, ["x"])
    assert not build_request("Hello", top_k=None).params.HasField("top_k")
    for address in ("localhost:50051", "[::1]:50051", "dns:///localhost:50051", "unix:/tmp/qwen.sock"):
        QwenClient(address).close()


# --- make-checkpoint ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--shard-size-mb", "-5"], "argument --shard-size-mb: must be an integer >= 1, got -5"),
    (["--shard-size-mb", "0"], "argument --shard-size-mb: must be an integer >= 1, got 0"),
    (["--layers", "0"], "argument --layers: must be an integer >= 1, got 0"),
    (["--layers", "-2"], "argument --layers: must be an integer >= 1, got -2"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got -1"),
])
def test_make_checkpoint_rejects_bad_flags(capsys, tmp_path, flags, message):
    code, out, err = run_cli(capsys, "make-checkpoint", *flags, str(tmp_path / "ckpt"))
    assert code == 2 and message in err, err
    assert not (tmp_path / "ckpt").exists()


def test_make_checkpoint_into_a_file_fails_cleanly(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    code, out, err = run_cli(capsys, "make-checkpoint", str(target))
    assert code == 2 and f"output directory '{target}' exists and is not a directory" in err, err
    assert out == "" and target.read_text() == "not a directory"
    code, out, err = run_cli(capsys, "make-checkpoint", str(target / "sub"))  # NotADirectoryError
    assert code == 1 and f"cannot write the checkpoint to '{target / 'sub'}'" in err, err
    assert out == "" and "Traceback" not in err


def test_make_checkpoint_unwritable_fails_cleanly(capsys, tmp_path, monkeypatch):
    from qwenserve.model import checkpoint

    def denied(path, *args, **kwargs):  # the tests may run as root, where chmod does not bite
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(checkpoint.os, "makedirs", denied)
    code, out, err = run_cli(capsys, "make-checkpoint", str(tmp_path / "ckpt"))
    assert code == 1 and "Permission denied" in err and str(tmp_path / "ckpt") in err, err
    assert out == ""


def test_make_checkpoint_python_arguments_named(tmp_path):
    from qwenserve.model.checkpoint import make_checkpoint

    for kwargs, message in [({"seed": -1}, "seed must be an integer"), ({"layers": "2"}, "layers must be an integer"),
                            ({"max_shard_bytes": -5}, "max_shard_bytes must be a positive integer"),
                            ({"preset": "huge"}, "preset must be one of")]:
        with pytest.raises(ValueError, match=message):
            make_checkpoint(str(tmp_path / "ckpt"), **kwargs)
    assert not (tmp_path / "ckpt").exists()


def test_an_unexpected_failure_is_one_line_on_stderr(capsys, monkeypatch):
    # Anything a subcommand does not report itself: exit 1 and one line naming the error, not a
    # traceback; QWENSERVE_DEBUG=1 lets the exception through for debugging.
    from qwenserve.model import checkpoint

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")  # not one of the errors make-checkpoint reports itself

    monkeypatch.setattr(checkpoint, "make_checkpoint", broken)
    monkeypatch.delenv("QWENSERVE_DEBUG", raising=False)
    code, out, err = run_cli(capsys, "make-checkpoint", "--preset", "tiny", "/tmp/unused-qwenserve-ckpt")
    assert code == 1 and "Traceback" not in err
    assert "disk on fire" in err
    monkeypatch.setenv("QWENSERVE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["make-checkpoint", "--preset", "tiny", "/tmp/unused-qwenserve-ckpt"])


# --- the installed console script ---------------------------------------------------------------

def _console_script():
    """The `qwenserve` console_scripts entry point of the installed distribution, or a skip."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="console_scripts") if ep.name == "qwenserve"]
    if not found:
        pytest.skip("qwenserve is not installed in this environment (no `qwenserve` console_scripts "
                    "entry point; CI installs it with `pip install -e .`)")
    assert len(found) == 1, found
    return found[0]


def test_the_console_script_entry_point_is_cli_main():
    """setup.py's console_scripts entry, as the installed metadata has it, loads `cli.main`, and
    `qwenserve --help` runs through it the way pip's generated script does."""
    ep = _console_script()
    assert ep.value == "qwenserve.cli:main"
    assert ep.load() is cli.main
    # What the `qwenserve` script pip writes does: sys.exit(<entry point>()) with argv[0] "qwenserve".
    wrapper = ("import sys\nfrom importlib.metadata import entry_points\n"
               "[ep] = [e for e in entry_points(group='console_scripts') if e.name == 'qwenserve']\n"
               "sys.argv[0] = 'qwenserve'\nsys.exit(ep.load()())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", wrapper, "--help"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: qwenserve ")
    assert all(name in out.stdout for name in ("launch", "generate", "make-checkpoint")), out.stdout


def test_the_installed_qwenserve_executable_runs(tmp_path):
    """The `qwenserve` executable pip put beside this interpreter runs `--help` (from a directory
    that is not the checkout, so the installation, not the working directory, provides it)."""
    import sysconfig

    _console_script()
    script = Path(sysconfig.get_path("scripts")) / ("qwenserve.exe" if os.name == "nt" else "qwenserve")
    if not script.exists():
        pytest.skip(f"qwenserve is not pip-installed in this environment: no {script} (its metadata is only "
                    f"visible from the checkout; CI installs it with `pip install -e .`)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: qwenserve ")
    assert all(name in out.stdout for name in ("launch", "generate", "make-checkpoint")), out.stdout
