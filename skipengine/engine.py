"""The skip-enabled batched decoder.

A left-padded batch runs prefill (every layer, or the plan's layers) and then decode through the plan's
kept layers, over a static KV cache that holds slots only for the kept layers. Rows stop on EOS, a stop
string, their token limit or the context window; a finished row leaves the batch, so it stops costing
compute. Architectures without a native adapter get the same plan through HF generate (`generic`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skipengine import generic
from skipengine.adapters import adapter_for, has_adapter
from skipengine.adaptive import AdaptivePlan, adaptive_layers
from skipengine.cache import StaticKVCache
from skipengine.inputs import encode_prompt
from skipengine.outputs import GenerationOutput, GenerationStats, RowResult
from skipengine.plan import SkipPlan, full_plan
from skipengine.sampling import Sampler, SamplingParams, find_stop


def attention_mask(
    pad: torch.Tensor, query_cols: torch.Tensor, key_len: int, window: int | None
) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, key_len], True = attend.

    pad: [B] left-padding per row; query_cols: [Tq] cache columns of the queries. Causal, no padded keys,
    optional sliding window. A padded query attends to itself only, so its row never softmaxes over
    nothing (its output is never read).
    """
    keys = torch.arange(key_len, device=pad.device)
    causal = keys[None, :] <= query_cols[:, None]  # [Tq, K]
    if window is not None:
        causal &= keys[None, :] > query_cols[:, None] - window
    real_key = keys[None, None, :] >= pad[:, None, None]  # [B, 1, K]
    allowed = causal[None] & real_key | (keys[None, :] == query_cols[:, None])[None]
    return allowed[:, None]


