"""Searched skip plans: which layers to keep, chosen on the job's own text, with no labels.

Greedy removal (as SLEB does): starting from every layer, drop one at a time the layer whose removal
least raises the KL divergence from the full model's next-token distributions on a calibration sample.
Each step's kept set is a subset of the last one's, so one search serves every number of kept layers:
whatever n a target and a device's calibration ask for, its plan is there.

Each candidate runs as generation will run the plan. The sample is the corpus's prompts, each followed by
the full model's own continuation; only the continuation's tokens are scored, as decode steps. With
prefill "full" the prompt's K/V come from every layer (computed once); with prefill "skip" the prompt
runs through the candidate's layers too. The first and the last layer are never removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from skipengine.cache import StaticKVCache
from skipengine.engine import Engine
from skipengine.lora import fingerprint
from skipengine.plan import MIN_KEPT_LAYERS, evenly_spaced
from skipengine.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchedPlans:
    """The search's kept set for each n from L down to its deepest, with the sample's KL to the full model.

    `removed` is greedy removal's order. For each n the kept set is greedy's, unless the evenly spaced
    (uniform) set scores a lower KL on the same sample: then that one, so a searched plan is never worse
    than uniform's on the text it was searched on."""

    num_layers: int
    prefill: str
    removed: tuple[int, ...]
    kept_by_n: dict[int, tuple[int, ...]]
    kl_by_n: dict[int, float]  # mean KL (nats per scored token) of kept_by_n[n]
    uniform_kl_by_n: dict[int, float]
    sample_hash: str
    model_fingerprint: str
    seconds: float

    @property
    def min_kept(self) -> int:
        return min(self.kept_by_n)

    def kept(self, num_kept: int) -> tuple[int, ...]:
        if num_kept not in self.kept_by_n:
            raise ValueError(
                f"the layer search went down to {self.min_kept} kept layers and {num_kept} were asked for; "
                "search deeper (skip.search_min_kept) or lower skip.target_speedup"
            )
        return self.kept_by_n[num_kept]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SearchedPlans:
        d = json.loads(text)
        d["removed"] = tuple(d["removed"])
        d["kept_by_n"] = {int(n): tuple(k) for n, k in d["kept_by_n"].items()}
        for key in ("kl_by_n", "uniform_kl_by_n"):
            d[key] = {int(n): v for n, v in d[key].items()}
        return cls(**d)


def sample_hash(prompts: Sequence[Sequence[int]], continuation_tokens: int) -> str:
    digest = hashlib.sha1(json.dumps([list(p) for p in prompts]).encode())
    digest.update(f":{continuation_tokens}".encode())
    return digest.hexdigest()[:16]


class _Sample:
    """The calibration batch: left-padded prompts and the full model's continuations, with the prompt's
    K/V at full depth already in the cache for prefill "full"."""

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]], tokens: int, prefill: str):
        ad, dev = engine.adapter, engine.device
        sampling = SamplingParams(max_new_tokens=tokens, no_repeat_ngram_size=4)  # text, not a loop
        continuations = [r.token_ids for r in engine.generate(list(prompts), None, sampling).rows]
        width, cont = max(len(p) for p in prompts), max(len(c) for c in continuations)
        batch = len(prompts)
        ids = torch.full((batch, width + cont), engine.pad_id, dtype=torch.long)
        scored = torch.zeros(batch, width + cont, dtype=torch.bool)  # positions whose next token is scored
        for r, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            ids[r, width - len(p) : width + len(c)] = torch.tensor(list(p) + c)
            scored[r, width : width + len(c) - 1] = True  # continuation inputs that predict the next one
        self.pad = torch.tensor([width - len(p) for p in prompts], device=dev)
        # prefill "full": the prompt runs at full depth once, and candidates run from the continuation on
        self.start = width if prefill == "full" else 0
        self.ids = ids[:, self.start : -1].to(dev)  # the inputs that candidates run: [B, T]
        self.scored = scored[:, self.start : -1].to(dev)
        cols = torch.arange(self.start, width + cont - 1, device=dev)
        self.positions = (cols[None] - self.pad[:, None]).clamp(min=0)
        self.cache = StaticKVCache(
            range(engine.num_layers), batch, ad.num_kv_heads, width + cont, ad.head_dim, engine.dtype, dev
        )
        if prefill == "full":
            prompt_cols = torch.arange(width, device=dev)
            prompt_positions = (prompt_cols[None] - self.pad[:, None]).clamp(min=0)
            engine._layers(
                ad.embed(ids[:, :width].to(dev)),
                prompt_positions,
                self.pad,
                0,
                range(engine.num_layers),
                self.cache,
            )
        self.tokens = int(self.scored.sum())
        if not self.tokens:
            raise ValueError("the layer search's calibration prompts got no continuation to score")


