"""Head-training recipes on a frozen SmolLM2-135M-Instruct, compared (the recipe sweep): one
sequential module, 400 steps of 16 x 128 tokens each, scored by greedy speculative decoding of 8
held-out instruct prompts at the end.

Run: python experiments/ablate.py --config configs/smollm2_ablate.py --sweep recipe
Produces: runs/ablate/recipe/results.csv, results.md and recipe.png (acceptance and tau per
recipe). The recipes are experiments/ablate.py's RECIPES: data tokens or the trunk's own
distribution as the target, text from the standard library's pydoc topics or chats the trunk
wrote (answers to given user turns, configs/smollm2_heads.py's cache, or to turns it invented),
the module started from the trunk's last block or from random.

The sweep in experiments/RESULTS.md ran before three later defaults this config now inherits:
train.dtype=auto (bfloat16 on a CPU with AMX or AVX512_BF16), train.remat_logits=False and
train.mask_rows=True; add --config.train.dtype=float32 --config.train.remat_logits=True
--config.train.mask_rows=False to train as it ran. Its chat recipes' data differs: the trunk
answers configs/prompts/instruct_train.txt, which held 2380 user turns then and holds 6000 now.
"""

import ml_collections

from configs import smollm2_heads


def get_config():
  c = smollm2_heads.get_config()
  c.mtp.depth = 1
  c.mtp.init_from = 'last_block'  # the recipes start here; self_distill_random_init from random
  # The recipe the sweep was measured with, before the heads recipe took the extra feature
  # layers, a higher learning rate and half the data.
  c.mtp.feature_layers = ''
  c.data.self_tokens = 500_000
  c.train.lr = 1e-3
  c.train.steps = 400
  c.train.warmup_steps = 40
  c.train.checkpoint_every = 400
  c.train.eval_every = 400
  c.decode.eval_prompts = 8
  with c.unlocked():  # base's fields are locked; the grid is this config's own
    c.sweep = ml_collections.ConfigDict()
    c.sweep.recipe = ('text_tokens,text_distill,self_distill,self_invented_distill,'
                      'self_distill_random_init')
  return c
