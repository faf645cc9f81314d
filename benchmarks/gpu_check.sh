#!/usr/bin/env bash
# gpu_check.sh: the one command to run on a machine with a GPU. It checks and measures, in stages:
#
#   env      GPU, driver, torch / triton / transformers versions
#   ckpt     7B-shaped random checkpoints with 2 layers, bf16 and GPTQ Int4
#            (qwenserve make-checkpoint --preset 7b --layers 2 [--int4])
#   tests    the GPU tests: kernels at real sizes, engine Triton vs reference at 7B shapes, CUDA-graph
#            decode vs eager, Int4 engine (Triton kernels) vs the reference, GPTQ kernels
#   kernels  benchmarks/kernels.py (bandwidth of each kernel against the copy roofline)
#   offline  benchmarks/run.py offline on that checkpoint: a prefix of the standard mixed workload,
#            qwenserve against transformers static batches of 32, in the same run
#   prefill  benchmarks/run.py prefill: 8 x 2048 prompt tokens/s, the decode stage's random 7B
#   decode   benchmarks/run.py decode, batch 1, full-depth (32-layer) 7B with random weights made
#            on the GPU (no 15 GB checkpoint on disk), against weight bytes / measured copy bandwidth
#   steptime benchmarks/step_time.py: the real step time of that 7B (decode through CUDA graphs and
#            eager, prefill) next to the simulated device's formula (benchmarks/simulated_device.py)
#   int4     the same on a 32-layer 7B in the GPTQ Int4 layout (random packed weights)
#
# and prints a short table last. Every stage runs under `timeout`, so one slow stage cannot eat
# the whole budget; the defaults add up to under 10 minutes. Runs from the source tree, offline.
#
#   benchmarks/gpu_check.sh [OUT_DIR]                  (default /tmp/qwenserve-gpu-check)
#   STAGES="offline decode" benchmarks/gpu_check.sh    (a subset, e.g. to split it over two commands)
#   T_TESTS=600 NUM_PROMPTS=512 benchmarks/gpu_check.sh (longer limits, the full mixed workload)
#
# Logs and JSON results stay in OUT_DIR; the table is also written to OUT_DIR/table.txt.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
OUT="${1:-/tmp/qwenserve-gpu-check}"
CKPT="${CKPT:-$OUT/qwen-${PRESET:-7b}-2layers}"
CKPT_INT4="${CKPT_INT4:-$OUT/qwen-${PRESET:-7b}-2layers-int4}"
STAGES="${STAGES:-env ckpt tests kernels offline decode prefill steptime int4}"
NUM_PROMPTS="${NUM_PROMPTS:-128}"
DECODE_LAYERS="${DECODE_LAYERS:-32}"
# Only for trying the script itself without a GPU: DEVICE=cpu PRESET=tiny DECODE_LAYERS=2.
DEVICE="${DEVICE:-cuda}" PRESET="${PRESET:-7b}"
DTYPE=bfloat16; [ "$DEVICE" = cpu ] && DTYPE=float32
STEP_QUICK=""; [ "$DEVICE" = cpu ] && STEP_QUICK=--quick  # three tiny step shapes on a CPU
# Seconds per stage (sum: 595 s).
T_ENV="${T_ENV:-20}" T_CKPT="${T_CKPT:-100}" T_TESTS="${T_TESTS:-140}" T_KERNELS="${T_KERNELS:-45}"
T_OFFLINE="${T_OFFLINE:-75}" T_DECODE="${T_DECODE:-60}" T_PREFILL="${T_PREFILL:-35}"
T_STEPTIME="${T_STEPTIME:-75}" T_INT4="${T_INT4:-45}"
STEP_LAYERS="${STEP_LAYERS:-$DECODE_LAYERS}"
mkdir -p "$OUT"
: > "$OUT/stages.tsv"

# run_stage NAME SECONDS CMD...: runs CMD with a time limit, its output in OUT/NAME.log (and
# its tail on the terminal), and records "name status seconds" for the table.
run_stage() {
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS rc status
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="fail($rc)" ;;
  esac
  tail -n 15 "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$OUT/stages.tsv"
}

