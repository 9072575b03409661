"""Exit classifiers for adaptive early exit: trained from full-depth traces of unlabeled text, saved as a
small safetensors file tied to the base model.

Label of a token at exit point e: the prediction from its hidden state after layer e (through the final
norm and the LM head) already equals the full-depth prediction. The classifier sees only the final-normed
hidden state, so the decision costs a tiny MLP instead of an LM-head pass.

Optionally (translate=True) each exit point also gets a translator: an affine map, fit by least squares on
the same traces, from the exit state to the last layer's output. A leaving token's prediction is read
from the translated state, and the labels are computed from it. The raw state still fills the deeper K/V,
unless kv_fill="fitted" (fit_kv_fill): then each deeper layer's input is estimated from both states.

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
Translators = dict[int, tuple[torch.Tensor, torch.Tensor]]  # exit layer -> (weight [D, D], bias [D])


@torch.no_grad()
def exit_traces(
    model: nn.Module,
    token_windows: Sequence[Sequence[int]],
    exit_layers: Sequence[int],
    batch_size: int = 8,
    translate: bool = False,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], Translators | None]:
    """(per exit layer: (final-normed hidden states [N, D], labels [N] = prediction already final),
    translators or None). With translate, each exit point first gets its translator (fit_translators) and
    the label is the prediction from the translated state, the one a token leaving there will take."""
    hf = base_model(model)
    inner = hf.model
    states: dict[int, list] = {e: [] for e in exit_layers}
    last, final = [], []
    captured = {}
    # the last layer's output before the final norm: what a translator estimates
    hook = inner.norm.register_forward_hook(lambda _m, args, _out: captured.update(x=args[0]))
    try:
        for i in range(0, len(token_windows), batch_size):
            ids = torch.tensor([list(w) for w in token_windows[i : i + batch_size]], device=hf.device)
            out = inner(input_ids=ids, output_hidden_states=True)
            last.append(captured["x"].flatten(0, 1).float())
            final.append(hf.lm_head(out.last_hidden_state).argmax(-1).flatten())  # [B*T]
            for e in exit_layers:
                states[e].append(out.hidden_states[e + 1].flatten(0, 1).float())  # after layer e: [B*T, D]
    finally:
        hook.remove()
    states = {e: torch.cat(v) for e, v in states.items()}
    final = torch.cat(final)
    translators = fit_translators(states, torch.cat(last)) if translate else None
    dtype = next(hf.parameters()).dtype
    traces = {}
    for e, hidden in states.items():
        leaves_with = hidden @ translators[e][0] + translators[e][1] if translators else hidden
        predicted = torch.cat(
            [
                hf.lm_head(inner.norm(chunk.to(dtype))).argmax(-1)
                for chunk in leaves_with.split(1024)  # [1024, V] logits at a time
            ]
        )
        traces[e] = (inner.norm(hidden.to(dtype)).float(), (predicted == final).float())
    return traces, translators


def fit_translators(states: dict[int, torch.Tensor], last: torch.Tensor, ridge: float = 1e-4) -> Translators:
    """Per exit layer, the affine map (weight [D, D], bias [D]) that best predicts the last layer's output
    [N, D] from the exit state [N, D]: least squares, ridge relative to the mean feature energy. A token
    leaving early takes its prediction from this estimate instead of its raw state (a tuned lens): on
    SmolLM2's ACLSum train traces the prediction after layer 5 then equals the final one for 39.5% of
    tokens instead of 4.6% (README, ADEPT)."""
    out = {}
    target = last.double()
    for e, hidden in states.items():
        x = torch.cat([hidden.double(), torch.ones(len(hidden), 1, dtype=torch.double)], 1)  # [N, D+1]
        gram = x.T @ x
        gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        solved = torch.linalg.solve(gram, x.T @ target)  # [D+1, D]
        out[e] = (solved[:-1].float(), solved[-1].float())
    return out


@torch.no_grad()
def fit_kv_fill(
    model: nn.Module,
    token_windows: Sequence[Sequence[int]],
    translators: Translators,
    batch_size: int = 8,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """[E, L, 3, D], the coefficients of kv_fill="fitted": per exit layer e (translators' order), deeper
    layer l and dimension, the least-squares (a, b, c) of x_l ~ a * h_e + b * T(h_e) + c over full-depth
    traces, x_l being layer l's input. The raw fill, (1, 0, 0), is one candidate: on the traces the fit
    is never further from x_l. A second pass over the windows, since T is fit on the first."""
    hf = base_model(model)
    exits, num_layers, dim = tuple(translators), hf.config.num_hidden_layers, hf.config.hidden_size
    gram = torch.zeros(len(exits), dim, 3, 3, dtype=torch.double)  # shared by every deeper layer
    rhs = torch.zeros(len(exits), num_layers, dim, 3, dtype=torch.double)
    for i in range(0, len(token_windows), batch_size):
        ids = torch.tensor([list(w) for w in token_windows[i : i + batch_size]], device=hf.device)
        states = hf.model(input_ids=ids, output_hidden_states=True).hidden_states
        inputs = [s.flatten(0, 1).double().cpu() for s in states[:num_layers]]  # layer l's input: [N, D]
        for k, e in enumerate(exits):
            weight, bias = translators[e]
            h = inputs[e + 1]  # after layer e
            x = torch.stack([h, h @ weight.double() + bias.double(), torch.ones_like(h)], -1)  # [N, D, 3]
            gram[k] += torch.einsum("ndi,ndj->dij", x, x)
            for layer in range(e + 1, num_layers):
                rhs[k, layer] += torch.einsum("ndi,nd->di", x, inputs[layer])
    gram += ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(3, dtype=gram.dtype)
    coef = torch.zeros(len(exits), num_layers, 3, dim)
    for k, e in enumerate(exits):
        solved = torch.linalg.solve(gram[k][None], rhs[k, e + 1 :, :, :, None])[..., 0]  # [J, D, 3]
        coef[k, e + 1 :] = solved.transpose(1, 2).float()
    return coef


def train_exit_classifiers(
    traces: dict[int, tuple[torch.Tensor, torch.Tensor]],
    hidden_size: int,
    steps: int = 300,
    lr: float = 3e-3,
    width: int = 64,
    seed: int = 0,
    translators: Translators | None = None,
    fill: torch.Tensor | None = None,
) -> tuple[ExitClassifiers, dict]:
    """(classifiers, per-exit-layer stats: positive rate and training accuracy) from exit_traces; the
    translators exit_traces fit and the fit_kv_fill coefficients, if any, ride along in the module."""
    torch.manual_seed(seed)
    classifiers = ExitClassifiers(
        hidden_size,
        tuple(traces),
        width,
        translate=translators is not None,
        fill_layers=0 if fill is None else fill.shape[1],
    )
    with torch.no_grad():
        for e, (weight, bias) in (translators or {}).items():
            classifiers.translators[str(e)].weight.copy_(weight.T)  # Linear stores [out, in]
            classifiers.translators[str(e)].bias.copy_(bias)
        if fill is not None:
            classifiers.fill.copy_(fill)
    optimizer = torch.optim.Adam(classifiers.heads.parameters(), lr=lr)  # translators stay as fit
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
        "translate": "1" if classifiers.translators is not None else "0",
        "fill_layers": str(0 if classifiers.fill is None else classifiers.fill.shape[1]),
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
    exits = tuple(json.loads(meta["exit_layers"]))
    classifiers = ExitClassifiers(
        hidden_size,
        exits,
        int(meta["width"]),
        translate=meta.get("translate") == "1",
        fill_layers=int(meta.get("fill_layers", 0)),
    )
    classifiers.load_state_dict(load_file(str(path)))
    param = next(base_model(model).parameters())
    return classifiers.to(param.device, param.dtype).eval()
