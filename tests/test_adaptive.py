"""Adaptive early exit (ADEPT) on the tiny Llama: exactness when nothing exits, the decoupled K/V debt
written and read, batch invariance, and exit classifiers that train, round-trip and refuse another model."""

import pytest
import torch
from conftest import build_llama
from reference import hf_greedy
from tolerance import assert_kernel_close, kernel_rtol

from skipengine import Engine, SamplingParams, full_plan
from skipengine.adaptive import AdaptivePlan, ExitClassifiers, adaptive_layers, exit_layers_for
from skipengine.cache import StaticKVCache
from skipengine.depth import exit_runs, sample_exit_depths, token_depth
from skipengine.exits import (
    exit_traces,
    fit_kv_fill,
    fit_translators,
    load_exit_classifiers,
    oracle_speedup,
    save_exit_classifiers,
    train_exit_classifiers,
)

NEW = 12
L = 8
WIDTH = 128  # the tiny Llama's longest dot product (its MLP width)


@pytest.fixture(scope="module")
def engine(llama, tokenizer):
    engine = Engine(llama, tokenizer)
    torch.manual_seed(0)  # random classifiers: sigmoid outputs spread around 0.5, so some tokens exit
    engine.exit_classifiers = ExitClassifiers(llama.config.hidden_size, exit_layers_for(L, 2, 2)).eval()
    return engine


def plan(criterion="classifier", threshold=0.5, kv_fill="decoupled", exits=None) -> AdaptivePlan:
    return AdaptivePlan(L, exits or exit_layers_for(L, 2, 2), threshold, criterion, kv_fill)


def greedy():
    return SamplingParams(max_new_tokens=NEW)


def test_a_threshold_that_never_exits_is_full_depth(engine, llama, prompts):
    full = [r.token_ids for r in engine.generate(prompts, full_plan(L), greedy()).rows]
    for never in (plan(threshold=1.01), plan("confidence", threshold=1.01)):
        out = engine.generate(prompts, never, greedy())
        assert [r.token_ids for r in out.rows] == full
        assert out.stats.decode_layers_per_token == L and out.stats.prefill_layers_per_token == L
    assert full == hf_greedy(llama, prompts, NEW, engine.pad_id)


def run_forward(engine, ids: list[int], exit_plan: AdaptivePlan, cache, start: int = 0):
    hidden = engine.adapter.embed(torch.tensor([ids]))
    positions = torch.arange(start, start + len(ids))[None]
    pad = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        return adaptive_layers(engine, hidden, positions, pad, start, exit_plan, cache)


@pytest.mark.parametrize("exit_at", [1, 3, 5])
def test_forced_exit_writes_the_decoupled_kv_and_later_tokens_read_it(engine, llama, prompts, exit_at):
    ad, prompt = engine.adapter, prompts[0]
    cache = StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")
    _, depth = run_forward(engine, prompt, plan("fixed", exits=(exit_at,)), cache)
    assert (depth == exit_at + 1).all()

    # the formula, from HF's own modules: K_l = rope(k_proj(norm_l(h_e))), V_l = v_proj(norm_l(h_e))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        states = llama.model(input_ids=ids, output_hidden_states=True).hidden_states
        h_exit = states[exit_at + 1]  # after layer exit_at
        cos, sin = llama.model.rotary_emb(h_exit, torch.arange(len(prompt))[None])
        for layer in range(exit_at + 1, L):
            attn = llama.model.layers[layer].self_attn
            x = llama.model.layers[layer].input_layernorm(h_exit)
            k = attn.k_proj(x).view(1, len(prompt), -1, ad.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, len(prompt), -1, ad.head_dim).transpose(1, 2)
            half = ad.head_dim // 2
            rotated = torch.cat((-k[..., half:], k[..., :half]), -1)
            k = k * cos[:, None] + rotated * sin[:, None]
            n = cache.slot[layer]
            assert_kernel_close(cache.keys[n][:, :, : len(prompt)], k, WIDTH, depth=exit_at + 2)
            assert_kernel_close(cache.values[n][:, :, : len(prompt)], v, WIDTH, depth=exit_at + 2)

    # a later token that runs every layer attends to that debt: equal to a cache-free forward in which
    # the prompt tokens stop after layer exit_at (their state carried unchanged, CALM's propagation)
    token = 7
    out, depth = run_forward(engine, [token], plan(threshold=1.01), cache, start=len(prompt))
    assert (depth == L).all()
    runs = torch.ones(L, 1, len(prompt) + 1, dtype=torch.bool)  # [layer, B, T]
    runs[exit_at + 1 :, 0, : len(prompt)] = False
    with torch.no_grad(), token_depth(llama, runs):
        reference = llama(input_ids=torch.tensor([prompt + [token]])).logits[0, -1]
    assert_kernel_close(ad.logits(out[:, -1])[0], reference, WIDTH, depth=L + 1)


