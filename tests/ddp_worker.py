"""Run under torchrun by tests/test_ddp.py: trains a tiny config, then records this rank's weights.

Usage: torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py CONFIG.yaml RUN_DIR WEIGHTS_DIR
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffmis.config import load_config
from diffmis.training import distributed
from diffmis.training.trainer import train

cfg_path, run_dir, weights_dir = sys.argv[1:4]
res = train(load_config(cfg_path), Path(run_dir))
rank = torch.distributed.get_rank()
state = {k: v.detach().contiguous().clone() for k, v in res.method.state_dict().items()}
save_file(state, str(Path(weights_dir) / f"rank{rank}.safetensors"))
distributed.cleanup()
