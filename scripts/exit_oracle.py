"""How far exit decisions could go on SmolLM2, against what the exit classifiers do (README, ADEPT).

On full-depth traces of a finished run's text (prompt + output, 128-token windows), every token has a
prediction at each exit point. The oracle exits each token at the first exit point whose prediction
already equals the full model's: no prediction changes, and its speedup is the most any exit rule can
reach without changing one; past it, the oracle forces out the tokens that change the fewest
predictions. Each criterion (the exit classifiers, CALM's LM-head confidence and its state saturation)
exits at the first point whose score reaches the threshold that meets each target on these same traces
(so each is seen at its best). Reported for each: the share of tokens whose prediction differs from the
base full model's. All traces are idealized: every earlier token ran at full depth.

python scripts/exit_oracle.py RUN_DIR CLASSIFIERS [ADAPTER]
  e.g. runs/teacher/aclsum-validation-full adapters/smollm2-summarize-adaptive-x1.25-exits.safetensors \
       adapters/smollm2-summarize-adaptive-x1.25.safetensors
"""

import json
import sys

import torch
import torch.nn.functional as F

from jobs.common import run_pairs
from skipengine import load_model
from skipengine.adapters import adapter_for
from skipengine.adaptive import AdaptivePlan
from skipengine.control import first_exits, kv_fraction, threshold_for_target, token_costs
from skipengine.exits import exit_metadata, load_exit_classifiers
from skipengine.lora import load_adapter
from skipengine.perplexity import windows

TARGETS = (1.25, 1.5, 2.0)


@torch.no_grad()
def traces(model, chunks, exit_layers, classifiers=None, batch_size=8):
    """(per-exit argmax [E, N], full-depth argmax [N], final-normed hidden states per exit [E, N, D],
    CALM's LM-head confidence per exit [E, N], CALM's state saturation per exit [E, N]: the cosine of the
    exit state with its layer's input). The argmax and the confidence are read from the state a leaving
    token takes: translated when the classifiers carry translators."""
    inner, head = model.model, model.lm_head
    preds, finals, normed, confidence, cosine = [], [], [], [], []
    for i in range(0, len(chunks), batch_size):
        out = inner(input_ids=torch.tensor(chunks[i : i + batch_size]), output_hidden_states=True)
        finals.append(head(out.last_hidden_state).argmax(-1).flatten())
        raw = [out.hidden_states[e + 1].flatten(0, 1) for e in exit_layers]  # [N, D] each
        states = [inner.norm(h) for h in raw]
        leaves_with = states
        if classifiers is not None and classifiers.translators is not None:
            pairs = zip(exit_layers, raw, strict=True)
            leaves_with = [inner.norm(classifiers.exit_state(e, h)) for e, h in pairs]
        probs = [head(s).softmax(-1).max(-1) for s in leaves_with]
        preds.append(torch.stack([p.indices for p in probs]))
        confidence.append(torch.stack([p.values for p in probs]))
        hs = out.hidden_states  # [e + 1]: after layer e
        cosine.append(torch.stack([F.cosine_similarity(hs[e], hs[e + 1], -1).flatten() for e in exit_layers]))
        normed.append(torch.stack(states))
    per_exit = (torch.cat(x, 1) for x in (preds, normed, confidence, cosine))
    preds, normed, confidence, cosine = per_exit
    return preds, torch.cat(finals), normed, confidence, cosine


def taken(first, preds, finals) -> torch.Tensor:
    """The prediction [N] each token leaves with: its first exit point's, or the final one (index E)."""
    return torch.cat([preds, finals[None]])[first, torch.arange(len(first))]


def outcome(first, preds, finals, base_finals, exit_layers, num_layers, kv):
    """(layer speedup, share of tokens whose prediction differs from the base full model's)."""
    speedup = num_layers / token_costs(first, exit_layers, num_layers, kv).mean().item()
    return speedup, (taken(first, preds, finals) != base_finals).float().mean().item()


def exit_shares(first, exit_layers) -> dict[str, float]:
    """Share of tokens leaving at each exit point ("full": never)."""
    counts = torch.bincount(first, minlength=len(exit_layers) + 1).float() / len(first)
    return dict(zip([*map(str, exit_layers), "full"], counts.tolist(), strict=True))


def oracle_at(first, settled, changed, target, exit_layers, num_layers, kv) -> torch.Tensor:
    """The oracle's exits [N] pushed to `target` while changing the fewest predictions: tokens are forced
    out at the first exit point, first those whose prediction has changed anyway (free), then those
    that save the most. changed: bool [N], the oracle's taken prediction differs from the base's."""
    cost = token_costs(first, exit_layers, num_layers, kv)
    excess = cost.sum().item() - len(first) * num_layers / target
    saving = cost - token_costs(torch.zeros_like(first), exit_layers, num_layers, kv)
    candidates = (~settled[0] & (saving > 0)).nonzero().squeeze(1)
    order = sorted(candidates.tolist(), key=lambda t: (not changed[t], -saving[t].item()))
    forced = first.clone()
    for token in order:
        if excess <= 0:
            break
        forced[token] = 0
        excess -= saving[token].item()
    return forced


def main(run_dir: str, classifiers_path: str, adapter: str | None) -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m-instruct", "cpu", "float32")
    stream = []
    for prompt, generated in run_pairs(run_dir):
        stream += tokenizer(prompt + generated, add_special_tokens=False)["input_ids"]
    chunks = windows(stream, 128, len(stream) // 128)
    exit_layers = tuple(json.loads(exit_metadata(classifiers_path)["exit_layers"]))
    num_layers = model.config.num_hidden_layers
    kv = kv_fraction(adapter_for(model, pack=False))
    base_finals = traces(model, chunks, exit_layers)[1]
    if adapter:
        model = load_adapter(model, adapter, AdaptivePlan(num_layers, exit_layers))
    classifiers = load_exit_classifiers(classifiers_path, model, adapter)
    preds, finals, normed, confidence, cosine = traces(model, chunks, exit_layers, classifiers)
    criteria = {
        "classifiers": torch.stack([classifiers(e, normed[k]).sigmoid() for k, e in enumerate(exit_layers)]),
        "confidence (CALM)": confidence,
        "state cosine (CALM)": cosine,
    }
    settled = preds == base_finals  # [E, N]: this exit point already predicts the full model's token
    report = {
        "tokens": len(base_finals),
        "adapter": adapter,
        "translators": classifiers.translators is not None,
        "full_depth_differs": (finals != base_finals).float().mean().item(),
        "settled_share": {e: settled[k].float().mean().item() for k, e in enumerate(exit_layers)},
    }
    oracle = first_exits(settled)
    speedup, changed = outcome(oracle, preds, finals, base_finals, exit_layers, num_layers, kv)
    report["oracle"] = {"speedup": speedup, "changed": changed}
    oracle_changed = taken(oracle, preds, finals) != base_finals
    for target in TARGETS:
        forced = oracle_at(oracle, settled, oracle_changed, target, exit_layers, num_layers, kv)
        speedup, changed = outcome(forced, preds, finals, base_finals, exit_layers, num_layers, kv)
        report[f"x{target:g}"] = {"oracle": {"speedup": speedup, "changed": changed}}
        for name, scores in criteria.items():
            threshold, _ = threshold_for_target(scores, exit_layers, num_layers, target, kv)
            first = first_exits(scores >= threshold)
            speedup, changed = outcome(first, preds, finals, base_finals, exit_layers, num_layers, kv)
            report[f"x{target:g}"][name] = {
                "threshold": threshold,
                "speedup": speedup,
                "changed": changed,
                "exit_share": exit_shares(first, exit_layers),
            }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
