import pytest
import torch
from reference import depth_greedy, hf_greedy, physically_pruned

from skipengine import Engine, SamplingParams, full_plan, make_plan

NEW = 12
PLANS = [
    ("none", 1.0, "full"),
    ("uniform", 2.0, "full"),
    ("uniform", 2.0, "skip"),
    ("uniform", 1.5, "full"),
    ("early_exit", 2.0, "full"),
    ("keep_top", 2.0, "skip"),
    ("random", 2.0, "full"),
]


@pytest.fixture(scope="module")
def engine(llama, tokenizer):
    return Engine(llama, tokenizer)


def greedy(max_new=NEW, **kw):
    return SamplingParams(max_new_tokens=max_new, **kw)


def test_full_depth_matches_hf_generate(engine, llama, prompts):
    out = engine.generate(prompts, full_plan(8), greedy())
    reference = hf_greedy(llama, prompts, NEW, engine.pad_id)
    assert [r.token_ids for r in out.rows] == reference
    assert all(r.ok and r.num_generated_tokens == len(r.token_ids) for r in out.rows)
    assert len({len(p) for p in prompts}) > 1  # the batch really is ragged


@pytest.mark.parametrize("strategy, target, prefill", PLANS)
def test_batch_invariance(engine, prompts, strategy, target, prefill):
    plan = make_plan(8, strategy, target, prefill=prefill, seed=1)
    batched = engine.generate(prompts, plan, greedy()).rows
    for prompt, row in zip(prompts, batched, strict=True):
        assert engine.generate([prompt], plan, greedy()).rows[0].token_ids == row.token_ids


@pytest.mark.parametrize(
    "strategy, target", [("uniform", 2.0), ("uniform", 4.0), ("early_exit", 2.0), ("random", 1.6)]
)
def test_prefill_skip_matches_physically_pruned_model(engine, llama, prompts, strategy, target):
    plan = make_plan(8, strategy, target, prefill="skip", seed=2)
    pruned = physically_pruned(llama, plan.kept_layers, "model.layers", "num_hidden_layers")
    out = engine.generate(prompts, plan, greedy())
    assert [r.token_ids for r in out.rows] == hf_greedy(pruned, prompts, NEW, engine.pad_id)
    full = engine.generate(prompts, full_plan(8), greedy())
    assert [r.token_ids for r in out.rows] != [r.token_ids for r in full.rows]  # the skip is real


@pytest.mark.parametrize("strategy, target", [("uniform", 2.0), ("keep_top", 2.0), ("uniform", 1.5)])
def test_prefill_full_matches_cache_free_reference(engine, llama, prompts, strategy, target):
    plan = make_plan(8, strategy, target, prefill="full")
    out = engine.generate(prompts, plan, greedy())
    for prompt, row in zip(prompts, out.rows, strict=True):
        assert row.token_ids == depth_greedy(llama, prompt, plan, NEW, engine.eos_ids)


def test_skipped_layers_own_no_kv(engine, prompts):
    full = engine.generate(prompts, full_plan(8), greedy()).stats
    half = engine.generate(prompts, make_plan(8, "uniform", 2.0), greedy()).stats
    assert half.kv_cache_bytes * 2 == full.kv_cache_bytes
    assert (half.prefill_layers_per_token, half.decode_layers_per_token) == (8, 4)


def test_seeded_sampling_is_reproducible_and_batch_invariant(engine, prompts):
    params = greedy(temperature=0.9, top_p=0.9, seed=7)
    a = [r.token_ids for r in engine.generate(prompts, full_plan(8), params).rows]
    b = [r.token_ids for r in engine.generate(prompts, full_plan(8), params).rows]
    alone = engine.generate([prompts[1]], full_plan(8), params).rows[0].token_ids
    other = [
        r.token_ids for r in engine.generate(prompts, full_plan(8), greedy(temperature=0.9, seed=8)).rows
    ]
    assert a == b and alone == a[1] and other != a


def test_eos_stops_a_row_and_it_leaves_the_batch(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer)
    free = engine.generate(prompts, full_plan(8), greedy(max_new=20)).rows
    # make row 0's 3rd greedy token an EOS: row 0 stops there, the others run on
    engine.eos_ids = engine.eos_ids | {free[0].token_ids[2]}
    out = engine.generate(prompts, full_plan(8), greedy(max_new=20))
    row = out.rows[0]
    assert row.finish_reason == "stop" and row.token_ids == free[0].token_ids[:3]
    longest = max(r.num_generated_tokens for r in out.rows)
    assert out.stats.decode_steps == longest - 1
    assert any(r.finish_reason == "length" and r.num_generated_tokens == 20 for r in out.rows)


