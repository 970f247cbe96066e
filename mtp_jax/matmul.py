"""Two-operand products for training and the XLA fallbacks: x @ w, arranged in bfloat16 on CPU so
that XLA runs them as bfloat16 products (see `matmul`), and the precision every product of the
model asks for (`precision`)."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint


def _row_major(a):
  """a stored row-major: a transposed view becomes a copy in that layout."""
  return with_layout_constraint(a, Layout(major_to_minor=tuple(range(a.ndim))))


def precision(x):
  """The precision of a product with operand x: HIGHEST for float32, so that a float32 model
  multiplies in float32 on every backend (XLA's default lets a GPU round float32 operands to
  TF32 and a TPU to bfloat16 passes, which changes logits in their fourth digit and makes greedy
  decoding depend on how many positions a call holds); the backend's default for narrower
  operands, which it multiplies as they are."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(x.dtype) == jnp.float32 else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_rows(x_MxK, w_KxN, out_dtype):
  return jnp.dot(_row_major(x_MxK), _row_major(w_KxN),
                 preferred_element_type=jnp.float32).astype(out_dtype)


def _matmul_rows_fwd(x_MxK, w_KxN, out_dtype):
  return _matmul_rows(x_MxK, w_KxN, out_dtype), (x_MxK, w_KxN)


def _matmul_rows_bwd(out_dtype, res, g_MxN):
  x_MxK, w_KxN = res
  g_MxN = _row_major(g_MxN.astype(x_MxK.dtype))
  dx = jnp.dot(g_MxN, _row_major(w_KxN.T), preferred_element_type=jnp.float32)
  dw = jnp.dot(_row_major(x_MxK.T), g_MxN, preferred_element_type=jnp.float32)
  return dx.astype(x_MxK.dtype), dw.astype(w_KxN.dtype)


_matmul_rows.defvjp(_matmul_rows_fwd, _matmul_rows_bwd)


def matmul(x_MxK, w_KxN, out_dtype=None):
  """x @ w for 2-D x and w (w widened or narrowed to x's dtype), in out_dtype (x's by default),
  accumulated in out_dtype or wider.
  In bfloat16 on CPU every product of it and of its gradients is made of row-major operands with
  a float32 result, the only form that XLA's CPU backend runs as a bfloat16 product (with AMX
  or AVX512_BF16, where the CPU has them: a product and both its gradients about 3x and 2x
  faster than in float32); a transposed operand or a bfloat16 result makes it widen both
  operands to float32 first, which is slower than float32 (experiments/bench_matmul.py)."""
  out_dtype = jnp.dtype(out_dtype or x_MxK.dtype)
  w_KxN = w_KxN.astype(x_MxK.dtype)
  # One CPU device only: a mesh's partitioner is left the plain product, as the decoding kernels
  # leave it theirs.
  if x_MxK.dtype != jnp.bfloat16 or jax.default_backend() != 'cpu' or jax.device_count() > 1:
    return jnp.dot(x_MxK, w_KxN, precision=precision(x_MxK), preferred_element_type=out_dtype)
  return _matmul_rows(x_MxK, w_KxN, out_dtype)
