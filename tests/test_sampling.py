"""Decoding settings with HF generate()'s semantics, in the engine's batched decode: repetition penalty,
no-repeat n-grams, temperature, top-k, top-p and min-p, greedy and seeded, per row of a ragged batch."""

import pytest
import torch
from reference import hf_generate_row, physically_pruned

from skipengine import Engine, SamplingParams, full_plan, make_plan
from skipengine.sampling import Sampler

NEW = 24
SETTINGS = [
    dict(repetition_penalty=1.3),
    dict(no_repeat_ngram_size=2),
    dict(repetition_penalty=0.8, no_repeat_ngram_size=3),
    dict(temperature=0.8, top_k=20, seed=3),
    dict(temperature=1.2, top_p=0.7, min_p=0.05, seed=4),
    dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.1, repetition_penalty=1.2, no_repeat_ngram_size=3),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=2, penalize_prompt=False),
    dict(
        temperature=0.9,
        top_k=30,
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
        penalize_prompt=False,
        seed=5,
    ),
]


@pytest.fixture(scope="module")
def engine(llama, tokenizer):
    return Engine(llama, tokenizer)


@pytest.mark.parametrize("settings", SETTINGS)
def test_every_row_of_a_batch_equals_hf_generate_on_that_row(engine, llama, prompts, settings):
    params = SamplingParams(max_new_tokens=NEW, **settings)
    rows = engine.generate(prompts, full_plan(8), params).rows
    for prompt, row in zip(prompts, rows, strict=True):
        assert row.token_ids == hf_generate_row(llama, prompt, params, engine.pad_id)


@pytest.mark.parametrize("settings", [SETTINGS[2], SETTINGS[5], SETTINGS[6]])
def test_under_a_skip_plan_rows_equal_hf_generate_on_the_pruned_model(engine, llama, prompts, settings):
    plan = make_plan(8, "uniform", 2.0, prefill="skip")
    pruned = physically_pruned(llama, plan.kept_layers, "model.layers", "num_hidden_layers")
    params = SamplingParams(max_new_tokens=NEW, **settings)
    rows = engine.generate(prompts, plan, params).rows
    for prompt, row in zip(prompts, rows, strict=True):
        assert row.token_ids == hf_generate_row(pruned, prompt, params, engine.pad_id)


def test_the_settings_change_greedy_output_and_no_repeat_ngram_forbids_repeats(engine, prompts):
    plain = [r.token_ids for r in engine.generate(prompts, full_plan(8), SamplingParams(NEW)).rows]
    assert any(len(set(zip(t, t[1:], strict=False))) < len(t) - 1 for t in plain)  # greedy repeats 2-grams
    for settings in SETTINGS[:3]:
        out = [
            r.token_ids for r in engine.generate(prompts, full_plan(8), SamplingParams(NEW, **settings)).rows
        ]
        assert out != plain
    n = 2
    for penalize_prompt in (True, False):
        params = SamplingParams(NEW, no_repeat_ngram_size=n, penalize_prompt=penalize_prompt)
        for prompt, row in zip(prompts, engine.generate(prompts, full_plan(8), params).rows, strict=True):
            seq = prompt + row.token_ids if penalize_prompt else row.token_ids
            grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams))


def test_warpers_follow_hf_on_one_distribution():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.5, top_k=12, top_p=0.8, min_p=0.2)
    ours = Sampler(params, [[1], [2], [3]], torch.device("cpu")).warp(scores)
    theirs = scores / 0.5
    for warper in (TopKLogitsWarper(12), TopPLogitsWarper(0.8), MinPLogitsWarper(0.2)):
        theirs = warper(None, theirs)
    assert torch.equal(ours.isinf(), theirs.isinf()) and (~ours.isinf()).sum(-1).min() >= 1
    torch.testing.assert_close(ours[~ours.isinf()], theirs[~theirs.isinf()], atol=0, rtol=0)


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(bad, key):
    with pytest.raises(ValueError, match=key):
        SamplingParams(**bad)
