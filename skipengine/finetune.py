"""Skip-aware fine-tuning: teach the model to work with its skipped layers, as inference will run it.

- ULS (Liu, Meng & Zhou 2024): the prompt runs every layer (prefill "full") and builds the KV, the
  response runs only the plan's kept layers, the loss is cross-entropy on the response tokens.
- Self-distillation: the same forward, but the target is the full-depth model's next-token distribution
  (KL), so any unlabeled text of the user's will do.

LoRA adapters (peft) are trained and saved as one small safetensors file whose metadata ties it to the
base model and the plan(s) it was trained for; `load_adapter` refuses anything else and merges it into
the weights, so the engine runs at full speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from skipengine.depth import plan_runs, token_depth
from skipengine.plan import SkipPlan

log = logging.getLogger(__name__)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    response: list[int]


def collate(examples: Sequence[Example], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, is_prompt and loss_mask (response tokens), [B, T].
    Too-long examples keep the end of the prompt and the start of the response."""
    rows = []
    for ex in examples:
        response = ex.response[: max_len - 1]
        prompt = ex.prompt[-(max_len - len(response)) :]
        rows.append((prompt, response))
    width = max(len(p) + len(r) for p, r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "is_prompt": torch.zeros((len(rows), width), dtype=torch.bool),
        "loss_mask": torch.zeros((len(rows), width), dtype=torch.bool),
    }
    for b, (prompt, response) in enumerate(rows):
        n, m = len(prompt), len(response)
        batch["input_ids"][b, : n + m] = torch.tensor(prompt + response)
        batch["attention_mask"][b, : n + m] = 1
        batch["is_prompt"][b, :n] = True
        batch["loss_mask"][b, n : n + m] = True
    return batch


def base_model(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logits(model: nn.Module, batch: dict[str, torch.Tensor], plan: SkipPlan | None) -> torch.Tensor:
    """Logits [N, V] at the N positions that predict a response token (position t predicts t+1), with
    prompt tokens through plan.prefill_layers and the rest through plan.kept_layers (plan None: full
    depth). The LM head runs on those positions only: over a 49k vocabulary it is most of the memory."""
    hf = base_model(model)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if plan is None:
        hidden = hf.model(**inputs).last_hidden_state
    else:
        with token_depth(hf, plan_runs(plan, batch["is_prompt"])):
            hidden = hf.model(**inputs).last_hidden_state
    return hf.lm_head(hidden[:, :-1][batch["loss_mask"][:, 1:]])


def uls_loss(model: nn.Module, batch: dict[str, torch.Tensor], plan: SkipPlan) -> torch.Tensor:
    targets = batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:]]
    return F.cross_entropy(response_logits(model, batch, plan).float(), targets)


def distill_loss(model: nn.Module, batch: dict[str, torch.Tensor], plan: SkipPlan) -> torch.Tensor:
    """KL(full-depth teacher || skipping student) on the response positions; the teacher is the same
    weights with the LoRA adapter switched off."""
    with torch.no_grad(), model.disable_adapter():
        teacher = response_logits(model, batch, None)
    student = response_logits(model, batch, plan)
    return F.kl_div(
        F.log_softmax(student.float(), -1),
        F.log_softmax(teacher.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


LOSSES: dict[str, Callable] = {"uls": uls_loss, "distill": distill_loss}


# -- adapters ------------------------------------------------------------------------------------


def fingerprint(model: nn.Module) -> str:
    """Identifies the base weights: architecture sizes plus a slice of the embedding matrix."""
    model = base_model(model)
    config = model.config
    head = model.get_input_embeddings().weight.detach()[:4, :16].float().cpu().numpy().tobytes()
    sizes = f"{config.model_type}:{config.hidden_size}:{config.num_hidden_layers}:{config.vocab_size}"
    return hashlib.sha1(sizes.encode() + head).hexdigest()[:16]


def add_lora(model: nn.Module, rank: int = 16, alpha: int = 32, dropout: float = 0.0) -> nn.Module:
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS))
    return get_peft_model(model, config)


def plan_key(plan: SkipPlan) -> str:
    return f"{plan.prefill}:{','.join(map(str, plan.kept_layers))}"


def save_adapter(model: nn.Module, path: str | Path, plans: Sequence[SkipPlan], **info) -> Path:
    """The LoRA weights, tied to this base model and these plans (metadata)."""
    lora = model.peft_config["default"]
    metadata = {
        "format": "skipengine-lora-1",
        "base_fingerprint": fingerprint(model),
        "plans": json.dumps(sorted({plan_key(p) for p in plans})),
        "rank": str(lora.r),
        "alpha": str(lora.lora_alpha),
        "info": json.dumps(info),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, tmp, metadata=metadata)
    tmp.rename(path)
    return path


def adapter_metadata(path: str | Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "skipengine-lora-1":
        raise ValueError(f"skip.adapter={str(path)!r} is not a skipengine adapter file")
    return meta


def adapter_plans(path: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """(prefill mode, kept layers) of every plan the adapter was trained for."""
    plans = []
    for key in json.loads(adapter_metadata(path)["plans"]):
        prefill, _, kept = key.partition(":")
        plans.append((prefill, tuple(int(i) for i in kept.split(","))))
    return plans


def load_adapter(model: nn.Module, path: str | Path, plan: SkipPlan) -> nn.Module:
    """The model with the adapter merged into its weights; refuses another base model or plan."""
    meta = adapter_metadata(path)
    if meta["base_fingerprint"] != fingerprint(model):
        raise ValueError(
            f"skip.adapter={str(path)!r} was trained on a different base model; train one for this model"
        )
    plans = json.loads(meta["plans"])
    if plan_key(plan) not in plans:
        raise ValueError(
            f"skip.adapter={str(path)!r} was trained for plans {plans}, not for {plan_key(plan)} ({plan}); "
            "use the adapter of this target speedup, or train one"
        )
    peft_model = add_lora(model, int(meta["rank"]), int(meta["alpha"]))
    set_peft_model_state_dict(peft_model, load_file(str(path)))
    return peft_model.merge_and_unload()


# -- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    loss: str = "uls"  # or "distill"
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


def batches(examples: Sequence[Example], size: int, seed: int) -> Iterator[list[Example]]:
    """Endless shuffled batches (a fresh order each epoch)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [examples[j] for j in order[i : i + size]]


def train(
    model: nn.Module,
    examples: Sequence[Example],
    plans: Sequence[SkipPlan],
    config: TrainConfig,
    out_dir: str | Path,
    pad_id: int,
) -> Path:
    """Trains a LoRA adapter on `examples` under `plans` (one plan: the paper's per-speedup adapter;
    several: a random one per step, one adapter for the whole range). Checkpoints to out_dir and resumes
    from it; returns the adapter's path. Logs loss curves to out_dir/log.jsonl."""
    if config.loss not in LOSSES:
        raise ValueError(f"finetune.loss={config.loss!r} is unknown; use one of {', '.join(LOSSES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = add_lora(model, config.rank, config.alpha)
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
        state = torch.load(checkpoint, weights_only=False)
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log.info("resuming from step %d", start)
    loss_fn, rng = LOSSES[config.loss], random.Random(config.seed + start)
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
        loss = loss_fn(model, batch, plan)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        window.append(loss.item())
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
            save_adapter(model, adapter_path, plans, loss=config.loss, steps=step + 1)
            torch.save(
                {
                    "adapter": get_peft_model_state_dict(model),
                    "optimizer": optimizer.state_dict(),
                    "step": step + 1,
                },
                checkpoint,
            )
    model.eval()
    return adapter_path
