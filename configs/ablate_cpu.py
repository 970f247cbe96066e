"""Base of the CPU ablation study: the quickstart model, shorter, with the sweep grids.

Run: python experiments/ablate.py --config configs/ablate_cpu.py --sweep depth
     (also --sweep loss_weight, kind, draft_len, seed)
Produces: runs/ablate/SWEEP/results.csv, results.md and SWEEP.png; each point trains for
1000 steps (2.0M tokens; 2.5 to 6 minutes on 2 CPU cores, by depth and by what else runs), and
each sweep took 8 to 21 minutes in the study whose results are in experiments/README.md.
"""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.mtp.depth = 2
  c.train.steps = 1000
  c.train.checkpoint_every = 500
  c.train.eval_every = 500
  c.decode.eval_prompts = 8  # tau per point, from greedy decoding of 8 validation prompts
  c.decode.bench_prompts = 8  # the draft_len sweep's bench rows (experiments/README.md)
  with c.unlocked():  # base's fields are locked; the grids are this config's own
    c.sweep = ml_collections.ConfigDict()
    c.sweep.depth = '0,1,2,3'
    c.sweep.loss_weight = '0.0,0.1,0.3,1.0'
    c.sweep.kind = 'sequential,parallel,medusa'
    c.sweep.draft_len = '1,2,3'
    c.sweep.seed = '0,1,2'  # the run-to-run spread of this config (seed 0 is the base point)
  return c
