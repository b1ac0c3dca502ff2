"""Run a script under accelerate's FSDP on CPU processes (gloo), which accelerate itself offers on GPUs only.

    accelerate launch --config_file configs/accelerate/fsdp.yaml tests/fsdp_on_cpu.py train.py ...

The launcher exports the config file's FSDP settings; train.py starts its processes on CPU when no GPU
is there (MULTI_CPU), and this turns that state into FSDP with the plugin those settings describe.
FSDP2 only: FSDP1 takes a GPU device id.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

if os.environ.get("FSDP_VERSION") != "2":
    sys.exit("fsdp_on_cpu.py: FSDP1 needs a GPU device id; use a config with fsdp_version: 2")
start_state = AcceleratorState.__init__


def start_fsdp_state(self, *args, **kwargs) -> None:
    start_state(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin()
        if self._mixed_precision != "no":
            self.fsdp_plugin.set_mixed_precision(self._mixed_precision)


AcceleratorState.__init__ = start_fsdp_state
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
