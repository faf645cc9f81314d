"""Call qwenserve's gRPC API (qwenserve.v1.Generation) with the Python client that comes with it:
a completion, a streamed completion, a chat reply, tokenization and the server's stats.

    qwenserve launch            # in another shell (with the venv activated)
    python examples/grpc_client.py [--address 127.0.0.1:50051] [--max-tokens 32]

Other languages: generate stubs from qwenserve/server/protos/qwenserve.proto (the server also
serves reflection, so `grpcurl -plaintext 127.0.0.1:50051 list` works).
"""
import argparse

from qwenserve.server.client import QwenClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with QwenClient(args.address) as client:
        info = client.model_info(timeout=10)
        print(f"model: {info['model']} ({info['dtype']} on {info['device']}, max_model_len {info['max_model_len']})")

        print("\n--- completion (greedy)")
        result = client.generate("蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是", max_tokens=args.max_tokens,
                                 temperature=0.0)
        print(result.text, f"[{result.outputs[0].finish_reason}]")

        print("\n--- streamed, two samples")
        for delta in client.generate_stream("Once upon a time", n=2, max_tokens=args.max_tokens, temperature=0.8,
                                            seed=1):
            print(f"[{delta.index}]{delta.text}", end="", flush=True)
        print()

        print("\n--- chat")
        reply = client.chat([{"role": "user", "content": "你好"}], system="You are a helpful assistant.",
                            max_tokens=args.max_tokens)
        print(reply.text)

        print("\n--- tokenize, stats")
        print(client.tokenize("Hello, 世界"))
        stats = client.stats()
        print(f"KV blocks used {stats['num_used_blocks']} of {stats['num_total_blocks']}, "
              f"{stats['num_finished_requests']} requests finished")


if __name__ == "__main__":
    main()
