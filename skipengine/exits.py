"""Exit classifiers for adaptive early exit: trained from full-depth traces of unlabeled text, saved as a
small safetensors file tied to the base model.

Label of a token at exit point e: the prediction from its hidden state after layer e (through the final
norm and the LM head) already equals the full-depth prediction. The classifier sees only the final-normed
hidden state, so the decision costs a tiny MLP instead of an LM-head pass.

Classifiers read the hidden states of the model they were trained on: trained on a model with an
exit-aware adapter merged (jobs.finetune strategy=adaptive), the file records that adapter, and loading
refuses any other (or none).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from skipengine.adaptive import ExitClassifiers
from skipengine.control import layers_cost
from skipengine.lora import adapter_id, base_model, fingerprint

log = logging.getLogger(__name__)
FORMAT = "skipengine-exits-1"


@torch.no_grad()
def exit_traces(
    model: nn.Module, token_windows: Sequence[Sequence[int]], exit_layers: Sequence[int], batch_size: int = 8
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per exit layer: (final-normed hidden states [N, D], labels [N] = prediction already final)."""
    hf = base_model(model)
    inner = hf.model
    feats: dict[int, list] = {e: [] for e in exit_layers}
    labels: dict[int, list] = {e: [] for e in exit_layers}
    for i in range(0, len(token_windows), batch_size):
        ids = torch.tensor([list(w) for w in token_windows[i : i + batch_size]])
        out = inner(input_ids=ids, output_hidden_states=True)
        final = hf.lm_head(out.last_hidden_state).argmax(-1).flatten()  # [B*T]
        for e in exit_layers:
            normed = inner.norm(out.hidden_states[e + 1]).flatten(0, 1)  # after layer e: [B*T, D]
            feats[e].append(normed.float())
            labels[e].append((hf.lm_head(normed).argmax(-1) == final).float())
    return {e: (torch.cat(feats[e]), torch.cat(labels[e])) for e in exit_layers}


def train_exit_classifiers(
    traces: dict[int, tuple[torch.Tensor, torch.Tensor]],
    hidden_size: int,
    steps: int = 300,
    lr: float = 3e-3,
    width: int = 64,
    seed: int = 0,
) -> tuple[ExitClassifiers, dict]:
    """(classifiers, per-exit-layer stats: positive rate and training accuracy) from exit_traces."""
    torch.manual_seed(seed)
    classifiers = ExitClassifiers(hidden_size, tuple(traces), width)
    optimizer = torch.optim.Adam(classifiers.parameters(), lr=lr)
    for step in range(steps):
        loss = sum(
            F.binary_cross_entropy_with_logits(classifiers(e, x), y) for e, (x, y) in traces.items()
        ) / len(traces)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            log.info("exit classifiers step %d/%d loss %.4f", step + 1, steps, loss.item())
    classifiers.eval()
    with torch.no_grad():
        stats = {
            e: {
                "tokens": len(y),
                "already_final": float(y.mean()),
                "accuracy": float(((classifiers(e, x) > 0).float() == y).float().mean()),
            }
            for e, (x, y) in traces.items()
        }
    return classifiers, stats


def oracle_speedup(traces: dict[int, tuple[torch.Tensor, torch.Tensor]], num_layers: int, kv: float) -> float:
    """The most any exit rule reaches on these traces without changing a prediction: every token leaves
    at its first exit point whose prediction is already final (K/V fills priced at kv layers each)."""
    labels = torch.stack([y for _, y in traces.values()])  # [E, N]
    return num_layers / layers_cost(labels, tuple(traces), num_layers, 1.0, kv)


def save_exit_classifiers(
    classifiers: ExitClassifiers, path: str | Path, model: nn.Module, adapter: str | None = None, **info
) -> Path:
    """`adapter`: the adapter file merged into `model` while the classifiers trained, if any."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = classifiers.heads[str(classifiers.exit_layers[0])]
    metadata = {
        "format": FORMAT,
        "base_fingerprint": fingerprint(model),
        "exit_layers": json.dumps(list(classifiers.exit_layers)),
        "width": str(first[0].out_features),
        # relative to this file, so the pair can move together (and actors resolve it anywhere)
        "adapter": os.path.relpath(adapter, path.parent) if adapter else "",
        "adapter_id": adapter_id(adapter) if adapter else "",
        "info": json.dumps(info),
    }
    state = {k: v.detach().contiguous() for k, v in classifiers.state_dict().items()}
    save_file(state, path, metadata=metadata)
    return path


def exit_metadata(path: str | Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"skip.exit_classifiers={str(path)!r} is not a skipengine exit-classifier file")
    return meta


def classifier_adapter(path: str | Path) -> str | None:
    """The adapter file the classifiers were trained with, or None."""
    recorded = exit_metadata(path).get("adapter")
    return str(Path(path).parent / recorded) if recorded else None


def load_exit_classifiers(path: str | Path, model: nn.Module, adapter: str | None = None) -> ExitClassifiers:
    """The classifiers at `path` for `model` with `adapter` merged (None: the base model); refuses a file
    trained on another base model or with another adapter."""
    meta = exit_metadata(path)
    trained_with = meta.get("adapter_id") or None
    if trained_with != (adapter_id(adapter) if adapter else None):
        raise ValueError(
            f"skip.exit_classifiers={str(path)!r} were trained on the model with adapter "
            f"{meta.get('adapter') or 'none'}, but this run uses {adapter or 'none'}; set skip.adapter to "
            "theirs (skip.adapter=auto does) or train classifiers for it (jobs.train_exits adapter=...)"
        )
    if meta["base_fingerprint"] != fingerprint(model):
        raise ValueError(
            f"skip.exit_classifiers={str(path)!r} was trained on a different base model; train them for this "
            "model (python -m jobs.train_exits)"
        )
    hidden_size = base_model(model).config.hidden_size
    classifiers = ExitClassifiers(hidden_size, tuple(json.loads(meta["exit_layers"])), int(meta["width"]))
    classifiers.load_state_dict(load_file(str(path)))
    param = next(base_model(model).parameters())
    return classifiers.to(param.device, param.dtype).eval()
