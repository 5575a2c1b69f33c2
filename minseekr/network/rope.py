"""RoPE: the rotation of q and k by position, in HF's rotate-half layout, and the scalings of its frequencies.

A head of D dims rotates D/2 pairs (i, i + D/2) by angle position·f_i, f_i = θ^(−2i/D). Scalings change f (all
as transformers computes them, in fp32), and YaRN also scales cos and sin:

    linear    f_i / factor                                             (position interpolation)
    dynamic   θ grown to θ·(factor·L/L₀ − (factor − 1))^(D/(D−2)) for a batch whose last position L exceeds the
              trained L₀ (NTK-aware); plain RoPE up to L₀. L is each forward's own (transformers keeps the
              largest L it has seen until a batch falls back under L₀: the same on any one forward)
    yarn      each f_i between f_i/factor and f_i by a ramp over its number of rotations in L₀ (β_fast, β_slow);
              cos and sin × attention_factor (0.1·ln(factor) + 1 by default)
    llama3    low frequencies (wavelength > L₀/low_freq_factor) / factor, high ones kept, the band between
              smoothly interpolated (Llama-3.1's)
"""
import math

import torch

# Each scaling's settings: (required, optional). A key outside them is refused by name.
SCALINGS = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor"}, {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                          "mscale", "mscale_all_dim", "truncate"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor"}, {"original_max_position_embeddings"}),
}


def check_scaling(name: str, section: dict, refuse) -> dict | None:
    """A config's RoPE section as {"rope_type", its settings} (None for plain RoPE); `refuse(why)` raises."""
    kind = section.get("rope_type", section.get("type", "default"))
    settings = {k: v for k, v in section.items() if k not in ("rope_type", "type", "rope_theta")}
    if kind == "default":
        if settings:
            refuse(f"{name}: {sorted(settings)} not implemented for plain RoPE")
        return None
    if kind not in SCALINGS:
        refuse(f"{name}.rope_type={kind!r} is not supported (default, {', '.join(SCALINGS)})")
    required, optional = SCALINGS[kind]
    if missing := sorted(required - set(settings)):
        refuse(f"{name}: rope_type {kind!r} needs {', '.join(missing)}")
    if unknown := sorted(set(settings) - required - optional):
        refuse(f"{name}: {', '.join(unknown)} not implemented for rope_type {kind!r}")
    for key, value in settings.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (isinstance(value, bool) if key == "truncate" else value is None or (number and value > 0)):
            refuse(f"{name}.{key} must be {'true or false' if key == 'truncate' else 'a finite number > 0'}, "
                   f"got {value!r}")
    return {"rope_type": kind, **settings}


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, trained_len: int,
                        seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """f (D/2,) in fp32 and the factor on cos and sin, for a batch whose positions end before `seq_len`."""
    f = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return f, 1.0
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":
        return f / factor, 1.0
    if kind == "dynamic":
        L = max(seq_len, trained_len)
        base = theta * ((factor * L / trained_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), 1.0
    original = scaling.get("original_max_position_embeddings") or trained_len
    if kind == "llama3":
        low, high = original / scaling["low_freq_factor"], original / scaling["high_freq_factor"]
        wavelength = 2 * math.pi / f
        scaled = torch.where(wavelength > low, f / factor, f)
        smooth = (original / wavelength - scaling["low_freq_factor"]) / (
            scaling["high_freq_factor"] - scaling["low_freq_factor"])
        medium = ~(wavelength < high) * ~(wavelength > low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    return _yarn(head_dim, theta, scaling, original)


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, theta: float, scaling: dict, original: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023): f interpolated between f/factor and f by a ramp over the dims whose number of
    rotations in `original` positions lies between β_slow and β_fast; cos and sin × the attention factor."""
    factor, mscale, mscale_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else \
            _mscale(factor)

    def dim_of(rotations):   # the dim whose wavelength fits `rotations` times into the trained length
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high else high) - low))
    extrapolate = 1 - ramp.clamp(0, 1)
    powers = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    f = (1.0 / (factor * powers)) * (1 - extrapolate) + (1.0 / powers) * extrapolate
    return f, float(attention)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling=None,
                 trained_len: int = 0):
    """cos and sin (B, 1, S, D) for integer positions (B, S), in HF's fp32 recipe."""
    seq_len = int(positions.max()) + 1 if scaling is not None and scaling["rope_type"] == "dynamic" else 0
    inv_freq, attention = inverse_frequencies(head_dim, theta, scaling, trained_len, seq_len)
    freqs = positions[..., None].float() * inv_freq.to(positions.device)     # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]                          # (B, 1, S, D)
    return (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
