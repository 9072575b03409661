"""Skip-aware fine-tuning on the tiny model: the training forward is the inference forward, a step
lowers the loss, adapters round-trip and refuse what they were not trained for."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_llama
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from tolerance import assert_kernel_close, kernel_rtol

from pipeline.planning import Measurer, build_run_plan
from skipengine import Engine, SamplingParams, full_plan, make_plan
from skipengine.calibrate import SpeedSample
from skipengine.depth import plan_runs, token_depth, training_runs
from skipengine.finetune import (
    Example,
    TrainConfig,
    add_lora,
    autocast,
    collate,
    distill_loss,
    native_bf16,
    resolve_precision,
    response_logits,
    response_targets,
    save_adapter,
    start_from_adapter,
    train,
    uls_loss,
)
from skipengine.lora import adapter_metadata, load_adapter

LAYERS, WIDTH = 8, 128  # the tiny Llama: its depth and longest dot product (its MLP width)
PLAN = make_plan(LAYERS, "uniform", 2.0, prefill="full")


@pytest.fixture
def examples(tokenizer):
    pairs = [
        ("Translate the verse", " In the beginning God created"),
        ("We propose a method", " that skips layers"),
        ("And the earth was", " without form, and void"),
        ("Summarize the abstract", " quality is kept"),
    ]
    return [
        Example(tokenizer(p)["input_ids"], tokenizer(r)["input_ids"] + [tokenizer.eos_token_id])
        for p, r in pairs
    ]


@pytest.mark.parametrize("plan", [PLAN, make_plan(8, "keep_top", 2.0, prefill="full"), full_plan(8)])
def test_training_forward_equals_inference_forward(llama, tokenizer, examples, plan):
    engine = Engine(llama, tokenizer)
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    with torch.no_grad():
        # the rows' response positions, in order
        training = response_logits(llama, batch, training_runs(plan, batch["is_prompt"]))
    inference = torch.cat([engine.score(ex.prompt, ex.response, plan) for ex in examples])
    assert_kernel_close(training, inference, WIDTH, depth=LAYERS + 1)


def acting_lora(tokenizer):
    """The tiny model with LoRA whose B is not zero: the adapter acts, so gradients reach A too."""
    model = add_lora(build_llama(tokenizer), rank=8, alpha=16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def test_training_forward_equals_inference_forward_for_prompts_of_different_lengths(
    llama, tokenizer, prompts
):
    """The batch's prompts are left-padded to the longest one, as the engine pads them."""
    engine = Engine(llama, tokenizer)
    examples = [Example(p, p[::-1][:5] + [tokenizer.eos_token_id]) for p in prompts]
    assert len({len(ex.prompt) for ex in examples}) > 2
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    with torch.no_grad():
        training = response_logits(llama, batch, training_runs(PLAN, batch["is_prompt"]))
    inference = torch.cat([engine.score(ex.prompt, ex.response, PLAN) for ex in examples])
    assert_kernel_close(training, inference, WIDTH, depth=LAYERS + 1)
    assert response_targets(batch).tolist() == [t for ex in examples for t in ex.response]


