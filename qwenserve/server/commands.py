"""The `qwenserve launch` and `qwenserve generate` subcommands (argparse).

Owns the flags of DESIGN.md's CLI and their mapping onto `EngineConfig`;
`qwenserve/cli.py` calls `add_launch_parser(sub)` / `add_generate_parser(sub)` and then
`args.func(args)`, which returns the exit code (0 on success).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_bytes(text: str) -> int:
    """'536870912', '512MiB', '0.5GiB', '2G' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 512MiB, 2GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "launch", help="serve a model over gRPC",
        description="Serve a Qwen model over gRPC (qwenserve.v1.Generation, health, reflection). "
                    "Without --model: the built-in tiny model (random weights).")
    p.add_argument("--model", default=None, help="checkpoint directory (HF format)")
    p.add_argument("--tp", type=int, default=1, dest="tp", help="tensor-parallel size")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="port (0: any free port; default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (tp > 1)")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="waiting-queue bound; beyond it calls get RESOURCE_EXHAUSTED")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running calls get to finish on SIGINT/SIGTERM (default: %(default)s)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache budget on the CPU, e.g. 512MiB")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--log-level", default="INFO", help="logging level for stderr")
    p.set_defaults(func=launch)
    return p


def engine_config_from_args(args: argparse.Namespace):
    from qwenserve.config import EngineConfig

    kwargs = {"model": args.model, "tensor_parallel_size": args.tp, "device": args.device,
              "dtype": args.dtype, "ray_address": args.ray_address}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                 "gpu_memory_utilization", "max_waiting_requests", "kv_cache_memory", "seed"):
        value = getattr(args, name)
        if value is not None:  # unset: EngineConfig's default
            kwargs[name] = value
    if args.no_prefix_caching:
        kwargs["enable_prefix_caching"] = False
    return EngineConfig.from_kwargs(**kwargs)


def launch(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"qwenserve launch: error: {e}", file=sys.stderr)
        return 2
    from .app import run_server

    return run_server(config, host=args.host, port=args.port, shutdown_grace=args.shutdown_grace)


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="stream a completion from a running server",
                              description="Stream a completion (or with --chat a ChatML reply) "
                                          "from a qwenserve server to the terminal.")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text ('-': read standard input)")
    p.add_argument("--address", default="127.0.0.1:50051", help="server HOST:PORT (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.set_defaults(func=generate)
    return p


def generate(args: argparse.Namespace) -> int:
    import grpc

    from .client import QwenClient

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    finish = None
    with QwenClient(args.address) as client:
        try:
            if args.chat:
                stream = client.chat_stream([{"role": "user", "content": prompt}],
                                            system=args.system, timeout=args.timeout, **sampling)
            else:
                stream = client.generate_stream(prompt, timeout=args.timeout, **sampling)
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                finish = delta.finish_reason or finish
        except grpc.RpcError as e:
            print(f"\nqwenserve generate: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # closing the stream above cancels the call
            print(file=sys.stderr)
            return 130
    sys.stdout.write("\n")
    if finish not in (None, "stop", "length"):
        print(f"(finished: {finish})", file=sys.stderr)
    return 0