for stage in $STAGES; do
  case $stage in
    env)
      run_stage env "$T_ENV" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
        $PY -c 'import torch, transformers; import importlib.util as u; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); \
print(\"triton\", __import__(\"triton\").__version__ if u.find_spec(\"triton\") else None); \
print(\"transformers\", transformers.__version__); \
print(\"grpcio\", __import__(\"grpc\").__version__ if u.find_spec(\"grpc\") else None, \"protobuf\", \
__import__(\"google.protobuf\").protobuf.__version__ if u.find_spec(\"google.protobuf\") else None)'; \
        git log -1 --format='commit %h %s'" ;;
    ckpt)
      if [ -f "$CKPT/model.safetensors.index.json" ] && [ -f "$CKPT_INT4/model.safetensors.index.json" ]; then
        echo "=== ckpt: reusing $CKPT and $CKPT_INT4"; printf 'ckpt\tok\t0\n' >> "$OUT/stages.tsv"
      else
        run_stage ckpt "$T_CKPT" bash -c "set -e
          [ -f '$CKPT/model.safetensors.index.json' ] || '$PY' -m qwenserve.cli make-checkpoint --preset '$PRESET' --layers 2 '$CKPT'
          [ -f '$CKPT_INT4/model.safetensors.index.json' ] || '$PY' -m qwenserve.cli make-checkpoint --preset '$PRESET' --layers 2 --int4 '$CKPT_INT4'"
      fi ;;
    tests)
      # The GPU-relevant tests: kernels at real sizes, the engine on Triton vs the reference at
      # 7B shapes (on the checkpoint above), GPTQ; the CPU-only rest is CI's job.
      run_stage tests "$T_TESTS" env QWENSERVE_GPU_CHECKPOINT="$CKPT" QWENSERVE_GPU_CHECKPOINT_INT4="$CKPT_INT4" \
        "$PY" -m pytest -q -m "not slow" \
        -p no:cacheprovider tests/test_gpu.py tests/test_kernels_attention.py tests/test_kernels_norm.py \
        tests/test_kernels_rotary.py tests/test_kernels_store_kv.py tests/test_kernels_gptq.py ;;
    kernels)
      if [ -f benchmarks/kernels.py ]; then
        run_stage kernels "$T_KERNELS" "$PY" benchmarks/kernels.py --json "$OUT/kernels.json"
      else
        printf 'kernels\tmissing\t0\n' >> "$OUT/stages.tsv"
      fi ;;
    offline)
      run_stage offline "$T_OFFLINE" "$PY" benchmarks/run.py offline --model "$CKPT" --device "$DEVICE" \
        --dataset mixed --num-prompts "$NUM_PROMPTS" --baseline-batch-size 32 --json "$OUT/offline.json" ;;
    decode)
      run_stage decode "$T_DECODE" "$PY" benchmarks/run.py decode --random-weights --preset "$PRESET" \
        --layers "$DECODE_LAYERS" --device "$DEVICE" --dtype "$DTYPE" --batch-size 1 --input-len 128 \
        --output-len 256 --json "$OUT/decode.json" ;;
    prefill)
      run_stage prefill "$T_PREFILL" "$PY" benchmarks/run.py prefill --random-weights --preset "$PRESET" \
        --layers "$DECODE_LAYERS" --device "$DEVICE" --dtype "$DTYPE" --batch-size 8 --input-len 2048 \
        --json "$OUT/prefill.json" ;;
    steptime)
      # Compares the measured step times with the simulated device's formula (benchmarks/simulated_device.py).
      run_stage steptime "$T_STEPTIME" "$PY" benchmarks/step_time.py --preset "$PRESET" --layers "$STEP_LAYERS" \
        --device "$DEVICE" --dtype "$DTYPE" --reps 5 $STEP_QUICK --json "$OUT/steptime.json" ;;
    int4)
      run_stage int4 "$T_INT4" "$PY" benchmarks/step_time.py --preset "$PRESET" --layers "$STEP_LAYERS" \
        --device "$DEVICE" --int4 --reps 5 $STEP_QUICK --json "$OUT/int4.json" ;;
    *) echo "unknown stage: $stage (stages: env ckpt tests kernels offline decode prefill steptime int4)"; exit 2 ;;
  esac
