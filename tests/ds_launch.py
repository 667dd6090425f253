"""`accelerate launch ... tests/ds_launch.py STAGE.py ARGS`: runs a stage script under DeepSpeed on a CPU-only
machine with DeepSpeed's shared-memory all-reduce kernel turned off, so the collectives go over gloo. That kernel
is a CPU-only speed-up that DeepSpeed compiles from C++ on first use (1-2 minutes); GPU runs never use it."""

import runpy
import sys

import deepspeed.ops

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed reads this table before building the op
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
