"""Architectures without a native adapter: the static plan through HF generate, on tiny random
encoder-decoder translators (Marian, T5)."""

import pytest
import torch
from reference import left_pad, physically_pruned
from transformers import MarianConfig, MarianMTModel, T5Config, T5ForConditionalGeneration

from skipengine import Engine, SamplingParams, full_plan, make_plan


def marian(tokenizer):
    config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=6,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        init_std=0.3,
    )
    torch.manual_seed(0)
    return MarianMTModel(config).eval(), "model.decoder.layers", "decoder_layers"


def t5(tokenizer):
    # equal depths: HF 5.23 T5 generate() itself fails when the decoder is deeper than the encoder
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=6,
        num_decoder_layers=6,  # HF 5.23 T5 generate fails if decoder > encoder
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        initializer_factor=3.0,
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval(), "decoder.block", "num_decoder_layers"


def hf_seq2seq(model, prompts, new, pad):
    ids, mask = left_pad(prompts, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, 1:]
    eos = model.config.eos_token_id
    rows = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append([t for t in row[:cut]])
    return [r if r and r[-1] == eos else [t for t in r if t != pad] for r in rows]


@pytest.mark.parametrize("build", [marian, t5])
def test_full_and_skipped_decoders_match_hf(tokenizer, prompts, build):
    model, prefix, count_key = build(tokenizer)
    engine = Engine(model, tokenizer)
    assert engine.adapter is None and engine.num_layers == 6
    sampling = SamplingParams(max_new_tokens=10)
    full = engine.generate(prompts, full_plan(6), sampling)
    assert [r.token_ids for r in full.rows] == hf_seq2seq(model, prompts, 10, tokenizer.pad_token_id)
    assert full.stats.backend == "hf_generate"

    plan = make_plan(6, "uniform", 2.0)
    skipped = engine.generate(prompts, plan, sampling)
    pruned = physically_pruned(model, plan.kept_layers, prefix, count_key)
    assert [r.token_ids for r in skipped.rows] == hf_seq2seq(pruned, prompts, 10, tokenizer.pad_token_id)
    assert [r.token_ids for r in skipped.rows] != [r.token_ids for r in full.rows]
    # the model is restored after the call
    assert len(engine.generate(prompts, full_plan(6), sampling).rows) == len(prompts)
    assert [r.token_ids for r in engine.generate(prompts, full_plan(6), sampling).rows] == [
        r.token_ids for r in full.rows
    ]


def test_bad_rows_fail_alone_on_the_generic_path(tokenizer, prompts):
    model, _, _ = marian(tokenizer)
    out = Engine(model, tokenizer).generate(["", prompts[0]], full_plan(6), SamplingParams(max_new_tokens=4))
    assert out.rows[0].error and out.rows[1].ok
