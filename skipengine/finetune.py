"""Skip-aware fine-tuning: teach the model to work with its skipped layers, as inference will run it.

- ULS (Liu, Meng & Zhou 2024): the prompt runs every layer (prefill "full") and builds the KV, the
  response runs only the plan's kept layers, the loss is cross-entropy on the response tokens.
- Self-distillation: the same forward, but the target is the full-depth model's next-token distribution
  (KL), so any unlabeled text of the user's will do.

LoRA adapters (peft) by default, full fine-tuning of every decoder weight as an option; either is saved
as one safetensors file whose metadata ties it to the base model and the plan(s) it was trained for
(skipengine.lora loads and merges them). A LoRA file is ~20 MB; a full one is the whole decoder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from skipengine.adaptive import AdaptivePlan
from skipengine.depth import token_depth, training_runs
from skipengine.lora import (
    FORMAT,
    FULL_FORMAT,
    adapter_id,
    base_model,
    check_base,
    fingerprint,
    merge_adapter,
    plan_key,
)
from skipengine.plan import SkipPlan

log = logging.getLogger(__name__)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_PREFIXES = ("model.layers.", "model.norm.")  # what full fine-tuning trains


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    response: list[int]


def collate(examples: Sequence[Example], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """The batch as the engine lays it out: prompts left-padded (prompt_ids, prompt_mask [B, P]),
    responses right-padded after them (response_ids, response_mask [B, R]); is_prompt [B, P + R] marks
    the prompt columns. Too-long examples keep the end of the prompt and the start of the response."""
    rows = []
    for ex in examples:
        response = ex.response[: max_len - 1]
        prompt = ex.prompt[-(max_len - len(response)) :]
        rows.append((prompt, response))
    prompt_width = max(len(p) for p, _ in rows)
    response_width = max(len(r) for _, r in rows)
    batch = {
        "prompt_ids": torch.full((len(rows), prompt_width), pad_id, dtype=torch.long),
        "prompt_mask": torch.zeros((len(rows), prompt_width), dtype=torch.long),
        "response_ids": torch.full((len(rows), response_width), pad_id, dtype=torch.long),
        "response_mask": torch.zeros((len(rows), response_width), dtype=torch.long),
    }
    for b, (prompt, response) in enumerate(rows):
        batch["prompt_ids"][b, prompt_width - len(prompt) :] = torch.tensor(prompt)
        batch["prompt_mask"][b, prompt_width - len(prompt) :] = 1
        batch["response_ids"][b, : len(response)] = torch.tensor(response)
        batch["response_mask"][b, : len(response)] = 1
    batch["is_prompt"] = torch.arange(prompt_width + response_width)[None] < prompt_width
    return batch


def response_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The response tokens [N], in the order response_logits predicts them (row by row)."""
    return batch["response_ids"][batch["response_mask"].bool()]


