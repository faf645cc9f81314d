"""argparse types shared by the CLI's subcommands and the benchmarks: sizes in bytes and
range-checked numbers. A bad value is an `argparse.ArgumentTypeError`, which argparse reports
as an error naming the flag (exit 2). Imports nothing heavy (no torch, no grpc).
"""
from __future__ import annotations

import argparse
import math
import re

_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_bytes(text: str) -> int:
    """'536870912', '512MiB', '0.5GiB', '2G' -> bytes (at least 1)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 512MiB, 2GiB)")
    size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return size


def int_in(low: int, high: int = None):
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            if high is None:
                bounds = f">= {low}"
            elif high > 2 ** 20 and (high + 1) & high == 0:  # [0, 2**64) reads better than its digits
                bounds = f"in [{low}, 2**{(high + 1).bit_length() - 1})"
            else:
                bounds = f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value
    return parse


def power_of_two(text: str) -> int:
    """An argparse type: a positive power of two (block sizes)."""
    value = int_in(1)(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value


def float_in(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high], or (low, high] when low_open."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            left = "(" if low_open else "["
            bounds = f"in {left}{low:g}, {high:g}]" if math.isfinite(high) else \
                (f"> {low:g}" if low_open else f">= {low:g}")
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text}")
        return value
    return parse
