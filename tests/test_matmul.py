"""mtp_jax.matmul: bfloat16 products arranged for XLA's CPU backend keep the value and gradients
of x @ w, train.dtype puts the training steps, and only them, in bfloat16, and every product of a
float32 model asks for float32 precision."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_bitwise_equal, assert_user_error, run_script, tiny_config
from mtp_jax import decode as dec
from mtp_jax import measure, sharding, train
from mtp_jax.config import ModelConfig
from mtp_jax.matmul import matmul
from mtp_jax.model import init_params


@pytest.mark.parametrize('out_dtype', [None, jnp.float32])
def test_bfloat16_product_and_gradients_are_those_of_the_rounded_operands(out_dtype):
  """Against float64 products of the same bfloat16 operands, within bfloat16 rounding: the
  custom gradient is the product's gradient."""
  x = jax.random.normal(jax.random.key(0), (24, 40)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (40, 56)).astype(jnp.bfloat16)
  c = jax.random.normal(jax.random.key(2), (24, 56))

  def loss(x, w):
    return jnp.sum(matmul(x, w, out_dtype).astype(jnp.float32) * c)

  y = matmul(x, w, out_dtype)
  assert y.dtype == (out_dtype or jnp.bfloat16)
  x64, w64 = (np.asarray(a, np.float64) for a in (x, w))
  np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w64, rtol=1e-2, atol=1e-2)
  gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  # the cotangent c is rounded to bfloat16 before it is multiplied, as the product's own output
  c_bf = np.asarray(c.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(gx, np.float64), c_bf @ w64.T, rtol=2e-2, atol=5e-2)
  np.testing.assert_allclose(np.asarray(gw, np.float64), x64.T @ c_bf, rtol=2e-2, atol=5e-2)


