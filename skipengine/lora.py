"""Skip-aware LoRA adapter files: what they are tied to, and merging them for inference.

An adapter is one safetensors file of peft LoRA weights (or, from full fine-tuning, the trained decoder
weights) whose metadata names the base model (a fingerprint) and the plan(s) it was trained for. Loading
refuses anything else and merges W += s·B·A into the weights (or copies the full ones in), so the engine
runs at full speed. Inference needs no peft (its import costs an actor about 2 s); training
(skipengine.finetune) writes these files with peft.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from skipengine.adaptive import AdaptivePlan
from skipengine.plan import SkipPlan

FORMAT = "skipengine-lora-1"
FULL_FORMAT = "skipengine-full-1"  # full fine-tuning: the trained decoder weights themselves
PEFT_PREFIX = "base_model.model."  # peft's state-dict keys are module paths under its wrapper


def base_model(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fingerprint(model: nn.Module) -> str:
    """Identifies the base weights: architecture sizes plus a slice of the embedding matrix."""
    model = base_model(model)
    config = model.config
    head = model.get_input_embeddings().weight.detach()[:4, :16].float().cpu().numpy().tobytes()
    sizes = f"{config.model_type}:{config.hidden_size}:{config.num_hidden_layers}:{config.vocab_size}"
    return hashlib.sha1(sizes.encode() + head).hexdigest()[:16]


def adapter_id(path: str | Path) -> str:
    """Identifies an adapter file by its content (a retrained adapter under the same name differs)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def plan_key(plan: SkipPlan | AdaptivePlan) -> str:
    """ "full:0,1,4,...": prefill mode and kept layers; "adaptive:5,7,...": the exit points."""
    layers = plan.exit_layers if isinstance(plan, AdaptivePlan) else plan.kept_layers
    return f"{plan.prefill}:{','.join(map(str, layers))}"


def adapter_metadata(path: str | Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") not in (FORMAT, FULL_FORMAT):
        raise ValueError(f"skip.adapter={str(path)!r} is not a skipengine adapter file")
    return meta


def adapter_plans(path: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """(prefill mode, kept layers) of every plan the adapter was trained for."""
    plans = []
    for key in json.loads(adapter_metadata(path)["plans"]):
        prefill, _, kept = key.partition(":")
        plans.append((prefill, tuple(int(i) for i in kept.split(","))))
    return plans


def check_base(model: nn.Module, path: str | Path, key: str = "skip.adapter") -> dict:
    """The adapter's metadata, after checking it was trained on this base model."""
    meta = adapter_metadata(path)
    if meta["base_fingerprint"] != fingerprint(model):
        raise ValueError(
            f"{key}={str(path)!r} was trained on a different base model; train one for this model"
        )
    return meta


def load_adapter(model: nn.Module, path: str | Path, plan: SkipPlan) -> nn.Module:
    """The model with the adapter merged into its weights; refuses another base model or plan."""
    meta = check_base(model, path)
    plans = json.loads(meta["plans"])
    if plan_key(plan) not in plans:
        raise ValueError(
            f"skip.adapter={str(path)!r} was trained for plans {plans}, not for {plan_key(plan)} ({plan}); "
            "use the adapter of this target speedup, or train one"
        )
    return merge_adapter(model, path, meta)


def merge_adapter(model: nn.Module, path: str | Path, meta: dict) -> nn.Module:
    """Merges W += s·B·A (a LoRA file) or copies the weights in (a full one); checks nothing."""
    state = load_file(str(path))
    if meta["format"] == FULL_FORMAT:
        unknown = set(state) - set(model.state_dict())
        if unknown:
            raise ValueError(f"{str(path)!r} has weights this model lacks: {sorted(unknown)[:3]}")
        model.load_state_dict(state, strict=False)  # copies into the existing tensors' device and dtype
        return model
    scale = int(meta["alpha"]) / int(meta["rank"])
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in (k for k in state if k.endswith(".lora_A.weight")):
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            down, up = state[key], state[key.replace(".lora_A.", ".lora_B.")]  # [r, in], [out, r]
            weight = modules[name].weight  # [out, in]
            up, down = (t.to(weight.device, torch.float32) for t in (up, down))
            weight += (scale * up @ down).to(weight.dtype)
    return model