def test_without_prompt_gradient_the_logits_are_the_same_and_only_the_prompt_pass_gets_none(
    tokenizer, examples
):
    model = acting_lora(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    runs = training_runs(PLAN, batch["is_prompt"])
    grads = {}
    for prompt_grad in (True, False):
        model.zero_grad(set_to_none=True)
        logits = response_logits(model, batch, runs, prompt_grad)
        logits.square().mean().backward()
        grads[prompt_grad] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if prompt_grad:
            exact = logits.detach()
        else:
            torch.testing.assert_close(logits.detach(), exact, atol=0, rtol=0)
    skipped = [layer for layer in range(8) if layer not in PLAN.kept_layers][0]
    with_grad = [n for n, g in grads[True].items() if f"layers.{skipped}." in n and g is not None]
    without = [n for n, g in grads[False].items() if f"layers.{skipped}." in n and g is not None]
    # a layer only the prompt runs learns through the prompt's K/V, and only with the prompt's gradient
    assert with_grad and not without
    kept = PLAN.kept_layers[1]
    assert all(grads[False][n] is not None for n in grads[False] if f"layers.{kept}." in n)


def test_two_pass_forward_gives_the_gradient_of_one_pass_over_the_whole_sequence(tokenizer, examples):
    """With the prompt's gradient, the prompt pass + response pass over the cache is the exact gradient:
    that of one token-gated pass over prompt + response (each row alone, so no padding)."""
    model = acting_lora(tokenizer)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for ex in examples:
        model.zero_grad(set_to_none=True)
        batch = collate([ex], tokenizer.pad_token_id, max_len=64)
        uls_loss(model, batch, training_runs(PLAN, batch["is_prompt"])).backward()
        two_pass = {n: p.grad.clone() for n, p in trainable.items()}

        model.zero_grad(set_to_none=True)
        ids = torch.tensor([ex.prompt + ex.response])
        is_prompt = torch.arange(ids.shape[1])[None] < len(ex.prompt)
        with token_depth(model.base_model.model, plan_runs(PLAN, is_prompt)):
            logits = model(input_ids=ids).logits[0, len(ex.prompt) - 1 : -1]
        torch.nn.functional.cross_entropy(logits, torch.tensor(ex.response)).backward()
        for name, param in trainable.items():
            # the backward pass runs the layers again: twice the depth
            assert_kernel_close(two_pass[name], param.grad, WIDTH, depth=2 * (LAYERS + 1))


@pytest.mark.parametrize("prompt_grad", [True, False])
@pytest.mark.parametrize("loss_fn", [uls_loss, distill_loss])
def test_one_step_lowers_the_loss(tokenizer, examples, loss_fn, prompt_grad):
    model = add_lora(build_llama(tokenizer), rank=8, alpha=16)
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = loss_fn(model, batch, training_runs(PLAN, batch["is_prompt"]), prompt_grad=prompt_grad)
    if loss_fn is distill_loss:  # LoRA starts as a no-op, so the student differs only by the skipped layers
        assert before.item() > 0
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn(model, batch, training_runs(PLAN, batch["is_prompt"]))
    assert after.item() < before.item()


def test_adapter_round_trip_and_refusals(tmp_path, tokenizer, examples):
    base = build_llama(tokenizer)
    config = TrainConfig(steps=3, batch_size=2, log_every=1, save_every=3, lr=1e-2, warmup_steps=1)
    path = train(copy.deepcopy(base), examples, [PLAN], config, tmp_path / "run", tokenizer.pad_token_id)
    assert path.exists() and path.stat().st_size < 1_000_000
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3

    merged = load_adapter(copy.deepcopy(base), path, PLAN)
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    with torch.no_grad():
        runs = training_runs(PLAN, batch["is_prompt"])
        assert not torch.allclose(response_logits(merged, batch, runs), response_logits(base, batch, runs))
    # the peft-free merge is peft's own merge
    peft_model = add_lora(copy.deepcopy(base), config.rank, config.alpha)
    set_peft_model_state_dict(peft_model, load_file(str(path)))
    reference = peft_model.merge_and_unload().state_dict()
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, reference[name], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="was trained for plans"):
        load_adapter(copy.deepcopy(base), path, make_plan(8, "uniform", 1.5))
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(build_llama(tokenizer, seed=1), path, PLAN)

    # resuming a finished run changes nothing; a longer run continues from the checkpoint
    longer = TrainConfig(steps=5, batch_size=2, log_every=1, save_every=5, lr=1e-2, warmup_steps=1)
    train(copy.deepcopy(base), examples, [PLAN], longer, tmp_path / "run", tokenizer.pad_token_id)
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5]


