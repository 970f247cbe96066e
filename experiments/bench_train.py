"""Training-step benchmark: this machine's matmul roofline, throughput and FLOPs of the train step
for each MTP depth D and head kind, and the compiled memory of the step as D grows.

Run: python experiments/bench_train.py --config configs/quickstart.py --depths 0,1,2,3 \
       --kinds sequential,parallel --steps 10 --markdown
Prints, from one process and without any data (batches are uniform random token windows of shape
(train.batch_size, train.seq_len + D + 1), ids < data.vocab_size):
  1. the FLOP/s of a jitted square matmul in the model's compute dtype (2048^2 on CPU, 8192^2 on
     GPU), best of 5 runs, and its share of --peak_tflops when that is given;
  2. per (kind, D): median step time over --steps steps (after 2 warmup steps), tokens/s, model
     FLOPs per step (counted in flop_counts) beside XLA's cost_analysis of the lowered and the
     compiled step, achieved FLOP/s, its share of the matmul FLOP/s (and MFU), and
     step_time(D)/step_time(0) beside flops(D)/flops(0); --interleave times all (kind, D) step
     by step, which a machine shared with other jobs needs for fair ratios;
  3. per D in --memory_depths (sequential, compiled only): XLA's temp/argument/output/alias
     bytes, and the growth of temp memory per extra depth in units of one B x T x V float32
     logits tensor, also after subtracting what one more trunk block adds (the activations a
     depth must keep whatever its logits cost); with --remat_compare, temp memory and the
     backward pass's saved residuals for model.remat x model.dtype.
Takes 3-4 minutes for the command above on 2 shared CPU cores; runs unchanged on one GPU. Config
overrides (--config.model.d_model=1024 ...) work as in launch.py; --out FILE.json keeps it all.
"""

import dataclasses
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py',
                                          'Path to a config file.', lock_config=True)
_DEPTHS = flags.DEFINE_list('depths', ['0', '1', '2', '3'], 'MTP depths D to time.')
_KINDS = flags.DEFINE_list('kinds', ['sequential', 'parallel'], 'MTP head kinds to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps per (kind, D), after 2 warmup.')
_MEMORY_DEPTHS = flags.DEFINE_list('memory_depths', ['0', '1', '2', '3', '4'],
                                   'Depths whose sequential train step is compiled for memory.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0,
                           'Peak dense TFLOP/s of ONE device in the compute dtype, for MFU '
                           '(e.g. 989 for H100 SXM bf16); 0 leaves MFU out.')
_REMAT = flags.DEFINE_bool('remat_compare', False,
                           'Also compile the config as given with model.remat False/True and '
                           'model.dtype float32/bfloat16 and print temp memory.')
_INTERLEAVE = flags.DEFINE_bool(
    'interleave', False, 'Time every (kind, D) step by step in rounds, all states live at once, '
    'so load drift on a shared machine hits each alike (needs memory for every state).')
_MARKDOWN = flags.DEFINE_bool('markdown', False, 'Also print each table as markdown.')
_OUT = flags.DEFINE_string('out', '', 'Write every number to this JSON file.')

WARMUP_STEPS = 2
MATMUL_SIZE = {'cpu': 2048}  # any other platform (GPU, TPU) gets 8192
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# FLOP counting