class Engine:
    """Batched generation under a SkipPlan. Construct once per model; call generate() per batch."""

    def __init__(self, model: nn.Module, tokenizer, max_context: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.adapter = adapter_for(model) if has_adapter(model) else None
        if self.adapter is not None:
            self.num_layers = self.adapter.num_layers
            model_context = self.adapter.max_positions
        else:
            self.num_layers = generic.num_decoder_layers(model)
            model_context = generic.max_positions(model)
        self.max_context = min(max_context or model_context, model_context)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(model, tokenizer, self.eos_ids)
        self.exit_classifiers = None  # skipengine.exits: for AdaptivePlan(criterion="classifier")

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        plan: SkipPlan | None = None,
        sampling: SamplingParams | None = None,
        on_too_long: str = "error",
        lengths: Sequence[int] | None = None,
    ) -> GenerationOutput:
        """One RowResult per prompt, in order. A bad prompt fails its own row (error set), never the batch.

        lengths: each row generates exactly this many tokens (at least its first), EOS and stop strings
        ignored. A timing reference that does another run's work: full depth timed on the rows a plan
        generated (a row the plan failed, 0 tokens, fails here too), so that a plan or an adapter writing
        shorter or longer text does not pass for a faster or slower one."""
        plan = plan or full_plan(self.num_layers)
        sampling = sampling or SamplingParams()
        if lengths is not None:
            if len(lengths) != len(prompts) or min(lengths, default=0) < 0:
                raise ValueError("lengths needs one count >= 0 per prompt")
            lengths = [max(1, n) for n in lengths]
            sampling = dataclasses.replace(sampling, max_new_tokens=max(lengths), ignore_eos=True, stop=())
        if isinstance(plan, AdaptivePlan) and self.adapter is None:
            raise ValueError(f"skip=adaptive needs a native adapter; {type(self.model).__name__} has none")
        if plan.num_layers != self.num_layers:
            raise ValueError(f"the plan is for {plan.num_layers} layers; this model has {self.num_layers}")
        if isinstance(prompts, str):
            raise TypeError("generate() takes a batch: a list of prompts, not one str")

        encoded = [
            encode_prompt(p, self.tokenizer, self.max_context, sampling.max_new_tokens, on_too_long)
            for p in prompts
        ]
        rows = [RowResult(error=e.error, truncated=e.truncated) for e in encoded]
        good = [i for i, e in enumerate(encoded) if e.ids is not None]
        stats = GenerationStats(num_rows=len(rows), num_errors=len(rows) - len(good))
        stats.predicted_speedup = plan.predicted_speedup
        if not good:
            return GenerationOutput(rows, stats)

        ids = [encoded[i].ids for i in good]
        limits = [sampling.max_new_tokens if lengths is None else lengths[i] for i in good]
        start = time.perf_counter()
        if self.adapter is not None:
            generated, reasons, finished_at = self._generate_native(ids, plan, sampling, stats, limits)
        else:
            generated, reasons = generic.generate(
                self.model, ids, plan, sampling, self.tokenizer, self.pad_id, self.eos_ids, stats
            )
            finished_at = [time.perf_counter()] * len(ids)
        for i, prompt_ids, new_ids, reason, end in zip(
            good, ids, generated, reasons, finished_at, strict=True
        ):
            row = rows[i]
            row.token_ids, row.finish_reason, row.latency_s = new_ids, reason, end - start
            row.num_input_tokens, row.num_generated_tokens = len(prompt_ids), len(new_ids)
            row.text = self.text(new_ids, sampling.stop)
        stats.num_input_tokens = sum(len(x) for x in ids)
        stats.num_generated_tokens = sum(len(g) for g in generated)
        return GenerationOutput(rows, stats)

    @torch.inference_mode()
    def score(self, prompt: list[int], continuation: list[int], plan: SkipPlan | None = None) -> torch.Tensor:
        """Logits [len(continuation), vocab] that predict each continuation token, computed as generation
        computes them: the prompt through the plan's prefill layers, then each continuation token fed in
        turn through the kept layers over the KV cache (teacher forcing). For perplexity under a plan."""
        if self.adapter is None:
            raise ValueError(f"score() needs a native adapter; {type(self.model).__name__} has none")
        if not prompt or not continuation:
            raise ValueError("score() needs a non-empty prompt and continuation")
        plan = plan or full_plan(self.num_layers)
        ad, dev = self.adapter, self.device
        total = len(prompt) + len(continuation)
        cache = StaticKVCache(plan.kept_layers, 1, ad.num_kv_heads, total, ad.head_dim, self.dtype, dev)
        pad = torch.zeros(1, dtype=torch.long, device=dev)
        ids = torch.tensor([prompt], device=dev)
        positions = torch.arange(len(prompt), device=dev)[None]
        hidden = self._layers(ad.embed(ids), positions, pad, 0, plan.prefill_layers, cache)
        logits = [ad.logits(hidden[:, -1])]
        for col, token in enumerate(continuation[:-1], start=len(prompt)):
            ids = torch.tensor([[token]], device=dev)
            hidden = self._layers(
                ad.embed(ids), torch.tensor([[col]], device=dev), pad, col, plan.kept_layers, cache
            )
            logits.append(ad.logits(hidden[:, -1]))
        return torch.cat(logits)

    # -- native path -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate_native(
        self,
        prompts: list[list[int]],
        plan: SkipPlan,
        sampling: SamplingParams,
        stats: GenerationStats,
        max_new: list[int],
    ) -> tuple[list[list[int]], list[str], list[float]]:
        """New tokens, finish reason and finish time per prompt; row i generates at most max_new[i]."""
        ad, dev = self.adapter, self.device
        batch = len(prompts)
        lengths = [len(p) for p in prompts]
        prompt_len = max(lengths)
        # a row may generate up to its token limit or the end of the context window, whichever is first
        limits = [min(m, self.max_context - n) for m, n in zip(max_new, lengths, strict=True)]
        cache = StaticKVCache(
            plan.kept_layers, batch, ad.num_kv_heads, prompt_len + max(limits), ad.head_dim, self.dtype, dev
        )
        stats.kv_cache_bytes = cache.nbytes

        input_ids = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, prompt_len - len(p) :] = torch.tensor(p)
        input_ids = input_ids.to(dev)
        pad = torch.tensor([prompt_len - n for n in lengths], device=dev)  # [B]
        sampler = Sampler(sampling, prompts, dev)

        adaptive = isinstance(plan, AdaptivePlan)
        controller = plan.controller if adaptive else None
        if controller is not None:  # carries on from the last batch
            plan = dataclasses.replace(plan, threshold=controller.threshold)
        t0 = time.perf_counter()
        cols = torch.arange(prompt_len, device=dev)
        positions = (cols[None, :] - pad[:, None]).clamp(min=0)  # [B, T]
        depth = [0]
        hidden = self._forward(ad.embed(input_ids), positions, pad, 0, plan, "prefill", cache, depth)
        tokens = sampler(ad.logits(hidden[:, -1]))  # [B]
        stats.prefill_s = time.perf_counter() - t0
        stats.prefill_layers_per_token = (
            depth[0] / sum(lengths) if adaptive else float(len(plan.prefill_layers))
        )

        generated: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * batch
        finished_at = [0.0] * batch
        active = list(range(batch))  # original row index of each live cache row
        col = prompt_len  # the cache column the next fed token is written to
        t0, depth = time.perf_counter(), [0]
        thresholds, depth_seen = [], 0  # the controller's thresholds, one per decode step
        while True:
            survivors = []
            for slot, (r, tok) in enumerate(zip(active, tokens.tolist(), strict=True)):
                generated[r].append(tok)
                reason = self._finished(generated[r], limits[r], sampling)
                if reason is None:
                    survivors.append(slot)
                else:
                    reasons[r], finished_at[r] = reason, time.perf_counter()
            if not survivors:
                break
            if len(survivors) < len(active):
                keep = torch.tensor(survivors, device=dev)
                cache.compact(keep, col)
                tokens, pad = tokens[keep], pad[keep]
                active = [active[s] for s in survivors]
                sampler.keep(survivors)
            positions = (col - pad)[:, None]  # [n, 1]
            hidden = self._forward(
                ad.embed(tokens[:, None]), positions, pad, col, plan, "decode", cache, depth
            )
            tokens = sampler(ad.logits(hidden[:, -1]))
            col += 1
            stats.decode_steps += 1
            stats.decode_row_steps += len(active)
            if controller is not None:
                thresholds.append(plan.threshold)
                step_layers, depth_seen = depth[0] - depth_seen, depth[0]
                plan = dataclasses.replace(plan, threshold=controller.step(step_layers, len(active), batch))
        stats.decode_s = time.perf_counter() - t0
        stats.decode_layers_per_token = (
            depth[0] / max(1, stats.decode_row_steps) if adaptive else float(plan.num_kept)
        )
        if adaptive:
            stats.exit_threshold = sum(thresholds) / len(thresholds) if thresholds else plan.threshold
        return generated, reasons, finished_at

    def _layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        pad: torch.Tensor,
        start: int,
        layers: Sequence[int],
        cache: StaticKVCache,
    ) -> torch.Tensor:
        """hidden: [B, T, hidden] at cache columns [start, start+T) through `layers`; the K/V of layers
        the cache owns are written at those columns."""
        ropes, masks = self.layer_inputs(hidden, positions, pad, start, layers)
        for i in layers:
            hidden = self.layer(i, hidden, ropes, masks, start, cache)
        return hidden

    def layer_inputs(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        pad: torch.Tensor,
        start: int,
        layers: Sequence[int],
    ) -> tuple[dict, dict]:
        """Rotary tables and attention masks per layer type, shared by every layer of a forward."""
        ad = self.adapter
        seq = hidden.shape[1]
        query_cols = torch.arange(start, start + seq, device=hidden.device)
        masks = {
            kind: attention_mask(pad, query_cols, start + seq, window)
            for kind, window in ad.windows.items()
            if kind in {ad.layer_types[i] for i in layers}
        }
        return ad.rope(hidden, positions), masks

    def layer(
        self,
        i: int,
        hidden: torch.Tensor,
        ropes: dict,
        masks: dict,
        start: int,
        cache: StaticKVCache,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder layer i on hidden [B, T, D]. With active [n] (adaptive decode, T = 1: the rows that
        have not exited), every row still writes its K/V, an exited row's from its frozen exit state
        (which is the decoupled fill, at no extra product), but only the active rows run the output
        projection and the MLP; the others keep their hidden state."""
        ad = self.adapter
        batch, seq, _ = hidden.shape
        x = ad.attention_input(i, hidden)
        q, k, v = ad.qkv(i, x, ropes)  # [B, H, T, D], [B, KV, T, D] x2
        if cache.owns(i):
            k, v = cache.update(i, start, k, v)  # [B, KV, start+T, D]
        mask = masks[ad.layer_types[i]]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ad.scale, enable_gqa=True)
        attn = attn.transpose(1, 2).reshape(batch, seq, -1)  # [B, T, H*D]
        if active is None:
            return ad.mlp_residual(i, ad.attention_residual(i, hidden, attn))
        # gathering the attention outputs, not the cache: the MLP is most of a layer and, from a few
        # rows on, its cost grows with them (SmolLM2 on 2 cores: 0.37 ms at 8 rows, 1.28 ms at 32;
        # scripts/time_mlp_rows.py)
        out = ad.mlp_residual(i, ad.attention_residual(i, hidden[active], attn[active]))
        return hidden.index_copy(0, active, out)

    def _forward(
        self, hidden, positions, pad, start, plan, phase: str, cache, depth_sum: list
    ) -> torch.Tensor:
        """One prefill (phase "prefill") or decode step under a static or an adaptive plan; adds the
        layers run by the real (non-pad) tokens to depth_sum[0]."""
        if isinstance(plan, AdaptivePlan):
            hidden, depth = adaptive_layers(self, hidden, positions, pad, start, plan, cache)
            real = torch.arange(start, start + hidden.shape[1], device=pad.device)[None] >= pad[:, None]
            depth_sum[0] += int(depth[real].sum())
            return hidden
        layers = plan.prefill_layers if phase == "prefill" else plan.kept_layers
        return self._layers(hidden, positions, pad, start, layers, cache)

    # -- stopping and text ---------------------------------------------------------------------------

    def _finished(self, generated: list[int], limit: int, sampling: SamplingParams) -> str | None:
        if not sampling.ignore_eos and generated[-1] in self.eos_ids:
            return "stop"
        if sampling.stop and find_stop(self.decode(generated), sampling.stop) is not None:
            return "stop"
        if len(generated) >= limit:
            return "length"
        return None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, ids: list[int], stop: tuple[str, ...] = ()) -> str:
        """The generated text, cut before the first stop string."""
        text = self.decode(ids)
        cut = find_stop(text, stop)
        return text if cut is None else text[:cut]


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, list | tuple | set) else [eos])
    return ids


def _pad_id(model: nn.Module, tokenizer, eos_ids: set[int]) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return min(eos_ids) if eos_ids else 0
