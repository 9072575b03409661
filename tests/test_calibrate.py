import pytest

from skipengine import Engine, SamplingParams, make_plan, measure_cost_model
from skipengine.calibrate import SpeedProbe, deepest_meeting


def test_cost_model_is_measured_and_drives_a_plan(llama, tokenizer):
    engine = Engine(llama, tokenizer)
    cost = measure_cost_model(engine, batch_size=2, prompt_len=16, steps=6, repeats=2)
    assert cost.num_layers == 8 and cost.batch_size == 2 and cost.device == "cpu"
    assert cost.per_layer_s > 0 and cost.fixed_s >= 0
    reachable = cost.max_speedup
    plan = make_plan(8, "uniform", min(1.5, reachable), basis="measured", cost_model=cost)
    assert plan.basis == "measured" and plan.predicted_speedup >= min(1.5, reachable) - 1e-9
    assert plan.kept_layers[0] == 0 and plan.kept_layers[-1] == 7


@pytest.mark.parametrize("fixed", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("target", [1.25, 1.5, 2.0, 3.0])
def test_the_deepest_plan_that_meets_the_target_is_found_with_few_measurements(fixed, target):
    # a step costs fixed + per-layer x kept (full depth 1); rows thinning out act as a larger fixed share
    def speedup(kept: int) -> float:
        asked.append(kept)
        return 1 / (fixed + (1 - fixed) * kept / 30)

    asked = []
    found = deepest_meeting(range(2, 30), 30, target, speedup)
    meeting = [n for n in range(2, 30) if speedup(n) >= target]
    best = max(meeting, default=None)
    assert found == best
    assert len(set(asked[: -len(range(2, 30))])) <= 4  # the line guesses within a layer or two


def test_an_unreachable_target_finds_nothing_and_a_noisy_line_still_converges():
    assert deepest_meeting([2, 4, 6], 8, 5.0, lambda n: 8 / (n + 1)) is None
    # no speedup at the first guess (noise): the walk still steps down to the plan that meets the target
    speeds = {2: 2.5, 3: 1.9, 4: 1.0, 5: 1.0}
    assert deepest_meeting([2, 3, 4, 5], 8, 1.8, speeds.__getitem__) == 3


def test_the_speed_probe_runs_plans_against_full_depth_on_the_given_prompts(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer)
    probe = SpeedProbe(engine, prompts[:2], SamplingParams(max_new_tokens=6), target=1.5)
    plan = make_plan(8, "uniform", 2.0)
    sample = probe.measure(plan)
    assert (
        sample.num_kept == 4
        and sample.runs in (1, 2)
        and len(probe.full[None, plan.kept_layers]) == sample.runs
    )
    assert sample.decode_speedup > 0 and sample.speedup > 0
    with pytest.raises(ValueError, match="no decode steps"):
        SpeedProbe(engine, prompts[:2], SamplingParams(max_new_tokens=1), 1.5).measure(
            make_plan(8, "uniform", 2.0)
        )


def test_a_timing_reference_generates_the_given_number_of_tokens_per_row(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer)
    sampling = SamplingParams(max_new_tokens=6, stop=("the",))
    natural = engine.generate(prompts[:3], sampling=sampling)
    forced = engine.generate(prompts[:3], sampling=sampling, lengths=[1, 4, 9])
    # EOS, stop strings and max_new_tokens give way: each row does exactly the work it is given
    assert [r.num_generated_tokens for r in forced.rows] == [1, 4, 9]
    for row, reference in zip(forced.rows, natural.rows, strict=True):  # greedy: the same tokens first
        shared = min(len(row.token_ids), len(reference.token_ids))
        assert row.token_ids[:shared] == reference.token_ids[:shared]
    assert forced.stats.decode_row_steps == 0 + 3 + 8
    assert [r.num_generated_tokens for r in engine.generate(prompts[:1], lengths=[0]).rows] == [1]
    with pytest.raises(ValueError, match="one count >= 0 per prompt"):
        engine.generate(prompts[:3], lengths=[1, 2])


def test_measurements_where_fewer_layers_ran_slower_are_flagged():
    from pipeline.planning import disagreements

    assert disagreements({11: 2.4, 13: 2.1, 15: 1.8}) == []
    assert disagreements({13: 2.0, 14: 2.1}) == []  # within the noise a fair measurement has
    # what a calibration beside another process measured: 17 layers slower than full depth, 16 at 2.2x
    (note,) = disagreements({16: 2.2, 17: 0.76, 15: 1.34})
    assert note.startswith("15 layers measured 1.34x and 16 layers 2.20x") and "output.mode=overwrite" in note
