"""The searched plan (skipengine.search) on the tiny Llama: its shape, its determinism, its score against
an independent computation, and never worse than uniform on the sample it was searched on."""

import pytest
import torch
import torch.nn.functional as F

from skipengine import Engine, SamplingParams, SkipPlan, full_plan, make_plan
from skipengine.depth import plan_runs, token_depth
from skipengine.plan import evenly_spaced
from skipengine.search import SearchedPlans, cached_search, plan_kl, sample_hash, search_plans

L, TOKENS = 8, 10


@pytest.fixture(scope="module")
def engine(llama, tokenizer):
    return Engine(llama, tokenizer)


@pytest.fixture(scope="module", params=["full", "skip"])
def searched(request, engine, prompts):
    return search_plans(engine, prompts, 2, request.param, TOKENS)


def test_each_searched_plan_has_n_layers_with_the_first_and_the_last(searched):
    assert sorted(searched.kept_by_n) == list(range(2, L + 1))
    for n, kept in searched.kept_by_n.items():
        assert len(kept) == n and kept[0] == 0 and kept[-1] == L - 1 and list(kept) == sorted(set(kept))
    assert len(searched.removed) == L - 2 and not {0, L - 1} & set(searched.removed)


def test_the_search_is_deterministic_and_never_worse_than_uniform(engine, prompts, searched):
    again = search_plans(engine, prompts, 2, searched.prefill, TOKENS)
    assert again.kept_by_n == searched.kept_by_n and again.removed == searched.removed
    for n in searched.kept_by_n:
        assert searched.kl_by_n[n] <= searched.uniform_kl_by_n[n]
        uniform = plan_kl(engine, prompts, evenly_spaced(L, n), searched.prefill, TOKENS)
        assert searched.uniform_kl_by_n[n] == pytest.approx(uniform, rel=1e-4, abs=1e-6)
    assert searched.kl_by_n[L] == 0.0 and searched.kl_by_n[2] > 0


def reference_kl(model, prompt, continuation, plan: SkipPlan) -> tuple[float, int]:
    """(summed KL, scored tokens) of one unpadded row from HF's own modules: the whole sequence in one
    cache-free pass, each token gated to the layers generation would run it through (skipengine.depth)."""
    ids = torch.tensor([prompt + continuation])
    is_prompt = torch.arange(ids.shape[1])[None] < len(prompt)
    with torch.no_grad():
        full = F.log_softmax(model(input_ids=ids).logits[0], -1)
        with token_depth(model, plan_runs(plan, is_prompt)):
            planned = F.log_softmax(model(input_ids=ids).logits[0], -1)
    scored = slice(len(prompt), len(prompt) + len(continuation) - 1)  # continuation inputs -> next token
    kl = F.kl_div(planned[scored], full[scored], log_target=True, reduction="sum")
    return float(kl), len(continuation) - 1


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_a_plans_score_is_the_kl_generation_would_see(engine, llama, prompts, prefill):
    """The batched, left-padded, cached scoring equals an independent per-row computation."""
    kept = (0, 2, 3, 7)
    plan = SkipPlan(L, kept, "searched", prefill)
    sampling = SamplingParams(max_new_tokens=TOKENS, no_repeat_ngram_size=4)  # the search's continuation
    total, tokens = 0.0, 0
    for prompt in prompts:
        continuation = engine.generate([prompt], full_plan(L), sampling).rows[0].token_ids
        kl, n = reference_kl(llama, prompt, continuation, plan)
        total, tokens = total + kl, tokens + n
    assert plan_kl(engine, prompts, kept, prefill, TOKENS) == pytest.approx(total / tokens, rel=1e-4)


def test_make_plan_takes_the_searched_set_for_the_count_the_target_asks(searched):
    plan = make_plan(L, "searched", 2.0, prefill=searched.prefill, searched=searched)
    assert plan.kept_layers == searched.kept_by_n[4] and plan.strategy == "searched"
    with pytest.raises(ValueError, match="needs the layer search"):
        make_plan(L, "searched", 2.0)


def test_the_search_is_cached_and_a_shallower_one_is_extended(tmp_path, engine, prompts, monkeypatch):
    import skipengine.search as search

    calls = []
    real = search.search_plans
    monkeypatch.setattr(search, "search_plans", lambda *a: calls.append(a[2]) or real(*a))
    first = cached_search(engine, prompts, 5, "full", tmp_path, TOKENS)
    assert first.min_kept == 5 and cached_search(engine, prompts, 6, "full", tmp_path, TOKENS) == first
    deeper = cached_search(engine, prompts, 3, "full", tmp_path, TOKENS)
    assert calls == [5, 3] and deeper.min_kept == 3
    assert SearchedPlans.from_json(deeper.to_json()) == deeper
    with pytest.raises(ValueError, match="search deeper"):
        first.kept(4)


def test_a_searched_job_searches_once_and_every_actor_runs_that_plan(tmp_path, tiny_model_dir, monkeypatch):
    import pyarrow.parquet as pq
    from pipeline_helpers import corpus_rows, job, write_jsonl

    from pipeline.planning import RunPlan
    from pipeline.run import run_job
    from skipengine import load_model

    monkeypatch.setenv("SKIPENGINE_CACHE", str(tmp_path / "cache"))
    rows = corpus_rows(8)
    skip = {"strategy": "searched", "search_rows": 4, "search_tokens": 6}
    cfg = job(tiny_model_dir, write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "run", skip=skip)
    cfg.cluster.num_actors = 2
    summary = run_job(cfg)
    assert summary["ids_check"]["ok"] and summary["rows_ok"] == 8
    found = RunPlan.from_json((tmp_path / "run" / "plan.json").read_text()).search
    assert len(list((tmp_path / "cache" / "searched").glob("*.json"))) == 1
    plan = make_plan(8, "searched", 2.0, searched=found)
    out = pq.read_table(tmp_path / "run" / "outputs").to_pylist()
    assert {r["plan"] for r in out} == {str(plan)}
    model, tok = load_model(str(tiny_model_dir))
    texts = {r["doc"]: r["text"] for r in rows}
    expected = Engine(model, tok).generate([texts[r["id"]] for r in out], plan, SamplingParams(6)).rows
    assert [r["generated_text"] for r in out] == [e.text for e in expected]
    # the search saw the corpus's first rows, as the job's prompts (plain text here)
    prompts = [tok(r["text"])["input_ids"] for r in rows[:4]]
    assert found.sample_hash == sample_hash(prompts, 6)
    assert found.kept_by_n == search_plans(Engine(model, tok), prompts, found.min_kept, "full", 6).kept_by_n
