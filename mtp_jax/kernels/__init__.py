"""Native CPU kernels for decoding steps (decode_ops.cc), built with the host's compiler at first
use and called through XLA's FFI, each beside the pure-JAX computation it replaces. That
fallback runs wherever a kernel cannot: no compiler, another platform, bfloat16 inputs, more rows
than a kernel is for, or MTP_JAX_KERNELS=0; tests check the two agree.

rows_matmul(x, w): x (..., K) times w (N, K) transposed (weights stored one output per row,
  which model.kernel_layout makes of the decoding params), for a few rows; w in float32, or in
  bfloat16 (half the bytes to read; widened to float32 in the kernel, products in float32).
cache_attention(q, k, v, positions, slots): new entries' attention over a KV cache.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile

import jax
import jax.numpy as jnp

from mtp_jax import measure
from mtp_jax.matmul import matmul

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'decode_ops.cc')
# Products of up to this many rows go to the kernel (in passes of 8 over each block of weights,
# the later passes reading it from L2): a batch-8 verify of 4 positions is 32 rows. Past that the
# work is compute-bound and XLA's dot does it as well (experiments/row_kernel.py).
MAX_ROWS = 32
MAX_QUERIES = 64  # attention: query heads per kv head


def _cache_root() -> str:
  return os.path.join(os.environ.get('MTP_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'mtp_jax'), 'kernels')


def _machine_key() -> str:
  """The source, compiler and CPU the library is built for (it is built with -march=native)."""
  digest = hashlib.sha1(open(SOURCE, 'rb').read())
  digest.update(jax.__version__.encode())
  digest.update(measure.cpu_flags().encode())
  return digest.hexdigest()[:16]


def _build() -> str | None:
  """Path of the compiled library (building it once per machine), or None when it cannot be."""
  path = os.path.join(_cache_root(), _machine_key(), 'decode_ops.so')
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  compiler = os.environ.get('CXX', 'g++')
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.so')
  os.close(fd)
  command = [compiler, '-O3', '-march=native', '-std=c++17', '-fPIC', '-shared', '-w',
             f'-I{jax.ffi.include_dir()}', SOURCE, '-o', tmp]
  try:
    result = subprocess.run(command, capture_output=True, text=True)
  except OSError as e:
    result = None
    reason = str(e)
  if result is None or result.returncode:
    if result is not None:
      errors = [l for l in result.stderr.splitlines() if 'error' in l] or ['?']
      reason = errors[0].strip()
    print(f'note: decoding kernels not built ({reason}); decoding uses XLA alone',
          file=sys.stderr)
    os.remove(tmp)
    return None
  os.replace(tmp, path)
  return path


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered (once per process)."""
  if os.environ.get('MTP_JAX_KERNELS', '1') == '0' or sysconfig.get_platform().startswith('win'):
    return False
  path = _build()
  if path is None:
    return False
  library = ctypes.cdll.LoadLibrary(path)
  jax.ffi.register_ffi_target('mtpjax_rows_matmul', jax.ffi.pycapsule(library.RowsMatmul),
                              platform='cpu')
  jax.ffi.register_ffi_target('mtpjax_rows_matmul_bf16',
                              jax.ffi.pycapsule(library.RowsMatmulBf16), platform='cpu')
  jax.ffi.register_ffi_target('mtpjax_cache_attention',
                              jax.ffi.pycapsule(library.CacheAttention), platform='cpu')
  return True


def usable() -> bool:
  """Kernels on this process's devices: built, and a single CPU device (a custom call has no
  sharding rule, so a mesh of several devices keeps XLA's own ops)."""
  return jax.default_backend() == 'cpu' and jax.device_count() == 1 and available()


def _float32(*arrays) -> bool:
  return all(a.dtype == jnp.float32 for a in arrays)


def rows_matmul(x, w, use_kernel: bool = True):
  """x (..., K) @ w.T for w (N, K), in x's dtype (w, if narrower, widened to it)."""
  rows = x.size // x.shape[-1]
  if (use_kernel and rows <= MAX_ROWS and _float32(x) and w.dtype in (jnp.float32, jnp.bfloat16)
      and usable()):
    target = 'mtpjax_rows_matmul' if w.dtype == jnp.float32 else 'mtpjax_rows_matmul_bf16'
    out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[0]), jnp.float32))
    return out(x, w)
  return matmul(x.reshape(-1, x.shape[-1]), w.T).reshape(*x.shape[:-1], -1)  # w.T in x's dtype


def cache_attention(q_BxTxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxT, slots_BxT,
                    use_kernel: bool = True):
  """Each new entry's attention over the cache slots before its position and its own slot
  (layers.attend's rule; float32), or None when the kernel cannot take these shapes (the caller
  then attends with XLA)."""
  H, E = q_BxTxHxE.shape[2:]
  K = k_BxLxKxE.shape[2]
  if not (use_kernel and E % 16 == 0 and 0 < E <= 128 and H // K <= MAX_QUERIES
          and _float32(q_BxTxHxE, k_BxLxKxE, v_BxLxKxE) and usable()):
    return None
  out = jax.ffi.ffi_call('mtpjax_cache_attention', jax.ShapeDtypeStruct(q_BxTxHxE.shape,
                                                                         jnp.float32))
  return out(q_BxTxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxT.astype(jnp.int32),
             slots_BxT.astype(jnp.int32))
