"""The continual-learning methods: what each does (`table.METHODS`), and the objects the trainer calls.

    table.py     the capability table: what each method adds to new-task cross-entropy and keeps between tasks
    training.py  the method protocol, called at the points of Algorithm 1, and its two kinds: full fine-tuning
                 (SeqFT, Replay, DER++, SEEKR, LwF, EWC, MTL) and parameter-efficient methods on a frozen model
    ewc.py       online EWC's penalty on an engine's shards
    peft.py      LoRA through hooks, soft prompts, the methods' shared base and their files
    olora.py, pp.py, l2p.py, lfpt5.py, sapt.py   O-LoRA, Progressive Prompts, L2P, LFPT5, SAPT
    pseudo.py    pseudo-samples a model writes of a finished task (LFPT5, SAPT)
    pet.py       the parameter-efficient methods by name, their checkpoint files and resume state

Imports: `minseekr.runtime`, `minseekr.network`, `minseekr.seekr`, `minseekr.evaluation`, `minseekr.engines`.
"""
