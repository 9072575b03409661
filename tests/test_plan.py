import pytest

from skipengine.plan import CostModel, evenly_spaced, full_plan, make_plan


@pytest.mark.parametrize("layers", [8, 18, 30, 32])
@pytest.mark.parametrize("target", [1.0, 1.25, 1.5, 2.0, 3.0, 4.0])
def test_uniform_count_ends_and_even_spacing(layers, target):
    plan = make_plan(layers, "uniform", target)
    assert plan.num_kept == int(layers // target) or plan.num_kept == int(layers / target + 1e-9)
    assert plan.kept_layers[0] == 0 and plan.kept_layers[-1] == layers - 1
    gaps = [b - a for a, b in zip(plan.kept_layers, plan.kept_layers[1:], strict=False)]
    assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1
    assert plan.predicted_speedup == pytest.approx(layers / plan.num_kept)
    assert plan.predicted_speedup >= target - 1e-9


def test_paper_example_spread_evenly():
    # the paper's integer stride gives 0,2,...,26,29; ours spreads the one 3-gap into the middle
    expected = (0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29)
    assert make_plan(30, "uniform", 2.0).kept_layers == expected
    assert evenly_spaced(5, 5) == (0, 1, 2, 3, 4)


def test_monotonic_in_target():
    kept = [make_plan(30, "uniform", s / 4).num_kept for s in range(4, 61)]
    assert kept == sorted(kept, reverse=True)


@pytest.mark.parametrize("strategy", ["early_exit", "keep_top", "random"])
def test_baselines_keep_the_same_count(strategy):
    uniform = make_plan(30, "uniform", 2.0)
    plan = make_plan(30, strategy, 2.0, seed=3)
    assert plan.num_kept == uniform.num_kept and len(set(plan.kept_layers)) == plan.num_kept
    assert plan.kept_layers == tuple(sorted(plan.kept_layers)) and plan.kept_layers[0] == 0
    if strategy == "early_exit":
        assert plan.kept_layers == tuple(range(15))
    if strategy == "keep_top":
        assert plan.kept_layers == (0, *range(16, 30))
    if strategy == "random":
        assert plan.kept_layers[-1] == 29 and plan == make_plan(30, "random", 2.0, seed=3)
        assert plan.kept_layers != make_plan(30, "random", 2.0, seed=4).kept_layers


def test_none_is_full_depth():
    assert make_plan(30, "none", 3.0) == full_plan(30)
    assert full_plan(30).is_full_depth and full_plan(30).skipped_layers == ()


def test_prefill_layers():
    plan = make_plan(10, "uniform", 2.0, prefill="full")
    assert plan.prefill_layers == tuple(range(10))
    assert make_plan(10, "uniform", 2.0, prefill="skip").prefill_layers == plan.kept_layers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_speedup=0.5), "must be a number >= 1.0"),
        (dict(target_speedup=float("nan")), "must be a number >= 1.0"),
        (dict(target_speedup=20.0), "the largest target is 15"),
        (dict(strategy="fastest"), "skip.strategy='fastest' is unknown"),
        (dict(prefill="half"), "skip.prefill='half' is unknown"),
        (dict(basis="vibes"), "skip.basis='vibes' is unknown"),
        (dict(basis="measured"), "needs a CostModel"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    args = dict(strategy="uniform", target_speedup=2.0) | kwargs
    with pytest.raises(ValueError, match=message):
        make_plan(30, **args)


def test_measured_basis_accounts_for_fixed_cost():
    # a decode step of 10 ms fixed + 1 ms per layer: full depth 40 ms
    cost = CostModel(fixed_s=0.010, per_layer_s=0.001, num_layers=30, batch_size=1, device="cpu")
    plan = make_plan(30, "uniform", 2.0, basis="measured", cost_model=cost)
    # 2x needs a 20 ms step: 10 layers, not the 15 that L/s suggests
    assert plan.num_kept == 10 and plan.predicted_speedup == pytest.approx(2.0)
    assert make_plan(30, "uniform", 1.5, basis="measured", cost_model=cost).num_kept == 16
    assert cost.max_speedup == pytest.approx(40 / 12)
    with pytest.raises(ValueError, match=r"caps it at 3.33x"):
        make_plan(30, "uniform", 3.5, basis="measured", cost_model=cost)


@pytest.mark.parametrize("strategy", ["none", "uniform", "searched", "early_exit", "keep_top", "random"])
@pytest.mark.parametrize("basis", ["layers", "measured"])
def test_target_one_is_full_depth_under_every_strategy_and_basis(strategy, basis):
    cost = CostModel(fixed_s=0.010, per_layer_s=0.001, num_layers=30, batch_size=8, device="cpu")
    plan = make_plan(30, strategy, 1.0, basis=basis, cost_model=cost)  # searched: no search needed
    assert plan.is_full_depth and plan.predicted_speedup == pytest.approx(1.0)


def test_plan_is_printable():
    text = str(make_plan(30, "uniform", 2.0))
    assert "keep 15/30" in text and "predicted=2.00x" in text and "prefill=full" in text
