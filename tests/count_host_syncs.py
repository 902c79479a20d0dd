"""Run train_conditional_ddpm.py (its flags as arguments) and print how many operations it made that, on a GPU, make
the CPU wait for the GPU: reading a tensor's value (`.item()`, `if tensor:`) or a data-dependent shape (`nonzero`).

One such wait per step keeps the CPU from queueing the next step while the GPU runs this one. The optimizer's
own steps are not counted: on a GPU its step counters live on the host, so reading them waits for nothing.
"""

import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_conditional_ddpm  # noqa: E402

HOST_SYNCS = {
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}


class CountHostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count, self.in_optimizer = 0, False
        register_optimizer_step_pre_hook(lambda *_: setattr(self, "in_optimizer", True))
        register_optimizer_step_post_hook(lambda *_: setattr(self, "in_optimizer", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in HOST_SYNCS and not self.in_optimizer:
            self.count += 1
        return func(*args, **(kwargs or {}))


if __name__ == "__main__":
    args = train_conditional_ddpm.parse_args(sys.argv[1:])
    with CountHostSyncs() as counter:
        train_conditional_ddpm.main(args)
    print(f"host syncs: {counter.count}")
