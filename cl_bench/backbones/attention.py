"""Attention made of four ``nn.Linear`` layers, for backbones whose attention fuses q/k/v.

open_clip's ``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight`` and never calls
``out_proj`` as a module, so an adapter wrapped around its linears would change nothing. The
open_clip backbone replaces it once by :class:`UnfusedAttention` (same function, tested
output-identical in fp32), so every strategy adapts plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.adapters import fused_projections


class UnfusedAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` made of four ``nn.Linear`` layers.

    ``nn.MultiheadAttention`` fuses q/k/v into ``in_proj_weight`` and never calls ``out_proj`` as
    a module, so wrapping its linears silently changes nothing. This module computes the same
    function with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linears and
    ``F.scaled_dot_product_attention``. The number of heads is derived from the q projection's
    output width and the fixed ``head_dim``, so structured pruning can slice whole heads.
    ``causal=True`` replaces the additive causal mask of a text tower by ``is_causal`` (same
    result, lets SDPA use its fused kernels).
    """

    def __init__(
        self,
        embed_dim: int,
        n_heads: int,
        *,
        bias: bool = True,
        batch_first: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {n_heads} heads")
        self.embed_dim = embed_dim
        self.n_heads = n_heads
        self.head_dim = embed_dim // n_heads
        self.batch_first = batch_first
        self.causal = causal
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention, *, causal: bool = False) -> UnfusedAttention:
        """Copy the weights of a self-attention ``nn.MultiheadAttention`` into a new module."""
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only self-attention with a fused in_proj_weight can be unfused")
        if mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
            raise ValueError("bias_k/bias_v, add_zero_attn and attention dropout are not supported")
        d = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(d, mha.num_heads, bias=bias, batch_first=mha.batch_first, causal=causal)
        new = new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * d : (i + 1) * d])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * d : (i + 1) * d])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("UnfusedAttention does not return attention weights")
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not supported")
        if torch.is_autocast_enabled(query.device.type):
            # one cast of the (fp32 layer-norm) input, not one per projection
            query = query.to(torch.get_autocast_dtype(query.device.type))
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length = query.shape[0], query.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], -1, self.head_dim).transpose(1, 2)

        qkv = None
        if key is query and value is query:  # self-attention: one GEMM for q, k and v when possible
            qkv = fused_projections(query, (self.q_proj, self.k_proj, self.v_proj))
        if qkv is not None:
            widths = [_out_width(m) for m in (self.q_proj, self.k_proj, self.v_proj)]
            q, k, v = (heads(t) for t in qkv.split(widths, dim=-1))
        else:
            q = heads(self.q_proj(query))
            k = heads(self.k_proj(key))
            v = heads(self.v_proj(value))
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = (
                attn_mask.to(q.dtype)
                if attn_mask is not None and attn_mask.is_floating_point()
                else attn_mask
            )
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _out_width(module: nn.Module) -> int:
    """Output width of a linear layer or of an adapter around one."""
    width = module.out_features  # nn.Linear and AdaptedLinear both expose it
    assert isinstance(width, int)
    return width
