"""Kernel bandwidth benchmark: how close each memory-bound Triton kernel gets to the copy roofline.

On CUDA it measures device-to-device copy bandwidth (a 4 GiB `copy_`, bytes read + written),
then, at Qwen-7B shapes (32 heads x 128, hidden 4096, bf16, block_size 16):

    decode attention   batch 64 x context 4096, batch 1 x context 32768   (targets 80%, 60%)
    rms_norm, add_rms_norm, apply_rotary (4096 tokens)                      (target 80%)
    store_kv, swiglu (4096 tokens, MLP 11008)                               (for reference)
    prefill attention  8 x 2048 causal                                      (TFLOP/s, compute-bound)

Achieved GB/s = bytes the kernel must move / median time (CUDA events, L2 flushed before each
run). Prints a table; `--json PATH` also writes the numbers. Without CUDA it says so and exits 0;
`--smoke` instead runs tiny shapes through the Triton interpreter to check the plumbing (its
times mean nothing).

    python benchmarks/kernels.py [--json out.json] [--smoke] [--iters 20]
"""
import argparse
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwenserve.kernels import get_ops  # noqa: E402

GiB = 1 << 30


def measure(fn, device, iters):
    """Median seconds per call. On CUDA each call follows an L2 flush, so nothing is served
    from the 50 MB L2 that a real step would have to fetch from HBM."""
    fn()
    if device.type != "cuda":
        times = []
        for _ in range(max(1, iters)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, iters, nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, iters)
    del src, dst
    return 2 * nbytes / seconds


def decode_case(ops, device, num_seqs, context, heads, head_dim, block_size, dtype):
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    cache_shape = (num_blocks, block_size, heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    # Scattered blocks, as after a while of serving.
    perm = torch.randperm(num_blocks - 1, device=device).to(torch.int32) + 1
    block_tables = perm[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq).contiguous()
    q = torch.randn(num_seqs, heads, head_dim, dtype=dtype, device=device)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)

    def run():
        ops.paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables,
                            1 / math.sqrt(head_dim), None, 1, context)

    elem = torch.finfo(dtype).bits // 8
    nbytes = 2 * num_seqs * context * heads * head_dim * elem + 2 * q.numel() * elem
    nbytes += block_tables.numel() * 4
    return run, nbytes


