"""Trains three sequential MTP modules on a frozen SmolLM2-135M-Instruct: the longer recipe behind
the heads configs/smollm2.py uses.

The trunk writes its own training data, its answers (sampled at temperature 0.5) to the user turns
of configs/prompts/instruct_train.txt (experiments/make_prompts.py: questions, advice, recipes,
letters, names, poems and comparisons on some 400 subjects), and keeps its features while writing
(its last hidden state, the outputs of blocks 2, 15 and 27, which the first module reads as
EAGLE-3's head does, and its top-32 next-token distribution at every position), so it runs once
per training token. The modules start from random weights (the recipe sweep in
experiments/RESULTS.md, "Head-training recipes", found that better than copies of the trunk's
last block) and fit the trunk's own distribution at position i + k (self-distillation) over the
8192 most frequent tokens of that data, at a learning rate of 3e-3.

Run:    python launch.py --config configs/smollm2_heads.py
Export: python launch.py --config configs/smollm2_heads.py --mode export --export_dtype float16
        (float16: the form experiments/results/smollm2_heads.safetensors ships in)
Produces: the feature cache under runs/cache, checkpoints and TensorBoard logs under
runs/smollm2_heads, and with --mode export runs/smollm2_heads/export/ (the trunk in Hugging Face
layout and mtp_heads.safetensors).
"""

from configs import base


def get_config():
  c = base.pretrained('smollm2')
  c.mtp.depth = 3
  c.mtp.init_from = ''
  c.mtp.feature_layers = '2,15,27'
  c.data.sources = 'self'
  c.data.features = True
  c.data.self_prompts = 'configs/prompts/instruct_train.txt'
  c.data.self_tokens = 250_000
  c.data.self_temperature = 0.5
  c.data.cache_dir = 'runs/cache'
  c.train.freeze_trunk = True
  # The modules train in bfloat16 where that is faster (a GPU, a CPU with AMX or AVX512_BF16),
  # else in float32; the trunk writes its data and decodes in float32 either way.
  c.train.dtype = 'auto'
  c.train.head_loss = 'distill'
  c.train.draft_vocab = 8192
  c.decode.draft_vocab = 8192  # decode over the tokens the heads learn
  # 16 x 128 positions of 8192 logits per module are small: keeping them skips a projection.
  c.train.remat_logits = False
  c.train.steps = 1200
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.0
  c.train.checkpoint_every = 400
  c.train.eval_every = 400
  c.train.eval_batches = 16
  c.train.log_every = 20
  c.decode.prompts = 'configs/prompts/instruct_heldout.txt'
  c.decode.eval_prompts = 4
  c.run_after_train = ''
  return c
