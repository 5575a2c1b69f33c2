"""What a step asks of the device, counted on any device: the benchmarks' launch and synchronisation figures.

A GPU step of small operations is bound by how many kernels the host launches and how often it waits for the
device (each read of a tensor's value back into Python). Neither needs a GPU to count:

    with Dispatched() as counted:
        step()
    counted.ops, counted.syncs
"""
from torch.utils._python_dispatch import TorchDispatchMode


class Dispatched(TorchDispatchMode):
    """Counts what a step asks of the device, whatever the device: the aten operations dispatched below autograd
    (views and the CPU's wrapped Python scalars excluded; each is about one kernel launch on a GPU), and the reads
    of a tensor's value back to Python through item(), bool(), int() or float() (each a host-device
    synchronisation on a GPU; a CPU tensor's tolist() reads its memory without a dispatch and is not seen)."""

    HOST = {"aten.scalar_tensor.default", "aten.promote_types.default", "aten._local_scalar_dense.default",
            "aten._unsafe_view.default"}

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.syncs += name == "aten._local_scalar_dense.default"
        self.ops += not func.is_view and name not in self.HOST
        return func(*args, **(kwargs or {}))
