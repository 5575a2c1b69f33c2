"""Who holds the weights while they train: sharded over the process group, one rank being a world of one.

    fsdp.py        the hand-written ZeRO-3 engine (flat units, all-gather / reduce-scatter, AdamW on shards)
    fsdp_torch.py  PyTorch's FSDP2 behind the same interface, the peer it is measured against
    engine.py      the one place that picks an engine, builds or loads one, and exports its weights

Imports: `minseekr.runtime` and `minseekr.network`. The engines know no method and no run.
"""