done

# The table: one line per stage, with the number that stage is for.
"$PY" - "$OUT" <<'EOF' | tee "$OUT/table.txt"
import json, os, re, sys
out = sys.argv[1]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def log_tail(name, pattern):
    try:
        lines = open(os.path.join(out, name + ".log"), errors="replace").read().splitlines()
    except OSError:
        return ""
    hits = [l.strip() for l in lines if re.search(pattern, l)]
    return hits[-1] if hits else ""

def summary(stage):
    if stage == "env":
        return log_tail("env", r"^[^,]+, \d+ MiB") or log_tail("env", r"^torch")
    if stage == "ckpt":
        return log_tail("ckpt", r"wrote") or "reused"
    if stage == "tests":
        return log_tail("tests", r"\b(passed|failed|error)")
    if stage == "kernels":
        r = load("kernels.json")
        try:  # benchmarks/kernels.py's JSON: copy_gb_per_s and rows with share_of_copy / target_share
            rated = [x for x in r["results"] if x.get("target_share")]
            met = [x for x in rated if x["share_of_copy"] >= x["target_share"]]
            worst = min(rated, key=lambda x: x["share_of_copy"] / x["target_share"])
            return (f"copy {r['copy_gb_per_s']:.0f} GB/s; {len(met)}/{len(rated)} kernels at target; lowest: "
                    f"{worst['kernel']} {worst['shape']} {100 * worst['share_of_copy']:.0f}% "
                    f"(target {100 * worst['target_share']:.0f}%)")
        except (TypeError, KeyError, ValueError):
            return "see kernels.log"
    if stage == "offline":
        r = load("offline.json")
        if not r:
            return ""
        q, b = r["qwenserve"], r.get("baseline") or {}
        text = f"{r['workload']['num_requests']} mixed: qwenserve {q['requests_per_s']:.2f} req/s, {q['output_tokens_per_s']:.0f} out tok/s"
        if "requests_per_s" in b:
            text += f"; transformers {b['requests_per_s']:.2f} req/s, {b['output_tokens_per_s']:.0f} out tok/s; {r['speedup']:.1f}x"
        elif b:
            text += f"; baseline: {b.get('error')}"
        return text
    if stage == "decode":
        r = load("decode.json")
        if not r:
            return ""
        return (f"batch 1: {r['tokens_per_s_per_seq']:.1f} tok/s ({r['ms_per_step']:.2f} ms/step) = "
                f"{100 * r['fraction_of_floor']:.0f}% of floor {r['floor_tokens_per_s_per_seq']:.0f} tok/s "
                f"({r['weight_bytes_per_step'] / 1e9:.1f} GB / {r['copy_bandwidth_GBps']:.0f} GB/s)")
    if stage in ("steptime", "int4"):
        r = load(stage + ".json")
        if not r:
            return ""
        named = ("decode B=1 ctx 128", "decode B=128 ctx 512", "prefill 4 x 2048")
        picked = [x for x in r["results"] if x["shape"] in named] or r["results"][:3]
        parts = []
        for x in picked:
            ms = x["graph_ms"] if x["graph_ms"] is not None else x["eager_ms"]
            text = f"{x['shape']} {ms:.2f} ms"
            if x["graph_ms"] is not None:
                text += f" (eager {x['eager_ms']:.2f})"
            if x["formula_ms"] is not None:
                text += f" = {x['measured_over_formula']:.2f}x formula {x['formula_ms']:.2f}"
            parts.append(text)
        if r.get("simulator") is None:
            parts.append("no simulated_device.py to compare with")
        return "; ".join(parts)
    if stage == "prefill":
        r = load("prefill.json")
        if not r:
            return ""
        return (f"{r['batch_size']} x {r['input_len']} in {r['engine_steps']} step(s): "
                f"{r['prefill_tokens_per_s']:,.0f} tok/s")
    return ""

print()
print(f"{'stage':9}{'status':12}{'time':>6}  result")
for line in open(os.path.join(out, "stages.tsv")):
    stage, status, seconds = line.rstrip("\n").split("\t")
    print(f"{stage:9}{status:12}{seconds + 's':>6}  {summary(stage)}")
EOF
