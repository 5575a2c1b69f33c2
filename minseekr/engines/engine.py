"""Which engine trains the model: the hand-written FSDP (`minseekr`) or PyTorch's FSDP2 (`torch`), chosen here only.

Both shard the model over the process group (a world of one in a plain `python` run) and offer the same
interface (see `fsdp.py`). An engine is built around a model already in memory (`build_engine`) or straight
from an HF directory (`load_engine`): the hand-written engine then streams each rank's rows from the files and
never holds the whole model; FSDP2 loads it whole first (its `fully_shard` shards a built module).
`export_hf` writes an engine's weights back as an HF directory.
"""
import torch

from minseekr.engines.fsdp import FSDP
from minseekr.engines.fsdp_torch import TorchFSDP
from minseekr.network.checkpoint import HFCheckpoint, load_hf, meta_model, write_hf
from minseekr.runtime import init_distributed, together

ENGINES = {"minseekr": FSDP, "torch": TorchFSDP}


def _engine_class(kind):
    if kind not in ENGINES:
        raise ValueError(f"--fsdp must be one of {'|'.join(ENGINES)}, got {kind!r}")
    return ENGINES[kind]


def build_engine(model, kind="minseekr", *, device=None, **options):
    """`model` (a Transformer) sharded by engine `kind` over the process group, started if need be. `options` are
    the engines' common ones: compute_dtype, activation_checkpointing, betas, eps, weight_decay."""
    engine = _engine_class(kind)
    _, _, default_device = init_distributed()
    if "betas" in options:
        options["betas"] = tuple(options["betas"])   # a list once read back from config.json
    return engine(model, device=device or default_device, **options)


def load_engine(path, kind="minseekr", *, frozen=False, **kwargs):
    """The HF checkpoint at `path` in engine `kind`; `frozen` leaves its weights without gradients or optimiser
    state (a teacher). Keyword arguments as `build_engine`."""
    _engine_class(kind)
    checkpoint = HFCheckpoint(path)   # every name, shape and dtype checked before any rank reads a tensor
    if kind == "minseekr":
        engine = build_engine(meta_model(checkpoint.args).requires_grad_(not frozen), kind, **kwargs)
        engine.load_hf(checkpoint)
        return engine
    return build_engine(load_hf(checkpoint, dtype=torch.float32).requires_grad_(not frozen), kind, **kwargs)


def export_hf(engine, path, dtype=torch.bfloat16, max_shard_size="5GB"):
    """The engine's weights as an HF directory: every rank gathers each unit in turn, rank 0 writes (a failure
    there, such as a full disk, stops every rank)."""
    with together():
        write_hf(engine.model.args, engine.full_tensors(), path, max_shard_size, dtype, write=engine.rank == 0)
