"""Fusion of the five sources' token sequences into one (:class:`SourceFusion`).

``mean``: the mean over sources.  ``single``: self-attention across the five sources at
each token, then the mean.  ``dual``: a learned source embedding, self-attention across
sources, attention pooling (one shared query or one per token) and a LayerNorm.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from speedstructure.models.inputs import N_SOURCES


class SourceFusion(nn.Module):
    """Fuses the five per-source token sequences ``(B, 5, N, C)`` into ``(B, N, C)``.

    ``mean``: plain mean.  ``single``: pre-norm self-attention across the sources of each
    token (residual), then the mean.  ``dual``: learned source embedding, pre-norm
    self-attention across sources (residual), attention pooling with a learned query
    (``shared`` by all tokens or one ``per_token``), then LayerNorm.
    """

    def __init__(
        self,
        mode: str,
        dim: int,
        n_tokens: int,
        channel_heads: int = 4,
        fusion_heads: int = 2,
        pool_query: str = "shared",
        n_sources: int = N_SOURCES,
    ):
        super().__init__()
        self.mode = mode
        self.self_attn = self.pool_attn = None
        if mode in ("single", "dual"):
            self.norm_in = nn.LayerNorm(dim)
            self.self_attn = nn.MultiheadAttention(dim, channel_heads, batch_first=True)
        if mode == "dual":
            self.source_embed = nn.Parameter(torch.zeros(1, n_sources, dim))
            nn.init.trunc_normal_(self.source_embed, std=0.02)
            self.query = nn.Parameter(
                torch.zeros(n_tokens if pool_query == "per_token" else 1, dim)
            )
            nn.init.trunc_normal_(self.query, std=0.02)
            self.pool_attn = nn.MultiheadAttention(dim, fusion_heads, batch_first=True)
            self.norm_out = nn.LayerNorm(dim)

    def attention_modules(self) -> list[nn.Module]:
        return [m for m in (self.self_attn, self.pool_attn) if m is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, n, c = x.shape
        if self.mode == "mean":
            return x.mean(dim=1)
        h = x.permute(0, 2, 1, 3).reshape(b * n, s, c)  # one sequence of 5 per token
        if self.mode == "dual":
            h = h + self.source_embed
        q = self.norm_in(h)
        h = h + self.self_attn(q, q, q, need_weights=False)[0]
        if self.mode == "single":
            return h.mean(dim=1).reshape(b, n, c)
        query = self.query.expand(n, c) if self.query.shape[0] == 1 else self.query
        query = query.unsqueeze(0).expand(b, n, c).reshape(b * n, 1, c)
        pooled = self.pool_attn(query, h, h, need_weights=False)[0]
        return self.norm_out(pooled.reshape(b, n, c))
