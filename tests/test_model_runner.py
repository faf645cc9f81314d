"""ModelRunner.prepare_inputs: the step's tensors, packed into one host-to-device copy, hold
what the scheduler asked for, and every one starts on a 16-byte boundary (Triton compiles a
kernel per pointer alignment; a view whose alignment changed with the batch would recompile)."""
import dataclasses

import torch

from qwenserve import LLM, SamplingParams


def test_step_tensors_are_aligned_views_with_the_scheduled_values(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu", max_num_batched_tokens=40, block_size=4)
    runner = llm.engine.executor.worker.runner
    seen = []
    original = runner.prepare_inputs

    def recording(out):
        result = original(out)
        # The views' buffers are reused two steps later: check them now, keep copies.
        tensors = [result.input_ids, result.positions, result.sample_index, result.meta.query_start_loc,
                   result.meta.seq_lens, result.meta.block_tables, result.meta.slot_mapping, result.meta.rope_theta]
        for t in tensors:
            assert t.data_ptr() % 16 == 0, t
        meta = dataclasses.replace(result.meta, **{name: getattr(result.meta, name).clone() for name in (
            "query_start_loc", "seq_lens", "block_tables", "slot_mapping", "rope_theta")})
        seen.append((dict(out.num_scheduled_tokens),
                     (result.input_ids.clone(), result.positions.clone(), meta, result.sample_rows,
                      result.sample_index.clone())))
        return result

    runner.prepare_inputs = recording
    engine = llm.engine
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    for i, n in enumerate((3, 17, 30)):  # odd sizes: packed segments of odd lengths
        engine.add_request(f"r{i}", prompt_token_ids=list(range(1000 + i, 1000 + i + n)), params=params)
    while engine.has_unfinished_requests():
        engine.step()
    llm.shutdown()

    assert len(seen) > 3
    for scheduled, (input_ids, positions, meta, sample_rows, sample_index) in seen:
        num_tokens = sum(scheduled.values())
        assert input_ids.shape == positions.shape == meta.slot_mapping.shape == meta.rope_theta.shape == (num_tokens,)
        assert meta.query_start_loc.tolist() == meta.query_start_loc_list
        assert meta.seq_lens.tolist() == meta.seq_lens_list
        assert sample_index.tolist() == [row for row, _ in sample_rows]
        # Positions run from each request's computed count up to its new sequence length.
        expected_positions = []
        for start, end, seq_len in zip(meta.query_start_loc_list, meta.query_start_loc_list[1:],
                                       meta.seq_lens_list):
            expected_positions += list(range(seq_len - (end - start), seq_len))
        assert positions.tolist() == expected_positions
        # Slots address each token's block and offset through the block table (block size 4).
        for b, (start, end) in enumerate(zip(meta.query_start_loc_list, meta.query_start_loc_list[1:])):
            for row in range(start, end):
                pos = positions[row].item()
                assert meta.slot_mapping[row].item() == meta.block_tables[b, pos // 4].item() * 4 + pos % 4
        assert torch.all(meta.rope_theta > 0)


def test_logn_scales_come_from_a_table_built_once(tiny_checkpoint):
    """Qwen's logn factor (past seq_length = 2048 for the built-in model) is gathered each step
    from a device table evaluated once; its values are the float64 formula rounded to float32."""
    from qwenserve.model.attention import logn_scales

    llm = LLM(model=tiny_checkpoint, device="cpu", max_num_batched_tokens=1024)
    runner = llm.engine.executor.worker.runner
    assert runner.config.use_logn_attn and runner.config.seq_length == 2048
    seen = []
    original = runner.prepare_inputs

    def recording(out):
        result = original(out)
        seen.append((result.positions.clone(), result.meta.logn_scale.clone()))  # buffers are reused
        return result

    runner.prepare_inputs = recording
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    # Chunks of 1024 and a decode past 2048, then past the table's first size (grows once).
    prompt = [100 + i % 5000 for i in range(2300)]
    llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
    assert runner.logn.builds == 1
    runner.logn.scales(torch.tensor([3]), max_position=runner.logn.table.shape[0])
    assert runner.logn.builds == 2 and runner.logn.table.shape[0] >= 2 * 8192
    llm.shutdown()

    positions = torch.cat([p for p, _ in seen])
    scales = torch.cat([scale for _, scale in seen])
    assert int(positions.max()) > 2048 and int(positions.min()) == 0
    assert torch.equal(scales, logn_scales(positions, 2048))
    assert torch.equal(runner.logn.table[:9000], logn_scales(torch.arange(9000), 2048))


def test_decode_rows_come_first_in_a_mixed_step(tiny_model):
    """One-token rows lead the flat batch (each group in the scheduler's order), and
    `num_decodes` says how many: the Triton attention sends exactly those to the decode kernel."""
    from qwenserve.scheduler.output import NewRequestData, SchedulerOutput
    from qwenserve.worker.model_runner import ModelRunner

    def new(rid, prompt, blocks, computed):
        return NewRequestData(rid, prompt, [], blocks, computed, 1.0, SamplingParams(max_tokens=4), [])

    runner = ModelRunner(tiny_model, block_size=4, device=torch.device("cpu"))
    out = SchedulerOutput(
        new_requests=[new("p", list(range(10, 22)), [1, 2, 3], 0),  # a whole 12-token prompt
                      new("d1", [5, 6, 7, 8, 9], [4, 5], 4),  # its last token: a decode row
                      new("c", list(range(30, 36)), [6, 7], 2),  # a 4-token chunk after a prefix hit
                      new("d2", [1, 2, 3], [8], 2)],
        num_scheduled_tokens={"p": 12, "d1": 1, "c": 4, "d2": 1})
    runner._update_states(out)
    input_ids, positions, meta, sample_rows, sample_index = runner.prepare_inputs(out)[:5]
    assert meta.num_decodes == 2
    assert meta.query_start_loc_list == [0, 1, 2, 14, 18]
    assert meta.seq_lens_list == [5, 3, 12, 6]
    assert input_ids.tolist() == [9, 3] + list(range(10, 22)) + [32, 33, 34, 35]
    assert positions.tolist() == [4, 2] + list(range(12)) + [2, 3, 4, 5]
    assert sample_rows == [(0, "d1"), (1, "d2"), (13, "p"), (17, "c")]
    assert meta.block_tables.tolist() == [[4, 5, 0], [8, 0, 0], [1, 2, 3], [6, 7, 0]]
