"""Training-step benchmark: this machine's matmul roofline, throughput and FLOPs of the train step
for each MTP depth D and head kind, and the compiled memory of the step as D grows.

Run: python experiments/bench_train.py --config configs/quickstart.py --depths 0,1,2,3 \
       --kinds sequential,parallel --steps 10 --markdown
     python experiments/bench_train.py --config configs/smollm2_heads.py \
       --config.data.features=False --config.train.batch_size=2 --config.train.seq_len=32 \
       --steps 2 --depths 3 --kinds sequential --memory_depths '' --freeze_compare
Prints, from one process and without any data (batches are uniform random token windows of shape
(train.batch_size, train.seq_len + D + 1), ids < data.vocab_size; with train.draft_vocab = N the
heads' softmax covers token ids 0..N-1, as the cost depends on N only):
  1. the FLOP/s of a jitted square matmul in the training step's compute dtype (2048^2 on CPU,
     8192^2 on GPU), best of 5 runs, and its share of --peak_tflops when that is given; and the memory read
     bandwidth (a sum over 512 MiB of float32, best of 5);
  2. per (kind, D): median step time over --steps steps (after 2 warmup steps), tokens/s, model
     FLOPs per step (mtp_jax/costs.py) beside XLA's cost_analysis of the lowered and the
     compiled step, achieved FLOP/s, its share of the matmul FLOP/s (and MFU), and
     step_time(D)/step_time(0) beside flops(D)/flops(0); --interleave times all (kind, D) step
     by step, which a machine shared with other jobs needs for fair ratios (D = 0 always trains
     its trunk: it has no heads to train alone); --flops_only prints only the model and
     hardware FLOPs per step of each (kind, D) and their ratio to D = 0, from the config alone,
     and stops (the numerators for step times measured elsewhere);
  3. per D in --memory_depths (sequential, compiled only): XLA's temp/argument/output/alias
     bytes, and the growth of temp memory per extra depth in units of one B x T x V float32
     logits tensor, also after subtracting what one more trunk block adds (the activations a
     depth must keep whatever its logits cost); with --remat_compare, temp memory and the
     backward pass's saved residuals for model.remat x model.dtype;
  4. with --freeze_compare, the configured model with train.freeze_trunk False and True, timed
     step by step in turns: step time, tokens/s, FLOPs (frozen: no trunk backward), compiled
     memory and the optimizer state's bytes. It needs a pretrained trunk (model.init_from; its
     shapes are read from the file, its weights are not needed).
Takes 3-4 minutes for the first command and a few for the second on 2 shared CPU cores; runs
unchanged on one GPU. Config overrides (--config.model.d_model=1024 ...) work as in launch.py;
--out FILE.json keeps it all. Token windows only: a config with data.features=True (heads trained
on cached trunk features, no trunk in the step) is refused.
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from mtp_jax import cli  # noqa: E402
from mtp_jax import atomic, costs, measure, sharding, train  # noqa: E402
from mtp_jax.config import KINDS, ConfigError, ModelConfig, apply_overrides, validate  # noqa: E402
from mtp_jax.loss import combined_loss  # noqa: E402
from mtp_jax.pretrained.resolve import resolve_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py',
                                          'Path to a config file.', lock_config=True)
_DEPTHS = flags.DEFINE_list('depths', ['0', '1', '2', '3'], 'MTP depths D to time.')
_KINDS = flags.DEFINE_list('kinds', ['sequential', 'parallel'], 'MTP head kinds to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps per (kind, D), after 2 warmup.',
                              lower_bound=1)
_MEMORY_DEPTHS = flags.DEFINE_list('memory_depths', ['0', '1', '2', '3', '4'],
                                   'Depths whose sequential train step is compiled for memory.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0,
                           'Peak dense TFLOP/s of ONE device in the compute dtype, for MFU '
                           '(e.g. 989 for H100 SXM bf16); 0 leaves MFU out.', lower_bound=0.0)
_REMAT = flags.DEFINE_bool('remat_compare', False,
                           'Also compile the config as given with model.remat False/True and '
                           'model.dtype float32/bfloat16 and print temp memory.')
_FREEZE = flags.DEFINE_bool('freeze_compare', False,
                            'Also time and compile the config as given with train.freeze_trunk '
                            'False and True (needs model.init_from).')
_INTERLEAVE = flags.DEFINE_bool(
    'interleave', False, 'Time every (kind, D) step by step in rounds, all states live at once, '
    'so load drift on a shared machine hits each alike (needs memory for every state).')
_FLOPS_ONLY = flags.DEFINE_bool(
    'flops_only', False, 'Print each (kind, D)\'s analytic FLOPs per train step (mtp_jax/costs.py) '
    'and exit, with no device work: the numerator of MFU for step times measured elsewhere.')
_MARKDOWN = flags.DEFINE_bool('markdown', False, 'Also print each table as markdown.')
_OUT = flags.DEFINE_string('out', '', 'Write every number to this JSON file.')

WARMUP_STEPS = 2
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# The train step, built as train.Program builds it


@dataclasses.dataclass
class Step:
  """The train step of one config, compiled as training compiles it (train.Program: state
  sharded by the parameters' logical axis names, batch split over the data axes, state donated),
  without data."""
  config: ml_collections.ConfigDict  # with its overrides applied
  program: train.Program
  lowered: jax.stages.Lowered
  compiled: jax.stages.Compiled  # (state, batch, draft_ids) -> (state, metrics), state donated
  batch_spec: jax.ShapeDtypeStruct
  draft_ids: jax.Array  # the heads' draft vocabulary: train.draft_vocab ids (none: every token)
  compile_s: float

  def flops(self) -> dict:
    return costs.train_flops_of(self.program.cfg, self.config.train)


def build_step(config, mesh, overrides: dict) -> Step:
  config = apply_overrides(config, overrides)
  validate(config)
  sharding.check_mesh(config, jax.device_count(), jax.process_count())
  program = train.Program(config, mesh)
  batch_spec = jax.ShapeDtypeStruct((config.train.batch_size, program.window), jnp.int32,
                                    sharding=program.batch_sharding)
  draft_ids = jax.device_put(np.arange(config.train.draft_vocab, dtype=np.int32),
                             sharding.replicated(mesh))
  start = time.perf_counter()
  with sharding.active(mesh):
    lowered = program.lower_train_step(batch_spec, draft_ids)
    compiled = lowered.compile()
  return Step(config, program, lowered, compiled, batch_spec, draft_ids,
              time.perf_counter() - start)


@dataclasses.dataclass
class Run:
  """One step being timed: its live state and batches; each call takes the next train step."""
  label: dict
  step: Step
  state: object
  batches: list
  taken: int = 0

  def __call__(self):
    batch = self.batches[self.taken % len(self.batches)]
    self.state, metrics = self.step.compiled(self.state, batch, self.step.draft_ids)
    self.taken += 1
    return self.state, metrics


def start_run(config, mesh, label: dict, overrides: dict, steps: int) -> Run:
  """A Run with a fresh state and WARMUP_STEPS + `steps` uniform random token windows, already on
  the devices (no host transfer is timed)."""
  step = build_step(config, mesh, overrides)
  c = step.config
  with sharding.active(mesh):
    state = step.program.init(jax.random.key(c.seed))
  rng = np.random.default_rng(c.seed)
  batches = [jax.device_put(rng.integers(0, c.data.vocab_size, step.batch_spec.shape, np.int32),
                            step.batch_spec.sharding) for _ in range(WARMUP_STEPS + steps)]
  return Run(label, step, state, batches)


def time_runs(runs: list[Run], steps: int) -> list[dict]:
  """Times the runs step by step in turns and returns a throughput row for each."""
  seconds, outputs = measure.timings(runs, steps, WARMUP_STEPS)
  return [{**run.label, **throughput(run.step, times, metrics)}
          for run, times, (_, metrics) in zip(runs, seconds, outputs)]


def throughput(step: Step, seconds: list[float], metrics) -> dict:
  counts = step.flops()
  xla, xla_compiled = costs.xla_cost(step.lowered), costs.xla_cost(step.compiled)
  step_s = statistics.median(seconds)
  return {'compile_s': step.compile_s, 'step_s': step_s, 'step_s_min': min(seconds),
          'step_s_max': max(seconds), 'final_loss': float(metrics['loss/total']),
          'tokens_per_s': counts['tokens'] / step_s,
          'tokens_per_s_per_device': counts['tokens'] / step_s / jax.device_count(),
          'model_flops': counts['model'], 'hardware_flops': counts['hardware'],
          'xla_flops': xla['flops'], 'xla_flops_compiled': xla_compiled['flops'],
          'xla_bytes_accessed_compiled': xla_compiled['bytes'],
          'xla_over_hardware': xla['flops'] / counts['hardware'] if xla['flops'] else None,
          'forward_flops_per_token': counts['parts_forward_per_token'],
          'model_flops_per_s': counts['model'] / step_s}


def add_rates(rows: list[dict], matmul_fps: float, peak: float):
  """Each row's achieved model FLOP/s per device as a share of the matmul roofline (and MFU)."""
  for r in rows:
    per_device = r['model_flops_per_s'] / jax.device_count()
    r['fraction_of_matmul'] = per_device / matmul_fps
    r['mfu'] = per_device / (peak * 1e12) if peak else None


# ---------------------------------------------------------------------------------------------
# The four parts


def at_depth(depth: int, kind: str | None = None) -> dict:
  """Overrides for D = depth (and head kind): D = 0 trains its trunk, having no heads to train
  alone."""
  kind = {'mtp.kind': kind} if kind else {}
  return {'mtp.depth': depth, **kind, **({'train.freeze_trunk': False} if depth == 0 else {})}


def plan_of(depths, kinds) -> list[tuple[dict, dict]]:
  """(label, overrides) per timed row: D = 0 once, then every kind at each D > 0."""
  plan = [({'kind': '-', 'depth': 0}, at_depth(0))] if 0 in depths else []
  return plan + [({'kind': kind, 'depth': d}, at_depth(d, kind))
                 for kind in kinds for d in depths if d > 0]


def print_flops(config, depths, kinds):
  """Model and hardware FLOPs per train step of each planned row, from the config alone."""
  base = None
  for label, overrides in plan_of(depths, kinds):
    c = apply_overrides(config, overrides)
    counts = costs.train_flops_of(ModelConfig.from_config(c), c.train)
    base = base or (counts['model'] if label['depth'] == 0 else None)
    ratio = f", F(D)/F(0) {counts['model'] / base:.3f}" if base else ''
    print(f"  {label['kind']:>10} D={label['depth']}: {counts['model'] / 1e12:.4g} model TFLOP, "
          f"{counts['hardware'] / 1e12:.4g} hardware TFLOP per step of {counts['tokens']} "
          f"tokens{ratio}", flush=True)


def bench_throughput(config, mesh, depths, kinds, steps, interleave):
  """Times each (kind, D) in turn or, with `interleave`, all of them step by step in rounds
  (every state live at once), so a drift in the machine's load hits every D alike."""
  plan = plan_of(depths, kinds)
  rows = []
  for group in ([plan] if interleave else [[p] for p in plan]):
    runs = [start_run(config, mesh, label, overrides, steps) for label, overrides in group]
    rows += time_runs(runs, steps)
    for r in rows[-len(runs):]:
      print(f"  timed {r['kind']:>10} D={r['depth']}: {1e3 * r['step_s']:.1f} ms/step, "
            f"{r['model_flops_per_s'] / jax.device_count() / 1e12:.3g} model TFLOP/s per device "
            f"(compile {r['compile_s']:.1f} s)", flush=True)
    del runs  # frees these states before the next group's are made
  base = next((r for r in rows if r['depth'] == 0), None)
  for r in rows:
    r['time_ratio'] = r['step_s'] / base['step_s'] if base else None
    r['flop_ratio'] = r['model_flops'] / base['model_flops'] if base else None
  return rows


def logits_bytes_per_device(config, mesh) -> int:
  """One float32 B x T x V logits tensor of a micro-batch, as one device holds it."""
  t = config.train
  batch = t.batch_size // t.grad_accum // (mesh.shape['data'] * mesh.shape['fsdp'])
  return 4 * batch * t.seq_len * config.data.vocab_size // mesh.shape['tensor']


def _temp(config, mesh, overrides):
  return costs.memory_stats(build_step(config, mesh, overrides).compiled).get('temp')


def bench_memory(config, mesh, depths):
  """Temp memory per D, and the yardstick to read it by: the temp memory that one more trunk
  block adds at D = 0. A depth that keeps only its block's activations (its logits computed
  and freed one depth at a time) adds about one block, whatever V is."""
  logits = logits_bytes_per_device(config, mesh)
  rows = []
  for depth in depths:
    step = build_step(config, mesh, at_depth(depth, 'sequential'))
    rows.append({'depth': depth, 'compile_s': step.compile_s,
                 **costs.memory_stats(step.compiled)})
    print(f'  compiled sequential D={depth} for memory ({step.compile_s:.1f} s)', flush=True)
  base = rows[0].get('temp') if depths[0] == 0 else _temp(config, mesh, at_depth(0))
  deeper = _temp(config, mesh, {**at_depth(0), 'model.num_layers': config.model.num_layers + 1})
  block = None if base is None or deeper is None else deeper - base
  print('  compiled D=0 with one more trunk layer, for the per-block yardstick', flush=True)
  for prev, r in zip([None] + rows, rows):
    if prev is not None and 'temp' in r:
      r['temp_increase_per_depth'] = (r['temp'] - prev['temp']) / (r['depth'] - prev['depth'])
      r['increase_over_logits'] = r['temp_increase_per_depth'] / logits
      if block is not None:
        r['increase_beyond_block_over_logits'] = (r['temp_increase_per_depth'] - block) / logits
  return logits, block, rows


def residual_bytes(step: Step) -> int:
  """Bytes the backward pass of the loss on one micro-batch keeps from its forward pass
  (parameters excluded), all parameters differentiated."""
  c, program = step.config, step.program
  tokens = jax.ShapeDtypeStruct((c.train.batch_size // c.train.grad_accum, program.window),
                                jnp.int32)
  loss = lambda params, tokens: combined_loss(params, tokens, program.spec, c.mtp.loss_weight)[0]
  return costs.saved_residual_bytes(loss, program.abstract_state['params'], tokens)


def bench_remat(config, mesh):
  rows = []
  for remat in (False, True):
    for dtype in ('float32', 'bfloat16'):
      # train.dtype '' lets the step follow model.dtype, whatever the config sets
      step = build_step(config, mesh, {'model.remat': remat, 'model.dtype': dtype,
                                       'train.dtype': ''})
      rows.append({'remat': remat, 'dtype': dtype, **costs.memory_stats(step.compiled),
                   'saved_residuals': residual_bytes(step)})
      print(f'  compiled remat={remat} dtype={dtype} for memory', flush=True)
  return rows


def bench_freeze(config, mesh, steps):
  """The configured step with the trunk trained and frozen, timed step by step in turns: the
  frozen one differentiates and updates only the heads, and keeps no optimizer state for the
  trunk."""
  runs = [start_run(config, mesh, {'freeze_trunk': frozen}, {'train.freeze_trunk': frozen}, steps)
          for frozen in (False, True)]
  rows = time_runs(runs, steps)
  for run, r in zip(runs, rows):
    params = costs.param_counts(run.step.program.cfg)
    r.update(costs.memory_stats(run.step.compiled))
    r['trained_params'] = params['heads'] if r['freeze_trunk'] else params['total']
    r['opt_state_bytes'] = costs.tree_bytes(run.step.program.abstract_state['opt_state'])
    print(f"  timed freeze_trunk={r['freeze_trunk']}: {1e3 * r['step_s']:.1f} ms/step "
          f"(compile {r['compile_s']:.1f} s)", flush=True)
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
  print(f"\nmachine: {measure.machine(result['machine'])}")
  print(f"config: {result['config_summary']}")
  print(f"data: {result['data']}")
  _report_rooflines(result, markdown)
  if result['throughput']:
    _report_throughput(result, markdown)
  if result['memory']['rows']:
    _report_memory(result['memory'], markdown)
  if result.get('remat_compare'):
    _report_remat(result['remat_compare'], markdown)
  if result.get('freeze_compare'):
    _report_freeze(result['freeze_compare'], result['steps'], markdown)


def _report_rooflines(result, markdown: bool):
  mm, peak = result['matmul'], result['peak_tflops']
  mfu = f", {_pct(mm['flops_per_s'] / (peak * 1e12))} of the {peak:g} TFLOP/s peak" if peak else ''
  show('1. matmul roofline (one device)',
       ['matmul', 'dtype', 'best time (ms)', 'TFLOP/s'],
       [[f"{mm['n']}^3", mm['dtype'], f"{1e3 * mm['seconds']:.2f}",
         _num(mm['flops_per_s'] / 1e12)]], markdown)
  print(f"machine's matmul FLOP/s: {mm['flops_per_s']:.3e}{mfu}")
  bw = result['read_bandwidth']
  print(f"memory read bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s (sum over {bw['bytes'] // MiB} "
        f"MiB of float32, {1e3 * bw['seconds']:.1f} ms)")


def _report_throughput(result, markdown: bool):
  rows, peak = result['throughput'], result['peak_tflops']
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
  print('model FLOPs: 3 x analytic forward of what trains (a frozen trunk: its forward alone; '
        'a frozen projection: its forward and input gradient), causal attention counted at T/2. '
        'hw: adds the dense '
        "T x T attention, the loss's recomputed logits (train.remat_logits) and model.remat. XLA: cost_analysis() of "
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


def _report_memory(mem, markdown: bool):
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


def _report_remat(rc, markdown: bool):
  show(f"memory by model.remat and model.dtype ({rc['label']}, per device, MiB)",
       ['remat', 'dtype', 'temp', 'argument', 'temp+arg', 'saved residuals'],
       [[r['remat'], r['dtype'], _mib(r.get('temp')), _mib(r.get('argument')),
         _mib(r.get('peak_estimate')), _mib(r.get('saved_residuals'))] for r in rc['rows']],
       markdown)


def _report_freeze(fc, steps: int, markdown: bool):
  show(f"4. frozen trunk ({fc['label']}, median of {steps} steps after {WARMUP_STEPS} "
       'warmup, in turns; memory per device, MiB)',
       ['freeze_trunk', 'step (ms)', 'tok/s', 'model GFLOP', 'hw GFLOP', 'XLA GFLOP',
        'trained params', 'opt state (all dev)', 'temp', 'argument', 'temp+arg'],
       [[r['freeze_trunk'], f"{1e3 * r['step_s']:.1f}", f"{r['tokens_per_s']:.0f}",
         _num(r['model_flops'] / 1e9), _num(r['hardware_flops'] / 1e9),
         _num(r['xla_flops'] and r['xla_flops'] / 1e9), r['trained_params'],
         _mib(r['opt_state_bytes']), _mib(r.get('temp')), _mib(r.get('argument')),
         _mib(r.get('peak_estimate'))] for r in fc['rows']], markdown)
  full, frozen = fc['rows']
  ratio = lambda key: _g(frozen.get(key) and full.get(key) and frozen[key] / full[key])
  print(f"frozen / trained: step time {ratio('step_s')}, model FLOPs {ratio('model_flops')}, "
        f"optimizer state {ratio('opt_state_bytes')}, temp {ratio('temp')}, argument "
        f"{ratio('argument')}. The frozen step runs the trunk forward only and updates the "
        'heads alone.')


def _ints(values, name, allow_empty=False):
  try:
    out = sorted({int(v) for v in values})
  except ValueError:
    cli.fail(f'--{name} takes integers, got {",".join(values)}')
  if any(d < 0 for d in out):
    cli.fail(f'--{name}: depths must be >= 0')
  if not out and not allow_empty:
    cli.fail(f'--{name}: give at least one depth')
  return out


def main(argv):
  cli.start(argv, persist=False)
  cli.output_file(_OUT.value, '--out')
  depths = _ints(_DEPTHS.value, 'depths')
  mem_depths = _ints(_MEMORY_DEPTHS.value, 'memory_depths', allow_empty=True)
  kinds = _KINDS.value
  if not kinds or any(k not in KINDS for k in kinds):
    cli.fail(f'--kinds takes {",".join(KINDS)}, got {",".join(kinds)}')
  ignored = [f'--{f.name}' for f in (_OUT, _MARKDOWN, _REMAT, _FREEZE) if f.value]
  if _FLOPS_ONLY.value and ignored:
    cli.fail(f'--flops_only prints the FLOP table alone; it takes no {", ".join(ignored)}')

  try:
    config = resolve_config(_CONFIG.value)  # a pretrained trunk's shapes, read from its file
    validate(config)  # each point's overrides are checked again as it is built
    if config.data.features:
      raise ConfigError('data.features=True trains on cached trunk features, which this does not '
                        'time; pass --config.data.features=False to time token windows')
    for kind in kinds:  # every point, before any is timed (or counted: --flops_only)
      for depth in sorted(set(depths) | set(mem_depths)):
        validate(apply_overrides(config, at_depth(depth, kind)))
    if not math.isfinite(_PEAK.value):
      raise ConfigError(f'--peak_tflops must be a finite number, got {_PEAK.value}')
    if _FLOPS_ONLY.value:
      print_flops(config, depths, kinds)
      return
    if _FREEZE.value:  # fails here, not after the other parts have run
      validate(apply_overrides(config, {'train.freeze_trunk': True}))
    mesh = sharding.make_mesh(config.mesh)
    machine = measure.machine_info()
    print(f'{measure.machine(machine)}, mesh {dict(mesh.shape)}', flush=True)
    mm = measure.matmul_roofline(train.step_dtype(config))  # the dtype the timed steps run in
    print(f"  matmul {mm['n']}^3 {mm['dtype']}: {mm['flops_per_s'] / 1e12:.3f} TFLOP/s", flush=True)
    bandwidth = measure.read_bandwidth()
    print(f"  memory read: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    peak = _PEAK.value
    t, m = config.train, config.model
    result = {
        'machine': machine,
        'config_file': config_flags.get_config_filename(flags.FLAGS['config']),
        'config_summary': (f'd_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads '
                           f'({m.num_kv_heads} kv), vocab {config.data.vocab_size}, '
                           f'batch {t.batch_size} x seq {t.seq_len}, grad_accum {t.grad_accum}, '
                           f'{train.step_dtype(config)}, remat {m.remat}'),
        'config': config.to_dict(),
        'data': ('no data: each batch is uniform random token ids < data.vocab_size, shape '
                 '(train.batch_size, train.seq_len + D + 1)'),
        'steps': _STEPS.value, 'warmup_steps': WARMUP_STEPS, 'interleave': _INTERLEAVE.value,
        'grad_accum': t.grad_accum,
        'peak_tflops': peak, 'matmul': mm, 'read_bandwidth': bandwidth, 'throughput': [],
        'memory': {'logits_bytes': None, 'one_block_temp_bytes': None, 'rows': [],
                   'logits_shape': (f'{t.batch_size // t.grad_accum} x {t.seq_len} x '
                                    f'{config.data.vocab_size} per micro-batch')},
        'remat_compare': None, 'freeze_compare': None, 'complete': False,
    }
    # --out is rewritten as each part finishes ('complete' says whether all did): a run stopped
    # by a time limit keeps what it measured
    result['throughput'] = bench_throughput(config, mesh, depths, kinds, _STEPS.value,
                                            _INTERLEAVE.value)
    add_rates(result['throughput'], mm['flops_per_s'], peak)
    _write(result)
    if mem_depths:
      memory = result['memory']
      memory['logits_bytes'], memory['one_block_temp_bytes'], memory['rows'] = bench_memory(
          config, mesh, mem_depths)
      _write(result)
    if _REMAT.value:
      result['remat_compare'] = {'label': f'{config.mtp.kind} D={config.mtp.depth}',
                                 'rows': bench_remat(config, mesh)}
      _write(result)
    if _FREEZE.value:
      freeze = {'label': f'{config.mtp.kind} D={config.mtp.depth}',
                'rows': bench_freeze(config, mesh, _STEPS.value)}
      add_rates(freeze['rows'], mm['flops_per_s'], peak)
      result['freeze_compare'] = freeze
      _write(result)
  except ConfigError as e:
    cli.fail(e)
  result['complete'] = True
  report(result, _MARKDOWN.value)
  _write(result)
  if _OUT.value:
    print(f'\nwrote {_OUT.value}')


def _write(result) -> None:
  """--out, whole or not at all."""
  if _OUT.value:
    atomic.write_text(_OUT.value, json.dumps(result, indent=2, default=str))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
