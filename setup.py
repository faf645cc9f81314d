"""Installs the qwenserve package and its `qwenserve` console script."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# One version, qwenserve.__version__ (what `qwenserve --version` prints), read without importing.
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "qwenserve" / "__init__.py").read_text(),
                    re.MULTILINE).group(1)

setup(
    name="qwenserve",
    version=VERSION,
    description="A serving engine for the Qwen (v1) model family",
    packages=find_packages(include=["qwenserve", "qwenserve.*"]),
    package_data={
        "qwenserve.model": ["assets/qwen.tiktoken"],
        "qwenserve.server": ["protos/*.proto"],
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton>=3.6",  # the oldest triton CI compiles every kernel with (.ci/run)
        "tiktoken>=0.6",
        "safetensors>=0.4",
        "numpy",
        "ray>=2.9",
        "grpcio>=1.85.1",  # the generated stubs check this at import
        "grpcio-health-checking>=1.85.1",
        "grpcio-reflection>=1.85.1",
        "protobuf>=7.35.1",  # gencode version of qwenserve_pb2.py
        "fastapi>=0.110",  # the OpenAI-compatible HTTP API
        "uvicorn>=0.30",
        # uvicorn's C HTTP parser: with h11 (pure Python) a 128-stream SSE run on the tiny model
        # served ~25% fewer tokens/s than gRPC; with httptools about as many (docs/PERFORMANCE.md).
        "httptools>=0.6",
        "prometheus_client>=0.20",  # /metrics
        "huggingface_hub>=0.23",  # --model ORG/NAME
        "llguidance>=1.9",  # structured output: grammar masks over the tiktoken vocabulary
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "transformers>=4.45", "grpcio-tools>=1.85.1", "openai>=1.40",
                 "httpx>=0.27", "jsonschema>=4"],
        # benchmarks/run.py: the transformers baseline of `offline`, `serve --backend openai`, `--plot`
        "bench": ["transformers>=4.45", "httpx>=0.27", "matplotlib"],
    },
    entry_points={"console_scripts": ["qwenserve=qwenserve.cli:main"]},
)