def flop_counts(cfg, batch: int, seq_len: int) -> dict:
  """Analytic FLOPs of one train step. Per token, forward: a Linear (a, b) costs 2ab; attention
  scores and values cost 2 * 2 * T_ctx * d with T_ctx = T / 2 under the causal mask; each depth
  projects to the vocabulary (2 d V); a sequential module adds eh_proj (2 * 2d * d) and a block,
  a parallel head a block (its MLP mtp.head_mlp_dim wide when set), a Medusa head its residual
  MLP. Model FLOPs = 3 x forward (backward = 2 x forward).

  Hardware FLOPs are what the compiled step does on top: the masked attention is dense (full
  T x T, no causal halving), the loss recomputes each depth's projection in the backward pass
  (jax.checkpoint), and model.remat recomputes every block's (and MTP head's) forward."""
  d, V, T, D, L = cfg.d_model, cfg.vocab_size, seq_len, cfg.mtp_depth, cfg.num_layers
  HE, KE = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  attn_linear = 2 * d * HE + 2 * 2 * d * KE + 2 * HE * d  # q, k, v, o
  F, F_head = cfg.mlp_dim, cfg.head_mlp_dim or cfg.mlp_dim  # trunk and head MLP widths
  linear, head_linear = attn_linear + 3 * 2 * d * F, attn_linear + 3 * 2 * d * F_head
  attn_causal, attn_dense = 2 * 2 * (T / 2) * HE, 2 * 2 * T * HE
  out_proj = 2 * d * V
  # Per depth: a sequential module adds eh_proj and a block, a parallel head a block, a Medusa
  # head its residual MLP (d x d, or d x F and F x d with mtp.head_mlp_dim = F; counted in
  # eh_proj's place) and no block.
  medusa = 2 * 2 * d * cfg.head_mlp_dim if cfg.head_mlp_dim else 2 * d * d
  eh_proj = {'sequential': 2 * 2 * d * d, 'parallel': 0, 'medusa': medusa}[cfg.mtp_kind]
  head_blocks = 0 if cfg.mtp_kind == 'medusa' else D
  forward = (L * (linear + attn_causal) + head_blocks * (head_linear + attn_causal)
             + D * eh_proj + (D + 1) * out_proj)
  dense_forward = forward + (L + head_blocks) * (attn_dense - attn_causal)
  # A rematerialized block recomputes all but its MLP down projection, whose output only feeds
  # the residual sum and so is not needed by the backward pass.
  remat_blocks = (L * (linear + attn_dense - 2 * F * d)
                  + head_blocks * (head_linear + attn_dense - 2 * F_head * d) + D * eh_proj
                  if cfg.remat else 0)
  tokens = batch * seq_len
  return {
      'tokens': tokens,
      'forward_per_token': forward,
      'model': 3 * forward * tokens,
      'hardware': (3 * dense_forward + (D + 1) * out_proj + remat_blocks) * tokens,
      'parts_forward_per_token': {
          'blocks_linear': L * linear + head_blocks * head_linear,
          'attention_causal': (L + head_blocks) * attn_causal,
          'eh_proj': D * eh_proj, 'output_projection': (D + 1) * out_proj},
  }


