"""What each method does: the one table the trainer and the entry points ask, never a method's name.

A method is SEEKR or one of the paper's baselines; its row says what it adds to new-task cross-entropy and what
it keeps between tasks. `training.build` turns a row into the object the trainer calls.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What a method adds to new-task cross-entropy; the trainer asks these, never a method's name."""
    replays: bool = False             # trains on the replay buffers R_k of earlier tasks (Eq. 2)
    distils_logits: bool = False      # stores θ_k's logits on R_k and distils them when replaying (Eq. 3)
    distils_attention: bool = False   # scores and selects heads, distils their attention rows (Eq. 5-13)
    distils_previous: bool = False    # distils θ_{k−1} on the new task's own inputs (LwF)
    penalises_drift: bool = False     # adds a quadratic penalty towards earlier weights (EWC)
    joint: bool = False               # trains once on every task together (MTL, the upper bound)
    adapts: bool = False              # trains only its own parameters beside the frozen model (PET: olora.py)
    learns_inputs: bool = False       # also trains to write the task's samples: an LM loss on every token (LFPT5)
    pseudo_replay: bool = False       # its buffer R_k holds samples θ_k writes of task k, never real ones (LFPT5)
    reflects: bool = False            # replays pseudo-inputs of finished tasks through its selection (SAPT's ARM)


METHODS = {
    "seqft": Method(),                                                        # the lower bound
    "replay": Method(replays=True),
    "derpp": Method(replays=True, distils_logits=True),
    "seekr": Method(replays=True, distils_logits=True, distils_attention=True),
    "lwf": Method(distils_previous=True),
    "ewc": Method(penalises_drift=True),
    "mtl": Method(joint=True),
    "olora": Method(adapts=True),                                             # a new LoRA per task, orthogonal
    "pp": Method(adapts=True),                                                # a new soft prompt per task
    "l2p": Method(adapts=True),                                               # a prompt pool chosen by the input
    "lfpt5": Method(adapts=True, replays=True, distils_logits=True, learns_inputs=True, pseudo_replay=True),
    "sapt": Method(adapts=True, reflects=True),                               # a LoRA per task, mixed per input
}
