"""minseekr: SEEKR (selective attention-guided knowledge retention) for LLaMA-style models, in plain PyTorch."""
from minseekr import heads
from minseekr.checkpoint import load_hf, save_hf
from minseekr.generate import generate
from minseekr.model import KVCache, ModelArgs, Transformer
from minseekr.tokenizer import Tokenizer

__all__ = ["KVCache", "ModelArgs", "Tokenizer", "Transformer", "generate", "heads", "load_hf", "save_hf"]
