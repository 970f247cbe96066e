"""The cost model against the model itself: parameter counts against the initialized params, and
the analytic hardware FLOPs against XLA's count of the lowered train step, for every head kind."""

import jax
import jax.numpy as jnp
import pytest

from configs import gpu_125m
from conftest import model_param_counts, run_script, tiny_config
from mtp_jax import costs, sharding, train
from mtp_jax.config import ModelConfig

# Wide layers on tiny_config: nothing is compiled or run, so width costs no time, and it makes the
# elementwise ops (norms, softmaxes, the optimizer), which XLA counts and the model does not, a
# small share of the step. With these widths XLA counts 0.2-0.4% more than the analytic hardware
# FLOPs; a missing term (one head's MLP, one recomputed projection) is several percent.
WIDE = {'model.d_model': 1024, 'model.num_heads': 8, 'model.mlp_dim': 2048, 'train.seq_len': 128,
        'model.max_seq_len': 256, 'data.vocab_size': 8192, 'train.batch_size': 32}
TOLERANCE = 0.01

CASES = [{'mtp.depth': 0},
         {'mtp.depth': 1, 'model.tie_embeddings': False, 'model.qkv_bias': True},
         {'mtp.depth': 1, 'model.qk_norm': True, 'model.head_dim': 256}] + [
    {'mtp.kind': kind, 'mtp.head_mlp_dim': width, 'mtp.depth': depth}
    for kind in ('sequential', 'parallel', 'medusa') for width in (0, 4096) for depth in (1, 2)] + [
    {'mtp.kind': kind, 'mtp.head_blocks': 2, 'mtp.depth': 2} for kind in ('sequential', 'parallel')]
# The step's other shapes: a frozen trunk (heads differentiated alone), model.remat, a draft
# vocabulary for the heads' softmax, logits kept rather than recomputed.
VARIANTS = [{'mtp.kind': kind, 'mtp.head_mlp_dim': 4096, **extra}
            for kind in ('sequential', 'parallel', 'medusa')
            for extra in ({'train.freeze_trunk': True}, {'model.remat': True},
                          {'train.freeze_trunk': True, 'model.remat': True,
                           'train.draft_vocab': 1000})] + [
    {'mtp.kind': 'sequential', 'mtp.head_blocks': 2, 'model.remat': True,
     'train.freeze_trunk': True}] + [
    {'mtp.kind': 'sequential', 'mtp.head_mlp_dim': 4096, 'train.remat_logits': False, **extra}
    for extra in ({}, {'train.freeze_trunk': True, 'train.draft_vocab': 1000})]


def _name(overrides):
  return ','.join(f'{k.split(".")[1]}={v}' for k, v in overrides.items())


@pytest.mark.parametrize('overrides', CASES, ids=_name)
def test_param_counts_match_the_initialized_model(overrides):
  cfg = ModelConfig.from_config(tiny_config(**WIDE, **overrides))
  assert costs.param_counts(cfg) == model_param_counts(cfg)


@pytest.mark.parametrize('overrides', CASES + VARIANTS, ids=_name)
def test_hardware_flops_match_xla(overrides):
  config = tiny_config(**WIDE, **overrides)
  mesh = sharding.make_mesh(config.mesh)
  program = train.Program(config, mesh)
  t = config.train
  batch = jax.ShapeDtypeStruct((t.batch_size, program.window), jnp.int32)
  draft_ids = jax.ShapeDtypeStruct((t.draft_vocab,), jnp.int32)
  with sharding.active(mesh):
    lowered = program.lower_train_step(batch, draft_ids)
  flops = costs.train_flops_of(program.cfg, t)
  ratio = costs.xla_cost(lowered)['flops'] / flops['hardware']
  assert 1 <= ratio < 1 + TOLERANCE, ratio


