"""Continual knowledge learning (TAALM, Seo et al. 2024): learning new facts from documents without forgetting
known ones, by choosing which tokens of a document the update attends to.

    lama.py       LAMA-ckl: facts, their probes, the authors' metric, the split for the model in use
    weights.py    the weighted next-token loss and the token weights of Finetune, Oracle and RHO-1
    taalm.py      TAALM's Train-Attention model φ, the functional AdamW step and φ's meta-loss through it
    baselines.py  Mix-Review's review documents and RecAdam's annealed recall of θ_0, over either engine

Imports: `minseekr.runtime`, `minseekr.network`, `minseekr.methods` (φ's LoRA).
"""