def xla_cost(stage) -> dict:
  """XLA's FLOPs and bytes accessed of a lowered or compiled function (cost_analysis returns a
  dict or, in older jax, a list of them)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  cost = cost or {}
  return {'flops': cost.get('flops'), 'bytes': cost.get('bytes accessed')}


def memory_stats(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  names = ('temp', 'argument', 'output', 'alias', 'generated_code')
  out = {n: int(getattr(m, f'{n}_size_in_bytes', 0)) for n in names}
  out['peak_estimate'] = out['temp'] + out['argument']
  return out


# ---------------------------------------------------------------------------------------------
# Machine and matmul roofline


def machine_info(jax) -> dict:
  dev = jax.devices()[0]
  info = {'platform': jax.default_backend(), 'device_kind': dev.device_kind,
          'device_count': jax.device_count(), 'process_count': jax.process_count(),
          'cpu_count': os.cpu_count(), 'jax_version': jax.__version__,
          'python': platform.python_version(), 'host': platform.machine()}
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  if stats and 'bytes_limit' in stats:
    info['device_memory_bytes'] = int(stats['bytes_limit'])
  return info


def matmul_roofline(jax, jnp, dtype_name: str, runs: int = 5) -> dict:
  """FLOP/s of one N x N x N matmul on the default device, best of `runs`. Each run repeats the
  matmul enough times to last ~50 ms so dispatch overhead does not count."""
  n = MATMUL_SIZE.get(jax.default_backend(), 8192)
  dtype = jnp.dtype(dtype_name)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  t0 = time.perf_counter()
  jax.block_until_ready(matmul(a, b))
  repeats = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
  best = float('inf')
  for _ in range(runs):
    t0 = time.perf_counter()
    outs = [matmul(a, b) for _ in range(repeats)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - t0) / repeats)
  return {'n': n, 'dtype': dtype_name, 'seconds': best, 'flops': 2 * n**3,
          'flops_per_s': 2 * n**3 / best}


# ---------------------------------------------------------------------------------------------
# The train step, built as train.Session builds it


def variant(config, **fields):
  """A copy of the config with 'section.field' values replaced (e.g. mtp__depth=2)."""
  c = config.copy_and_resolve_references()
  for key, value in fields.items():
    section, field = key.split('__')
    c[section][field] = value
  if c.mtp.depth == 0:
    c.decode.method = 'ar'  # the decoder is not benchmarked, but validate() checks it
  return c


@dataclasses.dataclass
class Step:
  cfg: object
  init: object  # jitted rng -> sharded state
  lowered: object
  compiled: object  # compiled (state, batch) -> (state, metrics), state donated
  batch_spec: object
  compile_s: float


def build_step(config, mesh):
  """Compiles the train step for `config` exactly as training does (train.Program: state
  sharded by the parameters' logical axis names, batch split over the data axes, state
  donated), without data."""
  import jax
  import jax.numpy as jnp
  from mtp_jax import sharding
  from mtp_jax import train as train_lib
  from mtp_jax.config import validate

  validate(config)
  sharding.check_mesh(config, jax.device_count(), jax.process_count())
  program = train_lib.Program(config, mesh)
  batch_spec = jax.ShapeDtypeStruct((config.train.batch_size, program.window), jnp.int32,
                                    sharding=program.batch_sharding)
  t0 = time.perf_counter()
  with sharding.active(mesh):
    lowered = program.train_step.lower(program.abstract_state, batch_spec)
    compiled = lowered.compile()
  return Step(program.cfg, program.init, lowered, compiled, batch_spec,
              time.perf_counter() - t0)


def random_batches(step: Step, count: int, seed: int):
  """`count` uniform random token windows, already on the devices (no host transfer is timed)."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  shape = step.batch_spec.shape
  return [jax.device_put(rng.integers(0, step.cfg.vocab_size, shape, dtype=np.int32),
                         step.batch_spec.sharding) for _ in range(count)]


@dataclasses.dataclass
class Run:
  """One (kind, D) being timed: its compiled step, live state, batches and step times."""
  kind: str
  depth: int
  step: Step
  state: object
  batches: list
  times: list = dataclasses.field(default_factory=list)
  metrics: object = None


def start_run(config, mesh, kind, depth, steps: int) -> Run:
  import jax
  from mtp_jax import sharding
  c = variant(config, mtp__depth=depth, **({'mtp__kind': kind} if kind else {}))
  step = build_step(c, mesh)
  with sharding.active(mesh):
    state = step.init(jax.random.key(c.seed))
  return Run(kind or '-', depth, step, state, random_batches(step, WARMUP_STEPS + steps, c.seed))


def take_step(run: Run, i: int):
  """Step i of a run, synced; steps after the warmup are timed."""
  import jax
  t0 = time.perf_counter()
  run.state, run.metrics = run.step.compiled(run.state, run.batches[i])
  jax.block_until_ready((run.state, run.metrics))
  if i >= WARMUP_STEPS:
    run.times.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The three parts


