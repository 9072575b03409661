"""Architecture adapters: where a loaded HF decoder keeps its parts, and how one layer computes.

The engine drives the layer loop itself (so that it can skip layers, own the KV cache and, later, let
tokens exit at different depths); an adapter is the only place that knows module names. Each method
reuses the HF modules themselves, so full-depth numerics equal HF's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from skipengine.kernels import FrozenLinear


class UnsupportedArchitecture(ValueError):
    pass


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's formula. x: [B, T, heads, D]; cos, sin: [B, T, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerKernels:
    """One layer's projections, frozen for inference: q|k|v and gate|up fused into one call each."""

    qkv: FrozenLinear
    o: FrozenLinear
    gate_up: FrozenLinear
    down: FrozenLinear


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm module's computation as one fused op (it is eight ops in eager HF)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class LlamaFamilyAdapter:
    """Llama, Mistral, Qwen2 and SmolLM2: pre-norm blocks, GQA attention with rotary, gated MLP.

    The projections are snapshotted at construction (see kernels.py): build a new adapter (a new
    Engine) after changing the weights, e.g. after merging a fine-tuned adapter.
    """

    model_types = ("llama", "mistral", "qwen2")

    def __init__(self, model: nn.Module, pack: bool = True):
        config = model.config
        self.model = model
        self.embed_tokens = model.model.embed_tokens
        self.layers = model.model.layers
        self.final_norm = model.model.norm
        self.rotary = model.model.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.max_positions = config.max_position_embeddings
        # layers of one type share a rotary table and an attention window (None = full attention)
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.layer_types = ["sliding_attention" if window else "full_attention"] * self.num_layers
        self.windows = {"sliding_attention": window, "full_attention": None}
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.kernels = [self._freeze(layer, pack) for layer in self.layers]
        self.head = FrozenLinear(self.lm_head.weight, self.lm_head.bias, pack)

    @staticmethod
    def _freeze(layer: nn.Module, pack: bool) -> LayerKernels:
        attn, mlp = layer.self_attn, layer.mlp
        return LayerKernels(
            qkv=FrozenLinear.fuse([attn.q_proj, attn.k_proj, attn.v_proj], pack),
            o=FrozenLinear(attn.o_proj.weight, attn.o_proj.bias, pack),
            gate_up=FrozenLinear.fuse([mlp.gate_proj, mlp.up_proj], pack),
            down=FrozenLinear(mlp.down_proj.weight, mlp.down_proj.bias, pack),
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer type, cos and sin: [B, T, D] for positions [B, T]."""
        cos_sin = self.rotary(hidden, positions)
        return dict.fromkeys(set(self.layer_types), cos_sin)

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(module, x)

    def attention_input(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers[i].input_layernorm, hidden)

    def qkv(
        self, i: int, x: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, hidden] (normed) -> q [B, heads, T, D], k and v [B, kv_heads, T, D]; q, k rotated."""
        b, t, _ = x.shape
        cos, sin = ropes[self.layer_types[i]]
        qkv = self.kernels[i].qkv(x).view(b, t, -1, self.head_dim)  # [B, T, H + 2 KV, D]
        qk = rotate(qkv[:, :, : self.num_heads + self.num_kv_heads], cos, sin)  # q and k in one call
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=2)
        v = qkv[:, :, self.num_heads + self.num_kv_heads :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def decoupled_kv(
        self, layers: range, hidden: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [J, N, KV, D] of `layers` (a contiguous range) for tokens whose input to all of them is
        hidden [N, hidden] (an exit state), or to each layer its own hidden [J, N, hidden], as one batched
        product: only the norm weights and the K/V projections differ per layer. ropes: per layer type,
        cos and sin [N, D]."""
        norms, weights, biases = self._kv_stack()
        # the deeper layers are a contiguous run: slicing the stacks is a view, indexing would copy weights
        idx = slice(layers.start, layers.stop)
        x = F.rms_norm(hidden, hidden.shape[-1:], eps=self.layers[0].input_layernorm.variance_epsilon)
        x = (x if x.dim() == 3 else x[None]) * norms[idx][:, None]  # [J, N, hidden]
        kv = torch.bmm(x, weights[idx].transpose(1, 2))  # [J, N, 2 KV D]
        if biases is not None:
            kv = kv + biases[idx][:, None]
        k, v = kv.view(len(layers), hidden.shape[-2], 2 * self.num_kv_heads, self.head_dim).chunk(2, dim=2)
        cos, sin = ropes[self.layer_types[0]]  # one rotary table for the whole Llama family
        return rotate(k, cos[None], sin[None]), v

    def _kv_stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per layer: input-norm weight [L, hidden], K|V weight [L, 2 KV D, hidden], bias or None."""
        if getattr(self, "_kv", None) is None:
            attns = [layer.self_attn for layer in self.layers]
            norms = torch.stack([layer.input_layernorm.weight.detach() for layer in self.layers])
            weights = torch.stack([torch.cat([a.k_proj.weight, a.v_proj.weight]).detach() for a in attns])
            biases = None
            if attns[0].k_proj.bias is not None:
                biases = torch.stack([torch.cat([a.k_proj.bias, a.v_proj.bias]).detach() for a in attns])
            self._kv = (norms, weights, biases)
        return self._kv

    def attention_residual(self, i: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn: [B, T, heads * D] -> hidden + o_proj(attn)."""
        return hidden + self.kernels[i].o(attn)

    def mlp_residual(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = (
            self.kernels[i]
            .gate_up(rms_norm(self.layers[i].post_attention_layernorm, hidden))
            .chunk(2, dim=-1)
        )
        return hidden + self.kernels[i].down(self.layers[i].mlp.act_fn(gate) * up)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.final_norm, hidden))


class Gemma3Adapter(LlamaFamilyAdapter):
    """Gemma 3 text models: (1 + w) RMSNorms, q/k norms, norms after attention and MLP too, sliding-window
    layers with their own rotary base, query_pre_attn_scalar scaling, GELU-tanh MLP (scaled embeddings
    live in the embedding module itself)."""

    model_types = ("gemma3_text",)

    def __init__(self, model: nn.Module, pack: bool = True):
        super().__init__(model, pack)
        config = model.config
        self.scale = config.query_pre_attn_scalar**-0.5
        self.layer_types = list(config.layer_types)
        self.windows = {"sliding_attention": config.sliding_window, "full_attention": None}
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def rope(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: self.rotary(hidden, positions, kind) for kind in set(self.layer_types)}

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # HF: (x.float() normalized) * (1 + w.float()), cast back
        return F.rms_norm(x.float(), module.weight.shape, 1.0 + module.weight.float(), module.eps).type_as(x)

    def qkv(
        self, i: int, x: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        attn = self.layers[i].self_attn
        cos, sin = ropes[self.layer_types[i]]
        q, k, v = (
            self.kernels[i]
            .qkv(x)
            .view(b, t, -1, self.head_dim)
            .split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=2)
        )
        q = rotate(self.norm(attn.q_norm, q), cos, sin)
        k = rotate(self.norm(attn.k_norm, k), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def decoupled_kv(
        self, layers: range, hidden: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As the Llama version, one layer at a time: (1 + w) norms in fp32, a k-norm per layer and a
        rotary table per layer type make the batched form not worth its code at 18 layers."""
        keys, values = [], []
        for j, i in enumerate(layers):
            attn = self.layers[i].self_attn
            x = self.norm(self.layers[i].input_layernorm, hidden[j] if hidden.dim() == 3 else hidden)
            k = F.linear(x, attn.k_proj.weight).view(x.shape[0], self.num_kv_heads, self.head_dim)
            v = F.linear(x, attn.v_proj.weight).view(x.shape[0], self.num_kv_heads, self.head_dim)
            cos, sin = ropes[self.layer_types[i]]
            keys.append(rotate(self.norm(attn.k_norm, k)[None], cos[None], sin[None])[0])
            values.append(v)
        return torch.stack(keys), torch.stack(values)

    def attention_residual(self, i: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return hidden + self.norm(self.layers[i].post_attention_layernorm, self.kernels[i].o(attn))

    def mlp_residual(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        gate, up = (
            self.kernels[i].gate_up(self.norm(layer.pre_feedforward_layernorm, hidden)).chunk(2, dim=-1)
        )
        return hidden + self.norm(
            layer.post_feedforward_layernorm, self.kernels[i].down(layer.mlp.act_fn(gate) * up)
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


ADAPTERS = (LlamaFamilyAdapter, Gemma3Adapter)


def adapter_for(model: nn.Module, pack: bool = True) -> LlamaFamilyAdapter:
    """The adapter for this model's architecture; UnsupportedArchitecture when there is none. pack=False
    skips prepacking the weights (for callers that only read the architecture, not run it)."""
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model, pack)
    raise UnsupportedArchitecture(f"no native adapter for model_type={model_type!r}")


def has_adapter(model: nn.Module) -> bool:
    return any(getattr(model.config, "model_type", None) in a.model_types for a in ADAPTERS)
