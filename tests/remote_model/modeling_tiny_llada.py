"""Bidirectional transformer with LLaDA's layer names (q_proj, k_proj, v_proj, attn_out, ff_out)."""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_tiny_llada import TinyLLaDAConfig


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.ff_proj, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h, mask):
        B, T, D = h.shape
        x = self.norm1(h)
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.attn_out(a.transpose(1, 2).reshape(B, T, D))
        return h + self.ff_out(nn.functional.gelu(self.ff_proj(self.norm2(h))))


class TinyLLaDAModelLM(PreTrainedModel):
    config_class = TinyLLaDAConfig

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)[None].expand(B, -1)
        mask = None
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            keys = attention_mask.bool()[:, None, None, :]
            mask = keys | ~keys.any(-1, keepdim=True)
        h = self.wte(input_ids) + self.wpe(pos)
        for block in self.blocks:
            h = block(h, mask)
        return MaskedLMOutput(logits=self.lm_head(self.norm(h)))