def bench_throughput(config, mesh, depths, kinds, steps, matmul_fps, peak, n_dev, interleave):
  """Times each (kind, D) in turn or, with `interleave`, all of them step by step in rounds
  (every state live at once), so a drift in the machine's load hits every D alike."""
  t = config.train
  plan = [(None, 0)] if 0 in depths else []
  plan += [(kind, d) for kind in kinds for d in depths if d > 0]
  rows = []
  for group in ([plan] if interleave else [[p] for p in plan]):
    runs = [start_run(config, mesh, kind, depth, steps) for kind, depth in group]
    for i in range(WARMUP_STEPS + steps):
      for run in runs:
        take_step(run, i)
    for run in runs:
      rows.append(throughput_row(run, t, matmul_fps, peak, n_dev))
      print(f"  timed {run.kind:>10} D={run.depth}: {1e3 * rows[-1]['step_s']:.1f} ms/step "
            f'(compile {run.step.compile_s:.1f} s)', flush=True)
    del runs
  base = next((r for r in rows if r['depth'] == 0), None)
  for r in rows:
    r['time_ratio'] = r['step_s'] / base['step_s'] if base else None
    r['flop_ratio'] = r['model_flops'] / base['model_flops'] if base else None
  return rows


def throughput_row(run: Run, t, matmul_fps, peak, n_dev) -> dict:
  counts = flop_counts(run.step.cfg, t.batch_size, t.seq_len)
  xla, xla_compiled = xla_cost(run.step.lowered), xla_cost(run.step.compiled)
  step_s = statistics.median(run.times)
  achieved = counts['model'] / step_s
  return {'kind': run.kind, 'depth': run.depth, 'compile_s': run.step.compile_s,
          'step_s': step_s, 'step_s_min': min(run.times), 'step_s_max': max(run.times),
          'final_loss': float(run.metrics['loss/total']),
          'tokens_per_s': counts['tokens'] / step_s,
          'tokens_per_s_per_device': counts['tokens'] / step_s / n_dev,
          'model_flops': counts['model'], 'hardware_flops': counts['hardware'],
          'xla_flops': xla['flops'], 'xla_flops_compiled': xla_compiled['flops'],
          'xla_bytes_accessed_compiled': xla_compiled['bytes'],
          'xla_over_hardware': xla['flops'] / counts['hardware'] if xla['flops'] else None,
          'forward_flops_per_token': counts['parts_forward_per_token'],
          'model_flops_per_s': achieved,
          'fraction_of_matmul': achieved / n_dev / matmul_fps,
          'mfu': achieved / n_dev / (peak * 1e12) if peak else None}


def logits_bytes_per_device(config, mesh) -> int:
  """One float32 B x T x V logits tensor of a micro-batch, as one device holds it."""
  t = config.train
  batch = t.batch_size // t.grad_accum // (mesh.shape['data'] * mesh.shape['fsdp'])
  return 4 * batch * t.seq_len * config.data.vocab_size // mesh.shape['tensor']


def _temp(config, mesh, **fields):
  return memory_stats(build_step(variant(config, **fields), mesh).compiled).get('temp')


def bench_memory(config, mesh, depths):
  """Temp memory per D, and the yardstick to read it by: the temp memory that one more trunk
  block adds at D = 0. A depth that keeps only its block's activations (its logits computed
  and freed one depth at a time) adds about one block, whatever V is."""
  logits = logits_bytes_per_device(config, mesh)
  rows = []
  for depth in depths:
    step = build_step(variant(config, mtp__depth=depth, mtp__kind='sequential'), mesh)
    rows.append({'depth': depth, 'compile_s': step.compile_s, **memory_stats(step.compiled)})
    print(f'  compiled sequential D={depth} for memory ({step.compile_s:.1f} s)', flush=True)
  base = rows[0].get('temp') if depths[0] == 0 else _temp(config, mesh, mtp__depth=0)
  deeper = _temp(config, mesh, mtp__depth=0, model__num_layers=config.model.num_layers + 1)
  block = None if base is None or deeper is None else deeper - base
  print('  compiled D=0 with one more trunk layer, for the per-block yardstick', flush=True)
  for prev, r in zip([None] + rows, rows):
    if prev is not None and 'temp' in r:
      r['temp_increase_per_depth'] = (r['temp'] - prev['temp']) / (r['depth'] - prev['depth'])
      r['increase_over_logits'] = r['temp_increase_per_depth'] / logits
      if block is not None:
        r['increase_beyond_block_over_logits'] = (r['temp_increase_per_depth'] - block) / logits
  return logits, block, rows


