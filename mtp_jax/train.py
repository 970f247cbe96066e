"""Training and evaluation: the jitted train step for the combined loss, the loop around it with
checkpoints, TensorBoard logs, preemption handling, and held-out evaluation.
"""

import dataclasses
import functools
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
from tensorboardX import SummaryWriter

from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import data as data_lib
from mtp_jax import sharding
from mtp_jax.config import ModelConfig, validate
from mtp_jax.loss import combined_loss, depth_sums, loss_weight
from mtp_jax.model import MTPLanguageModel, init_tokens


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, say); the message says where and why."""


def lr_schedule(t):
  """Learning rate of optimizer update `count` (0-based): linear warmup reaching t.lr at
  update warmup_steps, then cosine decay to t.lr * t.min_lr_ratio at the last update. The first
  update already moves (lr / warmup_steps), instead of optax's zero at count 0."""
  warmup = max(t.warmup_steps, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1), end_value=t.lr * t.min_lr_ratio)
  return lambda count: schedule(count + 1)


def _decay_mask(params):
  """Weight decay on matrices only: not on norms (1-D) nor on the (un)embedding."""
  def keep(path, leaf):
    names = {str(getattr(p, 'key', '')) for p in path}
    return leaf.ndim >= 2 and not names & {'embedding', 'unembedding'}
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(t) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the compiled step (hashable, so jit can key on it)."""
  model: ModelConfig
  grad_accum: int
  loss_weight: float
  loss_weight_schedule: str
  inject_nan_step: int = -1


def train_step(state, batch_BxW, *, tx, sc: StepConfig):
  """One optimizer step over grad_accum micro-batches. A non-finite loss or gradient leaves
  the state untouched and raises the `nonfinite` flag, so a bad step is never applied."""
  weight = loss_weight(state['step'], sc.loss_weight, sc.loss_weight_schedule)
  grad_fn = jax.value_and_grad(combined_loss, has_aux=True)
  micro_AxBxW = batch_BxW.reshape(sc.grad_accum, -1, batch_BxW.shape[-1])

  def accumulate(carry, micro_BxW):
    (_, metrics), grads = grad_fn(state['params'], micro_BxW, sc.model, weight)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  zeros = jax.eval_shape(lambda: grad_fn(state['params'], micro_AxBxW[0], sc.model, weight))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
  (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro_AxBxW)
  grads, metrics = jax.tree.map(lambda x: x / sc.grad_accum, (grads, metrics))
  poison = jnp.where(state['step'] + 1 == sc.inject_nan_step, jnp.nan, 1.0)
  metrics['loss/total'] = metrics['loss/total'] * poison

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics['loss/total']) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
  keep_old = lambda n, o: jnp.where(finite, n, o)
  new = {'step': new['step'],
         'params': jax.tree.map(keep_old, new['params'], state['params']),
         'opt_state': jax.tree.map(keep_old, new['opt_state'], state['opt_state'])}
  metrics.update({'grad_norm': grad_norm, 'loss_weight': weight,
                  'nonfinite': 1 - finite.astype(jnp.int32),
                  'nonfinite_grad': 1 - jnp.isfinite(grad_norm).astype(jnp.int32)})
  return new, metrics


def eval_step(params, batch_BxW, *, cfg: ModelConfig):
  return depth_sums(params, batch_BxW, cfg)


def summarize_eval(sums_list, depth: int) -> dict:
  """Host-side reduction of eval_step outputs over batches -> per-depth loss/acc/perplexity."""
  totals = np.sum(np.asarray(sums_list, dtype=np.float64), axis=0)  # (D+1, 3)
  out = {}
  for k in range(depth + 1):
    loss_sum, correct, count = totals[k]
    out[f'loss/depth_{k}'] = loss_sum / count
    out[f'accuracy/depth_{k}'] = correct / count
    out[f'perplexity/depth_{k}'] = float(np.exp(min(loss_sum / count, 50.0)))
  return out


def window_length(config) -> int:
  """Tokens per training row: seq_len inputs plus the D + 1 targets past the last one."""
  return config.train.seq_len + config.mtp.depth + 1


class Program:
  """The compiled side of a config on a mesh, with no data: the model config, optimizer, state
  layout (eval_shape -> logical axis names -> shardings) and the jitted init, train and eval
  steps. Benchmarks build this alone; Session adds data and checkpoints."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.cfg = ModelConfig.from_config(config)
    self.window = window_length(config)
    self.tx = make_optimizer(config.train)
    model = MTPLanguageModel(self.cfg)

    def init_state(rng):
      params = model.init(rng, init_tokens(self.cfg))
      return {'step': jnp.zeros((), jnp.int32), 'params': params,
              'opt_state': self.tx.init(params)}

    boxed = jax.eval_shape(init_state, jax.random.key(0))
    self.state_sharding = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.meta.unbox(boxed), self.state_sharding)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.init = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)),
                        out_shardings=self.state_sharding)
    t = config.train
    sc = StepConfig(self.cfg, t.grad_accum, config.mtp.loss_weight,
                    config.mtp.loss_weight_schedule, t.inject_nan_step)
    self.train_step = jax.jit(functools.partial(train_step, tx=self.tx, sc=sc),
                              in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, None), donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(eval_step, cfg=self.cfg),
                             in_shardings=(self.state_sharding['params'], self.batch_sharding))