def prefill_case(ops, device, num_seqs, length, heads, head_dim, block_size, dtype):
    blocks_per_seq = math.ceil(length / block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    cache_shape = (num_blocks, block_size, heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    block_tables = (torch.arange(num_seqs * blocks_per_seq, device=device, dtype=torch.int32) + 1
                    ).view(num_seqs, blocks_per_seq)
    q = torch.randn(num_seqs * length, heads, head_dim, dtype=dtype, device=device)
    seq_lens = torch.full((num_seqs,), length, dtype=torch.int32, device=device)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * length

    def run():
        ops.paged_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables,
                            1 / math.sqrt(head_dim), None, length, length)

    # QK^T and PV over the causal half: 2 matmuls x 2 flops x pairs x head_dim x heads.
    flops = 4 * num_seqs * heads * head_dim * length * (length + 1) / 2
    return run, flops


def elementwise_cases(ops, device, tokens, hidden, heads, inter, block_size, dtype):
    elem = torch.finfo(dtype).bits // 8
    head_dim = hidden // heads
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=dtype, device=device)
    qkv = torch.randn(tokens, 3 * hidden, dtype=dtype, device=device)
    q = qkv[:, :hidden].view(tokens, heads, head_dim)
    k = qkv[:, hidden : 2 * hidden].view(tokens, heads, head_dim)
    v = qkv[:, 2 * hidden :].view(tokens, heads, head_dim)
    positions = torch.arange(tokens, device=device)
    theta = torch.full((tokens,), 10000.0, device=device)
    mlp = torch.randn(tokens, 2 * inter, dtype=dtype, device=device)
    num_blocks = math.ceil(tokens / block_size) + 1
    k_cache = torch.empty(num_blocks, block_size, heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    slots = torch.arange(tokens, device=device) + block_size
    act = tokens * hidden * elem
    return [
        ("rms_norm", f"{tokens} x {hidden}", lambda: ops.rms_norm(x, w, 1e-6), 2 * act + hidden * elem, 0.8),
        ("add_rms_norm", f"{tokens} x {hidden}", lambda: ops.add_rms_norm(x, res, w, 1e-6),
         4 * act + hidden * elem, 0.8),
        ("apply_rotary (q, k)", f"{tokens} x {heads} x {head_dim}",
         lambda: ops.apply_rotary(q, k, positions, theta), 4 * act + tokens * 12, 0.8),
        ("store_kv", f"{tokens} x {heads} x {head_dim}",
         lambda: ops.store_kv(k, v, k_cache, v_cache, slots), 4 * act + tokens * 8, None),
        ("swiglu", f"{tokens} x 2*{inter}", lambda: ops.swiglu(mlp), 3 * tokens * inter * elem, None),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny interpreted run on the CPU")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("No CUDA device: nothing to measure (use --smoke for a tiny interpreted run).")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    ops, dtype = get_ops(use_triton=True), torch.bfloat16
    if cuda:
        heads, head_dim, hidden, inter, tokens = 32, 128, 4096, 11008, 4096
        decode_shapes, prefill_shape, copy_bytes, iters = [(64, 4096, 0.8), (1, 32768, 0.6)], (8, 2048), 4 * GiB, args.iters
    else:
        heads, head_dim, hidden, inter, tokens = 2, 32, 64, 48, 8
        decode_shapes, prefill_shape, copy_bytes, iters = [(2, 40, 0.8), (1, 64, 0.6)], (2, 24), 1 << 20, 1

    copy_bw = copy_bandwidth(device, iters, copy_bytes)
    rows = []

    def add(name, shape, seconds, nbytes=None, flops=None, target=None):
        row = dict(kernel=name, shape=shape, time_us=seconds * 1e6)
        if nbytes is not None:
            row.update(gb_per_s=nbytes / seconds / 1e9, share_of_copy=nbytes / seconds / copy_bw,
                       target_share=target)
        if flops is not None:
            row.update(tflop_per_s=flops / seconds / 1e12)
        rows.append(row)

    for num_seqs, context, target in decode_shapes:
        run, nbytes = decode_case(ops, device, num_seqs, context, heads, head_dim, 16, dtype)
        add("paged_attention decode", f"batch {num_seqs} x ctx {context}", measure(run, device, iters),
            nbytes=nbytes, target=target)
        del run
        if cuda:
            torch.cuda.empty_cache()
    run, flops = prefill_case(ops, device, *prefill_shape, heads, head_dim, 16, dtype)
    add("paged_attention prefill", f"{prefill_shape[0]} x {prefill_shape[1]} causal",
        measure(run, device, iters), flops=flops)
    for name, shape, fn, nbytes, target in elementwise_cases(ops, device, tokens, hidden, heads,
                                                             inter, 16, dtype):
        add(name, shape, measure(fn, device, iters), nbytes=nbytes, target=target)

    device_name = torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)"
    print(f"device: {device_name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)"
          + ("" if cuda else "  [smoke run: times are meaningless]"))
    print(f"{'kernel':<26}{'shape':<26}{'time us':>10}{'GB/s':>10}{'of copy':>9}{'target':>8}")
    for r in rows:
        bw = f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else f"{r['tflop_per_s']:.1f}TF"
        share = f"{100 * r['share_of_copy']:.0f}%" if "share_of_copy" in r else "-"
        target = f"{100 * r['target_share']:.0f}%" if r.get("target_share") else "-"
        print(f"{r['kernel']:<26}{r['shape']:<26}{r['time_us']:>10.1f}{bw:>10}{share:>9}{target:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, smoke=not cuda, copy_gb_per_s=copy_bw / 1e9,
                           torch=torch.__version__, results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
