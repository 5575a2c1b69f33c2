"""SEEKR's machinery: what a replayed batch is distilled with, which heads are worth it, and where it is kept.

    kl.py        the fused softmax-KL of chosen heads at sampled rows (Eq. 5, 12) and the probes that compute it
    distill.py   the logit losses (Eq. 3) and the teacher's signals stored with each replayed sample
    heads.py     task sensitivity (Eq. 6-8), forgettability (Eq. 9), importance (Eq. 10), budgets (Eq. 11)
    buffer.py    the memory buffer on disk: replay samples with their teacher signals, and their batches
    grafting.py  Fig. 1's attention grafting
    figures.py   the head figures (Fig. 4, 5)

Imports: `minseekr.runtime` and `minseekr.network`.
"""