def test_stop_strings_cut_the_text(engine, tokenizer, prompts):
    free = engine.generate(prompts[:1], full_plan(8), greedy(max_new=20)).rows[0]
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop.strip(), "need a non-blank stop string from the free run"
    row = engine.generate(prompts[:1], full_plan(8), greedy(max_new=20, stop=(stop,))).rows[0]
    assert row.finish_reason == "stop" and stop not in row.text and free.text.startswith(row.text)
    assert row.num_generated_tokens < 20


def test_text_prompts_are_tokenized(engine, tokenizer):
    out = engine.generate(["In the beginning God created"], full_plan(8), greedy())
    ids = tokenizer("In the beginning God created")["input_ids"]
    assert out.rows[0].num_input_tokens == len(ids)
    assert out.rows[0].token_ids == engine.generate([ids], full_plan(8), greedy()).rows[0].token_ids


def test_bad_rows_fail_alone(engine, prompts):
    good = prompts[0]
    batch = ["", "   ", None, 42, [1, 2, "x"], [10_000], good]
    out = engine.generate(batch, full_plan(8), greedy())
    assert len(out.rows) == len(batch)
    errors = [r.error for r in out.rows]
    assert all(errors[:6]) and errors[6] is None
    assert "empty" in errors[0] and "empty" in errors[1]
    assert "str or a list of token ids" in errors[2] and "int" in errors[3]
    assert "must lie in" in errors[5]
    assert all(r.finish_reason == "error" for r in out.rows[:6])
    assert out.rows[6].token_ids == engine.generate([good], full_plan(8), greedy()).rows[0].token_ids
    assert out.stats.num_errors == 6


def test_too_long_prompt_errors_or_truncates(llama, tokenizer):
    engine = Engine(llama, tokenizer, max_context=32)
    long = list(range(3, 43))  # 40 tokens > 32
    row = engine.generate([long], full_plan(8), greedy(max_new=8)).rows[0]
    assert row.error and "context window is 32" in row.error and "truncate" in row.error
    row = engine.generate([long], full_plan(8), greedy(max_new=8), on_too_long="truncate").rows[0]
    assert row.ok and row.truncated and row.num_input_tokens == 24 and row.num_generated_tokens == 8
    # a prompt that fits but leaves little room stops at the window, with finish_reason "length"
    row = engine.generate([long[:30]], full_plan(8), greedy(max_new=8)).rows[0]
    assert row.ok and row.num_generated_tokens == 2 and row.finish_reason == "length"


def test_api_misuse_is_a_clear_error(engine, prompts):
    with pytest.raises(TypeError, match="a batch"):
        engine.generate("one prompt")
    with pytest.raises(ValueError, match="plan is for 30 layers"):
        engine.generate(prompts, full_plan(30))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="on_too_long"):
        engine.generate(prompts, on_too_long="ignore")


def test_stats_are_filled(engine, prompts):
    stats = engine.generate(prompts, make_plan(8, "uniform", 2.0), greedy()).stats
    assert stats.num_rows == 4 and stats.num_generated_tokens > 4 and stats.decode_steps > 0
    assert stats.prefill_s > 0 and stats.decode_s > 0 and stats.decode_tokens_per_s > 0
    assert stats.predicted_speedup == 2.0 and stats.num_input_tokens == sum(len(p) for p in prompts)


def test_unpacked_kernels_agree(llama, tokenizer, prompts):
    """The oneDNN-packed projections and plain F.linear give the same greedy tokens."""
    from skipengine.adapters import LlamaFamilyAdapter

    packed = Engine(llama, tokenizer)
    plain = Engine(llama, tokenizer)
    plain.adapter = LlamaFamilyAdapter(llama, pack=False)
    a = packed.generate(prompts, full_plan(8), greedy()).rows
    b = plain.generate(prompts, full_plan(8), greedy()).rows
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert torch.backends.mkldnn.is_available() == (packed.adapter.head.packed is not None)