def test_decoupled_equals_state_propagation_and_differs_from_exact(engine, prompts):
    rows = {
        fill: [r.token_ids for r in engine.generate(prompts, plan(kv_fill=fill), greedy()).rows]
        for fill in ("decoupled", "propagate", "exact")
    }
    assert rows["decoupled"] == rows["propagate"]
    assert rows["exact"] != rows["decoupled"]  # the exit state's K/V is an approximation of the real one
    out = engine.generate(prompts, plan(), greedy())
    assert out.stats.decode_layers_per_token < L and out.stats.prefill_layers_per_token < L  # exits happen


@pytest.mark.parametrize("criterion, threshold", [("classifier", 0.5), ("classifier", 0.45), ("fixed", 0)])
def test_batch_invariance(engine, prompts, criterion, threshold):
    p = plan(criterion, threshold)
    batched = engine.generate(prompts, p, greedy()).rows
    for prompt, row in zip(prompts, batched, strict=True):
        assert engine.generate([prompt], p, greedy()).rows[0].token_ids == row.token_ids


@pytest.mark.parametrize("translate", [False, True])
def test_exit_classifiers_train_save_load_and_refuse_another_model(tmp_path, llama, tokenizer, translate):
    windows = [[(7 * i + 3 * j) % 200 + 5 for j in range(24)] for i in range(16)]
    exits = exit_layers_for(L, 2, 2)
    traces, translators = exit_traces(llama, windows, exits, translate=translate)
    assert (translators is not None) == translate
    fill = fit_kv_fill(llama, windows, translators) if translate else None
    classifiers, stats = train_exit_classifiers(
        traces, llama.config.hidden_size, steps=60, translators=translators, fill=fill
    )
    assert set(stats) == set(exits) and all(0 <= s["accuracy"] <= 1 for s in stats.values())
    assert 1.0 <= oracle_speedup(traces, L, 0.0) <= L / (exits[0] + 1)
    if not translate:  # the raw state: the last exit point agrees with the final prediction more often
        assert stats[exits[-1]]["already_final"] >= stats[exits[0]]["already_final"]
    path = save_exit_classifiers(classifiers, tmp_path / "exits.safetensors", llama)
    loaded = load_exit_classifiers(path, llama)
    x = torch.randn(5, llama.config.hidden_size)
    with torch.no_grad():
        assert_kernel_close(loaded(exits[0], x), classifiers(exits[0], x), WIDTH)
        assert_kernel_close(loaded.exit_state(exits[0], x), classifiers.exit_state(exits[0], x), WIDTH)
        if translate:
            weight, bias = translators[exits[0]]
            assert_kernel_close(loaded.exit_state(exits[0], x), x @ weight + bias, WIDTH)
            torch.testing.assert_close(loaded.fill, fill, atol=0, rtol=0)  # stored as fit
        else:
            assert loaded.exit_state(exits[0], x) is x and loaded.fill is None
    other = build_llama(tokenizer, seed=1)
    with pytest.raises(ValueError, match="different base model"):
        load_exit_classifiers(path, other)


def test_translators_recover_an_affine_map():
    torch.manual_seed(0)
    weight, bias = torch.randn(16, 16), torch.randn(16)
    states = {3: torch.randn(400, 16)}
    (fit_weight, fit_bias) = fit_translators(states, states[3] @ weight + bias, ridge=1e-9)[3]
    torch.testing.assert_close(fit_weight, weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fit_bias, bias, atol=1e-4, rtol=1e-4)


