"""The real default model end to end: locate the GGUF in its wheel, convert it (into a fresh cache),
load it, and generate sensible text at full depth, identical to HF generate()."""

import pytest
from reference import hf_greedy

from skipengine import Engine, SamplingParams, full_plan, load_model
from skipengine.load import converted_folder

pytestmark = pytest.mark.slow

ARTICLE = (
    "The city council voted on Tuesday to build a new public library in the town centre. The library "
    "will open in 2027, cost 40 million dollars, and hold more than 200,000 books. Supporters said it "
    "would give students a quiet place to study."
)


def test_default_model_converts_loads_and_summarizes(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPENGINE_CACHE", str(tmp_path))
    model, tok = load_model("smollm2-135m-instruct")
    assert (converted_folder("smollm2-135m-instruct") / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30

    engine = Engine(model, tok)
    messages = [{"role": "user", "content": f"Summarize this article in one sentence.\n\n{ARTICLE}"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    row = engine.generate([prompt], full_plan(30), SamplingParams(max_new_tokens=60)).rows[0]
    assert row.ok and row.finish_reason == "stop", row
    words = [w.strip(".,;:!?\"'()") for w in row.text.split()]
    assert 8 <= len(words) <= 60, row.text
    assert sum(w.isalpha() or w.replace(",", "").isdigit() for w in words) >= 0.8 * len(words), row.text
    assert "library" in row.text.lower(), row.text
    assert row.token_ids == hf_greedy(model, [prompt], 60, engine.pad_id)[0]