class _Search:
    def __init__(self, engine: Engine, sample: _Sample):
        self.engine, self.sample = engine, sample
        ad, s = engine.adapter, sample
        hidden = ad.embed(s.ids)
        self.ropes, self.masks = engine.layer_inputs(
            hidden, s.positions, s.pad, s.start, range(engine.num_layers)
        )
        self.embedded = hidden
        self.reference = F.log_softmax(self._logits(self.run(hidden, range(engine.num_layers))[0]), dim=-1)

    def run(
        self, hidden: torch.Tensor, layers: Sequence[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """hidden through `layers`; also each layer's input."""
        inputs = {}
        for i in layers:
            inputs[i] = hidden
            hidden = self.engine.layer(
                i, hidden, self.ropes, self.masks, self.sample.start, self.sample.cache
            )
        return hidden, inputs

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.engine.adapter.logits(hidden[self.sample.scored]).float()  # [N, vocab]

    def kl(self, hidden: torch.Tensor) -> float:
        """Mean KL(full || plan) per scored token."""
        logp = F.log_softmax(self._logits(hidden), dim=-1)
        return float(F.kl_div(logp, self.reference, log_target=True, reduction="sum")) / self.sample.tokens


@torch.inference_mode()
def search_plans(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    min_kept: int,
    prefill: str = "full",
    continuation_tokens: int = 32,
) -> SearchedPlans:
    """Greedy removal down to min_kept layers on the calibration prompts (token ids), each n checked
    against the evenly spaced plan."""
    if engine.adapter is None:
        raise ValueError(
            f"skip.strategy=searched needs a native adapter; {type(engine.model).__name__} has none"
        )
    if not prompts:
        raise ValueError("skip.strategy=searched needs calibration prompts (the corpus's first rows)")
    layers = engine.num_layers
    min_kept = max(MIN_KEPT_LAYERS, min(min_kept, layers))
    started = time.perf_counter()
    search = _Search(engine, _Sample(engine, prompts, continuation_tokens, prefill))
    kept, removed = list(range(layers)), []
    kept_by_n, kl_by_n, uniform_kl_by_n = {layers: tuple(kept)}, {layers: 0.0}, {layers: 0.0}
    _, inputs = search.run(search.embedded, kept)
    while len(kept) > min_kept:
        best = None
        for j in kept[1:-1]:  # never the first or the last layer
            out, _ = search.run(inputs[j], [i for i in kept if i > j])
            score = search.kl(out)
            if best is None or score < best[0]:
                best = (score, j)
        score, j = best
        kept.remove(j)
        removed.append(j)
        n = len(kept)
        uniform = evenly_spaced(layers, n)
        uniform_kl = search.kl(search.run(search.embedded, uniform)[0])
        kept_by_n[n], kl_by_n[n] = (tuple(kept), score) if score <= uniform_kl else (uniform, uniform_kl)
        uniform_kl_by_n[n] = uniform_kl
        _, inputs = search.run(search.embedded, kept)  # the kept layers' inputs under the new plan
        log.info(
            "layer search: %d kept, dropped layer %d, KL %.3f (uniform %.3f), %.0f s",
            n,
            j,
            score,
            uniform_kl,
            time.perf_counter() - started,
        )
    return SearchedPlans(
        num_layers=layers,
        prefill=prefill,
        removed=tuple(removed),
        kept_by_n=kept_by_n,
        kl_by_n=kl_by_n,
        uniform_kl_by_n=uniform_kl_by_n,
        sample_hash=sample_hash(prompts, continuation_tokens),
        model_fingerprint=fingerprint(engine.model),
        seconds=time.perf_counter() - started,
    )


@torch.inference_mode()
def plan_kl(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    kept: Sequence[int],
    prefill: str = "full",
    continuation_tokens: int = 32,
) -> float:
    """The search's score of one kept set: mean KL to the full model per continuation token."""
    search = _Search(engine, _Sample(engine, prompts, continuation_tokens, prefill))
    return search.kl(search.run(search.embedded, kept)[0])


def cached_search(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    min_kept: int,
    prefill: str,
    cache_dir: Path,
    continuation_tokens: int = 32,
) -> SearchedPlans:
    """search_plans, read from cache_dir when this model, sample and prefill were searched at least as
    deep before."""
    key = f"{fingerprint(engine.model)}-{sample_hash(prompts, continuation_tokens)}-{prefill}"
    path = Path(cache_dir) / f"{key}.json"
    if path.is_file():
        found = SearchedPlans.from_json(path.read_text())
        if found.min_kept <= max(MIN_KEPT_LAYERS, min_kept):
            log.info("layer search: read from %s", path)
            return found
    found = search_plans(engine, prompts, min_kept, prefill, continuation_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(found.to_json())
    tmp.replace(path)
    return found