def test_a_leaving_token_predicts_from_its_translated_state_and_fills_kv_from_its_raw_one(
    llama, tokenizer, prompts
):
    engine = Engine(llama, tokenizer)
    ad, prompt, exit_at = engine.adapter, prompts[0], 3
    torch.manual_seed(0)
    translating = ExitClassifiers(llama.config.hidden_size, (exit_at,), translate=True).eval()
    outs, caches = [], []
    for classifiers in (translating, None):
        engine.exit_classifiers = classifiers
        cache = StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")
        out, _ = run_forward(engine, prompt, plan("fixed", exits=(exit_at,)), cache)
        outs.append(out)
        caches.append(cache)
    with torch.no_grad():  # without translators a leaving token's state is its raw exit state
        assert_kernel_close(outs[0][0], translating.exit_state(exit_at, outs[1][0]), WIDTH, depth=exit_at + 2)
    for layer in range(L):
        n = caches[0].slot[layer]
        assert_kernel_close(caches[0].keys[n], caches[1].keys[n], WIDTH, depth=L)
        assert_kernel_close(caches[0].values[n], caches[1].values[n], WIDTH, depth=L)


def test_translated_fill_writes_the_deeper_kv_of_the_translated_state(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer)
    ad, prompt, exit_at = engine.adapter, prompts[0], 3
    torch.manual_seed(0)
    engine.exit_classifiers = ExitClassifiers(llama.config.hidden_size, (exit_at,), translate=True).eval()
    cache = StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")
    out, _ = run_forward(engine, prompt, plan("fixed", 0, "translated", exits=(exit_at,)), cache)
    with torch.no_grad():
        hidden = ad.embed(torch.tensor([prompt]))
        positions = torch.arange(len(prompt))[None]
        ropes, _ = engine.layer_inputs(hidden, positions, torch.zeros(1, dtype=torch.long), 0, range(L))
        sel = {kind: (cos[0], sin[0]) for kind, (cos, sin) in ropes.items()}
        keys, values = ad.decoupled_kv(range(exit_at + 1, L), out[0], sel)  # [J, T, KV, hd]
    for j, layer in enumerate(range(exit_at + 1, L)):
        n = cache.slot[layer]
        assert_kernel_close(cache.keys[n][0, :, : len(prompt)], keys[j].transpose(0, 1), WIDTH, depth=L)
        assert_kernel_close(cache.values[n][0, :, : len(prompt)], values[j].transpose(0, 1), WIDTH, depth=L)


WINDOWS = [[(7 * i + 3 * j) % 200 + 5 for j in range(24)] for i in range(16)]


@pytest.fixture(scope="module")
def fitted_engine(llama, tokenizer):
    """Random exit heads (so some tokens exit) with translators and K/V fill fit on the tiny Llama."""
    traces, translators = exit_traces(llama, WINDOWS, exit_layers_for(L, 2, 2), translate=True)
    fill = fit_kv_fill(llama, WINDOWS, translators)
    classifiers, _ = train_exit_classifiers(
        traces, llama.config.hidden_size, steps=0, translators=translators, fill=fill
    )
    engine = Engine(llama, tokenizer)
    engine.exit_classifiers = classifiers
    return engine


def test_fitted_fill_is_never_further_from_a_deeper_layers_input_than_the_raw_exit_state(
    fitted_engine, llama
):
    classifiers = fitted_engine.exit_classifiers
    with torch.no_grad():
        states = llama.model(input_ids=torch.tensor(WINDOWS), output_hidden_states=True).hidden_states
        for k, e in enumerate(classifiers.exit_layers):
            assert not classifiers.fill[k, : e + 1].any()  # no coefficients for layers a token has run
            raw = states[e + 1].flatten(0, 1)  # after layer e: [N, D]
            translated = classifiers.exit_state(e, raw)
            index = torch.full((len(raw),), k)
            estimate = classifiers.deeper_inputs(index, range(e + 1, L), raw, translated)  # [J, N, D]
            for j, layer in enumerate(range(e + 1, L)):
                true = states[layer].flatten(0, 1)  # layer's input
                slack = 1e-6 * (true**2).sum()  # the ridge; at layer e + 1 the raw state is exact
                assert ((estimate[j] - true) ** 2).sum() <= ((raw - true) ** 2).sum() + slack


