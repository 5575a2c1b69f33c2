"""A LLaMA-2 / Vicuna decoder in plain PyTorch that hands out its attention.

The same function as `transformers.LlamaForCausalLM`, written to be read in one sitting:
RMSNorm, RoPE in HF's rotate-half layout, SwiGLU, multi-head or grouped-query attention, tied or
untied output head. Parameter names are HF's verbatim (`model.layers.3.self_attn.q_proj.weight`),
so `state_dict()` keys are the safetensors keys and a head is one slice away.

Attention runs on `scaled_dot_product_attention`. Two ways out of it:
- `return_attn=True` computes every layer's softmax explicitly and returns the (B, H, S, S)
  probabilities, the values HF gives with eager attention and `output_attentions=True`.
- `probe=fn` is the hook point the SEEKR machinery stands on. Every attention layer calls
  `fn(layer, q, k, v, out)` with its post-RoPE queries (B, H, S, D), keys and values
  (B, H_kv, S_kv, D) and per-head output `out = A·V` (B, H, S, D) before `o_proj`, all still in
  the autograd graph. A probe can therefore recompute selected attention rows from q and k
  (distillation, forgettability) or register a hook on `out` to read ∂L/∂O (sensitivity), while
  the layer itself keeps SDPA and never materialises an S×S map it was not asked for. A probe that
  returns a tensor replaces `out` with it (attention grafting, Fig. 1: `grafting.py`).

Positions follow the padding mask: with `attention_mask` (1 = real token) the position of a token
is the number of real tokens before it, so left- or right-padded batches give every real token the
logits of its unpadded sequence. A padded query row attends to itself only, which keeps softmax
finite without touching real rows. A right-padded batch (the trainer's) needs no mask at all: every pad comes
after every real token, so causality already hides the pads from every real row, and SDPA runs its causal path
(flash attention on a GPU) whatever the padding; only the pads' own rows, which no loss reads, differ.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# config.json keys that carry no architecture (bookkeeping, generation defaults, training-only
# settings that are no-ops here); everything else must be understood or refused.
_INFORMATIONAL_KEYS = {
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pad_token_id", "initializer_range", "pretraining_tp", "max_sequence_length", "output_attentions",
    "output_hidden_states", "return_dict",
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)   # JSON's true reads as a bool, which is an int


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# What a config.json value must be, as (test, the words an error uses): a float such as 64.0 is not a size.
_SIZE = (lambda v: _is_int(v) and v >= 1, "an int ≥ 1")
_SIZE_OR_NULL = (lambda v: v is None or _SIZE[0](v), "an int ≥ 1 or null")
_POSITIVE = (lambda v: _is_number(v) and v > 0, "a finite number > 0")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_SECTION = (lambda v: v is None or isinstance(v, dict), "an object or null")
_REQUIRED = object()   # take()'s default for a key that must be present


@dataclass
class ModelArgs:
    dim: int = 4096                 # residual width (hidden_size)
    n_layers: int = 32              # transformer blocks
    n_heads: int = 32               # query heads
    n_kv_heads: int | None = None   # key/value heads; fewer than n_heads is GQA; None = n_heads
    vocab_size: int = 32000
    hidden_dim: int = 11008         # SwiGLU inner width (intermediate_size)
    head_dim: int | None = None     # None = dim // n_heads
    norm_eps: float = 1e-5          # RMSNorm epsilon
    rope_theta: float = 10000.0     # RoPE base
    max_seq_len: int = 4096         # max_position_embeddings
    tie_embeddings: bool = False    # lm_head shares embed_tokens' weight
    bos_id: int | None = 1          # None: the config names no BOS
    eos_id: int | list[int] = 2     # a list: any of them ends a turn

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read every architecture value from an HF LLaMA config, each checked where it is read (the error names
        its key); refuse what is not implemented."""
        cfg = dict(cfg)

        def refuse(why):
            raise ValueError(f"{source}: {why}")

        def check(key, value, ok, expected):
            if not ok(value):
                refuse(f"{key} must be {expected}, got {value!r}")
            return value

        def take(key, ok, expected, default=_REQUIRED):
            if key not in cfg and default is _REQUIRED:
                refuse(f"missing required key {key!r}")
            return check(key, cfg.pop(key, default), ok, expected)

        if (kind := cfg.pop("model_type", "llama")) != "llama":
            refuse(f"model_type must be 'llama', got {kind!r}")
        if (act := cfg.pop("hidden_act", "silu")) != "silu":
            refuse(f"hidden_act must be 'silu' (SwiGLU), got {act!r}")
        for key in ("attention_bias", "mlp_bias"):
            take(key, lambda v: v is False, "false (LLaMA-2 has no biases)", False)
        take("attention_dropout", lambda v: v is None or (_is_number(v) and v == 0), "0 (no dropout)", 0.0)
        # 2023 form: top-level rope_theta and rope_scaling; current form: rope_parameters.
        rope = take("rope_parameters", *_SECTION, None) or {}
        scaling = take("rope_scaling", *_SECTION, None) or {}
        theta = take("rope_theta", *_POSITIVE, 10000.0)
        if "rope_theta" in rope:
            theta = check("rope_parameters.rope_theta", rope["rope_theta"], *_POSITIVE)
        for name, section in (("rope_parameters", rope), ("rope_scaling", scaling)):
            kind = section.get("rope_type", section.get("type", "default"))
            if kind != "default":
                refuse(f"{name}.rope_type={kind!r} is not supported (only plain RoPE)")
        dim, n_heads = take("hidden_size", *_SIZE), take("num_attention_heads", *_SIZE)
        n_kv_heads = take("num_key_value_heads", *_SIZE_OR_NULL, None) or n_heads
        head_dim = take("head_dim", *_SIZE_OR_NULL, None)
        if n_heads % n_kv_heads:
            refuse(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}")
        if head_dim is None and dim % n_heads:
            refuse(f"hidden_size={dim} is not a multiple of num_attention_heads={n_heads}: give head_dim")
        vocab_size = take("vocab_size", *_SIZE)
        is_token = lambda v: _is_int(v) and 0 <= v < vocab_size
        token = f"a token id in 0..{vocab_size - 1}"
        # transformers' LlamaConfig allows a list of EOS ids (any of them ends a turn, as in Llama-3-Instruct) and
        # null for both; a tokenizer's one EOS must then be among them (Tokenizer.check_model). No EOS at all is
        # refused: every training sample ends with one.
        eos_ok = lambda v: is_token(v) or (isinstance(v, list) and len(v) > 0 and all(map(is_token, v)))
        values = dict(
            dim=dim, n_layers=take("num_hidden_layers", *_SIZE), n_heads=n_heads, n_kv_heads=n_kv_heads,
            vocab_size=vocab_size, hidden_dim=take("intermediate_size", *_SIZE), head_dim=head_dim,
            norm_eps=float(take("rms_norm_eps", *_POSITIVE, 1e-6)), rope_theta=float(theta),
            max_seq_len=take("max_position_embeddings", *_SIZE, 4096),
            tie_embeddings=take("tie_word_embeddings", *_BOOL, False),
            bos_id=take("bos_token_id", lambda v: v is None or is_token(v), f"{token} or null", 1),
            eos_id=take("eos_token_id", eos_ok, f"{token} or a list of them", 2))
        if unknown := sorted(set(cfg) - _INFORMATIONAL_KEYS):
            refuse(f"unsupported keys {unknown}")
        try:
            return cls(**values)
        except ValueError as e:   # __post_init__'s checks of the derived sizes (an odd head_dim)
            refuse(str(e))

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json that transformers' LlamaForCausalLM loads as this model."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "intermediate_size": self.hidden_dim, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, cast back before the scale, as HF does (the order matters in bf16).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin (B, 1, S, D) for integer positions (B, S), in HF's fp32 recipe."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq                  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]                  # (B, 1, S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A q or k projection's rows per head from Meta's interleaved RoPE pairs (2i, 2i+1) to HF's halves (i, i + D/2).

    Meta's, llama2.c's and llama.cpp's (GGUF's) RoPE rotates consecutive pairs; HF and this model rotate the
    two halves of each head. Reordering the rows gives the same rotation, hence the same attention.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    w = w.reshape(n_heads, head_dim // 2, 2, in_dim)                                 # (H, D/2 pairs, 2, in)
    return w.transpose(1, 2).reshape(out_dim, in_dim)                                # (H·2·D/2, in)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, return_attn=False, probe=None):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, S, D)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                         # (B, Hkv, Skv, D)
        probs = None
        if return_attn:
            rep = self.n_heads // self.n_kv_heads
            scores = q @ k.repeat_interleave(rep, 1).transpose(-2, -1) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, float("-inf"))                          # (B, H, S, Skv)
            probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
            out = probs @ v.repeat_interleave(rep, 1)                                    # (B, H, S, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=self.n_heads != self.n_kv_heads)
        if probe is not None:   # a probe sees q, k, v and the heads' outputs; it may replace them (grafting.py)
            replaced = probe(self.layer, q, k, v, out)
            if replaced is not None:
                out = replaced
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), probs


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, return_attn=False, probe=None):
        h, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, return_attn, probe)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), probs


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # A ModuleDict named `model` reproduces HF's `model.` prefix in state_dict keys.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

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
        """Every initialisation in one place: N(0, std) for matrices and embeddings, ones for norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
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
        mask = None
        # A right-padded batch without cache or maps runs SDPA's causal path: the check (one sync) only then.
        if cache is not None or return_attn or (key_valid is not None and (
                mask_pads or not bool((key_valid[:, 1:] <= key_valid[:, :-1]).all()))):
            q_idx = start + torch.arange(S, device=device)[:, None]
            k_idx = torch.arange(start + S, device=device)[None, :]
            mask = (k_idx <= q_idx).expand(B, 1, S, start + S)                         # (B, 1, S, Skv)
            if key_valid is not None:
                mask = (mask & key_valid[:, None, None, :]) | (k_idx == q_idx)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, x.dtype)
        maps = []
        for block in self.model.layers:
            x, probs = block(x, cos, sin, mask, cache, return_attn, probe)
            maps.append(probs)
        if cache is not None:
            cache.pos += S
        logits = self.lm_head(self.model.norm(x))
        return (logits, maps) if return_attn else logits


def token_losses(logits, labels):
    """Cross-entropy (B, S-1) of each next-token prediction in fp32; labels aligned with the input, -100 ignored."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")


def sequence_loss(logits, labels):
    """Each sample's mean cross-entropy over its labelled tokens (B,): the L(x, y) of Eq. 1."""
    losses = token_losses(logits, labels)
    n = (labels[:, 1:] != -100).sum(-1)
    return losses.sum(-1) / n.clamp(min=1)