def test_a_skip_adapter_starts_from_the_full_depth_baseline(tmp_path, tokenizer, examples):
    base = build_llama(tokenizer)
    config = TrainConfig(steps=2, batch_size=2, save_every=2, log_every=2, lr=1e-2, warmup_steps=1)
    pad = tokenizer.pad_token_id
    baseline = train(copy.deepcopy(base), examples, [full_plan(8)], config, tmp_path / "base", pad)
    baseline_state = load_file(str(baseline))

    model = add_lora(copy.deepcopy(base), config.rank, config.alpha)
    start_from_adapter(model, baseline)
    started = get_peft_model_state_dict(model)
    assert started.keys() == baseline_state.keys()
    for key, weight in baseline_state.items():
        torch.testing.assert_close(started[key], weight)

    # one tiny step from the baseline stays at the baseline; the same step from scratch does not
    tiny = replace(config, steps=1, save_every=1, log_every=1, lr=1e-7, init_adapter=str(baseline))
    skip = train(copy.deepcopy(base), examples, [PLAN], tiny, tmp_path / "skip", pad)
    scratch = train(
        copy.deepcopy(base), examples, [PLAN], replace(tiny, init_adapter=None), tmp_path / "scratch", pad
    )
    for key, weight in baseline_state.items():
        torch.testing.assert_close(load_file(str(skip))[key], weight, atol=1e-5, rtol=0)
    assert any(
        not torch.allclose(load_file(str(scratch))[k], w, atol=1e-3) for k, w in baseline_state.items()
    )
    assert baseline.name in adapter_metadata(skip)["info"]
    load_adapter(copy.deepcopy(base), skip, PLAN)  # a plain skip adapter of the base model

    with pytest.raises(ValueError, match="rank=16 alpha=32; set finetune rank and alpha"):
        start_from_adapter(add_lora(copy.deepcopy(base), rank=4, alpha=8), baseline)
    with pytest.raises(ValueError, match="init_adapter=.* different base model"):
        start_from_adapter(add_lora(build_llama(tokenizer, seed=1)), baseline)


def test_one_adapter_for_a_range_of_plans(tmp_path, tokenizer, examples):
    plans = [make_plan(8, "uniform", s) for s in (1.25, 1.5, 2.0)]
    config = TrainConfig(steps=2, batch_size=2, save_every=2, log_every=2)
    path = train(build_llama(tokenizer), examples, plans, config, tmp_path, tokenizer.pad_token_id)
    for plan in plans:
        load_adapter(build_llama(tokenizer), path, plan)
    with pytest.raises(ValueError, match="trained for plans"):
        load_adapter(build_llama(tokenizer), path, make_plan(8, "uniform", 4.0))


def test_saved_adapter_is_small_and_tied_to_its_plan(tmp_path, tokenizer):
    model = add_lora(build_llama(tokenizer), rank=4, alpha=8)
    path = save_adapter(model, tmp_path / "a.safetensors", [PLAN], note="x")
    meta = adapter_metadata(path)
    assert meta["rank"] == "4" and "full:0,2,5,7" in meta["plans"]


def test_perplexity_at_full_depth_equals_hf_loss_and_rises_when_skipping(llama):
    import math

    from skipengine.perplexity import perplexity, windows

    stream = [(11 * i) % 300 + 5 for i in range(200)]
    chunks = windows(stream, 48, 3)
    assert len(chunks) == 3 and chunks[1] == stream[48:96]
    ours = perplexity(llama, chunks, None, context=8, batch_size=2)
    ids = torch.tensor(chunks)
    labels = ids.clone()
    labels[:, :8] = -100  # HF shifts labels itself: the first 8 tokens play the prompt
    with torch.no_grad():
        loss = llama(input_ids=ids, labels=labels).loss
    assert ours["tokens"] == 3 * 40 and ours["perplexity"] == pytest.approx(
        math.exp(loss.item()), rel=kernel_rtol(torch.float32, WIDTH, LAYERS + 1)
    )
    skipped = perplexity(llama, chunks, make_plan(8, "uniform", 2.0), context=8, batch_size=2)
    assert skipped["perplexity"] != pytest.approx(ours["perplexity"], rel=1e-3)