def test_fitted_fill_writes_the_kv_of_each_layers_estimated_input(fitted_engine, llama, prompts):
    engine, prompt, exit_at = fitted_engine, prompts[0], 3
    ad, classifiers = engine.adapter, engine.exit_classifiers
    cache = StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")
    decoupled = StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")
    out, _ = run_forward(engine, prompt, plan("fixed", 0, "fitted", exits=(exit_at,)), cache)
    run_forward(engine, prompt, plan("fixed", 0, "decoupled", exits=(exit_at,)), decoupled)
    deeper = range(exit_at + 1, L)
    with torch.no_grad():
        hidden = ad.embed(torch.tensor([prompt]))
        positions = torch.arange(len(prompt))[None]
        ropes, _ = engine.layer_inputs(hidden, positions, torch.zeros(1, dtype=torch.long), 0, range(L))
        sel = {kind: (cos[0], sin[0]) for kind, (cos, sin) in ropes.items()}
        raw = llama.model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[
            exit_at + 1
        ][0]
        index = torch.full((len(prompt),), classifiers.exit_layers.index(exit_at))
        inputs = classifiers.deeper_inputs(index, deeper, raw, out[0])  # out: the translated states
        keys, values = ad.decoupled_kv(deeper, inputs, sel)  # [J, T, KV, hd]
    for j, layer in enumerate(deeper):
        n = cache.slot[layer]
        assert_kernel_close(cache.keys[n][0, :, : len(prompt)], keys[j].transpose(0, 1), WIDTH, depth=L)
        assert_kernel_close(cache.values[n][0, :, : len(prompt)], values[j].transpose(0, 1), WIDTH, depth=L)
        assert not torch.allclose(cache.values[n], decoupled.values[n])  # not the raw state's K/V
    for layer in range(exit_at + 1):  # the layers the tokens ran are exact either way
        n = cache.slot[layer]
        assert_kernel_close(cache.keys[n], decoupled.keys[n], WIDTH, depth=layer + 1)


@pytest.mark.parametrize("threshold", [0.5, 0.45])
def test_fitted_fill_is_batch_invariant_and_one_pass_equals_decoding(fitted_engine, prompts, threshold):
    engine, p = fitted_engine, plan(threshold=threshold, kv_fill="fitted")
    batched = engine.generate(prompts, p, greedy())  # rows leave at different layers: frozen rows
    assert batched.stats.decode_layers_per_token < L  # exits happen
    for prompt, row in zip(prompts, batched.rows, strict=True):
        assert engine.generate([prompt], p, greedy()).rows[0].token_ids == row.token_ids
    assert [r.token_ids for r in batched.rows] != [
        r.token_ids for r in engine.generate(prompts, plan(threshold=threshold), greedy()).rows
    ]  # the fitted K/V change what later tokens read
    ad, ids = engine.adapter, prompts[0]

    def cache():
        return StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")

    one_pass, depth = run_forward(engine, ids, p, cache())
    decoding = cache()
    steps = [run_forward(engine, [t], p, decoding, start=col) for col, t in enumerate(ids)]
    assert_kernel_close(one_pass, torch.cat([h for h, _ in steps], dim=1), WIDTH, depth=L)
    assert depth.tolist() == torch.cat([d for _, d in steps], dim=1).tolist()


def test_the_oracle_leaves_each_token_at_its_first_settled_exit_point():
    # exit points after layers 1 and 3 of 8; tokens settle after layer 1, after layer 3, never
    labels = {1: torch.tensor([1.0, 0.0, 0.0]), 3: torch.tensor([0.0, 1.0, 0.0])}
    traces = {e: (torch.zeros(3, 4), y) for e, y in labels.items()}
    assert oracle_speedup(traces, 8, 0.0) == pytest.approx(8 / ((2 + 4 + 8) / 3))
    # each exited token also fills the K/V of the layers it skipped: 6 and 4 layers at 0.1 each
    assert oracle_speedup(traces, 8, 0.1) == pytest.approx(8 / ((2.6 + 4.4 + 8) / 3))


