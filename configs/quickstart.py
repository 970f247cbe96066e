"""Quickstart: a small MTP model that trains on 2 CPU cores in about 10 minutes.

Run: python launch.py --config configs/quickstart.py --workdir runs/quickstart
Produces: a 2-layer, width-128 model with D=3 sequential MTP modules trained on the Python
standard library's source; prints the validation loss and each depth's top-1 accuracy, then
runs `demo` (each depth's top-5 and one draft-and-verify step) and `bench` (ar vs mtp decoding,
written to runs/quickstart/bench.json). Running the same command again resumes from the last
checkpoint and finishes at once (use --mode demo or --mode bench to repeat those).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.mtp.depth = 3
  c.train.steps = 1200
  c.train.checkpoint_every = 300
  c.train.eval_every = 300
  c.run_after_train = 'demo,bench'
  return c