def residual_bytes(config) -> int:
  """Bytes the backward pass keeps from the forward (JAX's saved residuals of the loss on one
  micro-batch, parameters excluded). This is what model.remat trades for recomputation; XLA
  CPU's memory_analysis does not show it, as its scheduler keeps similar buffers either way."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax._src.ad_checkpoint import saved_residuals
  from mtp_jax.config import ModelConfig
  from mtp_jax.loss import combined_loss
  from mtp_jax.model import init_params
  from mtp_jax.train import window_length
  cfg = ModelConfig.from_config(config)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  micro = config.train.batch_size // config.train.grad_accum
  tokens = jax.ShapeDtypeStruct((micro, window_length(config)), jnp.int32)
  saved = saved_residuals(lambda p, t: combined_loss(p, t, cfg, 0.3)[0], params, tokens)
  return int(sum(np.prod(a.shape) * a.dtype.itemsize for a, why in saved
                 if 'argument' not in why))


def bench_remat(config, mesh):
  rows = []
  for remat in (False, True):
    for dtype in ('float32', 'bfloat16'):
      conf = variant(config, model__remat=remat, model__dtype=dtype)
      step = build_step(conf, mesh)
      rows.append({'remat': remat, 'dtype': dtype, **memory_stats(step.compiled),
                   'saved_residuals': residual_bytes(conf)})
      print(f'  compiled remat={remat} dtype={dtype} for memory', flush=True)
  return rows


# ---------------------------------------------------------------------------------------------
# Printing


def table(headers, rows, markdown: bool) -> str:
  cells = [[str(c) for c in row] for row in rows]
  if markdown:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---:' for _ in headers) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in cells])
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
            for i, h in enumerate(headers)]
  fmt = lambda r: '  '.join(c.rjust(w) for c, w in zip(r, widths))
  return '\n'.join([fmt(headers), fmt(['-' * w for w in widths])] + [fmt(r) for r in cells])


def show(title, headers, rows, markdown: bool):
  print(f'\n{title}\n' + table(headers, rows, False))
  if markdown:
    print('\nmarkdown:\n' + table(headers, rows, True))


def _g(x, digits=3):
  return '-' if x is None else f'{x:.{digits}g}'


def _num(x):
  """Compact but never in exponent form: 13250, 27.2, 0.0494."""
  if x is None:
    return '-'
  return f'{x:.0f}' if abs(x) >= 1000 else f'{x:.1f}' if abs(x) >= 10 else f'{x:.3g}'


def _pct(x):
  return '-' if x is None else f'{100 * x:.1f}%'


def _mib(x):
  return '-' if x is None else f'{x / MiB:.2f}'


def report(result, markdown: bool):
  m, mm = result['machine'], result['matmul']
  print(f"\nmachine: {m['platform']} / {m['device_kind']} x {m['device_count']}, "
        f"{m['cpu_count']} CPUs, jax {m['jax_version']}")
  print(f"config: {result['config_summary']}")
  print(f"data: {result['data']}")
  peak = result['peak_tflops']
  mfu = f", {_pct(mm['flops_per_s'] / (peak * 1e12))} of the {peak:g} TFLOP/s peak" if peak else ''
  show('1. matmul roofline (one device)',
       ['matmul', 'dtype', 'best time (ms)', 'TFLOP/s'],
       [[f"{mm['n']}^3", mm['dtype'], f"{1e3 * mm['seconds']:.2f}",
         _num(mm['flops_per_s'] / 1e12)]], markdown)
  print(f"machine's matmul FLOP/s: {mm['flops_per_s']:.3e}{mfu}")

  rows = result['throughput']
  if rows:
    headers = ['kind', 'D', 'step (ms)', 'min (ms)', 'tok/s', 'tok/s/dev', 'model GFLOP',
               'hw GFLOP', 'XLA GFLOP', 'XLA/hw', 'compiled/hw', 'TFLOP/s', '% matmul'] + (
                   ['MFU'] if peak else []) + ['t(D)/t(0)', 'F(D)/F(0)']
    body = [[r['kind'], r['depth'], f"{1e3 * r['step_s']:.1f}", f"{1e3 * r['step_s_min']:.1f}",
             f"{r['tokens_per_s']:.0f}",
             f"{r['tokens_per_s_per_device']:.0f}", _num(r['model_flops'] / 1e9),
             _num(r['hardware_flops'] / 1e9), _num(r['xla_flops'] and r['xla_flops'] / 1e9),
             _g(r['xla_over_hardware']),
             _g(r['xla_flops_compiled'] and r['xla_flops_compiled'] / r['hardware_flops']),
             _num(r['model_flops_per_s'] / 1e12),
             _pct(r['fraction_of_matmul'])] + ([_pct(r['mfu'])] if peak else []) +
            [_g(r['time_ratio']), _g(r['flop_ratio'])] for r in rows]
    order = 'interleaved step by step' if result['interleave'] else 'one (kind, D) after another'
    show(f"2. training throughput (median of {result['steps']} steps after {WARMUP_STEPS} "
         f'warmup, {order}; /dev: per device)', headers, body, markdown)
    print('model FLOPs: 3 x analytic forward, causal attention counted at T/2. hw: adds the dense '
          "T x T attention, the loss's recomputed logits and model.remat. XLA: cost_analysis() of "
          'the lowered step (HLO before optimization; also counts elementwise and optimizer '
          'ops); compiled: of the compiled executable. TFLOP/s, % matmul and MFU use model FLOPs.')
    far = lambda x: x is not None and abs(x - 1) > 0.2
    for r in rows:
      if far(r['xla_over_hardware']):
        print(f"  note: {r['kind']} D={r['depth']}: XLA counts {r['xla_over_hardware']:.2f}x the "
              'analytic hardware FLOPs (> 20% apart)')
    if any(r['xla_flops_compiled'] and far(r['xla_flops_compiled'] / r['hardware_flops'])
           for r in rows):
      print("  note: the compiled executable's count is > 20% off the analytic one; it seems to "
            'leave out work handed to library calls (on GPU, the cuBLAS GEMMs), so the lowered '
            'count is the cross-check.')
    if result['grad_accum'] > 1:
      print(f"  note: train.grad_accum={result['grad_accum']}: XLA's cost_analysis counts the "
            'accumulation loop body once, so its figure is about 1/grad_accum of the step.')

  mem = result['memory']
  if mem['rows']:
    lb = mem['logits_bytes']
    show('3. compiled memory of the sequential train step (per device, MiB)',
         ['D', 'temp', 'argument', 'output', 'alias', 'temp+arg', 'temp +/depth',
          '+/depth / logits', '(+/depth - block) / logits'],
         [[r['depth'], _mib(r.get('temp')), _mib(r.get('argument')), _mib(r.get('output')),
           _mib(r.get('alias')), _mib(r.get('peak_estimate')),
           _mib(r.get('temp_increase_per_depth')), _g(r.get('increase_over_logits')),
           _g(r.get('increase_beyond_block_over_logits'))] for r in mem['rows']], markdown)
    incs = [r['increase_over_logits'] for r in mem['rows'] if 'increase_over_logits' in r]
    beyond = [r['increase_beyond_block_over_logits'] for r in mem['rows']
              if 'increase_beyond_block_over_logits' in r]
    print(f"one float32 B x T x V logits tensor: {_mib(lb)} MiB ({mem['logits_shape']}); temp "
          f"memory grows by {', '.join(_g(x, 2) for x in incs) or '-'} of it per extra depth.")
    print(f"one more trunk block adds {_mib(mem['one_block_temp_bytes'])} MiB of temp at D=0 "
          f"(= {_g(mem['one_block_temp_bytes'] and mem['one_block_temp_bytes'] / lb, 2)} logits); "
          f"beyond that, each depth adds {', '.join(_g(x, 2) for x in beyond) or '-'} logits "
          "(its eh_proj input, norms, embedded tokens, hidden state and its parameters' "
          'gradients).')
  if result.get('remat_compare'):
    rc = result['remat_compare']
    show(f"memory by model.remat and model.dtype ({rc['label']}, per device, MiB)",
         ['remat', 'dtype', 'temp', 'argument', 'temp+arg', 'saved residuals'],
         [[r['remat'], r['dtype'], _mib(r.get('temp')), _mib(r.get('argument')),
           _mib(r.get('peak_estimate')), _mib(r.get('saved_residuals'))] for r in rc['rows']],
         markdown)


def _ints(values, name):
  try:
    out = sorted({int(v) for v in values})
  except ValueError:
    raise app.UsageError(f'--{name} takes integers, got {",".join(values)}') from None
  if any(d < 0 for d in out):
    raise app.UsageError(f'--{name}: depths must be >= 0')
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  depths, mem_depths = _ints(_DEPTHS.value, 'depths'), _ints(_MEMORY_DEPTHS.value, 'memory_depths')
  kinds = _KINDS.value
  from mtp_jax.config import KINDS
  if any(k not in KINDS for k in kinds):
    raise app.UsageError(f'--kinds takes {",".join(KINDS)}, got {",".join(kinds)}')
  if _STEPS.value < 1:
    raise app.UsageError('--steps must be >= 1')
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)

  import jax
  import jax.numpy as jnp
  from mtp_jax import sharding
  from mtp_jax.config import ConfigError

  try:
    mesh = sharding.make_mesh(config.mesh)
    machine = machine_info(jax)
    print(f"{machine['platform']} / {machine['device_kind']} x {machine['device_count']}, "
          f"mesh {dict(mesh.shape)}", flush=True)
    mm = matmul_roofline(jax, jnp, config.model.dtype)
    print(f"  matmul {mm['n']}^3 {mm['dtype']}: {mm['flops_per_s'] / 1e12:.3f} TFLOP/s", flush=True)
    n_dev = jax.device_count()
    peak = _PEAK.value
    throughput = bench_throughput(config, mesh, depths, kinds, _STEPS.value, mm['flops_per_s'],
                                  peak, n_dev, _INTERLEAVE.value)
    logits, block, mem_rows = (bench_memory(config, mesh, mem_depths) if mem_depths
                               else (None, None, []))
    remat = None
    if _REMAT.value:
      remat = {'label': f'{config.mtp.kind} D={config.mtp.depth}',
               'rows': bench_remat(config, mesh)}
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

  t, m = config.train, config.model
  result = {
      'machine': machine,
      'config_file': config_flags.get_config_filename(flags.FLAGS['config']),
      'config_summary': (f'd_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads '
                         f'({m.num_kv_heads} kv), vocab {config.data.vocab_size}, '
                         f'batch {t.batch_size} x seq {t.seq_len}, grad_accum {t.grad_accum}, '
                         f'{m.dtype}, remat {m.remat}'),
      'config': config.to_dict(),
      'data': ('no data: each batch is uniform random token ids < data.vocab_size, shape '
               '(train.batch_size, train.seq_len + D + 1)'),
      'steps': _STEPS.value, 'warmup_steps': WARMUP_STEPS, 'interleave': _INTERLEAVE.value,
      'grad_accum': t.grad_accum,
      'peak_tflops': peak, 'matmul': mm, 'throughput': throughput,
      'memory': {'logits_bytes': logits, 'one_block_temp_bytes': block, 'rows': mem_rows,
                 'logits_shape': (f'{t.batch_size // t.grad_accum} x {t.seq_len} x '
                                  f'{config.data.vocab_size} per micro-batch')},
      'remat_compare': remat,
  }
  report(result, _MARKDOWN.value)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=2, default=str)
    print(f'\nwrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
