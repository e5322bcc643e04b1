"""Run under torchrun by tests/test_ddp.py: trains a tiny config, then records this rank's weights.

Usage: torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py CONFIG.yaml RUN_DIR WEIGHTS_DIR
"""

import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffmis.config import load_config
from diffmis.training import distributed
from diffmis.training.trainer import train

cfg_path, run_dir, weights_dir = sys.argv[1:4]
if os.environ.get("DIFFMIS_TEST_SLOW_CLOCK") and os.environ.get("RANK") == "1":
    # rank 1's clock runs at half speed: its own elapsed time would stop it at a later step than rank 0's
    import types

    from diffmis.training import trainer

    t0 = time.time()
    trainer.time = types.SimpleNamespace(time=lambda: t0 + 0.5 * (time.time() - t0))
res = train(load_config(cfg_path), Path(run_dir))
rank = torch.distributed.get_rank()
state = {k: v.detach().contiguous().clone() for k, v in res.method.state_dict().items()}
save_file(state, str(Path(weights_dir) / f"rank{rank}.safetensors"))
distributed.cleanup()
