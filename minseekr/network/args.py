"""The model's shape and its family's choices, read from and written back to an HF `config.json`.

One decoder (`model.py`) covers four families; a family is a set of choices, each a field of `ModelArgs`:

    llama         LLaMA-2 / Vicuna / SmolLM2; Llama-3.x: RoPE scaling (`rope_scaling` of type llama3, linear,
                  dynamic or yarn: `rope.py`), optional biases (`attention_bias` on q, k, v and o; `mlp_bias`)
    qwen2         biases on q, k and v; sliding windows only where `use_sliding_window` and from `max_window_layers`
    mistral       `sliding_window`: each query sees its last W keys, in every layer
    gemma3_text   RMSNorm as x̂·(1 + w) (`norm_offset`); embeddings × √dim (`embed_scale`); GeGLU with tanh GELU;
                  four norms a block (`sandwich_norms`); RMSNorm on q and k per head before RoPE (`qk_norm`);
                  the attention scale query_pre_attn_scalar^−1/2; sliding and full layers (`layer_types`), the
                  sliding ones with their own RoPE base (`rope_local_theta`)

Every value of a config.json is checked where it is read, and the error names its key; what no family here has
(softcapping, mixture of experts, partial rotary, bidirectional attention, …) is refused by key. `to_hf_config`
writes the family's own config, in the form both transformers 4.x and 5.x read (top-level `rope_theta`,
`rope_scaling`).
"""
import math
from dataclasses import dataclass

import torch

from minseekr.network.rope import check_scaling

