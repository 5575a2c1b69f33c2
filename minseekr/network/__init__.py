"""The network and its files: the LLaMA-style transformer, HF checkpoints in both directions, tokenizers, generation.

    model.py        the decoder (RMSNorm, RoPE, SwiGLU, MHA/GQA, KV cache), attention maps and the `probe` hook
    checkpoint.py   HF directories: `HFCheckpoint` (one name→file rule, one validation), `load_hf`, `write_hf`
    tokenizer.py    SentencePiece and HF `tokenizer.json`, chat templates, the TRACE training encoding
    generate.py     batched greedy / sampled generation with the KV cache, soft prompts included

Imports: `minseekr.runtime` only. Nothing here knows of continual learning.
"""
