"""The `qwenserve launch` and `qwenserve generate` subcommands (argparse).

Owns the command-line flags and their mapping onto `EngineConfig`;
`qwenserve/cli.py` calls `add_launch_parser(sub)` / `add_generate_parser(sub)` and then
`args.func(args)`, which returns the exit code (0 on success). Bad flags are argparse errors
(exit 2, naming the flag, through the range-checking types of `qwenserve/arg_types.py`);
runtime failures exit 1. Bad input never prints a traceback; a server whose engine fails
(warm-up included) logs the failure's traceback for the operator and exits 1.
"""
from __future__ import annotations

import argparse
import logging
import sys

from qwenserve.arg_types import float_in, int_in, parse_bytes, power_of_two

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The `generate` flag of each field the client may name in an InvalidRequest.
_GENERATE_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
                   "top_k": "--top-k", "seed": "--seed", "stop": "--stop", "timeout": "--timeout",
                   "system": "--system", "prompt": "PROMPT", "messages[0].content": "PROMPT"}


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    from qwenserve.config import EngineConfig  # light: no torch

    d = EngineConfig()  # the defaults that apply when a flag is not given
    p = subparsers.add_parser(
        "launch", help="serve a model over gRPC and an OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a Qwen model over gRPC (qwenserve.v1.Generation, health, reflection) and an\n"
                    "OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics, ...).\n"
                    "Without --model: the built-in tiny model (random weights).",
        epilog="Sampling defaults (max_tokens, temperature, top_p, top_k, repetition_penalty) come from the "
               "checkpoint's generation_config.json\n(max_tokens: its max_new_tokens, 512 for the Qwen chat "
               "models); a request's own values override them.")
    p.add_argument("--model", default=None,
                   help="checkpoint directory (HF format) or a Hugging Face repo id such as Qwen/Qwen-7B-Chat "
                        "(downloaded, or taken from the local cache offline); default: the built-in tiny model")
    p.add_argument("--tp", type=int_in(1), default=1, dest="tp", help="tensor-parallel size (default: %(default)s)")
    p.add_argument("--dp", type=int_in(1), default=1, dest="dp",
                   help="data-parallel size: engine cores, each with its own --tp ranks and KV cache, as Ray "
                        "actors behind this one server (default: %(default)s: one core, no Ray)")
    p.add_argument("--dp-routing", choices=("cache_aware", "round_robin", "least_loaded"), default="cache_aware",
                   help="how each request picks a core with --dp > 1: cache_aware (the core that served the "
                        "longest prefix of its prompt, unless the loads are too uneven), round_robin or "
                        "least_loaded (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind, both APIs (default: %(default)s)")
    p.add_argument("--port", type=int_in(0, 65535), default=50051,
                   help="gRPC port (0: any free port; default: %(default)s)")
    p.add_argument("--http-port", type=int_in(0, 65535), default=8000,
                   help="OpenAI-compatible HTTP port (0: any free port; default: %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name HTTP clients send (default: the repo id, the checkpoint directory's "
                        "name, or qwen-tiny for the built-in model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: %(default)s (CUDA when there is a GPU)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="default: %(default)s (the checkpoint's on a GPU, float32 on the CPU)")
    p.add_argument("--max-model-len", type=int_in(1), default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int_in(1), default=None,
                   help=f"most sequences in one step (default: {d.max_num_seqs})")
    p.add_argument("--max-num-batched-tokens", type=int_in(1), default=None,
                   help=f"token budget of one step (default: {d.max_num_batched_tokens})")
    p.add_argument("--block-size", type=power_of_two, default=None,
                   help=f"tokens per KV block, a power of two (default: {d.block_size})")
    p.add_argument("--gpu-memory-utilization", type=float_in(0.0, 1.0, low_open=True), default=None,
                   help=f"fraction of GPU memory to use, in (0, 1] (default: {d.gpu_memory_utilization})")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (tp > 1 or dp > 1; default: a local one, on 127.0.0.1 only "
                        "when --host is a loopback address)")
    p.add_argument("--max-waiting-requests", type=int_in(1), default=None,
                   help=f"waiting-queue bound; beyond it calls get RESOURCE_EXHAUSTED / HTTP 429 "
                        f"(default: {d.max_waiting_requests})")
    p.add_argument("--shutdown-grace", type=float_in(0.0), default=10.0,
                   help="seconds running calls get to finish on SIGINT/SIGTERM (default: %(default)s)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help=f"KV cache budget on the CPU, e.g. 512MiB (default: {d.kv_cache_memory // 2 ** 20}MiB)")
    p.add_argument("--seed", type=int_in(0, 2 ** 64 - 1), default=None,
                   help=f"engine seed, in [0, 2**64) (default: {d.seed})")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching (on by default)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no INFO line per finished request")
    # Benchmarks only (e.g. benchmarks.simulated_device:h100_7b_executor); not a user feature.
    p.add_argument("--executor-plugin", default=None, help=argparse.SUPPRESS)
    # Benchmarks and tests only: a fixed KV block count per core instead of the memory budget.
    p.add_argument("--num-kv-blocks", type=int_in(2), default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", type=str.upper, choices=_LOG_LEVELS, default="INFO",
                   help="logging level for stderr (default: %(default)s)")
    security = p.add_argument_group("security")
    security.add_argument("--api-key", default=None, metavar="KEY",
                          help="every call but health needs metadata 'authorization: Bearer KEY' "
                               "(default: $QWENSERVE_API_KEY; prefer it: a flag shows in `ps`)")
    security.add_argument("--ssl-certfile", default=None, metavar="PEM", help="serve TLS with this PEM certificate (chain)")
    security.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the PEM private key of --ssl-certfile")
    _add_limit_flags(p)
    p.set_defaults(func=launch)
    return p


# flag -> (RequestLimits field, help); every limit is checked before tokenizing, see
# qwenserve/frontend/limits.py and docs/RELIABILITY.md.
_LIMIT_FLAGS = {
    "--max-request-id-chars": ("max_request_id_chars", "longest request_id (default: 256)"),
    "--max-prompt-chars": ("max_prompt_chars", "longest prompt text, or chat text in total (default: "
                           "128 x (max_model_len - 1), the most that can fit)"),
    "--max-chat-messages": ("max_chat_messages", "most chat messages (default: (max_model_len - 4) // 5, "
                            "the most that can fit)"),
    "--max-stop-strings": ("max_stop_strings", "most stop strings per request (default: 16)"),
    "--max-stop-string-chars": ("max_stop_string_chars", "longest stop string (default: 512)"),
    "--max-stop-token-ids": ("max_stop_token_ids", "most stop_token_ids per request (default: 256)"),
    "--max-request-bytes": ("max_request_bytes", "largest request message, e.g. 8MiB (default: 4 bytes "
                            "per --max-prompt-chars + 1 MiB); larger ones get RESOURCE_EXHAUSTED (HTTP: 413)"),
}


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("request limits", "Requests over a limit get INVALID_ARGUMENT naming "
                                                   "the field and the limit.")
    for flag, (dest, help_text) in _LIMIT_FLAGS.items():
        kind, metavar = (parse_bytes, "BYTES") if dest == "max_request_bytes" else (int_in(1), "N")
        group.add_argument(flag, dest=dest, type=kind, default=None, metavar=metavar, help=help_text)


def request_limits_from_args(args: argparse.Namespace):
    from qwenserve.frontend.limits import RequestLimits

    values = {dest: getattr(args, dest) for dest, _ in _LIMIT_FLAGS.values()}
    return RequestLimits(**{k: v for k, v in values.items() if v is not None})


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) or localhost."""
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def engine_config_from_args(args: argparse.Namespace):
    from qwenserve.config import EngineConfig

    kwargs = {"model": args.model, "tensor_parallel_size": args.tp, "data_parallel_size": args.dp,
              "data_parallel_routing": args.dp_routing, "device": args.device, "dtype": args.dtype,
              "ray_address": args.ray_address, "ray_local_loopback": is_loopback_host(args.host),
              "executor_plugin": args.executor_plugin}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                 "gpu_memory_utilization", "max_waiting_requests", "kv_cache_memory", "num_kv_blocks", "seed"):
        value = getattr(args, name)
        if value is not None:  # unset: EngineConfig's default
            kwargs[name] = value
    if args.no_prefix_caching:
        kwargs["enable_prefix_caching"] = False
    return EngineConfig.from_kwargs(**kwargs)


def launch(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"qwenserve launch: error: {e}", file=sys.stderr)
        return 2
    from .app import run_server

    try:
        options = server_options_from_args(args)
    except ValueError as e:
        print(f"qwenserve launch: error: {e}", file=sys.stderr)
        return 2
    return run_server(config, options)


def server_options_from_args(args: argparse.Namespace):
    """ServerOptions from the launch flags; ValueError naming the flag for a bad limit or TLS file."""
    from .auth import resolve_api_key
    from .grpc_security import check_tls_files
    from .options import ServerOptions

    check_tls_files(args.ssl_certfile, args.ssl_keyfile)
    return ServerOptions(host=args.host, port=args.port, http_port=args.http_port,
                         served_model_name=args.served_model_name, shutdown_grace=args.shutdown_grace,
                         disable_log_requests=args.disable_log_requests,
                         api_key=resolve_api_key(args.api_key), ssl_certfile=args.ssl_certfile,
                         ssl_keyfile=args.ssl_keyfile, limits=request_limits_from_args(args))


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="stream a completion from a running server",
                              description="Stream a completion (or with --chat a ChatML reply) "
                                          "from a qwenserve server to the terminal.")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text ('-': read standard input)")
    p.add_argument("--address", default="127.0.0.1:50051", help="server HOST:PORT (default: %(default)s)")
    # Numbers are range-checked by the client (`InvalidRequest`), which Python callers share.
    server_default = "default: the server's, from the checkpoint's generation_config.json"
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"most tokens to generate ({server_default}: max_new_tokens)")
    p.add_argument("--temperature", type=float, default=None, help=f"0: greedy ({server_default})")
    p.add_argument("--top-p", type=float, default=None, help=f"({server_default})")
    p.add_argument("--top-k", type=int, default=None, help=f"0 or -1: off ({server_default})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, not reproducible)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    p.add_argument("--system", default=None, help="system prompt (only with --chat)")
    p.add_argument("--timeout", type=float_in(0.0, low_open=True), default=None, help="deadline in seconds")
    p.add_argument("--api-key", default=None, metavar="KEY", help="the server's API key (default: $QWENSERVE_API_KEY)")
    p.add_argument("--ssl", action="store_true", help="connect with TLS, trusting the system's CAs")
    p.add_argument("--ssl-root-cert", default=None, metavar="PEM",
                   help="connect with TLS, trusting this CA or self-signed certificate (implies --ssl)")
    p.set_defaults(func=generate, parser=p)
    return p


def generate(args: argparse.Namespace) -> int:
    import grpc

    from .client import InvalidRequest, QwenClient

    parser = args.parser
    if args.system is not None and not args.chat:
        parser.error("argument --system: only applies with --chat")
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    except (OSError, UnicodeDecodeError) as e:
        print(f"qwenserve generate: error: cannot read the prompt from standard input: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    finish, wrote = None, False
    root_certificates = None
    if args.ssl_root_cert is not None:
        try:
            with open(args.ssl_root_cert, "rb") as f:
                root_certificates = f.read()
        except OSError as e:
            parser.error(f"argument --ssl-root-cert: cannot read {args.ssl_root_cert!r}: {e.strerror or e}")
    from .auth import resolve_api_key

    try:
        client = QwenClient(args.address, api_key=resolve_api_key(args.api_key),
                            ssl=args.ssl or root_certificates is not None, root_certificates=root_certificates)
    except InvalidRequest as e:
        parser.error(f"argument --{e.field.replace('_', '-')}: {e.problem}")
    with client:
        try:  # builds and checks the request before anything is sent
            if args.chat:
                stream = client.chat_stream([{"role": "user", "content": prompt}],
                                            system=args.system, timeout=args.timeout, **sampling)
            else:
                stream = client.generate_stream(prompt, timeout=args.timeout, **sampling)
        except InvalidRequest as e:
            parser.error(f"argument {_GENERATE_FLAGS.get(e.field, e.field)}: {e.problem}")
        try:
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                wrote = wrote or bool(delta.text)
                finish = delta.finish_reason or finish
        except grpc.RpcError as e:
            after_text = "\n" if wrote else ""
            print(f"{after_text}qwenserve generate: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # closing the stream above cancels the call
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:  # e.g. piped into `head`: stop quietly, like other tools
            _silence_stdout()
            return 1
    try:
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 1
    if finish not in ("stop", "length"):  # aborted (e.g. the server shut down) or cut off
        print(f"qwenserve generate: error: the request ended with finish_reason {finish or 'none'!r}",
              file=sys.stderr)
        return 1
    return 0


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is quiet."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