def test_full_fine_tuning_trains_the_decoder_and_round_trips(tmp_path, tokenizer, examples):
    base = build_llama(tokenizer)
    trained = copy.deepcopy(base)
    config = TrainConfig("distill", "full", steps=4, batch_size=4, save_every=4, lr=1e-3, warmup_steps=1)
    path = train(trained, examples, [PLAN], config, tmp_path / "run", tokenizer.pad_token_id)
    assert adapter_metadata(path)["format"] == "skipengine-full-1"
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    with torch.no_grad():  # the student moved toward its frozen full-depth teacher (each step saw this batch)
        runs = training_runs(PLAN, batch["is_prompt"])
        before = distill_loss(copy.deepcopy(base), batch, runs, teacher=base)
        assert distill_loss(trained, batch, runs, teacher=base) < before

    loaded = load_adapter(copy.deepcopy(base), path, PLAN)
    for name, weight in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], weight, atol=0, rtol=0)
    layer = "model.layers.3.mlp.up_proj.weight"
    assert not torch.equal(loaded.state_dict()[layer], base.state_dict()[layer])
    embed = "model.embed_tokens.weight"  # frozen: it is the fingerprint and the tied LM head
    assert torch.equal(loaded.state_dict()[embed], base.state_dict()[embed])
    with pytest.raises(ValueError, match="was trained for plans"):
        load_adapter(copy.deepcopy(base), path, make_plan(8, "uniform", 1.5))


class TableMeasurer(Measurer):
    """The measured basis's choice rules on given speeds: pipeline.planning.Measurer, except that a plan's
    speedup is looked up (a step costs 1 fixed + 1 per layer: full depth 9) instead of timed."""

    def __init__(self, skip, tokenizer):
        engine = Engine(build_llama(tokenizer), tokenizer)
        super().__init__(skip, engine, [[5, 6, 7]], SamplingParams(max_new_tokens=4), 2, "error")
        self.asked = []

    def speed(self, by_count, adapter, count):
        self.asked.append((adapter and Path(adapter).name, count))
        return SpeedSample(count, 9 / (1 + count), 9 / (1 + count), 1)


def choose(skip, tokenizer, shipped, measurer=None):
    """(adapter file name or None, kept layers) that the job would run."""
    engine = Engine(build_llama(tokenizer), tokenizer)
    chosen = build_run_plan(
        skip,
        8,
        lambda: (engine, [[5, 6, 7]]),
        SamplingParams(max_new_tokens=4),
        2,
        shipped,
        measurer=measurer,
    )
    return (chosen.adapter and Path(chosen.adapter).name), chosen.plan.num_kept