# config.json keys that carry no architecture (bookkeeping, generation defaults, training-only
# settings that are no-ops here); everything else must be understood or refused.
_INFORMATIONAL_KEYS = {
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pad_token_id", "initializer_range", "pretraining_tp", "max_sequence_length", "output_attentions",
    "output_hidden_states", "return_dict", "cache_implementation",
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
LAYER_TYPES = ("full_attention", "sliding_attention")


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
_NULL = (lambda v: v is None, "null (not implemented)")
_REQUIRED = object()   # take()'s default for a key that must be present


@dataclass
class ModelArgs:
    dim: int = 4096                 # residual width (hidden_size)
    n_layers: int = 32              # transformer blocks
    n_heads: int = 32               # query heads
    n_kv_heads: int | None = None   # key/value heads; fewer than n_heads is GQA; None = n_heads
    vocab_size: int = 32000
    hidden_dim: int = 11008         # the gated MLP's inner width (intermediate_size)
    head_dim: int | None = None     # None = dim // n_heads
    norm_eps: float = 1e-5          # RMSNorm epsilon
    rope_theta: float = 10000.0     # RoPE base (of the full-attention layers)
    max_seq_len: int = 4096         # max_position_embeddings
    tie_embeddings: bool = False    # lm_head shares embed_tokens' weight
    bos_id: int | None = 1          # None: the config names no BOS
    eos_id: int | list[int] = 2     # a list: any of them ends a turn
    family: str = "llama"           # the HF model_type written back
    rope_scaling: dict | None = None        # the full-attention layers' RoPE scaling (rope.py), None: plain RoPE
    rope_local_theta: float | None = None   # the sliding layers' own RoPE base (Gemma-3); None: rope_theta
    attention_bias: bool = False    # biases on q, k, v and o (Llama's attention_bias)
    qkv_bias: bool = False          # biases on q, k and v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None       # W: a sliding layer's query sees its last W keys
    layer_types: list[str] | None = None    # per layer, full_attention or sliding_attention; None: every layer
                                            # slides when sliding_window is set (Mistral), else none does
    activation: str = "silu"        # the gate's activation: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)
    norm_offset: bool = False       # RMSNorm computes x̂·(1 + w) in fp32, then casts (Gemma)
    embed_scale: bool = False       # embeddings multiplied by √dim (Gemma)
    sandwich_norms: bool = False    # norms after attention and around the MLP too (Gemma)
    qk_norm: bool = False           # RMSNorm of q and k per head, before RoPE (Gemma-3)
    query_pre_attn_scalar: float | None = None   # the attention logits' scale is its ^−1/2; None: head_dim's

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window W (None: the layer attends to every earlier key)."""
        if self.layer_types is None:
            return [self.sliding_window] * self.n_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in self.layer_types]

    def rope_of(self, layer: int) -> tuple[float, dict | None]:
        """The RoPE base and scaling of `layer`: a sliding layer's own base where the family has one."""
        if self.rope_local_theta is not None and self.windows[layer] is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read every architecture value from an HF config of a known family, each checked where it is read (the
        error names its key); refuse what is not implemented."""
        return _Reader(cfg, source).args()

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json that transformers loads as this model (its family's class)."""
        config = {
            "architectures": [ARCHITECTURES[self.family]], "model_type": self.family,
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "intermediate_size": self.hidden_dim, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id,
        }
        if self.family == "gemma3_text":
            config |= {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": self.query_pre_attn_scalar,
                       "sliding_window": self.sliding_window, "layer_types": self.layer_types,
                       "rope_local_base_freq": self.rope_local_theta, "final_logit_softcapping": None,
                       "attn_logit_softcapping": None, "attention_bias": False}
        else:
            config["hidden_act"] = "silu"
        if self.family == "llama":
            config |= {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}
        elif self.family == "mistral":
            config["sliding_window"] = self.sliding_window
        elif self.family == "qwen2":
            config |= {"sliding_window": self.sliding_window, "layer_types": self.layer_types,
                       "use_sliding_window": any(w is not None for w in self.windows)}
        return config | {"torch_dtype": str(dtype).removeprefix("torch.")}


class _Reader:
    """One config.json read key by key: each key taken is checked, and whatever is left over is refused."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source = dict(cfg), source

    def refuse(self, why):
        raise ValueError(f"{self.source}: {why}")

    def check(self, key, value, ok, expected):
        if not ok(value):
            self.refuse(f"{key} must be {expected}, got {value!r}")
        return value

    def take(self, key, ok, expected, default=_REQUIRED):
        if key not in self.cfg and default is _REQUIRED:
            self.refuse(f"missing required key {key!r}")
        return self.check(key, self.cfg.pop(key, default), ok, expected)

    def args(self) -> ModelArgs:
        family = self.take("model_type", lambda v: v in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}",
                           "llama")
        gemma = family == "gemma3_text"
        values = dict(family=family, **self.shape(), **self.tokens())
        values.update(self.rope(gemma))
        if gemma:
            values.update(self.gemma(values["n_layers"]))
        else:
            self.take("hidden_act", lambda v: v == "silu", "'silu' (SwiGLU)", "silu")
        if family == "llama":
            values.update(attention_bias=self.take("attention_bias", *_BOOL, False),
                          mlp_bias=self.take("mlp_bias", *_BOOL, False))
        elif family == "qwen2":
            values.update(qkv_bias=True, **self.qwen2_windows(values["n_layers"]))
        elif family == "mistral":
            values["sliding_window"] = self.take("sliding_window", *_SIZE_OR_NULL, None)
        self.take("attention_dropout", lambda v: v is None or (_is_number(v) and v == 0), "0 (no dropout)", 0.0)
        if unknown := sorted(set(self.cfg) - _INFORMATIONAL_KEYS):
            self.refuse(f"unsupported keys {unknown}")
        try:
            return ModelArgs(**values)
        except ValueError as e:   # __post_init__'s checks of the derived sizes (an odd head_dim)
            self.refuse(str(e))

    def shape(self) -> dict:
        dim, n_heads = self.take("hidden_size", *_SIZE), self.take("num_attention_heads", *_SIZE)
        n_kv_heads = self.take("num_key_value_heads", *_SIZE_OR_NULL, None) or n_heads
        head_dim = self.take("head_dim", *_SIZE_OR_NULL, None)
        if n_heads % n_kv_heads:
            self.refuse(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}")
        if head_dim is None and dim % n_heads:
            self.refuse(f"hidden_size={dim} is not a multiple of num_attention_heads={n_heads}: give head_dim")
        return dict(dim=dim, n_layers=self.take("num_hidden_layers", *_SIZE), n_heads=n_heads,
                    n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=self.take("intermediate_size", *_SIZE),
                    norm_eps=float(self.take("rms_norm_eps", *_POSITIVE, 1e-6)),
                    max_seq_len=self.take("max_position_embeddings", *_SIZE, 4096),
                    tie_embeddings=self.take("tie_word_embeddings", *_BOOL, False))

    def tokens(self) -> dict:
        vocab_size = self.take("vocab_size", *_SIZE)
        is_token = lambda v: _is_int(v) and 0 <= v < vocab_size   # noqa: E731
        token = f"a token id in 0..{vocab_size - 1}"
        # transformers allows a list of EOS ids (any of them ends a turn, as in Llama-3-Instruct) and null for both;
        # a tokenizer's one EOS must then be among them (Tokenizer.check_model). No EOS at all is refused: every
        # training sample ends with one.
        eos_ok = lambda v: is_token(v) or (isinstance(v, list) and len(v) > 0 and all(map(is_token, v)))  # noqa
        return dict(vocab_size=vocab_size,
                    bos_id=self.take("bos_token_id", lambda v: v is None or is_token(v), f"{token} or null", 1),
                    eos_id=self.take("eos_token_id", eos_ok, f"{token} or a list of them", 2))

    def rope(self, gemma: bool) -> dict:
        """RoPE's base and scaling in either form: top-level rope_theta and rope_scaling (transformers 4.x), or
        rope_parameters (5.x; Gemma-3's nested by layer type)."""
        params = self.take("rope_parameters", *_SECTION, None) or {}
        scaling = self.take("rope_scaling", *_SECTION, None) or {}
        theta = self.take("rope_theta", *_POSITIVE, 1e6 if gemma else 10000.0)
        local = self.take("rope_local_base_freq", *_POSITIVE, 10000.0) if gemma else None
        if gemma and set(params) <= set(LAYER_TYPES):   # 5.x: {"full_attention": {...}, "sliding_attention": {...}}
            sliding = params.get("sliding_attention") or {}
            if check_scaling("rope_parameters.sliding_attention", sliding, self.refuse) is not None:
                self.refuse("rope_parameters.sliding_attention: only plain RoPE is implemented for sliding layers")
            local = self.check("rope_parameters.sliding_attention.rope_theta", sliding.get("rope_theta", local),
                               *_POSITIVE)
            params, name = params.get("full_attention") or {}, "rope_parameters.full_attention"
        else:
            name = "rope_parameters"
        if "rope_theta" in params:
            theta = self.check(f"{name}.rope_theta", params["rope_theta"], *_POSITIVE)
        chosen = check_scaling(name, params, self.refuse) or check_scaling("rope_scaling", scaling, self.refuse)
        return dict(rope_theta=float(theta), rope_scaling=chosen,
                    rope_local_theta=None if local is None else float(local))

    def layer_types(self, n_layers: int, default: list[str]) -> list[str]:
        types = self.take("layer_types", lambda v: v is None or (
            isinstance(v, list) and len(v) == n_layers and all(t in LAYER_TYPES for t in v)),
            f"null or a list of {n_layers} of {', '.join(LAYER_TYPES)}", None)
        return default if types is None else types

    def qwen2_windows(self, n_layers: int) -> dict:
        """Qwen2's windows: none unless use_sliding_window, then from layer max_window_layers on."""
        use = self.take("use_sliding_window", *_BOOL, False)
        window = self.take("sliding_window", *_SIZE_OR_NULL, None) if use else self.cfg.pop("sliding_window", None)
        start = self.take("max_window_layers", lambda v: _is_int(v) and v >= 0, "an int ≥ 0", n_layers)
        default = ["sliding_attention" if use and window is not None and i >= start else "full_attention"
                   for i in range(n_layers)]
        types = self.layer_types(n_layers, default)
        if "sliding_attention" in types and window is None:
            self.refuse("layer_types has sliding_attention layers but sliding_window is null")
        return dict(sliding_window=window if "sliding_attention" in types else None, layer_types=types)

    def gemma(self, n_layers: int) -> dict:
        """Gemma-3's choices: GeGLU, four norms a block, q/k norms, its query scale, sliding and full layers."""
        for key in ("hidden_activation", "hidden_act"):
            self.take(key, lambda v: v in (None, "gelu_pytorch_tanh"), "'gelu_pytorch_tanh'", None)
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            self.take(key, *_NULL, None)
        self.take("use_bidirectional_attention", lambda v: v in (None, False), "false", False)
        self.take("attention_bias", lambda v: v is False, "false", False)
        # Without layer_types, every pattern-th layer is full (transformers 5.x saves the pattern as a private key).
        pattern = self.take("_sliding_window_pattern", *_SIZE, self.take("sliding_window_pattern", *_SIZE, 6))
        return dict(activation="gelu_tanh", norm_offset=True, embed_scale=True, sandwich_norms=True, qk_norm=True,
                    query_pre_attn_scalar=self.take("query_pre_attn_scalar", *_POSITIVE, 256),
                    sliding_window=self.take("sliding_window", *_SIZE, 4096),
                    layer_types=self.layer_types(n_layers, ["sliding_attention" if (i + 1) % pattern else
                                                            "full_attention" for i in range(n_layers)]))