def test_adaptive_job_calibrates_and_holds_the_target(tmp_path, tiny_model_dir, tokenizer):
    import pyarrow.parquet as pq
    from pipeline_helpers import corpus_rows, job, write_jsonl
    from transformers import AutoModelForCausalLM

    from pipeline.run import run_job

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    windows = [tokenizer(r["text"] * 3)["input_ids"][:24] for r in corpus_rows(16)]
    traces, translators = exit_traces(model, windows, exit_layers_for(L, 1, 2), translate=True)
    classifiers, _ = train_exit_classifiers(traces, model.config.hidden_size, 60, translators=translators)
    exits = save_exit_classifiers(classifiers, tmp_path / "exits.safetensors", model)
    data = write_jsonl(tmp_path / "c.jsonl", corpus_rows(16))
    cfg = job(
        tiny_model_dir,
        data,
        tmp_path / "run",
        skip={"strategy": "adaptive", "target_speedup": 1.5, "exit_classifiers": str(exits)},
        task={"max_new_tokens": 16},
    )
    summary = run_job(cfg)
    assert summary["ids_check"]["ok"] and summary["rows_ok"] == 16
    stats = pq.read_table(tmp_path / "run" / "stats").to_pylist()
    assert all(0 <= s["exit_threshold"] <= 1 for s in stats)
    assert all(s["decode_layers_per_token"] < L for s in stats)
    assert summary["achieved_layer_speedup"] == pytest.approx(1.5, rel=0.25)
    within = sum(abs(s["achieved_layer_speedup"] / 1.5 - 1) <= 0.05 for s in stats)
    assert summary["batches_within_5pct"] == f"{within}/{len(stats)}"


def test_perplexity_under_exits_is_one_pass_equal_to_decoding_token_by_token(engine, llama, prompts):
    from skipengine.perplexity import adaptive_perplexity, perplexity, windows

    stream = [(11 * i) % 300 + 5 for i in range(96)]
    chunks = windows(stream, 48, 2)
    never = adaptive_perplexity(engine, chunks, plan(threshold=1.01), context=8)
    full = perplexity(llama, chunks, None, context=8)
    assert never["perplexity"] == pytest.approx(full["perplexity"], rel=kernel_rtol(torch.float32, WIDTH, L))
    assert never["layers_per_token"] == L and never["layer_speedup"] == pytest.approx(1.0)
    exiting = adaptive_perplexity(engine, chunks, plan(), context=8)
    assert exiting["layers_per_token"] < L and exiting["perplexity"] != pytest.approx(full["perplexity"])

    # the one pass it scores equals feeding the tokens in turn over the cache, exits and K/V fills alike
    ad, ids = engine.adapter, chunks[0][:20]

    def cache():
        return StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")

    one_pass, depth = run_forward(engine, ids, plan(), cache())
    decoding = cache()
    steps = [run_forward(engine, [t], plan(), decoding, start=col) for col, t in enumerate(ids)]
    assert_kernel_close(one_pass, torch.cat([h for h, _ in steps], dim=1), WIDTH, depth=L)
    assert depth.tolist() == torch.cat([d for _, d in steps], dim=1).tolist()
    assert 0 < int((depth < L).sum()) < len(ids)  # some tokens exited, some did not


def test_controller_holds_the_target_per_batch_where_the_calibrated_threshold_misses():
    from skipengine.control import SpeedupController, layer_speedup, threshold_for_target

    exits, kv, target, rows = exit_layers_for(L, 1, 2), 0.1, 2.0, 8
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(len(exits), 4000, generator=gen).sort(0).values  # deeper exit points more sure
    threshold, _ = threshold_for_target(probs, exits, L, target, kv)
    # decode is less sure than the calibration traces: the calibrated threshold alone falls short
    decode = probs * 0.6

    def step_layers(threshold: float) -> int:
        cols = torch.randint(0, decode.shape[1], (rows,), generator=gen)
        hit = decode[:, cols] >= threshold  # [E, rows]
        exit_at = torch.tensor([exits[int(h.float().argmax())] if h.any() else L - 1 for h in hit.T])
        return int((exit_at + 1).sum())

    def batch_speedup(next_threshold) -> float:
        layers, t = [], next_threshold(None)
        for _ in range(64):
            layers.append(step_layers(t))
            t = next_threshold(layers[-1])
        return layer_speedup(L, sum(layers) / (64 * rows), kv)

    fixed = batch_speedup(lambda _: threshold)
    assert fixed < 0.9 * target
    control = SpeedupController(probs, exits, L, target, kv, threshold)
    speedups = [
        batch_speedup(lambda ran: control.threshold if ran is None else control.step(ran, rows, rows))
        for _ in range(6)
    ]
    assert all(abs(s / target - 1) <= 0.05 for s in speedups[1:]), speedups  # after the first batch