def test_auto_picks_the_adapter_with_fewest_plans_then_the_deepest_plan_that_meets_the_target(
    tmp_path, tokenizer
):
    from pipeline.config import SkipConfig

    model = add_lora(build_llama(tokenizer), rank=4, alpha=8)

    def adapter(name: str, *kept: int) -> str:
        return str(save_adapter(model, tmp_path / name, [make_plan(8, "uniform", 8 / k) for k in kept]))

    shipped = [adapter("range", 2, 3, 4, 5, 6), adapter("narrow", 2, 3), adapter("x2", 3)]
    skip = SkipConfig(strategy="uniform", basis="measured", adapter="auto")
    # measured speedups 9 / (1 + kept): 3 layers 2.25x, 4 layers 1.8x, 2 layers 3x, 6 layers 1.29x

    def pick(target: float) -> tuple[str | None, int]:
        measure_skip = replace(skip, target_speedup=target)
        return choose(measure_skip, tokenizer, shipped, TableMeasurer(measure_skip, tokenizer))

    assert pick(2.0) == ("x2", 3)
    assert pick(2.5) == ("narrow", 2)  # x2 cannot reach it
    # 1.5x: the specialist's 3 layers, though they run 2.25x and the range adapter has 5 layers at 1.5x
    assert pick(1.5) == ("x2", 3)
    assert pick(1.0) == (None, 8)  # full depth asked for: no adapter of a shallower plan is taken instead
    full = adapter("full", 8)
    assert choose(replace(skip, target_speedup=1.0), tokenizer, [*shipped, full]) == ("full", 8)
    with pytest.raises(ValueError, match="cannot be reached"):
        pick(4.0)  # no adapter serves it, and without one the fastest plan (2 layers) runs 3x
    # basis=layers: the plan is fixed; the adapter with the fewest plans that was trained for it
    layers = replace(skip, basis="layers")
    assert choose(replace(layers, target_speedup=2.0), tokenizer, shipped) == ("range", 4)
    assert choose(replace(layers, target_speedup=8 / 3), tokenizer, shipped) == ("x2", 3)
    assert choose(replace(layers, target_speedup=8 / 7), tokenizer, shipped) == (None, 7)  # none: without


def test_auto_serves_a_strategy_only_with_adapter_plans_of_that_strategy(tmp_path, tokenizer):
    """An adapter's evenly spaced plans serve uniform and its other plans serve searched, on either basis;
    the searched run then takes the adapter's own kept layers."""
    from pipeline.config import SkipConfig
    from skipengine import SkipPlan

    model = add_lora(build_llama(tokenizer), rank=4, alpha=8)
    searched_plans = [SkipPlan(8, kept) for kept in ((0, 1, 2, 7), (0, 1, 7))]
    searched = str(save_adapter(model, tmp_path / "searched", searched_plans))
    uniform = str(save_adapter(model, tmp_path / "uniform", [make_plan(8, "uniform", 2.0)]))
    skip = SkipConfig(strategy="searched", basis="measured", target_speedup=2.0, adapter="auto")
    assert choose(skip, tokenizer, [uniform, searched], TableMeasurer(skip, tokenizer)) == (
        "searched",
        3,
    )
    as_uniform = replace(skip, strategy="uniform", target_speedup=1.75)  # 4 layers: 9 / 5 = 1.8x
    measurer = TableMeasurer(as_uniform, tokenizer)
    assert choose(as_uniform, tokenizer, [uniform, searched], measurer) == ("uniform", 4)
    assert set(measurer.asked) == {("uniform", 4)}  # the searched adapter's plans are not uniform's
    layers = replace(skip, basis="layers")  # 2x: 4 layers, the adapter's own
    assert choose(layers, tokenizer, [uniform, searched]) == ("searched", 4)
    # another strategy's plans of the same size are not random's: auto runs random's own without an adapter
    assert choose(replace(layers, strategy="random"), tokenizer, [uniform, searched]) == (None, 4)
    # full depth needs no search; an adapter named explicitly brings its own searched layers too
    assert choose(replace(layers, target_speedup=1.0), tokenizer, [uniform, searched]) == (None, 8)
    assert choose(replace(layers, adapter=searched), tokenizer, []) == ("searched", 4)
    # an adapter named explicitly that has no plan for the target: say what to do
    with pytest.raises(ValueError, match="has no searched plan that serves skip.target_speedup=4"):
        choose(replace(layers, adapter=searched, target_speedup=4.0), tokenizer, [])


def test_skip_none_loads_an_explicit_full_depth_adapter_and_refuses_a_skip_one(tmp_path, tokenizer):
    from pipeline.config import SkipConfig

    model = add_lora(build_llama(tokenizer), rank=4, alpha=8)
    baseline = str(save_adapter(model, tmp_path / "baseline", [full_plan(8)]))
    none = SkipConfig(strategy="none", adapter=baseline)
    assert choose(none, tokenizer, []) == ("baseline", 8)
    load_adapter(build_llama(tokenizer), baseline, full_plan(8))
    assert choose(replace(none, adapter="auto"), tokenizer, [baseline]) == (None, 8)  # auto: no adapter
    with pytest.raises(ValueError, match="was trained for plans"):
        load_adapter(build_llama(tokenizer), str(save_adapter(model, tmp_path / "x2", [PLAN])), full_plan(8))


