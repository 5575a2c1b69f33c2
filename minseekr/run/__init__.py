"""A continual-learning run: its settings, Algorithm 1's loop, SEEKR's memory between tasks, and its files.

    config.py       settings: `ContinualConfig`, the presets, the method's authors' defaults, flags from dataclasses
    trainer.py      Algorithm 1: for each task, train (micro-steps, optimiser steps, resume points), then remember
    memory.py       SEEKR's memory lifecycle: R_k and its rows, θ_{k−1}'s snapshot, head scores, the buffer write
    batches.py      the epoch's interleaved plan of new and replayed micro-batches, and each rank's share
    resume.py       resume points: per-rank files, re-sharding
    rundir.py       the run directory's layout, its claim, and the results summary
    fingerprint.py  what a run depends on (θ_0, tokenizer, data, settings), held against resume points and buffers
    demo.py         the built-in demo behind `python train.py`
    knowledge.py    continual knowledge learning on LAMA-ckl (`train.py --knowledge`): the filter, φ's meta-training,
                    the epochs with a method's token weights, the authors' table
    phi.py          TAALM's φ meta-learned as a stage of a knowledge run, resumable step by step

Imports: every floor below (`minseekr.runtime`, `network`, `seekr`, `evaluation`, `engines`, `methods`).
`train.py`, `eval.py` and `tools/` stand on top; nothing in the package imports them.
"""