class Session(Program):
  """Everything one run needs: the checked config, data, mesh, compiled functions and the
  workdir's checkpoints. Every check runs before anything is written or compiled."""

  def __init__(self, config, workdir: str):
    self.workdir = workdir
    validate(config)
    sharding.check_mesh(config, jax.device_count(), jax.process_count())
    saved = ckpt_lib.load_config(workdir)
    if saved is not None:
      ckpt_lib.check_compatible(saved, config)
    self.data = data_lib.prepare(config.data, workdir)
    if self.data.vocab_size > config.data.vocab_size:
      raise data_lib.DataError(f'tokenizer has {self.data.vocab_size} tokens, more than '
                               f'data.vocab_size={config.data.vocab_size}')
    window = window_length(config)
    # Checked here, once the split sizes are known, not at the first batch of each split: the
    # first evaluation may come after hours of training.
    for split, tokens in (('train', self.data.train), ('valid', self.data.valid)):
      if len(tokens) < window:
        raise data_lib.DataError(
            f'train.seq_len={config.train.seq_len}: the {split} split has {len(tokens)} tokens, '
            f'fewer than one window of train.seq_len + mtp.depth + 1 = {window}; use '
            f'train.seq_len <= {len(tokens) - config.mtp.depth - 1}, more data or a larger '
            'data.valid_fraction')
    super().__init__(config, sharding.make_mesh(config.mesh))
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)

  def device_batch(self, batch_np):
    """A process-local numpy batch -> one global array sharded over the batch axes."""
    return jax.make_array_from_process_local_data(self.batch_sharding, batch_np)

  def restore_or_init(self):
    step, state, _ = self.checkpointer.restore_latest_valid(self.abstract_state)
    if state is None:
      with sharding.active(self.mesh):
        state = self.init(jax.random.key(self.config.seed))
      step = 0
    return step, state

  def batch(self, step: int, tokens=None, seed=None):
    t = self.config.train
    return data_lib.get_batch(
        self.data.train if tokens is None else tokens,
        seed=self.config.seed if seed is None else seed, step=step, batch_size=t.batch_size,
        window=self.window, process_index=jax.process_index(), process_count=jax.process_count())

  def evaluate(self, params) -> dict:
    t = self.config.train
    batches = data_lib.eval_batches(self.data.valid, batch_size=t.batch_size, window=self.window,
                                    num_batches=t.eval_batches)
    per_process = t.batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    with sharding.active(self.mesh):
      sums = [jax.device_get(self.eval_step(params, self.device_batch(b[lo:lo + per_process])))
              for b in batches]
    return summarize_eval(sums, self.cfg.mtp_depth)


class _Preemption:
  """SIGTERM/SIGINT: the first asks the loop to checkpoint and stop after the current step;
  a second exits at once (a checkpoint being written then stays an ignored temporary)."""

  def __init__(self):
    self.requested = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested is not None:
      os._exit(128 + signum)
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _log(writer, metrics: dict, step: int, prefix: str = ''):
  if writer is not None:
    for name, value in metrics.items():
      writer.add_scalar(prefix + name, float(value), step)


def _open_writer(tb_dir: str, purge_step=None) -> SummaryWriter:
  """A new event file. Readers go through a run's files in name order, and tensorboardX names
  them by the second they were opened in; the nanosecond suffix keeps files opened within one
  second (a quick resume, a writer reopened at a checkpoint) in the order they were written."""
  return SummaryWriter(tb_dir, purge_step=purge_step, filename_suffix=f'.{time.time_ns()}')


def _print_eval(step: int, metrics: dict, depth: int):
  parts = [f"loss {metrics['loss/depth_0']:.3f}"]
  parts += [f"acc@{k} {metrics[f'accuracy/depth_{k}']:.3f}" for k in range(depth + 1)]
  tqdm.tqdm.write(f'step {step} eval: ' + ', '.join(parts), file=sys.stderr)


