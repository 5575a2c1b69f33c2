"""The network and its files: the LLaMA-style transformer, HF checkpoints in both directions, tokenizers, generation.

    args.py         the model's shape and its family's choices (LLaMA/Llama-3, Qwen2, Mistral, Gemma-3), read from and
                    written to an HF config.json
    rope.py         RoPE and its scalings (linear, dynamic, YaRN, Llama-3's)
    model.py        the decoder (RMSNorm, RoPE, gated MLP, MHA/GQA/MQA, sliding windows, KV cache), attention maps
                    and the `probe` hook
    checkpoint.py   HF directories: `HFCheckpoint` (one name→file rule, one validation), `load_hf`, `write_hf`
    tokenizer.py    SentencePiece and HF `tokenizer.json`, chat templates, the TRACE training encoding
    generate.py     batched greedy / sampled generation with the KV cache, soft prompts included

Imports: `minseekr.runtime` only. Nothing here knows of continual learning.
"""
