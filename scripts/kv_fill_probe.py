"""How close do the K/V filled for an exited token come to the exact ones, by fill rule?

python scripts/kv_fill_probe.py TRAIN_RUN VALID_RUN EXITS_FILE: full-depth hidden states of both runs'
prompts and outputs (128-token windows); errors reported on VALID_RUN; the per-dimension fill is the one
EXITS_FILE carries (jobs.train_exits fit it on TRAIN_RUN), the scalar one is fit here on TRAIN_RUN. For a
token leaving after layer e, the input x_j of a deeper layer j is estimated from its exit state h_e and
(where EXITS_FILE carries translators) its translated state T(h_e):
    raw         x_j = h_e                                      (ADEPT's decoupled fill)
    translated  x_j = T(h_e)
    scalar      x_j = h_e + a_ej (T(h_e) - h_e)                 a_ej: one number per (e, j)
    per-dim     x_j = a_ej * h_e + b_ej * T(h_e) + c_ej         per dimension (skip.kv_fill=fitted)
and the error is ||K_j(x) - K_j(true)||^2 / ||K_j(true)||^2 (same for V), averaged over the deeper layers
(rotary is a rotation, so it cancels out of the ratio). Prints one JSON line per exit point and fill.
"""

from __future__ import annotations

import json
import sys

import torch

from jobs.common import run_pairs, setup
from skipengine import load_model
from skipengine.exits import load_exit_classifiers
from skipengine.perplexity import windows


def run_windows(tokenizer, run_dir: str, max_windows: int) -> list[list[int]]:
    stream = []
    for prompt, generated in run_pairs(run_dir):
        stream += tokenizer(prompt + generated, add_special_tokens=False)["input_ids"]
    return windows(stream, 128, max_windows)


@torch.no_grad()
def all_states(model, chunks: list[list[int]]) -> torch.Tensor:
    """[L, N, D]: the input of every layer (after the embedding for layer 0) for every token."""
    per_layer = [[] for _ in range(model.config.num_hidden_layers)]
    for i in range(0, len(chunks), 8):
        out = model.model(input_ids=torch.tensor(chunks[i : i + 8]), output_hidden_states=True)
        for j in range(len(per_layer)):  # hidden_states[j]: the input of layer j (the last one is normed)
            per_layer[j].append(out.hidden_states[j].flatten(0, 1).float())
    return torch.stack([torch.cat(x) for x in per_layer])


def kv(model, j: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    attn = model.model.layers[j].self_attn
    normed = model.model.layers[j].input_layernorm(x)
    return normed @ attn.k_proj.weight.T, normed @ attn.v_proj.weight.T


def rel_err(estimate: torch.Tensor, true: torch.Tensor) -> float:
    return float(((estimate - true) ** 2).sum() / (true**2).sum())


def scalar_fit(h: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> float:
    """The least-squares a of target ~ h + a (t - h), all [N, D]."""
    delta = t - h
    return float((delta * (target - h)).sum() / (delta * delta).sum())


def fills(h: torch.Tensor, t: torch.Tensor, scalar: float, per_dim: torch.Tensor) -> dict[str, torch.Tensor]:
    """per_dim: [3, D], one (exit, layer) slice of fit_kv_fill's coefficients."""
    return {
        "raw": h,
        "translated": t,
        "scalar": h + scalar * (t - h),
        "per_dim": per_dim[0] * h + per_dim[1] * t + per_dim[2],
    }


def main(train_run: str, valid_run: str, exits_file: str, max_windows: int = 200) -> None:
    setup(2)
    model, tokenizer = load_model("smollm2-135m-instruct", "cpu", "float32")
    classifiers = load_exit_classifiers(exits_file, model)
    if classifiers.fill is None:
        raise SystemExit(
            f"{exits_file} carries no translators and K/V fill (jobs.train_exits translate=true)"
        )
    per_dim = classifiers.fill  # [E, L, 3, D], as jobs.train_exits fit it on TRAIN_RUN
    train = all_states(model, run_windows(tokenizer, train_run, max_windows))
    valid = all_states(model, run_windows(tokenizer, valid_run, max_windows))
    layers = model.config.num_hidden_layers
    for index, e in enumerate(classifiers.exit_layers):
        translate = classifiers.translators[str(e)]
        h_fit, h_val = train[e + 1], valid[e + 1]  # after layer e
        t_fit, t_val = translate(h_fit), translate(h_val)
        errors: dict[str, list] = {}
        for j in range(e + 1, layers):
            true_k, true_v = kv(model, j, valid[j])
            for name, x in fills(h_val, t_val, scalar_fit(h_fit, t_fit, train[j]), per_dim[index, j]).items():
                k, v = kv(model, j, x)
                errors.setdefault(name, []).append((rel_err(k, true_k), rel_err(v, true_v)))
        for name, pairs in errors.items():
            k_err, v_err = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
            print(json.dumps({"exit": e, "fill": name, "k_err": round(k_err, 4), "v_err": round(v_err, 4)}))
        sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
