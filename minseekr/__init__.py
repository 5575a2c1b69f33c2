"""minseekr: SEEKR (selective attention-guided knowledge retention) for LLaMA-style models, in plain PyTorch."""
from minseekr.network.checkpoint import load_hf, save_hf
from minseekr.network.generate import generate
from minseekr.network.model import KVCache, ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer
from minseekr.seekr import heads

__all__ = ["KVCache", "ModelArgs", "Tokenizer", "Transformer", "generate", "heads", "load_hf", "save_hf"]
