"""Independent references the engine is checked against."""

from __future__ import annotations

import copy
import re

import torch

from skipengine.depth import plan_runs, token_depth
from skipengine.plan import SkipPlan


def physically_pruned(model, kept: tuple[int, ...], layer_prefix: str, count_key: str):
    """A fresh model whose config has only len(kept) decoder layers, loaded with the kept layers' weights."""
    config = copy.deepcopy(model.config)
    setattr(config, count_key, len(kept))
    if getattr(config, "layer_types", None):  # e.g. Gemma 3's sliding / full layers keep their kinds
        config.layer_types = [config.layer_types[i] for i in kept]
    pruned = type(model)(config).eval()
    new_index = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(re.escape(layer_prefix) + r"\.(\d+)\.")
    state = {}
    for name, tensor in model.state_dict().items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) in new_index:
            state[pattern.sub(f"{layer_prefix}.{new_index[int(match.group(1))]}.", name, count=1)] = tensor
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or "inv_freq" in m for m in missing), (missing, unexpected)
    return pruned


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] for a left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids, mask


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """HF generate() on a left-padded batch; new tokens per row, cut after the first EOS."""
    ids, mask = left_pad(prompts, pad_id)
    width = ids.shape[1]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


@torch.no_grad()
def depth_greedy(model, prompt: list[int], plan: SkipPlan, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding with no KV cache: each step reruns the whole sequence, prompt tokens through
    plan.prefill_layers and generated tokens through plan.kept_layers (skipengine.depth, HF modules)."""
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        ids = torch.tensor([seq])
        is_prompt = torch.arange(len(seq))[None] < len(prompt)
        with token_depth(model, plan_runs(plan, is_prompt)):
            logits = model(input_ids=ids).logits
        tok = int(logits[0, -1].argmax())
        new.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return new


def hf_generate_row(model, prompt: list[int], params, pad_id: int) -> list[int]:
    """HF generate() on one unpadded row with params' settings (skipengine.SamplingParams), seeded as the
    engine seeds that row; new tokens, cut after the first EOS."""
    from skipengine.sampling import row_seed

    if not params.greedy:
        torch.manual_seed(row_seed(params, prompt))
    ids = torch.tensor([prompt])
    if params.penalize_prompt:
        inputs = dict(input_ids=ids)
    else:  # HF's processors then see only the generated tokens, and it returns only those
        inputs = dict(inputs_embeds=model.get_input_embeddings()(ids))
    out = model.generate(
        **inputs, attention_mask=torch.ones_like(ids), pad_token_id=pad_id, **params.hf_kwargs()
    )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    row = out[0, len(prompt) if params.penalize_prompt else 0 :].tolist()
    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return row[:cut]