def _dots(product, x, w):
  """(operand names, contracting dims, operand types, result type) of every dot_general in the
  lowered gradient of sum(product(x, w)), and the names of LayoutConstraint results."""
  loss = lambda x, w: jnp.sum(product(x, w).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  constrained = set(re.findall(r'(%\w+) = stablehlo.custom_call @LayoutConstraint', text))
  dots = re.findall(r'stablehlo.dot_general (%\w+), (%\w+), contracting_dims = (\[\d\] x \[\d\]).*'
                    r': \(tensor<\w+x(\w+)>, tensor<\w+x(\w+)>\) -> tensor<\w+x(\w+)>', text)
  return dots, constrained


def test_bfloat16_products_are_lowered_in_the_form_xla_runs_natively():
  """Both gradient products (the forward one is not needed for them): bfloat16 operands, a
  float32 result, the first operand's last axis against the second's first, each operand a
  row-major copy. A plain bfloat16 x @ w lowers otherwise (which XLA's CPU backend widens)."""
  x = jnp.ones((8, 4), jnp.bfloat16)
  w = jnp.ones((4, 6), jnp.bfloat16)
  dots, constrained = _dots(lambda x, w: matmul(x, w, jnp.float32), x, w)
  assert len(dots) == 2, dots
  for a, b, dims, ta, tb, out in dots:
    assert (dims, ta, tb, out) == ('[1] x [0]', 'bf16', 'bf16', 'f32'), dots
    assert {a, b} <= constrained, (a, b, constrained)
  plain, _ = _dots(lambda x, w: x @ w, x, w)
  assert any(d[2:] != ('[1] x [0]', 'bf16', 'bf16', 'f32') for d in plain), plain


def _dot_precisions(text: str) -> list[str]:
  """The precision of every dot_general in a lowered program's text ('' where it names none)."""
  return [m.group(1) if m else '' for m in
          (re.search(r'precision = \[(\w+), \w+\]', line) for line in text.splitlines()
           if 'stablehlo.dot_general' in line)]


@pytest.mark.parametrize('kind, attention', [('sequential', 'fused'), ('parallel', 'einsum'),
                                             ('medusa', 'fused')])
def test_float32_models_multiply_in_float32_and_narrower_ones_as_they_are(kind, attention):
  """Every product of a float32 model's training step (forward and gradients, either attention)
  and of its decoder (XLA's products, as on a GPU) asks for HIGHEST precision, so that no backend
  rounds its operands (a GPU's default is TF32); a bfloat16 model's products keep the backend's
  default."""
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(**{'mtp.kind': kind, 'model.attention': attention, 'model.dtype': dtype,
                            'train.draft_vocab': 0})
    program = train.Program(config, sharding.make_mesh(config.mesh))
    batch = jax.ShapeDtypeStruct((config.train.batch_size, program.window), jnp.int32)
    step = _dot_precisions(program.lower_train_step(batch, program.draft_ids).as_text())
    assert len(step) > 10, step
    if dtype == 'bfloat16':
      assert 'HIGHEST' not in step, step
      continue
    assert set(step) == {'HIGHEST'}, step
    cfg = ModelConfig.from_config(config)
    model = dec.decode_model(cfg, use_kernels=False)
    s = dec.Settings(draft_len=2, max_new_tokens=4)
    prompts, lens = dec.pad_prompts([[1, 2, 3]])
    decoder = dec.Decoder(model, s, dec.cache_length(3, s), None)
    params = model.prepare(init_params(cfg, jax.random.key(0)))
    text = decoder.jitted.lower(params, prompts, lens, jax.random.key(1)).as_text()
    decoding = _dot_precisions(text)
    assert len(decoding) > 10 and set(decoding) == {'HIGHEST'}, decoding


def test_float32_precision_changes_nothing_on_the_cpu():
  """The CPU multiplies float32 in float32 whatever the precision: a float32 product through
  `matmul` (HIGHEST) and its gradients equal plain x @ w's bit for bit."""
  x = jax.random.normal(jax.random.key(0), (64, 96))
  w = jax.random.normal(jax.random.key(1), (96, 80))
  c = jax.random.normal(jax.random.key(2), (64, 80))
  grads = lambda product: jax.jit(jax.value_and_grad(
      lambda x, w: jnp.sum(product(x, w) * c), argnums=(0, 1)))(x, w)
  assert jax.default_backend() == 'cpu'
  assert_bitwise_equal(grads(matmul), grads(lambda x, w: x @ w))


def test_train_dtype_sets_the_steps_dtype_and_leaves_decoding_alone():
  """train.dtype=bfloat16 computes the training step's loss as model.dtype=bfloat16 does, bit
  for bit, while the model config decoding and the data-writing trunk use stays float32."""
  def step_loss(**overrides):
    config = tiny_config(**{'train.draft_vocab': 0, **overrides})
    program = train.Program(config, sharding.make_mesh(config.mesh))
    tokens = jax.random.randint(jax.random.key(1), (config.train.batch_size, program.window), 0,
                                config.data.vocab_size)
    with sharding.active(program.mesh):
      state = program.init(jax.random.key(0))
      _, metrics = program.train_step(state, tokens)
    return program, float(metrics['loss/total'])

  program, narrow = step_loss(**{'train.dtype': 'bfloat16'})
  assert program.cfg.dtype == 'float32' and program.step_cfg.dtype == 'bfloat16'
  auto = train.step_dtype(tiny_config(**{'train.dtype': 'auto'}))
  assert auto == ('bfloat16' if measure.bfloat16_products_fast() else 'float32')
  _, whole = step_loss(**{'model.dtype': 'bfloat16'})
  _, wide = step_loss()
  assert narrow == whole
  assert narrow != wide and abs(narrow - wide) < 0.05 * wide


def test_bench_matmul_times_each_way_and_refuses_a_bad_shape():
  result = run_script('experiments/bench_matmul.py', '--shapes', '64x32x48,16x8x24', '--rounds',
                      '1')
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split('|') for line in result.stdout.splitlines() if line.count('|') == 4]
  ways = [r[1].strip() for r in rows[1:]]
  assert ways == ['float32', 'float32, mtp_jax.matmul', 'bfloat16, plain x @ w',
                  'bfloat16, mtp_jax.matmul'] * 2, rows
  assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows[1:])
  assert float(rows[1][4]) == 1.0  # float32 over itself
  assert_user_error(run_script('experiments/bench_matmul.py', '--shapes', '64x32'), '--shapes',
                    '64x32')


def test_bfloat16_products_are_fast_on_cpus_with_bfloat16_instructions(monkeypatch):
  for cpu, fast in [('fpu avx512f avx512_vnni', False), ('fpu avx512f avx512_bf16', True),
                    ('fpu amx_bf16 amx_tile', True)]:
    monkeypatch.setattr(measure, 'cpu_flags', lambda cpu=cpu: f'flags\t\t: {cpu}\n')
    assert measure.bfloat16_products_fast() == (jax.default_backend() != 'cpu' or fast), cpu
