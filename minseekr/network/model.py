"""A LLaMA-style decoder in plain PyTorch that hands out its attention.

The same function as transformers' `LlamaForCausalLM` (LLaMA-2, Vicuna, Llama-3.x), `Qwen2ForCausalLM`,
`MistralForCausalLM` and `Gemma3ForCausalLM`, written to be read in one sitting: RMSNorm, RoPE in HF's
rotate-half layout, a gated MLP, multi-head, grouped- or multi-query attention, tied or untied output head.
A family's choices are fields of `ModelArgs` (args.py), and a layer's own ones (its sliding window, its RoPE)
are data of the layer. Parameter names are HF's verbatim (`model.layers.3.self_attn.q_proj.weight`), so
`state_dict()` keys are the safetensors keys and a head is one slice away.

Attention runs on `scaled_dot_product_attention`. Two ways out of it:
- `return_attn=True` computes every layer's softmax explicitly and returns the (B, H, S, S)
  probabilities, the values HF gives with eager attention and `output_attentions=True`.
- `probe=fn` is the hook point the SEEKR machinery stands on. Every attention layer calls
  `fn(layer, q, k, v, out)` with its post-RoPE queries (B, H, S, D), keys and values
  (B, H_kv, S_kv, D) and per-head output `out = A·V` (B, H, S, D) before `o_proj`, all still in
  the autograd graph. A probe can therefore recompute selected attention rows from q and k
  (distillation, forgettability) or register a hook on `out` to read ∂L/∂O (sensitivity), while
  the layer itself keeps SDPA and never materialises an S×S map it was not asked for. A probe that
  returns a tensor replaces `out` with it (attention grafting, Fig. 1: `grafting.py`). The q it gets is
  scaled so that q·kᵀ/√D are the layer's logits whatever the family's scale (Gemma-3's); a sliding layer's
  window is the model's `args.windows[layer]`, which the probes are given.

Positions follow the padding mask: with `attention_mask` (1 = real token) the position of a token
is the number of real tokens before it, so left- or right-padded batches give every real token the
logits of its unpadded sequence. A padded query row attends to itself only, which keeps softmax
finite without touching real rows. A right-padded batch (the trainer's) needs no mask at all: every pad comes
after every real token, so causality already hides the pads from every real row, and SDPA runs its causal path
(flash attention on a GPU) whatever the padding; only the pads' own rows, which no loss reads, differ.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minseekr.network.args import ModelArgs
from minseekr.network.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    """x / rms(x) · w (LLaMA: cast back before the scale), or · (1 + w) in fp32 and cast after (`offset`, Gemma)."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (fp64 for fp64); the order of the cast and the scale is each family's (it matters in bf16).
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.to(h.dtype))).type_as(x)
        return self.weight * h.to(x.dtype)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A q or k projection's rows per head from Meta's interleaved RoPE pairs (2i, 2i+1) to HF's halves (i, i + D/2).

    Meta's, llama2.c's and llama.cpp's (GGUF's) RoPE rotates consecutive pairs; HF and this model rotate the
    two halves of each head. Reordering the rows gives the same rotation, hence the same attention.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    w = w.reshape(n_heads, head_dim // 2, 2, in_dim)                                 # (H, D/2 pairs, 2, in)
    return w.transpose(1, 2).reshape(out_dim, in_dim)                                # (H·2·D/2, in)


class KVCache:
    """Preallocated keys and values for incremental decoding; `pos` counts the cached tokens."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0

    def update(self, layer: int, k, v):
        """Write k, v (B, H_kv, S, D) after the cached prefix; return the keys and values so far."""
        end = self.pos + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KVCache holds {self.k.shape[3]} tokens, asked for {end}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    """Multi-head, grouped- or multi-query attention over one layer's keys: all earlier ones, or the last
    `window` (a sliding layer); q and k normalised per head before RoPE where the family does (Gemma-3)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.windows[layer]
        bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
        scalar = args.query_pre_attn_scalar
        self.scale = None if scalar is None or scalar == args.head_dim else scalar ** -0.5   # None: 1/√D
        # A probe computes q·kᵀ/√D: it is handed q times this, so that its logits are the layer's.
        self.probe_q = None if self.scale is None else self.scale * math.sqrt(args.head_dim)

    def forward(self, x, cos, sin, mask, cache=None, return_attn=False, probe=None):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, S, D)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                         # (B, Hkv, Skv, D)
        probs = None
        if return_attn:
            rep = self.n_heads // self.n_kv_heads
            scores = q @ k.repeat_interleave(rep, 1).transpose(-2, -1)
            scores = scores / math.sqrt(self.head_dim) if self.scale is None else scores * self.scale
            scores = scores.masked_fill(~mask, float("-inf"))                          # (B, H, S, Skv)
            probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
            out = probs @ v.repeat_interleave(rep, 1)                                    # (B, H, S, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                 enable_gqa=self.n_heads != self.n_kv_heads)
        if probe is not None:   # a probe sees q, k, v and the heads' outputs; it may replace them (grafting.py)
            replaced = probe(self.layer, q if self.probe_q is None else q * self.probe_q, k, v, out)
            if replaced is not None:
                out = replaced
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), probs


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) · up(x)), SiLU (SwiGLU) or tanh-approximated GELU (GeGLU)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)
        self.act = F.silu if args.activation == "silu" else lambda x: F.gelu(x, approximate="tanh")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x)); with `sandwich_norms` each branch's output is normalised
    too before the residual add (Gemma's four norms, HF's names: post_attention_layernorm is then the
    attention output's norm and pre_feedforward_layernorm the MLP input's)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_offset)   # noqa: E731
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        keep = nn.Identity()
        self.branches = (keep, self.post_attention_layernorm, keep)   # attention's output, MLP's input, its output
        if args.sandwich_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
            self.branches = (self.post_attention_layernorm, self.pre_feedforward_layernorm,
                             self.post_feedforward_layernorm)

    def forward(self, x, cos, sin, mask, cache=None, return_attn=False, probe=None):
        attention_out, mlp_in, mlp_out = self.branches
        h, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, return_attn, probe)
        x = x + attention_out(h)
        return x + mlp_out(self.mlp(mlp_in(x))), probs


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # A ModuleDict named `model` reproduces HF's `model.` prefix in state_dict keys.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps, args.norm_offset),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # Each layer's RoPE (base, scaling) as an index into the model's distinct ones: cos and sin once each.
        self.ropes = []
        for layer in range(args.n_layers):
            if args.rope_of(layer) not in self.ropes:
                self.ropes.append(args.rope_of(layer))
        self.rope_index = [self.ropes.index(args.rope_of(layer)) for layer in range(args.n_layers)]

    def tie_weights(self):
        """Share embed_tokens' weight with lm_head when the config ties them (again after assign-loading)."""
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self):
        """Where the model computes; read from a weight, so it also holds when an FSDP engine owns the parameters."""
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Every initialisation in one place: N(0, std) for matrices, biases and embeddings; norms at scale 1."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(0.0 if self.args.norm_offset else 1.0)
            else:
                p.normal_(0.0, std)

    def forward(self, tokens, attention_mask=None, *, cache: KVCache | None = None,
                return_attn: bool = False, probe=None, prefix=None, mask_pads: bool = False):
        """Logits (B, S, V) for tokens (B, S); with return_attn also a list of (B, H, S, Skv) maps.

        `prefix` (B, P, dim): vectors placed before the tokens' embeddings (soft prompts), which then count in S:
        they take the first positions and the logits' first P rows; or a function of the tokens' embeddings
        (B, S, dim) and their mask (B, S) that returns them (prompts chosen by the input, L2P: computed here, where
        an engine's embeddings are gathered). `attention_mask` (B, Skv) marks real tokens (and prefix vectors)
        with 1 and covers the cached prefix plus this call's inputs. `mask_pads` keeps the explicit mask for a
        right-padded batch too, so that pad rows attend to themselves only (what the pads' values are matters to
        whoever reads them: the official sensitivity over every entry).
        """
        x = self.model.embed_tokens(tokens)
        if self.args.embed_scale:   # √dim, rounded to the weights' dtype first, as transformers does
            x = x * torch.tensor(self.args.dim ** 0.5).to(x.dtype)
        if callable(prefix):
            prefix = prefix(x, None if attention_mask is None else attention_mask[:, -tokens.shape[1]:])
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        B, S = x.shape[:2]
        start = cache.pos if cache is not None else 0
        device = tokens.device
        if attention_mask is None:
            positions = (start + torch.arange(S, device=device)).expand(B, S)
            key_valid = None
        else:
            key_valid = attention_mask.to(device=device, dtype=torch.bool)
            if key_valid.shape != (B, start + S):
                raise ValueError(f"attention_mask has shape {tuple(key_valid.shape)}, expected {(B, start + S)}")
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        # A right-padded batch without cache or maps runs SDPA's causal path in its full layers (the check, one
        # sync, only then); a sliding layer always has its mask.
        explicit = cache is not None or return_attn or (key_valid is not None and (
            mask_pads or not bool((key_valid[:, 1:] <= key_valid[:, :-1]).all())))
        masks = {window: self.attention_mask(key_valid, B, S, start, window, device)
                 if explicit or window is not None else None for window in set(self.args.windows)}
        ropes = [rope_cos_sin(positions, self.args.head_dim, theta, x.dtype, scaling, self.args.max_seq_len)
                 for theta, scaling in self.ropes]
        maps = []
        for layer, block in enumerate(self.model.layers):
            cos, sin = ropes[self.rope_index[layer]]
            x, probs = block(x, cos, sin, masks[block.self_attn.window], cache, return_attn, probe)
            maps.append(probs)
        if cache is not None:
            cache.pos += S
        logits = self.lm_head(self.model.norm(x))
        return (logits, maps) if return_attn else logits

    @staticmethod
    def attention_mask(key_valid, B: int, S: int, start: int, window: int | None, device):
        """(B, 1, S, start + S) bool: query i sees key j ≤ i (and j > i − window in a sliding layer), a real one
        where `key_valid` says; a padded query row sees itself only, which keeps softmax finite."""
        q_idx = start + torch.arange(S, device=device)[:, None]
        k_idx = torch.arange(start + S, device=device)[None, :]
        mask = k_idx <= q_idx
        if window is not None:
            mask = mask & (k_idx > q_idx - window)
        mask = mask.expand(B, 1, S, start + S)                                        # (B, 1, S, Skv)
        if key_valid is not None:
            mask = (mask & key_valid[:, None, None, :]) | (k_idx == q_idx)
        return mask


def token_losses(logits, labels):
    """Cross-entropy (B, S-1) of each next-token prediction in fp32; labels aligned with the input, -100 ignored."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")


def sequence_loss(logits, labels):
    """Each sample's mean cross-entropy over its labelled tokens (B,): the L(x, y) of Eq. 1."""
    losses = token_losses(logits, labels)
    n = (labels[:, 1:] != -100).sum(-1)
    return losses.sum(-1) / n.clamp(min=1)