@pytest.mark.parametrize('overrides', CASES, ids=_name)
def test_model_flops_are_three_forward_passes(overrides):
  """Model FLOPs, the convention MFU is quoted in: forward + backward = 3 x forward (causal
  attention at T / 2) when everything is trained; the hardware count is more (dense attention,
  recomputed projections)."""
  cfg = ModelConfig.from_config(tiny_config(**WIDE, **overrides))
  flops = costs.train_flops(cfg, 4, 128)
  assert flops['model'] == 3 * flops['forward_per_token'] * flops['tokens'] < flops['hardware']


def test_byte_counts_of_trees_and_of_the_backward_pass():
  tree = {'a': jnp.zeros((3, 5), jnp.float32), 'b': [jax.ShapeDtypeStruct((7,), jnp.bfloat16)]}
  assert costs.tree_bytes(tree) == 3 * 5 * 4 + 7 * 2
  w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  x = jax.ShapeDtypeStruct((16, 64), jnp.float32)

  def f(w, x):
    return jnp.tanh(jnp.tanh(x @ w) @ w).sum()

  # Each tanh keeps its 16 x 64 output for the backward pass (the arguments are not counted);
  # under jax.checkpoint nothing but the arguments is kept.
  kept = costs.saved_residual_bytes(f, w, x)
  assert kept >= 2 * 16 * 64 * 4
  assert costs.saved_residual_bytes(jax.checkpoint(f), w, x) == 0
  compiled = jax.jit(f).lower(w, x).compile()
  stats = costs.memory_stats(compiled)
  assert stats['argument'] == costs.tree_bytes((w, x))
  assert stats['output'] == 4  # the scalar the step returns


def test_bench_train_prints_the_step_flops_with_no_device_work():
  """`bench_train.py --flops_only`: each row's model and hardware FLOPs per step as costs.py
  counts them, and the ratio to D = 0 (the numbers MFU and the step-time ratio are read against
  for step times measured on another machine)."""
  result = run_script('experiments/bench_train.py', '--config', 'configs/gpu_125m.py',
                      '--depths', '0,1', '--kinds', 'sequential', '--flops_only')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 and 'D=0' in lines[0] and 'sequential D=1' in lines[1]
  counts = []
  for depth in (0, 1):
    c = gpu_125m.get_config()
    c.mtp.depth = depth
    counts.append(costs.train_flops_of(ModelConfig.from_config(c), c.train))
  for line, count in zip(lines, counts):
    tflop = lambda key: f'{count[key] / 1e12:.4g}'
    assert f"{tflop('model')} model TFLOP, {tflop('hardware')} hardware TFLOP" in line
  assert lines[1].endswith(f"F(D)/F(0) {counts[1]['model'] / counts[0]['model']:.3f}")


def test_bench_train_writes_every_part_it_measured(tmp_path):
  """A whole `bench_train.py` run on a tiny model: --out first holds the throughput rows alone,
  marked incomplete, while the memory part compiles (it is rewritten as each part finishes, so a
  run a time limit stops keeps what it measured), then the memory rows too, marked complete.
  Timings are not asserted."""
  import json
  import subprocess
  import sys
  import time
  from conftest import REPO, cpu_env, tiny_config
  from mtp_jax.config import as_flags
  out = tmp_path / 'bench_train.json'
  config = tiny_config(**{'model.num_layers': 1})
  proc = subprocess.Popen(
      [sys.executable, 'experiments/bench_train.py', '--config', 'configs/base.py', '--depths',
       '0,1', '--kinds', 'sequential', '--steps', '1', '--memory_depths', '0,1', f'--out={out}',
       *as_flags(config)], cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  while not out.exists() and proc.poll() is None:  # written whole (replaced), never in part
    time.sleep(0.02)
  first = json.loads(out.read_text()) if out.exists() else None
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert first['complete'] is False and len(first['throughput']) == 2
  assert first['memory']['rows'] == []
  written = json.loads(out.read_text())
  assert written['complete'] is True
  assert [(r['kind'], r['depth']) for r in written['throughput']] == [('-', 0), ('sequential', 1)]
  assert all(r['fraction_of_matmul'] > 0 for r in written['throughput'])
  assert [r['depth'] for r in written['memory']['rows']] == [0, 1]
