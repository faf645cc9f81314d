"""GPU checks at real sizes (run by benchmarks/gpu_check.sh; skipped without CUDA): the engine on
the Triton kernels against the torch reference path on a 2-layer 7B-shaped model."""
import gc

import pytest
import torch

from qwenserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# bf16 Triton vs fp32 reference: top-5 logprobs of the first sampled position.
BF16_LOGPROB_ATOL = 0.15


@pytest.fixture(scope="module")
def checkpoint_7b_int4(tmp_path_factory):
    """gpu_check.sh passes the 2-layer 7B Int4 (GPTQ) checkpoint it already made."""
    import os

    from qwenserve.model.checkpoint import make_checkpoint

    if os.environ.get("QWENSERVE_GPU_CHECKPOINT_INT4"):
        return os.environ["QWENSERVE_GPU_CHECKPOINT_INT4"]
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "7b-2l-int4"), "7b", layers=2, seed=0, int4=True)


@pytest.fixture(scope="module")
def checkpoint_7b(tmp_path_factory):
    """gpu_check.sh passes the 2-layer 7B checkpoint it already made."""
    import os

    from qwenserve.model.checkpoint import make_checkpoint

    if os.environ.get("QWENSERVE_GPU_CHECKPOINT"):
        return os.environ["QWENSERVE_GPU_CHECKPOINT"]
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "7b-2l"), "7b", layers=2, seed=0)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 151643, (n,), generator=g).tolist() for n in (1, 15, 16, 17, 300, 1000)]


def _run(checkpoint, inspect=None, **kwargs):
    llm = LLM(model=checkpoint, device="cuda", num_kv_blocks=2048, max_num_batched_tokens=512, **kwargs)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)
    if inspect is not None:
        inspect(llm, "before")
    outs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params, use_tqdm=False)
    if inspect is not None:
        inspect(llm, "after")
    assert llm.get_stats()["num_used_blocks"] == 0
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs]


def test_triton_engine_equals_reference_fp32(checkpoint_7b):
    triton = _run(checkpoint_7b, dtype="float32", use_triton=True)
    reference = _run(checkpoint_7b, dtype="float32", use_triton=False)
    assert [o.token_ids for o in triton] == [o.token_ids for o in reference]


def test_triton_engine_bf16_logprobs_close_to_fp32(checkpoint_7b):
    bf16 = _run(checkpoint_7b, dtype="bfloat16", use_triton=True)
    fp32 = _run(checkpoint_7b, dtype="float32", use_triton=False)
    for a, b in zip(bf16, fp32):
        ref = dict(b.logprobs[0])
        for token, logprob in a.logprobs[0]:
            if token in ref:
                assert abs(logprob - ref[token]) < BF16_LOGPROB_ATOL
        assert a.logprobs[0][0][0] in ref  # the bf16 argmax is among fp32's top 5


def _assert_logprobs_close(outputs, reference, atol):
    for a, b in zip(outputs, reference):
        ref = dict(b.logprobs[0])
        for token, logprob in a.logprobs[0]:
            if token in ref:
                assert abs(logprob - ref[token]) < atol
        assert a.logprobs[0][0][0] in ref


def test_cuda_graph_decode_matches_eager(checkpoint_7b):
    """One GPU: the decode steps replay captured graphs (checked by counting replays) and give
    the eager path's tokens; both on the Triton kernels, fp32."""
    replays = []

    def inspect(llm, when):
        runner = llm.engine.executor.worker.runner
        if when == "before":
            assert runner.decode_graphs is not None, "no decode graphs were captured"
            original = runner.decode_graphs.run
            runner.decode_graphs.run = lambda *a: replays.append(1) or original(*a)

    graphs = _run(checkpoint_7b, inspect=inspect, dtype="float32", use_triton=True, use_cuda_graphs=True)
    eager = _run(checkpoint_7b, dtype="float32", use_triton=True, use_cuda_graphs=False)
    assert len(replays) >= 7  # every request decodes 7 tokens after its first
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
    _assert_logprobs_close(graphs, eager, atol=1e-3)


def test_int4_engine_triton_close_to_reference(checkpoint_7b_int4):
    """GPTQ Int4 at 7B layer shapes: the Triton kernels (16-row for decode steps, large-tile for the
    prompts and the chunks of the 1000-token one) against the torch reference, which dequantizes
    whole weights; fp16 both (the checkpoint's dtype)."""
    triton = _run(checkpoint_7b_int4, dtype="float16", use_triton=True)
    reference = _run(checkpoint_7b_int4, dtype="float16", use_triton=False)
    _assert_logprobs_close(triton, reference, atol=BF16_LOGPROB_ATOL)
