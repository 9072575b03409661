from skipengine import Engine, make_plan, measure_cost_model


def test_cost_model_is_measured_and_drives_a_plan(llama, tokenizer):
    engine = Engine(llama, tokenizer)
    cost = measure_cost_model(engine, batch_size=2, prompt_len=16, steps=6, repeats=2)
    assert cost.num_layers == 8 and cost.batch_size == 2 and cost.device == "cpu"
    assert cost.per_layer_s > 0 and cost.fixed_s >= 0
    reachable = cost.max_speedup
    plan = make_plan(8, "uniform", min(1.5, reachable), basis="measured", cost_model=cost)
    assert plan.basis == "measured" and plan.predicted_speedup >= min(1.5, reachable) - 1e-9
    assert plan.kept_layers[0] == 0 and plan.kept_layers[-1] == 7
