"""Attention grafting (Fig. 1): a model run with another model's attention weights at chosen heads.

The paper's motivating experiment. After sequential fine-tuning the final model θ_K has forgotten an earlier task
j; give its heads θ_j's attention weights at inference (θ_j's map A^{l,h} applied to θ_K's own values, the rest
of θ_K untouched) and much of task j's score comes back. Grafting every head measures how much of the forgetting
lives in the attention maps; grafting only the heads SEEKR selects measures how much of that its selection holds.

`Grafted(final, source, heads)` is a model for `generate` and `evaluate`: each call runs `source` on the same
tokens (with its own KV cache, maps explicit) and then `final` with a probe that replaces the grafted heads'
outputs by source's maps times final's values.
"""
import torch

from minseekr.network.model import KVCache


class Grafted(torch.nn.Module):
    """`final` with `source`'s attention weights at `heads`, a list of (layer, head)."""

    def __init__(self, final, source, heads):
        super().__init__()
        if (final.args.n_layers, final.args.n_heads) != (source.args.n_layers, source.args.n_heads):
            raise ValueError("grafting needs two models of the same shape")
        self.final, self.source = final, source
        self.model, self.args = final.model, final.args          # what generate() reads: embeddings and shape
        self.heads = {}                                           # layer -> its grafted heads
        for layer, head in sorted(set(map(tuple, heads))):
            self.heads.setdefault(layer, []).append(head)
        self.source_cache = None

    def forward(self, tokens, attention_mask=None, *, cache: KVCache | None = None, prefix=None):
        if cache is None:
            self.source_cache = None
        elif cache.pos == 0:   # a new prompt: source keeps its own keys and values in step with final's
            self.source_cache = KVCache(self.source.args, tokens.shape[0], cache.k.shape[3], cache.k.dtype,
                                        cache.k.device)
        _, maps = self.source(tokens, attention_mask, cache=self.source_cache, return_attn=True, prefix=prefix)

        def graft(layer, q, k, v, out):
            if layer not in self.heads:
                return None
            heads = torch.tensor(self.heads[layer], device=out.device)
            values = v[:, heads // (q.shape[1] // v.shape[1])]    # the key/value head each query head reads
            out = out.clone()
            out[:, heads] = maps[layer][:, heads].to(values.dtype) @ values
            return out

        return self.final(tokens, attention_mask, cache=cache, probe=graft, prefix=prefix)
