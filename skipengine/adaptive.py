"""ADEPT-style adaptive early exit: each token leaves the network at the first exit point where its
prediction is settled, in prefill and in decode, and its debt to deeper layers is paid at once.

A token that exits after layer e still owes every deeper layer l its K and V (later tokens attend to
them). The decoupled fill computes them from the exit hidden state h_e alone,
    K_l = rope(W_k,l · norm_l(h_e)),  V_l = W_v,l · norm_l(h_e)   for all l > e,
as one batched product over the deeper layers instead of a pass through their attention and MLP.
CALM's state propagation (copy h_e as the input of each deeper layer) gives the same K and V, computed
one layer after another: kv_fill="propagate" runs it that way so the two can be compared. kv_fill="exact"
is the reference: exited tokens keep running every layer for their K and V (no saving), only their
prediction is taken at the exit. kv_fill="translated" is the decoupled fill from the translated exit state
(skipengine.exits: translators) instead of the raw one. kv_fill="fitted" estimates each deeper layer's
input from the exit state and its translation, per dimension, with coefficients fit on full-depth traces
    x_l = a_el * h_e + b_el * T(h_e) + c_el,   K_l, V_l from x_l as above,
still one batched product: only the input differs per layer.

Work falls as tokens exit: once some token of the batch has left, a prefill layer runs its projections
and MLP on the gathered still-active tokens only (attention still sees every cached key); a decode layer
runs the output projection and MLP on the active rows only, and a decode step ends when its last row has
left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from skipengine.cache import StaticKVCache

if TYPE_CHECKING:
    from skipengine.control import SpeedupController

CRITERIA = ("classifier", "confidence", "fixed")  # fixed: every token leaves at the first exit point
KV_FILLS = ("decoupled", "propagate", "exact", "translated", "fitted")


@dataclass(frozen=True)
class AdaptivePlan:
    """Where tokens may exit and by which rule. Shares the static plan's interface where the engine
    needs it: every layer owns a cache slot (a token may run any depth)."""

    num_layers: int
    exit_layers: tuple[int, ...]  # a token may leave after these layers (0-based, never the last)
    threshold: float = 0.9
    criterion: str = "classifier"
    kv_fill: str = "decoupled"
    target_speedup: float = 1.0
    predicted_speedup: float = 1.0
    strategy: str = "adaptive"
    prefill: str = "adaptive"
    basis: str = "layers"
    # holds target_speedup step by step: the engine takes its threshold after every decode step
    controller: SpeedupController | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(
                f"skip.criterion={self.criterion!r} is unknown; use one of {', '.join(CRITERIA)}"
            )
        if self.kv_fill not in KV_FILLS:
            raise ValueError(f"skip.kv_fill={self.kv_fill!r} is unknown; use one of {', '.join(KV_FILLS)}")
        if not self.exit_layers or max(self.exit_layers) >= self.num_layers - 1 or min(self.exit_layers) < 0:
            raise ValueError(
                f"exit layers {self.exit_layers} must lie in [0, {self.num_layers - 2}] (not the last layer)"
            )

    @property
    def kept_layers(self) -> tuple[int, ...]:
        return tuple(range(self.num_layers))

    prefill_layers = kept_layers

    @property
    def num_kept(self) -> int:
        return self.num_layers

    @property
    def is_full_depth(self) -> bool:
        return False

    def __str__(self) -> str:
        return (
            f"adaptive target={self.target_speedup:g}x exits after {list(self.exit_layers)} "
            f"criterion={self.criterion} threshold={self.threshold:.4g} kv_fill={self.kv_fill}"
        )


def exit_layers_for(num_layers: int, every: int = 2, min_depth: int = 4) -> tuple[int, ...]:
    """Exit points after layers min_depth-1, min_depth-1+every, ... (0-based), before the last layer."""
    if every < 1 or min_depth < 1:
        raise ValueError(f"skip.exit_every={every} and skip.min_depth={min_depth} must be >= 1")
    layers = tuple(range(min_depth - 1, num_layers - 1, every))
    if not layers:
        raise ValueError(f"skip.min_depth={min_depth} leaves no exit point in {num_layers} layers")
    return layers


class ExitClassifiers(torch.nn.Module):
    """One small MLP per exit point: P(the prediction at this depth already equals the final one),
    from the final-normed hidden state. Costs ~D*64 multiply-adds, against D*V for an LM-head check.
    With translate, also one affine translator per exit point (D*D multiply-adds, paid only by the
    tokens that leave): the state a leaving token's prediction is read from (skipengine.exits).
    With fill_layers (the model's layer count), also the per-dimension coefficients of kv_fill="fitted"."""

    def __init__(
        self,
        hidden_size: int,
        exit_layers: tuple[int, ...],
        width: int = 64,
        translate: bool = False,
        fill_layers: int = 0,
    ):
        super().__init__()
        self.exit_layers = tuple(exit_layers)
        self.heads = torch.nn.ModuleDict(
            {
                str(layer): torch.nn.Sequential(
                    torch.nn.Linear(hidden_size, width), torch.nn.GELU(), torch.nn.Linear(width, 1)
                )
                for layer in self.exit_layers
            }
        )
        self.translators = None
        if translate:
            self.translators = torch.nn.ModuleDict(
                {str(layer): torch.nn.Linear(hidden_size, hidden_size) for layer in self.exit_layers}
            )
        # [E, L, 3, D]: (a, b, c) of x_l = a * h_e + b * T(h_e) + c, zero for l <= e; None without
        fill = torch.zeros(len(self.exit_layers), fill_layers, 3, hidden_size) if fill_layers else None
        self.register_buffer("fill", fill)

    def forward(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """normed: [N, D] -> logits [N]."""
        return self.heads[str(layer)](normed).squeeze(-1)

    def exit_state(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] after `layer` -> [N, D] the state the final norm and LM head read for a token
        leaving there: the translator's estimate of the last layer's output, or hidden itself."""
        return hidden if self.translators is None else self.translators[str(layer)](hidden)

    def deeper_inputs(
        self, exit_index: int | torch.Tensor, layers: range, raw: torch.Tensor, translated: torch.Tensor
    ) -> torch.Tensor:
        """Raw and translated exit states [N, D] -> [J, N, D] the estimated input of each of `layers`
        (kv_fill="fitted"). exit_index: the position of the exit layer in exit_layers, one for every
        token (prefill: they leave together) or per token [N] (decode: rows left at different layers)."""
        span = slice(layers.start, layers.stop)
        if isinstance(exit_index, int):
            coef = self.fill[exit_index, span][:, None]  # [J, 1, 3, D]
        else:
            coef = self.fill[exit_index, span].transpose(0, 1)  # [J, N, 3, D]
        return coef[:, :, 0] * raw + coef[:, :, 1] * translated + coef[:, :, 2]


def exit_scores(engine, criterion: str, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [N, D] after `layer` -> [N] in [0, 1]; a token exits where its score reaches the threshold."""
    ad = engine.adapter
    if criterion == "fixed":
        return torch.ones(hidden.shape[0], device=hidden.device)
    if criterion == "confidence":  # CALM's baseline: a full LM-head pass per check
        return ad.logits(hidden).float().softmax(-1).amax(-1)
    if engine.exit_classifiers is None:
        raise ValueError(
            "criterion=classifier needs exit classifiers: load them with skip.exit_classifiers=…"
        )
    normed = ad.norm(ad.final_norm, hidden)
    return torch.sigmoid(engine.exit_classifiers(layer, normed).float())


def exit_state(engine, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [N, D] of tokens leaving after `layer` -> the state their prediction is read from."""
    classifiers = engine.exit_classifiers
    return hidden if classifiers is None else classifiers.exit_state(layer, hidden)


def leaving(engine, plan: AdaptivePlan, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [N, D] of the tokens still deciding -> bool [N], True = exit now."""
    return exit_scores(engine, plan.criterion, layer, hidden) >= plan.threshold


def fill_deeper_kv(
    engine, plan: AdaptivePlan, layer: int, hidden, rows, cols, ropes, start, cache, fitted=None
) -> None:
    """Writes the K and V of layers > layer for exiting tokens (hidden [N, D] at batch rows `rows`,
    query columns `cols`) into the cache, computed from their exit hidden state. fitted (kv_fill="fitted"):
    (exit index, translated states [N, D]) of those tokens (ExitClassifiers.deeper_inputs)."""
    ad = engine.adapter
    deeper = range(layer + 1, ad.num_layers)
    sel = {kind: (cos[rows, cols], sin[rows, cols]) for kind, (cos, sin) in ropes.items()}  # [N, hd]
    if plan.kv_fill == "fitted":
        inputs = engine.exit_classifiers.deeper_inputs(fitted[0], deeper, hidden, fitted[1])  # [J, N, D]
        keys, values = ad.decoupled_kv(deeper, inputs, sel)
    elif plan.kv_fill in ("decoupled", "translated"):
        keys, values = ad.decoupled_kv(deeper, hidden, sel)  # [J, N, KV, hd] each, one batched product
    else:  # "propagate": the exit state as each deeper layer's input, one layer after another
        keys, values = [], []
        for i in deeper:
            kind = ad.layer_types[i]
            one = {kind: (sel[kind][0][None], sel[kind][1][None])}
            _, k, v = ad.qkv(i, ad.attention_input(i, hidden[None]), one)  # [1, KV, N, hd]
            keys.append(k[0].transpose(0, 1))
            values.append(v[0].transpose(0, 1))
        keys, values = torch.stack(keys), torch.stack(values)
    cache.write_many(deeper, rows, start + cols, keys, values)


def sparse_layer(engine, i: int, hidden, rows, cols, ropes, masks, start, cache) -> None:
    """Layer i for the tokens at (rows, cols) only, in place; attention reads every cached key."""
    ad = engine.adapter
    batch, seq, _ = hidden.shape
    x = hidden[rows, cols][None]  # [1, N, D]
    sel = {kind: (cos[rows, cols][None], sin[rows, cols][None]) for kind, (cos, sin) in ropes.items()}
    q, k, v = ad.qkv(i, ad.attention_input(i, x), sel)  # [1, H, N, hd], [1, KV, N, hd] x2
    slot = cache.slot[i]
    cache.keys[slot][rows, :, start + cols] = k[0].transpose(0, 1)
    cache.values[slot][rows, :, start + cols] = v[0].transpose(0, 1)
    queries = hidden.new_zeros(batch, ad.num_heads, seq, ad.head_dim)
    queries[rows, :, cols] = q[0].transpose(0, 1)
    end = start + seq
    attn = F.scaled_dot_product_attention(
        queries,
        cache.keys[slot][:batch, :, :end],
        cache.values[slot][:batch, :, :end],
        attn_mask=masks[ad.layer_types[i]],
        scale=ad.scale,
        enable_gqa=True,
    )  # [B, H, T, hd]
    x = ad.attention_residual(i, x, attn.transpose(1, 2)[rows, cols].reshape(1, len(rows), -1))
    hidden[rows, cols] = ad.mlp_residual(i, x)[0]


def adaptive_layers(engine, hidden, positions, pad, start: int, plan: AdaptivePlan, cache):
    """hidden [B, T, D] at cache columns [start, start+T) -> (exit hidden states [B, T, D], translated
    where the classifiers carry translators; layers run per token [B, T], the K/V fill not counted).
    Every token decides at every exit point until it leaves.

    Prefill (T > 1): an exiting token's deeper K/V is filled at once and later layers gather the tokens
    still computing. Decode (T = 1): an exited row's hidden state stays frozen and the layers that still
    run for other rows project it to its K/V as they go, which is the decoupled fill computed where the
    layer's weights are read anyway; only when the last row leaves are the remaining layers filled, for
    every row at once. Row counts stay on the host: no sync per layer."""
    ad = engine.adapter
    batch, seq, _ = hidden.shape
    ropes, masks = engine.layer_inputs(hidden, positions, pad, start, range(ad.num_layers))
    deciding = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
    computing = deciding.clone()  # differs from deciding only for kv_fill="exact"
    depth = torch.full((batch, seq), ad.num_layers, dtype=torch.long, device=hidden.device)
    n_deciding = n_computing = batch * seq
    active_rows = None  # decode: indices of the rows still computing, once some have left
    out = torch.empty_like(hidden)
    exits = set(plan.exit_layers)
    fitted = plan.kv_fill == "fitted"
    if fitted:  # the exit states and exit points the deeper layers' inputs are estimated from
        classifiers = engine.exit_classifiers
        raw = torch.empty_like(hidden)
        exit_index = torch.zeros(batch, seq, dtype=torch.long, device=hidden.device)
        frozen = None  # decode: (rows that have left, their exit index, raw and translated states)
    for i in range(ad.num_layers):
        if n_computing == 0:
            break
        if n_computing == batch * seq:
            hidden = engine.layer(i, hidden, ropes, masks, start, cache)
        elif seq == 1:
            if fitted:  # a row that left writes layer i's K/V from its estimated input to layer i
                left, index, left_raw, left_translated = frozen
                hidden[left, 0] = classifiers.deeper_inputs(
                    index, range(i, i + 1), left_raw, left_translated
                )[0]
            hidden = engine.layer(i, hidden, ropes, masks, start, cache, active=active_rows)
        else:
            rows, cols = computing.nonzero(as_tuple=True)
            sparse_layer(engine, i, hidden, rows, cols, ropes, masks, start, cache)
        if i in exits and n_deciding:
            rows, cols = deciding.nonzero(as_tuple=True)
            leave = leaving(engine, plan, i, hidden[rows, cols])
            rows, cols = rows[leave], cols[leave]
            if rows.numel():
                out[rows, cols] = exit_state(engine, i, hidden[rows, cols])
                if plan.kv_fill == "translated":  # the deeper K/V come from the translated state
                    hidden[rows, cols] = out[rows, cols]
                if fitted:
                    raw[rows, cols] = hidden[rows, cols]
                    exit_index[rows, cols] = k = classifiers.exit_layers.index(i)
                deciding[rows, cols] = False
                n_deciding -= rows.numel()
                if plan.kv_fill != "exact":
                    computing[rows, cols] = False
                    n_computing -= rows.numel()
                    depth[rows, cols] = i + 1
                    if seq > 1:
                        fit = (k, out[rows, cols]) if fitted else None
                        fill_deeper_kv(
                            engine, plan, i, hidden[rows, cols], rows, cols, ropes, start, cache, fit
                        )
                    elif n_computing:
                        active_rows = computing[:, 0].nonzero()[:, 0]
                        if fitted:  # gathered once per exit event, not per layer
                            left = (~computing[:, 0]).nonzero()[:, 0]
                            frozen = (left, exit_index[left, 0], raw[left, 0], out[left, 0])
                    else:  # every row has left: the layers below were not run, fill them for all
                        every = torch.arange(batch, device=hidden.device)
                        zero = torch.zeros_like(every)
                        # fitted: the frozen rows' hidden holds their last estimate, not the exit state
                        states, fit = (
                            (raw[:, 0], (exit_index[:, 0], out[:, 0])) if fitted else (hidden[:, 0], None)
                        )
                        fill_deeper_kv(engine, plan, i, states, every, zero, ropes, start, cache, fit)
    out[deciding] = hidden[deciding]
    return out, depth


@torch.inference_mode()
def exit_probabilities(
    engine, prompts: list[list[int]], exit_layers: tuple[int, ...], criterion: str = "classifier"
) -> torch.Tensor:
    """Exit scores [E, N] (exit_scores: classifier probabilities or CALM's LM-head confidence) for every
    token of `prompts` run at full depth."""
    ad, out = engine.adapter, []
    for ids in prompts:
        hidden = ad.embed(torch.tensor([ids], device=engine.device))
        positions = torch.arange(len(ids), device=engine.device)[None]
        pad = torch.zeros(1, dtype=torch.long, device=engine.device)
        ropes, masks = engine.layer_inputs(hidden, positions, pad, 0, range(ad.num_layers))
        cache = StaticKVCache((), 1, ad.num_kv_heads, 0, ad.head_dim, hidden.dtype, engine.device)
        per_exit = []
        for i in range(max(exit_layers) + 1):
            hidden = engine.layer(i, hidden, ropes, masks, 0, cache)
            if i in exit_layers:
                per_exit.append(exit_scores(engine, criterion, i, hidden[0]))
        out.append(torch.stack(per_exit))
    return torch.cat(out, dim=1).cpu()
