"""Training and evaluation: the jitted train step for the combined loss, the loop around it with
checkpoints, TensorBoard logs, preemption handling, and held-out evaluation.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from mtp_jax import atomic
from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import data as data_lib
from mtp_jax import decode as decode_lib
from mtp_jax import features as feat_lib
from mtp_jax import kernels
from mtp_jax import measure
from mtp_jax import selfdata
from mtp_jax import sharding
from mtp_jax.config import ConfigError, ModelConfig, folder_problem, prompt_lines, validate
from mtp_jax.loss import LossSpec, loss_of, loss_weight, metrics_of, positions, window_sums
from mtp_jax.model import MTPLanguageModel, init_tokens
from mtp_jax.pretrained import heads_file
from mtp_jax.pretrained import resolve as pretrained

CHAT_SEED = 0  # the trunk's chats: their sampling and which rows are held out


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, say); the message says where and why."""


def lr_schedule(t):
  """Learning rate of optimizer update `count` (0-based): linear warmup reaching t.lr at the
  warmup_steps-th update (count warmup_steps - 1), then cosine decay to t.lr * t.min_lr_ratio at
  the last update. The first update already moves (lr / warmup_steps), instead of optax's zero
  at count 0."""
  warmup = max(t.warmup_steps, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1), end_value=t.lr * t.min_lr_ratio)
  return lambda count: schedule(count + 1)


def _decay_mask(params):
  """Weight decay on matrices only: not on norms and biases (1-D, or Qwen2's q, k and v biases,
  stored per head) nor on the (un)embedding."""
  def keep(path, leaf):
    names = [str(getattr(p, 'key', '')) for p in path]
    return (leaf.ndim >= 2 and not {'embedding', 'unembedding'} & set(names)
            and not names[-1].endswith('_bias'))
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(t) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask))


def split_heads(params):
  """(heads, trunk): the MTP heads' part of a param tree and the rest, each a param tree."""
  inner = params['params']
  heads = {k: v for k, v in inner.items() if k.startswith('mtp')}
  return {'params': heads}, {'params': {k: v for k, v in inner.items() if k not in heads}}


def join_params(a, b):
  return {'params': {**a['params'], **b['params']}}


def trainable(params, frozen_trunk: bool):
  """The part of the params the optimizer updates."""
  return split_heads(params)[0] if frozen_trunk else params


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the compiled step (hashable, so jit can key on it)."""
  spec: LossSpec
  grad_accum: int
  loss_weight: float
  loss_weight_schedule: str
  inject_nan_step: int = -1


def train_step(state, batch, draft_ids=None, *, tx, sc: StepConfig):
  """One optimizer step over grad_accum micro-batches. A non-finite loss or gradient leaves
  the state untouched and raises the `nonfinite` flag, so a bad step is never applied. With a
  frozen trunk only the heads are differentiated and updated; the trunk passes through."""
  weight = loss_weight(state['step'], sc.loss_weight, sc.loss_weight_schedule)
  if sc.spec.frozen:
    train_part, frozen = split_heads(state['params'])
    full = lambda p: join_params(p, frozen)
  else:
    train_part, full = state['params'], lambda p: p
  sums_of = lambda p, micro: window_sums(full(p), micro, sc.spec, draft_ids)

  def micro_loss(p, micro, counts):
    sums = sums_of(p, micro)
    return loss_of(sums, sc.spec, weight, counts), sums

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  # Micro-batch i holds rows i, i + grad_accum, ...: the batch is split over the devices in
  # blocks of rows, so each device holds rows of every micro-batch and none moves (micro-batches
  # of consecutive rows made XLA gather and permute each one onto all devices; tests/
  # sharded_check.py counts the step's collectives).
  micro = jax.tree.map(lambda x: x.reshape(-1, sc.grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
  counts, scale = None, 1.0 / sc.grad_accum
  if sc.grad_accum > 1 and isinstance(batch, dict):
    # Rows packed into windows leave micro-batches different numbers of positions, so a mean of
    # micro-batch means would weigh a position by its micro-batch's size: each micro-batch's
    # sums are divided by the whole batch's positions instead, as one big batch divides them.
    # Positions depend on the targets alone; XLA keeps of this pass only what those need (the
    # trunk's top-k where they are its distribution).
    counts = jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.lax.map(
        lambda m: positions(sums_of(jax.lax.stop_gradient(train_part), m)), micro))
    scale = 1.0

  def accumulate(carry, micro_batch):
    (_, sums), grads = grad_fn(train_part, micro_batch, counts)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.eval_shape(lambda: grad_fn(train_part, first, counts))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro)
  grads = jax.tree.map(lambda g: g * scale, grads)
  # the whole batch's means (with equal micro-batches, the mean of their means)
  metrics = metrics_of(sums, sc.spec.head_loss == 'distill')
  poison = jnp.where(state['step'] + 1 == sc.inject_nan_step, jnp.nan, 1.0)
  metrics['loss/total'] = loss_of(sums, sc.spec, weight) * poison

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics['loss/total']) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state['opt_state'], train_part)
  updated = optax.apply_updates(train_part, updates)
  keep_old = lambda n, o: jnp.where(finite, n, o)
  new = {'step': state['step'] + 1,
         'params': full(jax.tree.map(keep_old, updated, train_part)),
         'opt_state': jax.tree.map(keep_old, opt_state, state['opt_state'])}
  metrics.update({'grad_norm': grad_norm, 'loss_weight': weight,
                  'nonfinite': 1 - finite.astype(jnp.int32),
                  'nonfinite_grad': 1 - jnp.isfinite(grad_norm).astype(jnp.int32)})
  return new, metrics


def eval_step(params, batch, draft_ids=None, *, spec: LossSpec):
  return window_sums(params, batch, spec, draft_ids)


def summarize_eval(sums_list, depth: int, agreement: bool = False) -> dict:
  """Host-side reduction of eval_step outputs over batches -> per-depth loss, accuracy,
  perplexity and (heads) agreement with their target's top token. A depth not computed (the
  trunk, when training on its cached features) is left out."""
  totals = [None if sums_list[0][k] is None else
            {name: np.sum([np.float64(s[k][name]) for s in sums_list]) for name in sums_list[0][k]}
            for k in range(depth + 1)]
  out = {name: float(value) for name, value in metrics_of(totals, agreement).items()}
  for k, total in enumerate(totals):
    if total is not None:
      out[f'perplexity/depth_{k}'] = float(np.exp(min(out[f'loss/depth_{k}'], 50.0)))
  return out


def window_length(config) -> int:
  """Tokens per training row: seq_len inputs plus the D + 1 targets past the last one."""
  return config.train.seq_len + config.mtp.depth + 1


def loss_spec(config, cfg: ModelConfig) -> LossSpec:
  t = config.train
  return LossSpec(cfg, head_loss=t.head_loss, topk=t.distill_topk, frozen=t.freeze_trunk,
                  feature_weight=float(t.feature_weight), remat=t.remat_logits,
                  mask_rows=t.mask_rows)


def step_dtype(config) -> str:
  """The training step's compute dtype: train.dtype, with '' meaning model.dtype
  and 'auto' bfloat16 where the device multiplies it fast (measure.bfloat16_products_fast),
  float32 elsewhere. Resolved when the steps are built, after jax.distributed has started, on
  each host from its own device: the hosts of one run are taken to be alike."""
  t = config.train
  if t.dtype == 'auto':
    return 'bfloat16' if measure.bfloat16_products_fast() else 'float32'
  return t.dtype or config.model.dtype


class Program:
  """The compiled side of a config on a mesh, with no data: the model config, optimizer, state
  layout (eval_shape -> logical axis names -> shardings) and the jitted init, train and eval
  steps. Benchmarks build this alone; Session adds data and checkpoints. The steps take the
  draft vocabulary's token ids as a third argument (an empty array: the full vocabulary)."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.cfg = ModelConfig.from_config(config)  # decoding's, and the trunk's that writes data
    # the training step's (train.dtype, when set, replaces model.dtype)
    self.step_cfg = dataclasses.replace(self.cfg, dtype=step_dtype(config))
    self.window = window_length(config)
    self.tx = make_optimizer(config.train)
    self.spec = loss_spec(config, self.step_cfg)
    # Evaluations compute in model.dtype, so a run's eval metrics do not depend on the machine
    # train.dtype=auto resolved on.
    self.eval_spec = loss_spec(config, self.cfg)
    model = MTPLanguageModel(self.step_cfg)
    frozen = config.train.freeze_trunk

    def init_state(rng, given=None):
      """Step 0's state: random params, except the subtrees in `given` (params by path, e.g.
      from pretrained files), which are put in place; with `given`, the random values they
      replace are never computed (the compiled program drops them), and params come unboxed."""
      params = model.init(rng, init_tokens(self.cfg))
      if given is not None:
        params = {'params': pretrained.merge(nn.meta.unbox(params)['params'], given)}
      return {'step': jnp.zeros((), jnp.int32), 'params': params,
              'opt_state': self.tx.init(trainable(params, frozen))}

    boxed = jax.eval_shape(lambda: init_state(jax.random.key(0)))  # the key too: nothing compiles
    self.state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.meta.unbox(boxed), self.state_sharding)
    self.batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    self.init = jax.jit(lambda rng, given=None: nn.meta.unbox(init_state(rng, given)),
                        out_shardings=self.state_sharding)
    self.init_params = jax.jit(lambda rng, given: init_state(rng, given)['params'],
                               out_shardings=self.state_sharding['params'])
    t = config.train
    sc = StepConfig(self.spec, t.grad_accum, config.mtp.loss_weight,
                    config.mtp.loss_weight_schedule, t.inject_nan_step)
    self._train_step = jax.jit(
        lambda state, batch, ids: train_step(state, batch, ids if ids.size else None, tx=self.tx,
                                             sc=sc),
        in_shardings=(self.state_sharding, self.batch_sharding, replicated),
        out_shardings=(self.state_sharding, None), donate_argnums=0)
    self._eval_step = jax.jit(
        lambda params, batch, ids: eval_step(params, batch, ids if ids.size else None,
                                             spec=self.eval_spec),
        in_shardings=(self.state_sharding['params'], self.batch_sharding, replicated))
    self.draft_ids = np.zeros((0,), np.int32)

  def train_step(self, state, batch):
    return self._train_step(state, batch, self.draft_ids)

  def lower_train_step(self, batch, draft_ids):
    """The train step lowered for abstract (or concrete) batch and draft ids, for cost and
    memory analysis."""
    return self._train_step.lower(self.abstract_state, batch, draft_ids)

  def eval_step(self, params, batch):
    return self._eval_step(params, batch, self.draft_ids)