def test_the_engine_steps_the_plans_controller_and_reports_its_mean_threshold(engine, prompts):
    from skipengine.control import SpeedupController

    exits = exit_layers_for(L, 2, 2)
    probs = torch.rand(len(exits), 500, generator=torch.Generator().manual_seed(1))
    control = SpeedupController(probs, exits, L, 1.5, 0.1, threshold=0.5)
    stats = engine.generate(prompts, AdaptivePlan(L, exits, 0.5, controller=control), greedy()).stats
    assert control.threshold != 0.5  # stepped after decode steps
    assert stats.exit_threshold is not None and 0 <= stats.exit_threshold <= 1.01
    again = engine.generate(prompts, AdaptivePlan(L, exits, 0.5, controller=control), greedy()).stats
    assert again.exit_threshold != stats.exit_threshold  # carried on from the last batch, not reset to 0.5


def test_a_decode_layer_fills_exited_rows_kv_and_runs_the_rest_for_active_rows_only(engine):
    """Decode runs a layer with active=: the exited row keeps its hidden state, and the K/V the layer
    writes for it is the decoupled fill of its frozen exit state; the active row equals running the
    layer on it alone."""
    ad = engine.adapter
    cache = StaticKVCache(range(L), 2, ad.num_kv_heads, 8, ad.head_dim, torch.float32, "cpu")
    torch.manual_seed(3)
    for buf in (*cache.keys, *cache.values):
        buf.normal_()
    hidden = torch.randn(2, 1, engine.model.config.hidden_size)
    positions, pad, start, i = torch.tensor([[5], [5]]), torch.zeros(2, dtype=torch.long), 5, 3
    before_k, before_v = cache.keys[i].clone(), cache.values[i].clone()
    with torch.inference_mode():
        ropes, masks = engine.layer_inputs(hidden, positions, pad, start, range(L))
        out = engine.layer(i, hidden, ropes, masks, start, cache, active=torch.tensor([0]))
        torch.testing.assert_close(out[1], hidden[1], atol=0, rtol=0)
        sel = {kind: (cos[1], sin[1]) for kind, (cos, sin) in ropes.items()}  # [1, hd]
        fill_k, fill_v = ad.decoupled_kv(range(i, i + 1), hidden[1], sel)  # [1, 1, KV, hd]
        assert_kernel_close(cache.keys[i][1, :, start], fill_k[0, 0], WIDTH)
        assert_kernel_close(cache.values[i][1, :, start], fill_v[0, 0], WIDTH)
        torch.testing.assert_close(cache.keys[i][1, :, :start], before_k[1, :, :start], atol=0, rtol=0)
        alone = StaticKVCache(range(L), 1, ad.num_kv_heads, 8, ad.head_dim, torch.float32, "cpu")
        alone.keys[i].copy_(before_k[:1])
        alone.values[i].copy_(before_v[:1])
        ropes1, masks1 = engine.layer_inputs(hidden[:1], positions[:1], pad[:1], start, range(L))
        single = engine.layer(i, hidden[:1], ropes1, masks1, start, alone)
    assert_kernel_close(out[:1], single, WIDTH)
    assert_kernel_close(cache.keys[i][:1], alone.keys[i], WIDTH)


def test_exit_aware_training_forward_equals_adaptive_inference(engine, llama):
    """The training forward (HF modules, skipengine.depth) with each token gated at the depth the
    engine's adaptive exits chose gives the engine's exit hidden states: a frozen state feeding deeper
    layers' K/V is the decoupled fill."""
    ad, ids = engine.adapter, [(11 * i) % 300 + 5 for i in range(20)]
    cache = StaticKVCache(range(L), 1, ad.num_kv_heads, 64, ad.head_dim, torch.float32, "cpu")
    inference, depth = run_forward(engine, ids, plan(), cache)
    assert 0 < int((depth < L).sum()) < len(ids)  # a mix of exits and full-depth tokens
    with torch.no_grad(), token_depth(llama, exit_runs(depth, L)):
        training = llama.model(input_ids=torch.tensor([ids])).last_hidden_state
    assert_kernel_close(ad.norm(ad.final_norm, inference), training, WIDTH, depth=L)


