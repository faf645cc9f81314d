"""Installs the qwenserve package and its `qwenserve` console script."""
from setuptools import find_packages, setup

setup(
    name="qwenserve",
    version="0.1.0",
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
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "transformers>=4.45", "grpcio-tools>=1.85.1"],
    },
    entry_points={"console_scripts": ["qwenserve=qwenserve.cli:main"]},
)
