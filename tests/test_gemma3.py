"""The Gemma 3 adapter on a tiny random Gemma 3 text model whose sliding window (4) is shorter than the
prompts, so both attention kinds and both rotary tables are exercised."""

import pytest
import torch
from reference import depth_greedy, hf_greedy, physically_pruned
from tolerance import assert_kernel_close
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from skipengine import Engine, SamplingParams, full_plan, make_plan
from skipengine.adapters import Gemma3Adapter
from skipengine.depth import training_runs
from skipengine.finetune import Example, collate, response_logits


@pytest.fixture(scope="module")
def gemma(tokenizer):
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=4,
        layer_types=["sliding_attention"] * 2
        + ["full_attention"]
        + ["sliding_attention"] * 2
        + ["full_attention"],
        query_pre_attn_scalar=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises the (1 + w) norms at w = 0; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def test_full_depth_matches_hf(gemma, tokenizer, prompts):
    engine = Engine(gemma, tokenizer)
    assert isinstance(engine.adapter, Gemma3Adapter)
    out = engine.generate(prompts, full_plan(6), SamplingParams(max_new_tokens=12))
    assert [r.token_ids for r in out.rows] == hf_greedy(gemma, prompts, 12, engine.pad_id)


def test_skip_plans_match_references(gemma, tokenizer, prompts):
    engine = Engine(gemma, tokenizer)
    plan = make_plan(6, "uniform", 1.5, prefill="skip")
    pruned = physically_pruned(gemma, plan.kept_layers, "model.layers", "num_hidden_layers")
    out = engine.generate(prompts, plan, SamplingParams(max_new_tokens=10))
    assert [r.token_ids for r in out.rows] == hf_greedy(pruned, prompts, 10, engine.pad_id)

    plan = make_plan(6, "uniform", 2.0, prefill="full")
    out = engine.generate(prompts, plan, SamplingParams(max_new_tokens=10))
    for prompt, row in zip(prompts, out.rows, strict=True):
        assert row.token_ids == depth_greedy(gemma, prompt, plan, 10, engine.eos_ids)


def test_training_forward_equals_inference_forward(gemma, tokenizer, prompts):
    """The fine-tuning forward (prompt pass, then response pass over HF's cache, skipped layers left
    out) on left-padded prompts longer than the window, against the engine's teacher-forced scoring."""
    engine = Engine(gemma, tokenizer)
    plan = make_plan(6, "uniform", 2.0, prefill="full")
    examples = [Example(p, p[::-1][:6] + [tokenizer.eos_token_id]) for p in prompts]
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    with torch.no_grad():
        training = response_logits(gemma, batch, training_runs(plan, batch["is_prompt"]))
    inference = torch.cat([engine.score(ex.prompt, ex.response, plan) for ex in examples])
    assert_kernel_close(training, inference, reduction=128, depth=6 + 1)  # its MLP width, its depth