def train(config, workdir: str, eval_hook=None) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and returns the final eval metrics.
  `eval_hook(session, params, step, writer)` runs after each periodic evaluation; the dict of
  metrics it returns, if any, is added to the evaluation's."""
  session = Session(config, workdir)
  t, depth = config.train, session.cfg.mtp_depth
  start, state = session.restore_or_init()
  ckpt_lib.save_config(workdir, config)
  is_main = jax.process_index() == 0
  tb_dir = os.path.join(workdir, 'tb')
  # purge_step hides events an interrupted run wrote past its last checkpoint.
  writer = _open_writer(tb_dir, purge_step=start + 1) if is_main else None
  if start:
    print(f'resuming from step {start}', file=sys.stderr)
  tokens_per_step = t.batch_size * t.seq_len
  pending = None  # (step, metrics) of the last dispatched step, fetched after the next dispatch
  nonfinite_skipped, stopped_by = 0, None
  last_time, last_step = time.perf_counter(), start
  eval_metrics = {}
  finished = False

  def save(step):
    nonlocal writer
    if writer is not None:
      # A resume from this checkpoint never logs its steps again, so their events must be on
      # disk before it exists. tensorboardX's flush() leaves queued events behind (lost to a
      # kill -9); close() writes them all.
      writer.close()
      writer = _open_writer(tb_dir)
    session.checkpointer.save(step, state, {'step': step})

  def consume(step, metrics):
    nonlocal nonfinite_skipped, last_time, last_step
    metrics = jax.device_get(metrics)
    if metrics['nonfinite']:
      what = 'gradient' if metrics['nonfinite_grad'] else 'loss'
      if t.nonfinite == 'stop':
        raise TrainingError(f'non-finite {what} at step {step} (loss {metrics["loss/total"]}); '
                            f'the latest checkpoint keeps the last finite state')
      nonfinite_skipped += 1
      tqdm.tqdm.write(f'step {step}: non-finite {what}, update skipped '
                      f'({nonfinite_skipped} so far)', file=sys.stderr)
    if step % t.log_every == 0 or step == t.steps:
      now = time.perf_counter()
      metrics['tokens_per_s'] = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
      metrics['lr'] = lr_schedule(t)(step - 1)
      metrics['nonfinite_skipped'] = nonfinite_skipped
      last_time, last_step = now, step
      _log(writer, {k: v for k, v in metrics.items() if not k.startswith('nonfinite_grad')},
           step, 'train/')
      bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

  with _Preemption() as preempt, tqdm.tqdm(total=t.steps, initial=start, desc='train',
                                           disable=not is_main, dynamic_ncols=True) as bar:
    try:
      for step in range(start + 1, t.steps + 1):
        with sharding.active(session.mesh):
          state, metrics = session.train_step(state, session.device_batch(session.batch(step - 1)))
        if pending is not None:
          consume(*pending)
        pending = (step, metrics)
        bar.update(1)
        # Read once: a signal arriving later in this step (during an evaluation, say) must not
        # stop the loop without the checkpoint; the next step honours it.
        stop = preempt.requested
        boundary = step % t.checkpoint_every == 0 or step == t.steps or stop
        if boundary or step % t.eval_every == 0:
          consume(*pending)
          pending = None
        if step % t.eval_every == 0 or step == t.steps:
          eval_metrics = session.evaluate(state['params'])
          _log(writer, eval_metrics, step, 'eval/')
          _print_eval(step, eval_metrics, depth)
          if eval_hook is not None:  # its metrics join the eval dict that train returns
            eval_metrics.update(eval_hook(session, state['params'], step, writer) or {})
        if boundary:
          save(step)
        if stop:
          stopped_by = stop
          break
      if pending is not None:
        consume(*pending)
      finished = True
    finally:
      session.checkpointer.wait()  # a save in flight completes intact, whatever happened
      if writer is not None:
        writer.close()
      if not finished:
        session.checkpointer.close()
  if stopped_by:
    print(f'{stopped_by}: stopped after step {step}; checkpoint saved, rerun the same command to '
          f'resume', file=sys.stderr)
  elif start >= t.steps:
    print(f'already trained to step {start} (train.steps={t.steps}); nothing to do',
          file=sys.stderr)
    eval_metrics = session.evaluate(state['params'])
  session.checkpointer.close()
  return {'step': int(state['step']), 'resumed_from': start, 'stopped_by': stopped_by,
          'eval': eval_metrics, 'nonfinite_skipped': nonfinite_skipped}


def evaluate(config, workdir: str) -> dict:
  """Evaluates the latest checkpoint in workdir on the validation split."""
  session = Session(config, workdir)
  step, state, _ = session.checkpointer.restore_latest_valid(session.abstract_state)
  session.checkpointer.close()
  if state is None:
    raise ckpt_lib.CheckpointError(f'no checkpoint in {workdir}; train first')
  metrics = session.evaluate(state['params'])
  return {'step': step, 'eval': metrics}


def write_summary(workdir: str, summary: dict):
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2, default=float)