def test_the_shipped_adapters_serve_the_uniform_plans_they_are_listed_for():
    from omegaconf import OmegaConf

    from skipengine.lora import adapter_plans

    root = Path(__file__).resolve().parents[1]
    shipped = OmegaConf.load(root / "conf/model/smollm2.yaml").adapters
    paths = [root / p for task in shipped.values() for p in task]
    assert len(set(paths)) == len(paths)  # each file is listed for one task only
    assert len({adapter_metadata(p)["base_fingerprint"] for p in paths}) == 1  # one base model
    for task, targets in {"summarize": (1.25, 1.5, 2.0), "translate": (1.0, 1.25, 1.5, 2.0)}.items():
        plans = {plan for p in shipped[task] for plan in adapter_plans(root / p)}
        for target in targets:  # basis=layers: the paper's plans, each served by an adapter for the task
            assert ("full", make_plan(30, "uniform", target).kept_layers) in plans, (task, target)


@pytest.mark.parametrize("strategy", ["none", "uniform", "searched", "early_exit", "keep_top", "random"])
@pytest.mark.parametrize("basis", ["layers", "measured"])
def test_target_one_is_full_depth_under_every_strategy_basis_and_adapter_setting(
    tmp_path, tokenizer, strategy, basis
):
    from pipeline.config import SkipConfig

    model = add_lora(build_llama(tokenizer), rank=4, alpha=8)
    shallow = str(save_adapter(model, tmp_path / "x2", [PLAN, make_plan(8, "uniform", 8 / 6)]))
    full = str(save_adapter(model, tmp_path / "full", [full_plan(8)]))
    skip = SkipConfig(strategy=strategy, basis=basis, target_speedup=1.0)
    # auto: a shipped full-depth adapter (skip=none: the job resolves auto to no adapter, pipeline.config)
    for adapter, shipped, expected in [
        (None, [], None),
        ("auto", [shallow], None),
        ("auto", [shallow, full], None if strategy == "none" else "full"),
    ]:
        assert choose(replace(skip, adapter=adapter), tokenizer, shipped) == (expected, 8)
    assert choose(replace(skip, adapter=full), tokenizer, []) == ("full", 8)
    if strategy != "none":  # skip=none loads an explicit adapter as it is, and loading refuses a shallow one
        with pytest.raises(ValueError, match="has no full-depth plan"):
            choose(replace(skip, adapter=shallow), tokenizer, [])


def test_bf16_training_tracks_fp32_and_is_recorded(tmp_path, tokenizer, examples):
    cpu = torch.device("cpu")
    base = build_llama(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id, max_len=64)
    runs = training_runs(PLAN, batch["is_prompt"])
    with torch.no_grad():
        exact = uls_loss(base, batch, runs)
        with autocast("bf16", cpu):
            rounded = uls_loss(base, batch, runs)
    # bf16 keeps 8 mantissa bits: its rounding moves the loss by a few eps, a bug by far more
    assert rounded.item() != exact.item()
    assert rounded.item() == pytest.approx(exact.item(), rel=4 * torch.finfo(torch.bfloat16).eps)

    config = TrainConfig(steps=1, batch_size=2, save_every=1, log_every=1, precision="bf16")
    path = train(copy.deepcopy(base), examples, [PLAN], config, tmp_path, tokenizer.pad_token_id)
    assert json.loads(adapter_metadata(path)["info"])["precision"] == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    with pytest.raises(ValueError, match="finetune.precision='fp16' is unknown"):
        resolve_precision("fp16", cpu)