def token_rank(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """Every token id, the most frequent in `tokens` first (ties by id)."""
  counts = np.bincount(np.asarray(tokens, np.int64), minlength=vocab_size)[:vocab_size]
  return np.argsort(-counts, kind='stable').astype(np.int32)


def check_fits(config, reads: str = '') -> None:
  """The model (and, for training and eval, a batch of train.batch_size windows) divides over the
  config's mesh and fits the devices' memory (`reads`: as Session's)."""
  batches = reads in ('', 'eval')  # training's batches, and eval's of the same size
  sharding.check_mesh(config, jax.device_count(), jax.process_count(), batch=batches)
  sharding.check_memory(config, batch=batches)


def check_trained(mode: str, config, workdir: str) -> None:
  """A mode that reads the workdir's checkpoint finds one, or a model it can use without one: a
  pretrained trunk, with heads from mtp.init_from where the mode uses heads (export would write
  random ones; 'profile', a script timing decoding calls, takes random heads on a pretrained
  trunk). Checked before anything is read or written: a mistyped --workdir built its data and
  tokenizer there first."""
  # (a save in flight counts only while the run that may be making it holds the workdir)
  if ckpt_lib.holds_checkpoints(workdir, in_flight=atomic.held_elsewhere(workdir)):
    return
  if mode == 'eval' or not config.model.init_from:
    raise ckpt_lib.CheckpointError(f'no checkpoint in {workdir}; train first')
  uses_heads = mode != 'profile' and not (mode == 'generate' and config.decode.method == 'ar')
  if config.mtp.depth >= 1 and uses_heads and not config.mtp.init_from:
    raise ckpt_lib.CheckpointError(
        f'no checkpoint in {workdir}, and mtp.init_from is empty: the {config.mtp.depth} MTP heads '
        'would be random; train them here first, or give mtp.init_from (a heads file)')


class Session(Program):
  """Everything one run needs: the checked config, the model file it starts from, data, mesh,
  compiled functions and the workdir's checkpoints. Every check runs before anything is written
  or compiled. `data=False` skips the training data (decoding modes that do not draw prompts
  from it). `check(session)`, when given, makes further checks of its own: before the data is
  prepared when the model file gives the tokenizer, else before it with prompts standing in as
  one id each (encode_prompt) and again right after. `reads`: the mode (eval,
  a decoding mode, export) that will read the workdir's checkpoint (check_trained); its
  training batch need not divide over the mesh, unless it is eval. `hold()`, for a training, takes
  the workdir before anything is written there (the data's tokenizer, the cache): the workdir's
  checks are made again once it holds it, as a run it waited for may have saved meanwhile."""

  def __init__(self, config, workdir: str, *, data: bool = True, check=None, reads: str = '',
               hold=None):
    self.workdir = workdir
    self.stand_ins = False  # prompts stand in as one id each (inference.encode_prompt)
    self.writes = not reads or data  # training writes config.json, the data tokenizer.json
    problem = folder_problem(workdir, '--workdir')  # launch.py says it first; scripts, here
    if problem:
      raise ConfigError(problem)
    config = pretrained.resolve_config(config)
    validate(config)
    check_fits(config, reads)
    self.check_workdir(config)
    pretrained.check_heads_init(config)
    if reads:
      check_trained(reads, config, workdir)
    self.model_file = (pretrained.open_model(config.model.init_from)
                       if config.model.init_from else None)
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:  # a session refused from here on is never returned: its checkpointer is closed
      self._check_trunk(config)
      if self.model_file is not None and self.model_file.tokenizer is None:
        needs = ("tokenizer.json (transformers writes one beside the weights: "
                 "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
                 if os.path.isdir(config.model.init_from) else 'tokenizer in its metadata')
        raise data_lib.DataError(f'model.init_from: {config.model.init_from} has no {needs}; the '
                                 'tokenizer comes with the model')
      super().__init__(config, sharding.make_mesh(config.mesh))
      self.data = self.rows = None
      early = check is not None and self.model_file is not None
      if check is not None and (early or data):
        # A model trained here gets its tokenizer from its data: before that, its prompts stand in
        # as one id each (encode_prompt), so what fails whatever they encode to fails here, before
        # the data is made, and the rest right after.
        self.stand_ins = self.tokenizer is None
        try:
          check(self)
        finally:
          self.stand_ins = False
      if hold is not None:
        hold()
        self.recheck()
      if data:
        self._prepare_data()
      if check is not None and not early:
        check(self)
    except BaseException:
      self.checkpointer.close()
      raise

  def check_workdir(self, config, held: bool = False):
    """Refuses a workdir whose checkpoints hold another model. A run stopped before its first
    checkpoint (bad input, a non-finite first step) binds nothing: what its config.json and
    tokenizer.json say matters once a checkpoint exists (`bound`). A config.json that is not a
    run's (the workdir is a model's own directory) is refused where the session would write its
    own files there. A checkpoint being saved binds only while a run that may be saving it holds
    the workdir (`held`: this run does; otherwise another may), else a killed run left it."""
    # (Every process makes this first check before process 0 takes the lock: the checkpoint
    # manager each makes first holds them at a barrier; else process 1 could read its own
    # run's lock as another run's.)
    saving = not held and atomic.held_elsewhere(self.workdir)
    self.bound = ckpt_lib.holds_checkpoints(self.workdir, in_flight=saving)
    if not self.bound and self.writes and ckpt_lib.foreign_config(self.workdir):
      raise ckpt_lib.CheckpointError(
          f'{self.workdir} holds a config.json that is not a run\'s (a model\'s own directory?), '
          'which a run would write over: use another --workdir')
    self.saved_config = ckpt_lib.load_config(self.workdir) if self.bound else None
    if self.bound and self.saved_config is None:  # else another model's would read as damaged
      raise ckpt_lib.CheckpointError(
          f'{self.workdir} holds checkpoints but no config.json, the record of the model they '
          'hold: put it back, or use another --workdir')
    if self.saved_config is not None:
      ckpt_lib.check_compatible(self.saved_config, config)

  def recheck(self):
    """The workdir's checks again, once a training holds the workdir: a run it waited for may
    have saved checkpoints since, of another model or trained from another model file, and the
    checkpoint manager lists only the steps it saw when it was made."""
    self.check_workdir(self.config, held=True)
    self.checkpointer.reload()
    self._check_trunk(self.config)

  def _check_trunk(self, config):
    """Refuses checkpoints trained from another model file than model.init_from now holds (a
    file replaced at the same path): the heads would be trained on, exported and named for a
    trunk they never saw. Their latest step records the file's sha256 (a Hugging Face
    directory's weights'), and a directory's config, tokenizer and chat template apart
    (trunk_setup); the file may have moved. Checkpoints from before that record name it by its
    path alone."""
    meta = self.checkpointer.latest_meta() if self.bound else {}
    trained_on = meta.get('trunk', '')
    whole = trained_on and ('trunk_setup' in meta or not self.trunk_setup)
    if self.bound and not whole and config.model.init_from:
      saved = self.saved_config.get('model', {}).get('init_from', '')
      if os.path.realpath(saved) != os.path.realpath(config.model.init_from):
        raise ckpt_lib.CheckpointError(
            f'workdir holds a checkpoint of a different model: model.init_from: "{saved}" -> '
            f'"{config.model.init_from}"')
    if trained_on and meta.get('trunk_setup', self.trunk_setup) != self.trunk_setup:
      raise ckpt_lib.CheckpointError(
          f'model.init_from: {config.model.init_from} holds the weights this workdir\'s '
          'checkpoints were trained from, but another config, tokenizer or chat template; give '
          'model.init_from the directory they were trained from, or use another --workdir')
    if trained_on and trained_on != self.trunk_identity:
      raise ckpt_lib.CheckpointError(
          f'model.init_from: {config.model.init_from or "(none)"} is not the model file this '
          f'workdir\'s checkpoints were trained from (sha256 {trained_on[:12]}..., not '
          f'{self.trunk_identity[:12] or "none"}); give model.init_from that file, or use '
          'another --workdir')

  @property
  def tokenizer(self):
    """The model file's tokenizer, else the data's (None before a model trained here has it)."""
    if self.model_file:
      return self.model_file.tokenizer
    return self.data.tokenizer if self.data is not None else None

  @property
  def eos_id(self) -> int:
    """The model's end token (the chat template's eos_token, an export's), else the data's EOS;
    generation ends at any of stop_ids."""
    if self.model_file is not None and self.model_file.eos_id is not None:
      return int(self.model_file.eos_id)
    return self.data.eos_id if self.data is not None else -1

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The tokens that end a generated row: the model file's (EOS, and the end of a turn where it
    names one), else the data's EOS."""
    if self.model_file is not None and self.model_file.stop_ids:
      return self.model_file.stop_ids
    return (self.eos_id,) if self.eos_id >= 0 else ()

  @functools.cached_property
  def decode_model(self):
    """The model as the decoder sees it: with the native kernels where they run, and drafting
    over the decode.draft_vocab most frequent tokens of the heads' training data (if > 0)."""
    N, ids = self.config.decode.draft_vocab, None
    if N:
      rank = self.token_rank()
      if rank is None:
        raise ConfigError(f'decode.draft_vocab={N} needs the token frequencies of the heads\' '
                          'training data: train in this workdir, or start from a heads file '
                          'that holds them (mtp.init_from)')
      ids = rank[:N]
    model = decode_lib.decode_model(self.cfg, self.config.decode.kernels, ids,
                                    self.config.decode.draft_dtype, self.config.decode.tiles)
    if model.draft_dtype != self.config.decode.draft_dtype:
      needs = ('the decoding kernels (float32 model, one CPU device, kernels built)'
               if model.draft_dtype == 'float32'
               else 'a CPU with AVX-512 or AVX2 (the scaled-tile kernels)')
      print(f'note: decode.draft_dtype={self.config.decode.draft_dtype} needs {needs}; drafting '
            f'reads {model.draft_dtype} heads', file=sys.stderr)
    width, groups = self.cfg.head_dim, self.cfg.num_heads // self.cfg.num_kv_heads
    if model.kernels and not kernels.attention_takes(width, groups):
      print(f'note: the attention kernel takes heads {kernels.HEAD_WIDTH_STEP} to '
            f'{kernels.MAX_HEAD_WIDTH} entries wide, by {kernels.HEAD_WIDTH_STEP}, and at most '
            f'{kernels.MAX_QUERIES} query heads a kv head; these ({width} wide, {groups} a kv '
            'head) attend in XLA instead, so greedy `mtp` may split from `ar` at a near tie of '
            'two logits', file=sys.stderr)
    return model

  @property
  def chat_template(self) -> str:
    return self.model_file.chat_template if self.model_file else ''

  @property
  def bos_id(self) -> int | None:
    return self.model_file.bos_id if self.model_file else None

  # Data.

  def _prepare_data(self):
    config, d = self.config, self.config.data
    root = d.cache_dir or os.path.join(self.workdir, 'data')
    if d.sources.strip() == 'self':
      queries = None
      if d.self_prompts:
        queries = prompt_lines(d.self_prompts, 'data.self_prompts', 'holds no user turn', ids=False)
      # A turn's place decides its split: a repeated one could be trained on and held out.
      seen = {}
      for i, q in enumerate(queries or []):
        if seen.setdefault(q, i) != i:
          raise ConfigError(f'data.self_prompts: turn {i + 1} of {d.self_prompts} repeats turn '
                            f'{seen[q] + 1} (a repeated turn could be both trained on and held '
                            'out); keep one of each')
      turns = queries and [selfdata.encode(self, q) for q in queries]
      selfdata.check_fits(self, turns, d.self_answer_len, self.cfg.max_seq_len)
      selfdata.check_held_out(self, turns, tokens=d.self_tokens, answer_len=d.self_answer_len,
                              valid_fraction=d.valid_fraction, seed=CHAT_SEED,
                              window=self.window)
      os.makedirs(self.workdir, exist_ok=True)
      spec = {'kind': 'chats', 'trunk': self.model_file.identity, 'tokens': d.self_tokens,
              'temperature': d.self_temperature, 'answer_len': d.self_answer_len,
              'topk': config.train.distill_topk if d.features else 0,
              'valid_fraction': d.valid_fraction}
      if queries:  # a cache made without them keeps its key
        spec['prompts'] = hashlib.sha1('\n'.join(queries).encode()).hexdigest()
      if self.stop_ids != (self.eos_id,):  # and one of a model that ends turns at EOS alone
        spec['stop_ids'] = list(self.stop_ids)
      cache = self._build(root, spec, lambda trunk, builder: selfdata.write_chats(
          trunk, builder, tokens=d.self_tokens, temperature=d.self_temperature,
          answer_len=d.self_answer_len, topk=spec['topk'], seed=CHAT_SEED,
          valid_fraction=d.valid_fraction, queries=queries))
      self.data = data_lib.TokenData(
          train=cache['train'].tokens, valid=cache['valid'].tokens, tokenizer=self.tokenizer,
          eos_id=self.eos_id, vocab_size=self.tokenizer.get_vocab_size())
      self._check_data()
      self.rows = cache  # features and row starts, or row starts alone (data.features=False)
    else:
      self.data = data_lib.prepare(d, self.workdir, self.model_file and self.model_file.tokenizer,
                                   self.model_file and self.model_file.eos_id, keep=self.bound)
      self._check_data()  # before the trunk runs over the corpus
      if d.features:
        tokens = _digest(self.data.train, self.data.valid)
        spec = {'kind': 'text', 'trunk': self.model_file.identity, 'tokens': tokens,
                'topk': config.train.distill_topk}
        self.rows = self._build(root, spec, lambda trunk, builder: selfdata.write_features(
            trunk, builder, {'train': selfdata.pieces(self.data.train),
                             'valid': selfdata.pieces(self.data.valid)},
            config.train.distill_topk))
    if config.train.draft_vocab:
      self.draft_ids = np.sort(self.data_token_rank()[:config.train.draft_vocab])

  def _check_data(self):
    """The tokenizer's size and each split's length, checked once the splits are known, not at
    the first batch of each split: the first evaluation may come after hours of training."""
    config = self.config
    if self.data.vocab_size > config.data.vocab_size:
      raise data_lib.DataError(f'tokenizer has {self.data.vocab_size} tokens, more than '
                               f'data.vocab_size={config.data.vocab_size}')
    for split, tokens in (('train', self.data.train), ('valid', self.data.valid)):
      if len(tokens) < self.window:
        fits = len(tokens) - config.mtp.depth - 1  # the longest window the split holds
        raise data_lib.DataError(
            f'train.seq_len={config.train.seq_len}: the {split} split has {len(tokens)} tokens, '
            f'fewer than one window of train.seq_len + mtp.depth + 1 = {self.window}; use '
            + (f'train.seq_len <= {fits}, ' if fits >= 1 else '')
            + f"more data or a {'larger' if split == 'valid' else 'smaller'} "
            'data.valid_fraction')

  def _build(self, root: str, spec: dict, write) -> dict:
    """The feature cache for `spec` (with the trunk's feature layers, when it keeps features),
    made if it is not there yet: from a finished cache of the same rows with other features by
    one trunk forward per row, else by write(trunk, builder), starting from a smaller finished
    cache of the same kind when there is one (write then appends rows)."""
    if spec['topk'] and self.cfg.feature_layers:  # caches made without them keep their key
      spec = {**spec, 'feature_layers': list(self.cfg.feature_layers)}
    if self.config.model.dtype != 'float32':  # the trunk writes in it; float32 caches keep theirs
      spec = {**spec, 'dtype': self.config.model.dtype}
    if self.model_file.setup_identity:  # a Hugging Face directory's config and tokenizer
      spec = {**spec, 'setup': self.model_file.setup_identity}
    directory = feat_lib.cache_dir(os.path.join(root, 'features'), spec)
    cache = feat_lib.load(directory)
    if jax.process_count() > 1:
      # Process 0's look decides for all: another run sharing data.cache_dir may finish the
      # cache between the processes' looks, and one that found it would skip the barrier below.
      if multihost_utils.broadcast_one_to_all(np.int32(cache is not None)):
        return cache if cache is not None else _wait_for_cache(directory)
    elif cache is not None:
      return cache
    failed = os.path.join(directory, FAILED)
    if jax.process_count() > 1:  # process 0 builds it (the workdir is shared, as for Orbax)
      if jax.process_index() == 0 and os.path.exists(failed):
        os.remove(failed)  # left by an earlier attempt; this one starts afresh
      multihost_utils.sync_global_devices(f'mtp_jax:build {directory}')
      if jax.process_index() > 0:
        return _wait_for_cache(directory)
    try:
      return self._build_here(directory, spec, write)
    except BaseException as e:  # the processes waiting for the cache learn why it never comes
      if jax.process_count() > 1:
        atomic.write_text(failed, f'{type(e).__name__}: {e}')
      raise

  def _build_here(self, directory: str, spec: dict, write) -> dict:
    """One run at a time builds a cache: another run sharing data.cache_dir waits for it, then
    reads what it built."""
    os.makedirs(directory, exist_ok=True)
    with atomic.exclusive(directory, f'data: waiting for another run building {directory}'):
      cache = feat_lib.load(directory)
      return cache if cache is not None else self._write_cache(directory, spec, write)

  def _write_cache(self, directory: str, spec: dict, write) -> dict:
    source = feat_lib.rows_source(directory, spec)
    if source:
      print(f'data: features of the rows in {source}, recomputed', file=sys.stderr)
      builder = feat_lib.Builder(directory, spec, features=True)
      selfdata.write_features(self.data_trunk(), builder, {
          split: feat_lib.rows(rows) for split, rows in feat_lib.load(source).items()},
          spec['topk'])
    else:
      base = feat_lib.smaller_cache(os.path.dirname(directory), spec)
      builder = feat_lib.Builder(directory, spec, features=spec['topk'] > 0, base=base)
      if builder.base:  # the base a resumed build began with, which may not be `base`
        print(f'data: starting from the {builder.base["spec"]["tokens"]}-token cache in '
              f'{builder.base_dir}', file=sys.stderr)
      write(self.data_trunk(), builder)
    return builder.finish()

  def data_trunk(self) -> selfdata.Trunk:
    """The frozen trunk as data making sees it: its params alone, on a depth-0 config."""
    m = self.model_file
    params = {'params': jax.device_put(pretrained.trunk_params(self.config.model.init_from))}
    # (no row of the data is compared with another decoding's: XLA's dot may take its prefills)
    cfg = dataclasses.replace(self.cfg, mtp_depth=0, exact_products=False)
    model = decode_lib.decode_model(cfg, self.config.decode.kernels,
                                    use_tiles=self.config.decode.tiles)
    return selfdata.Trunk(model=model, params=params,
                          tokenizer=m.tokenizer, eos_id=self.eos_id, bos_id=m.bos_id,
                          stop_ids=self.stop_ids, chat_template=m.chat_template)

  def data_token_rank(self) -> np.ndarray:
    """Token ids by frequency in the training split, most frequent first."""
    return token_rank(self.data.train, self.cfg.vocab_size)

  def token_rank(self):
    """Token ids, most frequent in the heads' training data first: WORKDIR/token_rank.npy
    (written by training), else the heads file's (mtp.init_from), else the training split's;
    None when none is known."""
    path = os.path.join(self.workdir, TOKEN_RANK)
    if os.path.exists(path):
      return np.load(path)
    source = self.config.mtp.init_from
    rank = heads_file.token_rank(source) if source not in pretrained.HEAD_INITS else None
    if rank is None and self.data is not None:
      rank = self.data_token_rank()
    return rank

  def device_batch(self, batch_np):
    """A process-local numpy batch (an array or a dict of them) -> global arrays sharded over the
    batch axes."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch_np)

  def batch(self, step: int):
    """Training batch `step`: token windows, or windows of the trunk's cached features."""
    return self._windows('train', self.config.seed, step)

  def _windows(self, name: str, seed: int, step: int):
    """This process's rows of batch (seed, step) of split `name`."""
    t = self.config.train
    where = dict(seed=seed, step=step, batch_size=t.batch_size, window=self.window,
                 process_index=jax.process_index(), process_count=jax.process_count())
    if self.rows is None:
      return data_lib.get_batch(getattr(self.data, name), **where)
    # The trunk's cached features, or its chats as tokens: either way the rows' starts go with
    # the tokens (the loss leaves out what reaches into the next row).
    split = self.rows[name]
    starts = data_lib.window_starts(len(split.tokens), **where)
    return feat_lib.window_batch(split, starts, t.seq_len, self.cfg.mtp_depth)

  def evaluate(self, params) -> dict:
    sums = []
    with sharding.active(self.mesh):
      for step in data_lib.eval_steps(self.config.train.eval_batches):
        batch = self.device_batch(self._windows('valid', data_lib.EVAL_SEED, step))
        sums.append(jax.device_get(self.eval_step(params, batch)))
    return summarize_eval(sums, self.cfg.mtp_depth, self.spec.head_loss == 'distill')

  # Params.

  @property
  def trunk_identity(self) -> str:
    """What a checkpoint records of the model file it was trained from ('' for none)."""
    return self.model_file.identity if self.model_file is not None else ''

  @property
  def trunk_setup(self) -> str:
    """What a checkpoint records of a Hugging Face directory's other files ('' for a GGUF file,
    whose identity covers them, or none)."""
    return self.model_file.setup_identity if self.model_file is not None else ''

  def restore_or_init(self):
    """(step, state, meta) of the newest checkpoint that restores, else of a fresh start
    (0, the initial state, {})."""
    step, state, meta = self.checkpointer.restore_latest_valid(self.abstract_state)
    if state is None:
      given = self.pretrained_parts()
      with sharding.active(self.mesh):
        state = self.init(jax.random.key(self.config.seed), given)
      step = 0
    return step, state, meta

  def initial_params(self):
    """The params a run starts from: random, with the trunk of model.init_from and the heads of
    mtp.init_from put in place."""
    given = self.pretrained_parts()
    with sharding.active(self.mesh):
      return self.init_params(jax.random.key(self.config.seed), given)

  def pretrained_parts(self) -> dict:
    """The param subtrees model.init_from and mtp.init_from give (trunk, heads), float32 and on
    the devices as the state lays them out; {} for a random start."""
    source = self.config.model.init_from
    trunk = pretrained.trunk_params(source) if source else {}
    parts = {**trunk, **pretrained.head_params(self.config, trunk)}
    parts = jax.tree.map(lambda a: np.asarray(a, np.float32), parts)
    layout = self.state_sharding['params']['params']
    return jax.device_put(parts, _like(layout, parts))


