"""Generates the Python stubs of `protos/qwenserve.proto` reproducibly.

Owns `qwenserve_pb2.py` and `qwenserve_pb2_grpc.py` beside this file. Run
`python -m qwenserve.server.gen_protos` after editing the proto; `--check` exits 1 when the
committed stubs differ from a fresh generation (CI runs the same comparison as a test).

grpc_tools writes `import qwenserve_pb2 as ...` into the service stub, which only works
with the output directory on sys.path; we rewrite it to a package-relative import so the
stubs work as `qwenserve.server.qwenserve_pb2_grpc`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "protos")
PROTO_NAME = "qwenserve.proto"
STUB_NAMES = ("qwenserve_pb2.py", "qwenserve_pb2_grpc.py")

# Lines that record the generator's version; they differ between grpcio-tools releases
# without the stubs meaning anything different, so the check ignores them.
_VERSION_LINE = re.compile(
    r"(Protobuf Python Version|GRPC_GENERATED_VERSION|ValidateProtobufRuntimeVersion|"
    r"^\s*\d+,\s*$|^\s*'',\s*$)"
)


def run_protoc(out_dir: str) -> None:
    """Runs grpc_tools.protoc on the proto into `out_dir` (raw, unfixed output)."""
    from grpc_tools import protoc  # imported here: only generation needs grpcio-tools

    import importlib.resources

    # grpc_tools ships google/protobuf/*.proto; pass its include dir like the CLI does.
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", PROTO_NAME]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {os.path.join(PROTO_DIR, PROTO_NAME)}")


def fix_imports(source: str) -> str:
    """Makes the generated `import qwenserve_pb2` package-relative."""
    return re.sub(r"^import qwenserve_pb2 as ", "from . import qwenserve_pb2 as ", source,
                  flags=re.MULTILINE)


def generate() -> dict[str, str]:
    """Returns {stub file name: text} of a fresh generation, imports fixed."""
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(tmp)
        stubs = {}
        for name in STUB_NAMES:
            with open(os.path.join(tmp, name), encoding="utf-8") as f:
                stubs[name] = fix_imports(f.read())
    return stubs


def normalize(source: str) -> str:
    """Drops generator-version lines so stubs from another grpcio-tools release compare equal."""
    return "\n".join(line for line in source.splitlines() if not _VERSION_LINE.search(line))


def stale_stubs() -> list[str]:
    """Names of committed stubs that differ from a fresh generation (missing counts)."""
    stale = []
    for name, text in generate().items():
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            stale.append(name)
            continue
        with open(path, encoding="utf-8") as f:
            if normalize(f.read()) != normalize(text):
                stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        for name in stale:
            print(f"stale: {name} (run python -m qwenserve.server.gen_protos)", file=sys.stderr)
        return 1 if stale else 0
    for name, text in generate().items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {os.path.join(HERE, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