def response_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], runs: torch.Tensor | None, prompt_grad: bool = True
) -> torch.Tensor:
    """Logits [N, V] that predict the N response tokens, computed as generation computes them: the
    prompts in one pass that fills the KV cache, then the responses in one pass over it, token (b, t)
    through the layers l where runs[l, b, t] (skipengine.depth.training_runs, [L, B, P + R]; None: full
    depth). Layers that no response token runs are left out of the second pass, so a static plan's
    skipped layers cost nothing there. prompt_grad=False runs the prompt pass without gradient: the
    same logits and a faster step when prompts are most of the tokens (1.4x in jobs.bench_finetune),
    but the adapter learns nothing through the prompt's K/V. The LM head runs on the response positions
    only: over a 49k vocabulary it is most of the memory."""
    hf = base_model(model)
    prompt_mask, response_mask = batch["prompt_mask"], batch["response_mask"]
    width = prompt_mask.shape[1]
    if runs is None:
        runs = torch.ones((len(hf.model.layers), *batch["is_prompt"].shape), dtype=torch.bool)
    runs = runs.to(prompt_mask.device)
    lengths = prompt_mask.sum(-1, keepdim=True)  # [B, 1]
    cache = DynamicCache(config=hf.config)
    with torch.set_grad_enabled(prompt_grad and torch.is_grad_enabled()):
        with token_depth(hf, runs[..., :width]):
            prompt_hidden = hf.model(
                input_ids=batch["prompt_ids"],
                attention_mask=prompt_mask,
                position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state  # [B, P, D]
    with token_depth(hf, runs[..., width:], drop_idle=True):
        response_hidden = hf.model(
            input_ids=batch["response_ids"],
            attention_mask=torch.cat([prompt_mask, response_mask], 1),
            position_ids=lengths + torch.arange(response_mask.shape[1], device=lengths.device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state  # [B, R, D]
    # the last prompt token predicts response token 0, response token t predicts t + 1
    hidden = torch.cat([prompt_hidden[:, -1:], response_hidden[:, :-1]], 1)  # [B, R, D]
    return hf.lm_head(hidden[response_mask.bool()])


def uls_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], runs: torch.Tensor, prompt_grad: bool = True
) -> torch.Tensor:
    logits = response_logits(model, batch, runs, prompt_grad)
    return F.cross_entropy(logits.float(), response_targets(batch))


def distill_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    runs: torch.Tensor,
    teacher: nn.Module | None = None,
    prompt_grad: bool = True,
) -> torch.Tensor:
    """KL(full-depth teacher || skipping student) on the response positions. The teacher is a frozen
    copy of the base model (full fine-tuning) or, with teacher None, the same weights with the LoRA
    adapter switched off."""
    with torch.no_grad():
        if teacher is None:
            with model.disable_adapter():
                target = response_logits(model, batch, None)
        else:
            target = response_logits(teacher, batch, None)
    student = response_logits(model, batch, runs, prompt_grad)
    return F.kl_div(
        F.log_softmax(student.float(), -1),
        F.log_softmax(target.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


LOSSES: dict[str, Callable] = {"uls": uls_loss, "distill": distill_loss}
METHODS = ("lora", "full")  # full: every decoder weight trains; embeddings (tied to the head) stay frozen
PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware (AVX512-BF16 or AMX on a CPU); elsewhere bf16 is
    emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


def resolve_precision(precision: str, device: torch.device) -> str:
    """finetune.precision: bf16 autocast over fp32 master weights where the device has native bf16
    ("auto"), or as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"finetune.precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if native_bf16(device):
            return "bf16"
        log.info("no native bf16 on this %s: training in fp32 (finetune.precision=auto)", device.type)
        return "fp32"
    if precision == "bf16" and not native_bf16(device):
        log.warning(
            "finetune.precision=bf16 on a %s without native bf16: emulated, slower than fp32", device.type
        )
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's context: bf16 matmuls with fp32 weights, gradients and optimizer state (the losses
    take their softmax in fp32), or plain fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- adapters (the file format and merging live in skipengine.lora) ------------------------------


def add_lora(model: nn.Module, rank: int = 16, alpha: int = 32, dropout: float = 0.0) -> nn.Module:
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS))
    return get_peft_model(model, config)


def make_trainable(model: nn.Module, method: str, rank: int, alpha: int) -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"finetune.method={method!r} is unknown; use one of {', '.join(METHODS)}")
    if method == "lora":
        return add_lora(model, rank, alpha)
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(FULL_PREFIXES))
    return model


def start_from_adapter(model: nn.Module, path: str | Path) -> None:
    """Training starts from an adapter of this base model instead of from scratch (e.g. skip adapters
    from the full-depth baseline fine-tuned on the same data, the paper's setup): a LoRA run takes over
    its LoRA weights, full fine-tuning merges it into the weights. The distillation teacher stays the
    base model."""
    meta = check_base(model, path, key="finetune.init_adapter")
    lora = getattr(model, "peft_config", {}).get("default")
    if lora is None:
        merge_adapter(base_model(model), path, meta)
        return
    if meta["format"] != FORMAT:
        raise ValueError(
            f"finetune.init_adapter={str(path)!r} holds full fine-tuned weights; a LoRA run starts only "
            "from a LoRA adapter (use method=full, or a LoRA file)"
        )
    if (int(meta["rank"]), int(meta["alpha"])) != (lora.r, lora.lora_alpha):
        raise ValueError(
            f"finetune.init_adapter={str(path)!r} has rank={meta['rank']} alpha={meta['alpha']}; "
            f"set finetune rank and alpha to those (now {lora.r}, {lora.lora_alpha})"
        )
    unused = set_peft_model_state_dict(model, load_file(str(path))).unexpected_keys
    if unused:  # peft loads non-strictly: weights for modules this run does not adapt would be dropped
        raise ValueError(
            f"finetune.init_adapter={str(path)!r} adapts modules this run does not: {sorted(unused)[:3]}"
        )


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changed: the LoRA weights (peft's keys), or every trainable weight."""
    if hasattr(model, "peft_config"):
        return get_peft_model_state_dict(model)
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def restore_trained_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if hasattr(model, "peft_config"):
        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state, strict=False)


def save_adapter(
    model: nn.Module, path: str | Path, plans: Sequence[SkipPlan | AdaptivePlan], **info
) -> Path:
    """The trained weights (LoRA, or every decoder weight for full fine-tuning), tied to this base model
    and these plans (metadata)."""
    lora = getattr(model, "peft_config", {}).get("default")
    metadata = {
        "format": FORMAT if lora else FULL_FORMAT,
        "base_fingerprint": fingerprint(model),
        "plans": json.dumps(sorted({plan_key(p) for p in plans})),
        "info": json.dumps(info),
    }
    if lora:
        metadata |= {"rank": str(lora.r), "alpha": str(lora.lora_alpha)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in trained_state(model).items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata=metadata)
    tmp.rename(path)
    return path


# -- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    loss: str = "uls"  # or "distill"
    method: str = "lora"  # or "full"
    steps: int = 300
    batch_size: int = 8
    max_len: int = 256
    lr: float = 2e-4
    warmup_steps: int = 20
    rank: int = 16
    alpha: int = 32
    log_every: int = 10
    save_every: int = 50
    seed: int = 0
    init_adapter: str | None = None  # start from this adapter's weights (start_from_adapter)
    prompt_grad: bool = True  # False: no prompt-pass gradient (response_logits): faster, learns less
    precision: str = "auto"  # bf16 autocast where the device has native bf16, else fp32 (PRECISIONS)


def batches(examples: Sequence[Example], size: int, seed: int) -> Iterator[list[Example]]:
    """Endless shuffled batches (a fresh order each epoch)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [examples[j] for j in order[i : i + size]]


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    runs: torch.Tensor,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    precision: str = "fp32",
) -> float:
    """One optimizer step on one batch (gradients clipped to norm 1); returns the loss. precision bf16
    runs the forward under bf16 autocast (resolve_precision)."""
    with autocast(precision, batch["prompt_ids"].device):
        loss = loss_fn(model, batch, runs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item()


def train(
    model: nn.Module,
    examples: Sequence[Example],
    plans: Sequence[SkipPlan | AdaptivePlan],
    config: TrainConfig,
    out_dir: str | Path,
    pad_id: int,
) -> Path:
    """Trains a LoRA adapter on `examples` under `plans` (one plan: the paper's per-speedup adapter;
    several: a random one per step, one adapter for the whole range; an adaptive plan: exits sampled
    per token, skipengine.depth.sample_exit_depths). Checkpoints to out_dir and resumes
    from it; returns the adapter's path. Logs loss curves to out_dir/log.jsonl."""
    if config.loss not in LOSSES:
        raise ValueError(f"finetune.loss={config.loss!r} is unknown; use one of {', '.join(LOSSES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    # full fine-tuning distills from a frozen copy of the base model; LoRA switches itself off instead
    teacher = copy.deepcopy(model).eval() if config.method == "full" and config.loss == "distill" else None
    model = make_trainable(model, config.method, config.rank, config.alpha)
    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device)
    log.info("training precision: %s", precision)
    info = {
        "loss": config.loss,
        "method": config.method,
        "prompt_grad": config.prompt_grad,
        "precision": precision,
    }
    if config.init_adapter:
        start_from_adapter(model, config.init_adapter)
        info["init_adapter"] = f"{Path(config.init_adapter).name}@{adapter_id(config.init_adapter)}"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    checkpoint, start = out / "checkpoint.pt", 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)  # tensors and numbers only: no pickled code
        restore_trained_state(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log.info("resuming from step %d", start)
    loss_fn = partial(LOSSES[config.loss], prompt_grad=config.prompt_grad)
    if teacher is not None:
        loss_fn = partial(loss_fn, teacher=teacher)
    rng = random.Random(config.seed + start)
    exit_rng = torch.Generator().manual_seed(config.seed + start)
    stream = batches(examples, config.batch_size, config.seed)
    for _ in range(start):  # the same data order as an uninterrupted run
        next(stream)
    adapter_path = out / "adapter.safetensors"
    tick, window = time.perf_counter(), []
    for step in range(start, config.steps):
        batch = collate(next(stream), pad_id, config.max_len)
        plan = plans[rng.randrange(len(plans))]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        runs = training_runs(plan, batch["is_prompt"], exit_rng)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        window.append(train_step(model, batch, runs, loss_fn, optimizer, precision))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - tick
            record = {
                "step": step + 1,
                "loss": sum(window) / len(window),
                "lr": lr_at(step),
                "s_per_step": elapsed / len(window),
            }
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            log.info(
                "step %d/%d loss %.4f (%.1f s/step)",
                step + 1,
                config.steps,
                record["loss"],
                record["s_per_step"],
            )
            tick, window = time.perf_counter(), []
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_adapter(model, adapter_path, plans, **info, steps=step + 1)
            torch.save(
                {
                    "adapter": trained_state(model),
                    "optimizer": optimizer.state_dict(),
                    "step": step + 1,
                },
                checkpoint,
            )
    model.eval()
    return adapter_path