def _like(tree: dict, parts: dict):
  """The entries of the nested dict `tree` on the paths of `parts`."""
  return {k: _like(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in parts.items()}


def _digest(*arrays) -> str:
  """Of the arrays' values and where each ends (moving a document between splits changes it)."""
  digest = hashlib.sha1()
  for a in arrays:
    digest.update(f'{a.dtype}:{len(a)}:'.encode())
    digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()


@functools.cache
def _process_max():
  """(the sharding of one value per process, the jitted max over them, replicated)."""
  devices = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
  mesh = jax.sharding.Mesh(devices, ('processes', 'local'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('processes')),
          jax.jit(jnp.max, out_shardings=replicated))


def _any_process(flag: bool):
  """Whether `flag` is set in any process, as a replicated scalar being computed (a collective:
  every process calls it)."""
  per_process, maximum = _process_max()
  return maximum(jax.make_array_from_process_local_data(per_process, np.array([flag], np.int32)))


FAILED = 'FAILED'  # in a cache's directory: why process 0 could not build it


def _wait_for_cache(directory: str, poll_s: float = 5.0) -> dict:
  """The cache process 0 is building in `directory`, once it is finished; DataError with
  process 0's reason if it stops without it."""
  start = time.monotonic()
  announced = 0.0
  while (cache := feat_lib.load(directory)) is None:
    if os.path.exists(os.path.join(directory, FAILED)):
      with open(os.path.join(directory, FAILED)) as f:
        raise data_lib.DataError(f'process 0 could not build {directory}: {f.read()}')
    if time.monotonic() - start >= announced:
      print(f'data: waiting for process 0 to build {directory}', file=sys.stderr)
      announced += 300
    time.sleep(poll_s)
  return cache


class _Preemption:
  """SIGTERM/SIGINT: the first asks the loop to checkpoint and stop after the current step;
  a second exits at once (a checkpoint being written then stays an ignored temporary)."""

  def __init__(self):
    self.requested = None
    self._old = {}
    self._gathering = None  # every process's flag at the step before, being gathered

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested is not None:
      os._exit(128 + signum)
    self.requested = signal.Signals(signum).name

  def poll(self, last: bool = False):
    """Why to stop after this step (read once per step), or None. A single process stops at
    once. The processes of a run stop after the same step, where they save its checkpoint
    together, instead of one waiting in the save while the others wait in the next step: each
    call starts gathering every process's flag and decides by the flags the previous call
    gathered, read once the previous step is done, as the step metrics are read: one step late,
    with no process waiting on its devices for it. So after the loop (`last`) they still agree
    on a signal during the last step and report it; a single process has simply finished."""
    if jax.process_count() == 1:
      return None if last else self.requested
    earlier, self._gathering = self._gathering, _any_process(self.requested is not None)
    if earlier is None or not int(np.asarray(earlier.addressable_data(0))):
      return None
    return self.requested or 'a signal to another process'

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _open_writer(tb_dir: str, purge_step=None) -> SummaryWriter:
  """A new event file. Readers go through a run's files in name order, and tensorboardX names
  them by the second they were opened in; the nanosecond suffix keeps files opened within one
  second (a quick resume, a writer reopened at a checkpoint) in the order they were written."""
  return SummaryWriter(tb_dir, purge_step=purge_step, filename_suffix=f'.{time.time_ns()}')


class MetricsLog:
  """TensorBoard on process 0 and the step metrics: each step's metrics are fetched one step late
  (after the next step is dispatched, so the device never waits for the host), checked for a
  non-finite update, and logged every log_every steps with the throughput since the last log
  (the first window from the end of the first step, which holds the compile, unless that step
  is logged itself). `clock` gives the time in seconds."""

  def __init__(self, workdir: str, t, start: int, enabled: bool, skipped: int = 0,
               clock=time.perf_counter):
    self.t, self.tb_dir, self.clock = t, os.path.join(workdir, 'tb'), clock
    # purge_step hides events an interrupted run wrote past its last checkpoint.
    self.writer = _open_writer(self.tb_dir, purge_step=start + 1) if enabled else None
    self.pending = None  # (step, metrics) of the last dispatched step
    self.skipped = skipped  # steps whose update was skipped (nonfinite=skip), resumes included
    self.last_time, self.last_step = clock(), start
    self.first = start + 1  # the step that compiles: its time is not throughput
    self.postfix = {}

  def scalars(self, metrics: dict, step: int, prefix: str):
    if self.writer is not None:
      for name, value in metrics.items():
        self.writer.add_scalar(prefix + name, float(value), step)

  def push(self, step: int, metrics):
    """Queues this step's metrics and handles the previous step's."""
    self.flush()
    self.pending = (step, metrics)

  def flush(self):
    if self.pending is not None:
      self._consume(*self.pending)
      self.pending = None

  def _consume(self, step: int, metrics):
    t = self.t
    metrics = jax.device_get(metrics)
    skipped_before = self.skipped
    if metrics['nonfinite']:
      what = 'gradient' if metrics['nonfinite_grad'] else 'loss'
      if t.nonfinite == 'stop':
        raise TrainingError(f'non-finite {what} at step {step} (loss {metrics["loss/total"]}); '
                            'stopped before saving it: the latest checkpoint, if any, holds the '
                            'last finite state (train.nonfinite=skip skips such steps)')
      self.skipped += 1
      tqdm.tqdm.write(f'step {step}: non-finite {what}, update skipped '
                      f'({self.skipped} so far)', file=sys.stderr)
    if step % t.log_every == 0 or step == t.steps:
      # a skipped step leaves the optimizer's count, and so the schedule, where it was; its
      # first call compiles (eager jnp ops), which is no part of the window's steps
      with self.paused():
        metrics['lr'] = lr_schedule(t)(step - 1 - skipped_before)
      now = self.clock()
      metrics['tokens_per_s'] = (t.batch_size * t.seq_len * (step - self.last_step)
                                 / max(now - self.last_time, 1e-9))
      metrics['nonfinite_skipped'] = self.skipped
      self.last_time, self.last_step = now, step
      self.scalars({k: v for k, v in metrics.items() if k != 'nonfinite_grad'}, step, 'train/')
      self.postfix = {'loss': f"{metrics['loss/total']:.3f}",
                      'tok_s': f"{metrics['tokens_per_s']:.0f}"}
    elif step == self.first:  # the first window's tokens/s starts once this step has run
      self.last_time, self.last_step = self.clock(), step

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside (evaluations, checkpoint saves) does not count in the tokens/s of the
    window it falls in."""
    start = self.clock()
    try:
      yield
    finally:
      self.last_time += self.clock() - start

  def reopen(self):
    """Closes the event file and opens a new one. A resume from a checkpoint never logs its
    steps again, so their events must be on disk before it exists; tensorboardX's flush() leaves
    queued events behind (lost to a kill -9), close() writes them all."""
    if self.writer is not None:
      self.writer.close()
      self.writer = _open_writer(self.tb_dir)

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _print_eval(step: int, metrics: dict):
  depths = sorted({int(k.split('_')[-1]) for k in metrics if k.startswith('loss/depth_')})
  parts = [f"loss {metrics[f'loss/depth_{depths[0]}']:.3f}"]
  parts += [f"acc@{k} {metrics[f'accuracy/depth_{k}']:.3f}" for k in depths]
  parts += [f"agree@{k} {metrics[f'agreement/depth_{k}']:.3f}" for k in depths
            if f'agreement/depth_{k}' in metrics]
  tqdm.tqdm.write(f'step {step} eval: ' + ', '.join(parts), file=sys.stderr)


EVALUATED = 'evaluated.json'
PARTS = ('eval', 'hook')  # of an evaluation: the validation split's metrics, then the eval hook


RETRIES = 2  # reruns cut short (killed) while they log a step's missing part, before it is left out


def _read_evaluated(workdir: str) -> dict:
  """WORKDIR/evaluated.json: {'step': the last checkpoint step that also evaluates, 'logged': the
  PARTS of its evaluation whose events are on disk, 'tries': {part: how many reruns began to log
  it}, 'failed': the parts whose retry raised}; {} where there is none or it cannot be read. (A
  record's 'retried', as runs wrote it before 'tries', are parts that failed.)"""
  try:
    with open(os.path.join(workdir, EVALUATED), encoding='utf-8') as f:
      record = json.load(f)
  except (OSError, ValueError):
    return {}
  parts = lambda value: (isinstance(value, list)
                         and all(isinstance(p, str) and p in PARTS for p in value))
  tries = record.get('tries', {}) if isinstance(record, dict) else None
  good = (isinstance(record, dict) and type(record.get('step')) is int
          and parts(record.get('logged')) and parts(record.get('failed', []))
          and parts(record.get('retried', [])) and isinstance(tries, dict)
          and parts(list(tries)) and all(type(n) is int for n in tries.values()))
  if not good:
    return {}
  return {'step': record['step'], 'logged': record['logged'], 'tries': tries,
          'failed': sorted(set(record.get('failed', [])) | set(record.get('retried', [])))}


class _Periodic:
  """What happens between steps: evaluations (with the eval hook), checkpoints and preemption.
  A step that both checkpoints and evaluates records how far its evaluation got
  (WORKDIR/evaluated.json): a run killed during it resumes after that step, which the loop never
  evaluates again, so the rerun logs what is missing first (finish_evaluation)."""

  def __init__(self, session: Session, log: MetricsLog, eval_hook):
    self.session, self.log, self.eval_hook = session, log, eval_hook
    self.t = session.config.train
    self.eval_metrics = {}
    self.left_out = ()  # parts of the resumed step's evaluation that failed again when retried

  def after(self, step: int, state, stop) -> None:
    t = self.t
    is_eval = step % t.eval_every == 0 or step == t.steps
    boundary = step % t.checkpoint_every == 0 or step == t.steps or stop
    if boundary or is_eval:
      self.log.flush()  # metrics checked before they are evaluated or saved
    with self.log.paused():
      # The checkpoint first: an evaluation that fails (out of memory while decoding, say) must
      # not take the steps since the last checkpoint with it, and a preempted run must not wait
      # for one before its checkpoint. save() returns once the state is copied to host.
      if boundary:
        self.log.reopen()
        if is_eval:  # before the checkpoint exists: a rerun from it finds its evaluation due
          self._record(step, ())
        meta = {'step': step, 'nonfinite_skipped': self.log.skipped}
        if self.session.trunk_identity:  # the model file it was trained from
          meta['trunk'] = self.session.trunk_identity
        if self.session.trunk_setup:  # and a directory's config, tokenizer and template
          meta['trunk_setup'] = self.session.trunk_setup
        self.session.checkpointer.save(step, state, meta)
      if is_eval:
        self.evaluate(step, state['params'], record=boundary)

  def evaluate(self, step: int, params, record: bool = False, logged: set | None = None,
               attempts: dict | None = None):
    """Evaluates and logs the PARTS not in `logged` (a set, to which each part is added once it
    is logged); with `record`, each part's events are written to disk (the event file reopened)
    and then recorded, with reruns' `attempts` at the step, before the run goes on."""
    logged = set() if logged is None else logged
    metrics = self.session.evaluate(params)
    if 'eval' not in logged:
      self.log.scalars(metrics, step, 'eval/')
      _print_eval(step, metrics)
      logged.add('eval')
      if record:
        self.log.reopen()
        self._record(step, logged, attempts)
    if self.eval_hook is not None and 'hook' not in logged:
      # its metrics join the eval dict that train returns
      metrics.update(self.eval_hook(self.session, params, step, self.log.writer) or {})
      logged.add('hook')
      if record:
        self.log.reopen()
        self._record(step, logged, attempts)
    self.eval_metrics = metrics

  def finish_evaluation(self, step: int, params) -> bool:
    """At a rerun's start (from checkpoint `step`): the parts of that step's evaluation that are
    not on disk (the run that saved it was killed during it, or a part failed) are logged now: a
    part that fails again (raises) is left out by the next rerun, which goes on without it
    (`left_out`), as is one whose retry was cut short (killed) RETRIES times. Process 0 reads
    the record and decides for every process. Whether it evaluated."""
    parts = PARTS if self.eval_hook is not None else PARTS[:1]
    todo, skip, tries, failed = [], [], {}, []
    if step and jax.process_index() == 0:
      record = _read_evaluated(self.session.workdir)
      if record.get('step') == step:
        tries, failed = record['tries'], record['failed']
        missing = [p for p in parts if p not in record['logged']]
        given_up = set(failed) | {p for p, n in tries.items() if n >= RETRIES}
        skip = [p for p in missing if p in given_up]
        todo = [p for p in missing if p not in given_up]
        if 'eval' in skip:  # every part runs after the validation split's
          skip, todo = missing, []
    mask = sum(1 << i for i, p in enumerate(parts) if p in todo)
    mask += sum(1 << len(parts) + i for i, p in enumerate(parts) if p in skip)
    if jax.process_count() > 1:
      mask = int(multihost_utils.broadcast_one_to_all(np.int32(mask)))
    todo = [p for i, p in enumerate(parts) if mask >> i & 1]
    self.left_out = [p for i, p in enumerate(parts) if mask >> len(parts) + i & 1]
    if self.left_out:
      tqdm.tqdm.write(f'step {step}: its evaluation ({", ".join(self.left_out)}) failed again when '
                      f'a rerun retried it (or {RETRIES} reruns were cut short while they did); '
                      'going on without it', file=sys.stderr)
    if not todo:
      return False
    tqdm.tqdm.write(f'step {step}: logging its evaluation ({", ".join(todo)}), which is not on '
                    'disk from the run that saved the step', file=sys.stderr)
    logged = {p for p in parts if p not in todo}
    # Counted before it runs: a part that kills its run (out of memory) every time is left out
    # after RETRIES reruns; one that raises, at once (by the next rerun).
    attempts = {'tries': {**tries, **{p: tries.get(p, 0) + 1 for p in todo}}, 'failed': failed}
    self._record(step, logged, attempts)
    try:
      self.evaluate(step, params, record=True, logged=logged, attempts=attempts)
    except Exception:
      attempts['failed'] = sorted(set(failed) | (set(todo) - logged))
      self._record(step, logged, attempts)
      raise
    return True

  def _record(self, step: int, logged, attempts: dict | None = None):
    """WORKDIR/evaluated.json (process 0): the PARTS of `step`'s evaluation on disk, and what
    reruns' `attempts` at it came to ('tries', 'failed'; none for a step no rerun has tried)."""
    if jax.process_index() == 0:
      a = attempts or {}
      atomic.write_json(os.path.join(self.session.workdir, EVALUATED),
                        {'step': step, 'logged': [p for p in PARTS if p in logged],
                         **({'tries': a['tries']} if a.get('tries') else {}),
                         **({'failed': [p for p in PARTS if p in a['failed']]}
                            if a.get('failed') else {})})


def train(config, workdir: str, eval_hook=None, check=None) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and returns a summary: 'step' (the
  last), 'resumed_from', 'stopped_by' (what ended it), 'eval' (the final evaluation's metrics)
  and 'nonfinite_skipped' (steps skipped for a non-finite loss).
  `eval_hook(session, params, step, writer)` runs after each periodic evaluation; the dict of
  metrics it returns, if any, is added to the evaluation's. `eval_hook.check(session)`, where the
  hook has one, then `check(session)` are the Session's check: input that the hook, or a mode
  run after training, would refuse stops the run before any step, not at its first evaluation
  or after the last."""
  checks = [c for c in (getattr(eval_hook, 'check', None), check) if c is not None]

  def check_all(session):
    for c in checks:
      c(session)
  with contextlib.ExitStack() as held:
    session = Session(config, workdir, check=check_all if checks else None,
                      hold=lambda: held.enter_context(_only_run(workdir)))
    return _train(session, eval_hook)


@contextlib.contextmanager
def _only_run(workdir: str):
  """Held by process 0 of the one run training in `workdir`, from before it writes there until
  its last checkpoint is written: a second run started there (the same config twice, a
  requeued job while the first still saves) waits, where it would have written its tokenizer
  and saved over the first's. The other processes go on once process 0 holds it. The folders
  it makes to hold are removed again if the run stops with them empty (bad input found then,
  such as a missing corpus, leaves no workdir behind)."""
  if jax.process_index() != 0:
    multihost_utils.sync_global_devices(f'mtp_jax:hold {workdir}')
    yield
    return
  made, folder = [], os.path.abspath(workdir)
  while not os.path.exists(folder):
    made.append(folder)
    folder = os.path.dirname(folder)
  os.makedirs(workdir, exist_ok=True)
  try:
    with atomic.exclusive(workdir, f'waiting for another run training in {workdir} to stop '
                          '(one run trains in a workdir at a time)'):
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'mtp_jax:hold {workdir}')
      yield
  except BaseException:
    for folder in made:  # the workdir first, then the folders above it it needed
      try:
        os.rmdir(folder)
      except OSError:  # not empty: the run wrote there
        break
    raise


def _train(session, eval_hook) -> dict:
  config, workdir, t = session.config, session.workdir, session.config.train
  start, state, meta = session.restore_or_init()
  # What a resumed run does differently from the run its config.json recorded.
  changed = (ckpt_lib.changed_settings(session.saved_config, config)
             if start and session.saved_config is not None else [])
  if start < t.steps:  # a finished run's records stay those of the run that trained it
    ckpt_lib.save_config(workdir, config)
    save_token_rank(workdir, session.data_token_rank())
  is_main = jax.process_index() == 0
  if start:
    print(f'resuming from step {start}' + (f' with changed settings: {", ".join(changed)}'
                                           if changed else ''), file=sys.stderr)
  if t.dtype == 'auto':
    print(f'train.dtype=auto: the steps compute in {session.step_cfg.dtype} here', file=sys.stderr)
  log = MetricsLog(workdir, t, start, enabled=is_main,
                   skipped=meta.get('nonfinite_skipped', 0))
  periodic = _Periodic(session, log, eval_hook)
  stopped_by, finished, step, evaluated = None, False, start, False
  with _Preemption() as preempt, tqdm.tqdm(total=t.steps, initial=start, desc='train',
                                           disable=not is_main, dynamic_ncols=True) as bar:
    try:
      with log.paused():
        evaluated = periodic.finish_evaluation(start, state['params'])
      for step in range(start + 1, t.steps + 1):
        with sharding.active(session.mesh):
          state, metrics = session.train_step(state, session.device_batch(session.batch(step - 1)))
        log.push(step, metrics)
        bar.update(1)
        bar.set_postfix(log.postfix, refresh=False)
        # Read once: a signal arriving later in this step (during an evaluation, say) must not
        # stop the loop without the checkpoint; the next step honours it.
        stop = preempt.poll()
        periodic.after(step, state, stop)
        if stop:
          stopped_by = stop
          break
      else:
        stopped_by = preempt.poll(last=True)
      log.flush()
      finished = True
    finally:
      session.checkpointer.wait()  # a save in flight completes intact, whatever happened
      log.close()
      if not finished:
        session.checkpointer.close()
  if stopped_by:
    print(f'{stopped_by}: stopped after step {step}; checkpoint saved, rerun the same command to '
          f'resume', file=sys.stderr)
  elif start >= t.steps:
    print(f'already trained to step {start} (train.steps={t.steps}); nothing to do',
          file=sys.stderr)
    # The eval dict of a finished run, hook's metrics too (a run stopped in its last step is
    # finished by this rerun; its summary must not lack them).
    if not evaluated and 'eval' not in periodic.left_out:
      periodic.eval_metrics = session.evaluate(state['params'])
      if eval_hook is not None and 'hook' not in periodic.left_out:
        periodic.eval_metrics.update(eval_hook(session, state['params'], start, None) or {})
  session.checkpointer.close()
  return {'step': int(state['step']), 'resumed_from': start, 'stopped_by': stopped_by,
          'eval': periodic.eval_metrics, 'nonfinite_skipped': log.skipped}


TOKEN_RANK = 'token_rank.npy'


def save_token_rank(workdir: str, rank: np.ndarray) -> None:
  """WORKDIR/token_rank.npy: the training data's token ids by frequency, which a reduced draft
  vocabulary reads when decoding and --mode export ships with the heads."""
  data = io.BytesIO()
  np.save(data, rank)
  atomic.write_bytes(os.path.join(workdir, TOKEN_RANK), data.getvalue())


def evaluate(config, workdir: str) -> dict:
  """Evaluates the latest checkpoint in workdir on the validation split."""
  session = Session(config, workdir, reads='eval')
  step, state, _ = session.checkpointer.restore_latest_valid(session.abstract_state,
                                                            set_aside=False)
  session.checkpointer.close()
  if state is None:
    raise ckpt_lib.CheckpointError(f'no checkpoint in {workdir}; train first')
  metrics = session.evaluate(state['params'])
  return {'step': step, 'eval': metrics}


def write_summary(workdir: str, summary: dict):
  atomic.write_json(os.path.join(workdir, 'summary.json'), summary, indent=2, default=float)


def read_summary(workdir: str) -> dict:
  """WORKDIR/summary.json as the last run wrote it, {} where there is none (or it is unreadable:
  it is rewritten by the run that reads it)."""
  try:
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):  # JSON's errors and a file not in UTF-8 are ValueErrors
    return {}
  return summary if isinstance(summary, dict) else {}