def test_sampled_exits_meet_the_target_depth_on_average():
    exits = exit_layers_for(30, 2, 6)
    generator = torch.Generator().manual_seed(0)
    for target in (1.25, 1.5):
        depth = sample_exit_depths(AdaptivePlan(30, exits, target_speedup=target), (64, 256), generator)
        assert set(depth.unique().tolist()) <= {e + 1 for e in exits} | {30}
        assert depth.float().mean().item() == pytest.approx(30 / target, rel=0.02)
    # exits alone reach at most 30 / mean exit depth (17 layers): every token exits
    deepest = sample_exit_depths(AdaptivePlan(30, exits, target_speedup=3.0), (64, 256), generator)
    assert (deepest < 30).all()


def test_an_exit_aware_adapter_trains_and_its_classifiers_bring_it_into_the_job(
    tmp_path, tiny_model_dir, tokenizer
):
    import copy

    from pipeline_helpers import corpus_rows, job, write_jsonl
    from transformers import AutoModelForCausalLM

    from pipeline.run import run_job
    from skipengine import make_plan
    from skipengine.finetune import Example, TrainConfig, train
    from skipengine.lora import adapter_plans, load_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    exits = exit_layers_for(L, 2, 2)
    exit_plan = AdaptivePlan(L, exits, target_speedup=1.5)
    texts = [tokenizer(r["text"] * 2)["input_ids"] for r in corpus_rows(8)]
    examples = [Example(ids[:10], ids[10:20]) for ids in texts]
    config = TrainConfig("distill", steps=2, batch_size=4, save_every=2, warmup_steps=1, lr=1e-3)
    pad = tokenizer.pad_token_id
    adapter = train(copy.deepcopy(base), examples, [exit_plan], config, tmp_path / "ft", pad)
    assert adapter_plans(adapter) == [("adaptive", exits)]
    with pytest.raises(ValueError, match="trained for plans"):
        load_adapter(copy.deepcopy(base), adapter, make_plan(L, "uniform", 1.5))

    merged = load_adapter(copy.deepcopy(base), adapter, exit_plan)
    traces, _ = exit_traces(merged, [ids[:20] for ids in texts], exits)
    classifiers, _ = train_exit_classifiers(traces, merged.config.hidden_size, steps=20)
    path = save_exit_classifiers(classifiers, tmp_path / "exits.safetensors", merged, str(adapter))
    with pytest.raises(ValueError, match="with adapter"):
        load_exit_classifiers(path, base)  # the base model's hidden states are not what they learned

    data = write_jsonl(tmp_path / "c.jsonl", corpus_rows(8))
    skip = {"strategy": "adaptive", "target_speedup": 1.5, "exit_classifiers": str(path), "adapter": "auto"}
    summary = run_job(job(tiny_model_dir, data, tmp_path / "run", skip=skip))
    assert summary["rows_ok"] == 8 and summary["adapter"] == adapter.name


def test_calms_confidence_calibrates_and_holds_a_target_like_the_classifiers(engine, prompts):
    from pipeline.config import SkipConfig
    from pipeline.generator import build_adaptive_plan

    skip = SkipConfig(strategy="adaptive", target_speedup=1.5, criterion="confidence", min_depth=2)
    calm = build_adaptive_plan(skip, engine, prompts)
    assert calm.criterion == "confidence" and calm.controller is not None and 0 <= calm.threshold <= 1
    out = engine.generate(prompts, calm, greedy())
    assert out.stats.decode_layers_per_token < L


def test_min_depth_keeps_later_exit_points_and_translated_fill_needs_translators(engine):
    from pipeline.config import SkipConfig
    from pipeline.generator import build_adaptive_plan

    assert engine.exit_classifiers.exit_layers == (1, 3, 5)
    skip = SkipConfig(strategy="adaptive", threshold=0.5, controller=False, min_depth=4)
    assert build_adaptive_plan(skip, engine, []).exit_layers == (3, 5)
    skip.min_depth = 7
    with pytest.raises(ValueError, match="skip.min_depth=7 leaves none"):
        build_adaptive_plan(skip, engine, [])
    skip.min_depth, skip.kv_fill = 4, "translated"  # these classifiers carry no translators
    with pytest.raises(ValueError, match="skip.kv_fill=translated"):
        build_adaptive_plan(skip, engine, [])
    skip.kv_fill = "fitted"  # nor fill coefficients
    with pytest.raises(ValueError, match="skip.kv_fill=fitted"):
        build_adaptive_plan(skip, engine, [])
