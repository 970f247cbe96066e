"""The native decoding kernels against the pure-JAX computations they replace: few-row products
(every row count, ragged shapes), attention over a cache with per-row positions, and whole
greedy decodes with and without kernels."""

import ctypes
import dataclasses
import glob
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from conftest import gguf_rounded, run_script, tiny_model
from mtp_jax import decode as dec
from mtp_jax import kernels
from mtp_jax.layers import attend, visible_slots
from mtp_jax.model import (_dense_inputs, _in_heads, _keys, init_params, kernel_layout,
                           narrow_heads)



def test_the_kernels_build_here():
  # CI's machine has a C++ compiler; where one is missing the fallbacks run instead.
  assert kernels.usable()
  # with the mode a linker gives (others sharing the cache can load it), not mkstemp's 0600
  mask = os.umask(0)
  os.umask(mask)
  library = os.path.join(kernels._cache_root(), kernels._machine_key(), 'decode_ops.so')
  assert os.stat(library).st_mode & 0o777 == 0o777 & ~mask


def test_a_machine_without_a_compiler_uses_a_library_built_for_its_cpu(monkeypatch):
  """A cache filled where a compiler ran (a prebuilt image, a shared home) serves a machine with
  none: the library is found by its source, flags, JAX and CPU."""
  built = kernels._build()
  monkeypatch.setenv('CXX', '/nonexistent/g++')
  assert kernels._compiler_version() == '' and kernels._build() == built


def test_a_switch_is_on_off_or_said(monkeypatch, capsys):
  """MTP_JAX_KERNELS and MTP_JAX_TILES: a value that is neither on nor off (a typo) is said once
  and taken as off, not silently as on."""
  for value, off in (('1', False), ('', False), ('Yes', False), ('0', True), ('off', True)):
    monkeypatch.setenv('MTP_JAX_TILES', value)
    assert kernels._off('MTP_JAX_TILES') is off, value
  assert capsys.readouterr().err == ''
  monkeypatch.setenv('MTP_JAX_TILES', 'disable')
  assert kernels._off('MTP_JAX_TILES') and kernels._off('MTP_JAX_TILES')
  assert capsys.readouterr().err.count("note: MTP_JAX_TILES='disable' is neither 1") == 1


def test_a_cache_directory_it_cannot_write_leaves_decoding_to_xla(tmp_path, monkeypatch, capsys):
  blocked = tmp_path / 'a_file'
  blocked.write_text('')
  monkeypatch.setattr(kernels, '_cache_root', lambda: str(blocked / 'kernels'))
  assert kernels._build() is None
  assert 'decoding kernels not built' in capsys.readouterr().err


def test_a_refused_build_is_recorded_and_not_tried_again(tmp_path, monkeypatch, capsys):
  """A compiler that refuses the source refuses it again (here g++ told to read it as C++98,
  stopping at its first error): the reason is kept beside where the library would be, so later
  processes say it at once instead of compiling; removing the record tries again. A failure
  that may pass (here: no compiler where $CXX points) is not recorded."""
  monkeypatch.setattr(kernels, '_cache_root', lambda: str(tmp_path / 'kernels'))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  assert kernels._build() is None
  assert 'no-such-compiler is not found' in capsys.readouterr().err
  assert not (tmp_path / 'kernels').exists()  # nor an empty folder for a library never built
  old = tmp_path / 'old-gxx'
  old.write_text('#!/bin/sh\nexec g++ "$@" -std=c++98 -fmax-errors=1\n')
  old.chmod(0o755)
  monkeypatch.setenv('CXX', str(old))
  assert kernels._build() is None
  first = capsys.readouterr().err
  assert ': error:' in first and 'to try the build again' not in first
  [record] = (tmp_path / 'kernels').glob('*/build_failed.txt')
  assert kernels._build() is None
  again = capsys.readouterr().err
  assert record.read_text().strip() in again and 'to try the build again' in again
  record.unlink()
  assert kernels._build() is None
  assert 'to try the build again' not in capsys.readouterr().err and record.exists()
  record.unlink()
  # The linker out of disk space (its reason shown, not its wrapper's summary) may pass: not
  # recorded. An assembler that does not know an instruction -march=native chose will not.
  for said, kept in [('/usr/bin/ld: final link failed: No space left on device', False),
                     ('/tmp/cc1.s:12: Error: no such instruction: vpdpbusd %zmm1,%zmm2,%zmm3',
                      True)]:
    fails = tmp_path / 'fails'
    fails.write_text(f'#!/bin/sh\necho "{said}" >&2\n'
                     'echo "collect2: error: ld returned 1 exit status" >&2\nexit 1\n')
    fails.chmod(0o755)
    monkeypatch.setenv('CXX', str(fails))
    assert kernels._build() is None
    assert said in capsys.readouterr().err
    assert bool(list((tmp_path / 'kernels').glob('*/build_failed.txt'))) == kept, said


def test_a_library_it_cannot_load_leaves_decoding_to_xla_and_is_built_again(tmp_path):
  """A damaged library in the cache (an empty file after a power loss, say) is a note and XLA's
  ops, not a crash at every run; the file is removed, so the next run builds it again (where a
  compiler runs: one another compiler built, found where none does, is not promised that)."""
  code = ('import os, sys; from mtp_jax import kernels; '
          "p = os.path.join(kernels._cache_root(), kernels._machine_key(sys.argv[1] or None), "
          "'decode_ops.so'); os.makedirs(os.path.dirname(p)); open(p, 'wb').close(); "
          'print(kernels.available(), os.path.exists(p))')
  result = run_script('-c', code, '', MTP_JAX_CACHE=str(tmp_path / 'a'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['False', 'False']
  assert 'decoding kernels not loaded' in result.stderr
  assert 'and the library is built again next time' in result.stderr
  result = run_script('-c', code, 'g++ (another) 1.0', MTP_JAX_CACHE=str(tmp_path / 'b'),
                      CXX=str(tmp_path / 'no-compiler'))
  assert result.stdout.split() == ['False', 'False'], result.stderr[-2000:]
  assert 'decoding uses XLA alone; no compiler here builds it again' in result.stderr


def test_a_library_built_here_that_does_not_load_is_not_built_again(tmp_path):
  """A library this process built that does not load (a cache on a noexec mount; here a
  "compiler" whose output is no library) would not load after another build either: it is
  recorded as a refused build is, and the next process says so without compiling."""
  fake = tmp_path / 'fake-gxx'
  fake.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\necho not-a-library > "$2"\n')
  fake.chmod(0o755)
  cache = str(tmp_path / 'cache')
  code = 'from mtp_jax import kernels; print(kernels.available())'
  first = run_script('-c', code, MTP_JAX_CACHE=cache, CXX=str(fake))
  assert first.stdout.split() == ['False'] and 'decoding kernels not loaded' in first.stderr
  assert 'built again next time' not in first.stderr
  [record] = glob.glob(os.path.join(cache, 'kernels', '*', 'build_failed.txt'))
  assert open(record).read().startswith('built, but not loaded')
  second = run_script('-c', code, MTP_JAX_CACHE=cache, CXX=str(fake))
  assert second.stdout.split() == ['False'] and 'to try the build again' in second.stderr


@pytest.mark.parametrize('rows', [1, 2, 3, 4, 5, 7, 8, 9, 17, 32, 33, 129])
@pytest.mark.parametrize('K,N', [(64, 128), (576, 200), (40, 13)])
def test_rows_matmul_matches_xla(rows, K, N):
  x = jax.random.normal(jax.random.key(rows), (rows, K))
  w = jax.random.normal(jax.random.key(K + N), (N, K))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  # the kernel, MAX_ROWS rows a call (in a loop past MAX_UNROLLED_ROWS, where XLA's dot takes
  # them when rows need not be exact; up to it both are the kernel): within float32 rounding
  for exact in (True, False) if rows > kernels.MAX_UNROLLED_ROWS else (True,):
    got = jax.jit(kernels.rows_matmul, static_argnums=(2, 3))(x, w, True, exact)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(K))
    assert got.shape == (rows, N)


def narrow_weights(w, dtype: str):
  """w (N, K) stored in `dtype` as the kernels read it, and the float64 matrix it stands for."""
  stored = kernels.narrowed(w, dtype)
  if dtype == 'int8':
    return stored, (np.asarray(stored.values, np.float64)
                    * np.asarray(stored.scale, np.float64)[:, None])
  return stored, np.asarray(stored.astype(jnp.float32), np.float64)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'int8'])
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(dtype):
  """Bit for bit, so that a verify's rows equal the ar steps' and greedy MTP stays ar's output
  with no near-tie flips, and a batch's prefill gives each prompt its own: past MAX_ROWS (32) the
  rows take several calls, past MAX_UNROLLED_ROWS (128) in a loop. N = 37 leaves rows past every
  block size (4, 2) over; K = 100 has a tail past the last full vector."""
  K, N = 100, 37
  x = jax.random.normal(jax.random.key(0), (200, K))
  w, _ = narrow_weights(jax.random.normal(jax.random.key(1), (N, K)), dtype)
  product = jax.jit(kernels.rows_matmul)
  alone = np.concatenate([np.asarray(product(x[i:i + 1], w)) for i in range(200)])
  for rows in [*range(2, 34), 64, 97, 128, 129, 200]:
    np.testing.assert_array_equal(np.asarray(product(x[:rows], w)), alone[:rows])


@pytest.mark.parametrize('dtype', ['bfloat16', 'int8'])
@pytest.mark.parametrize('rows', [1, 3, 9, 32, 33])
@pytest.mark.parametrize('K,N', [(576, 200), (40, 13)])
def test_rows_matmul_reads_narrow_weights(dtype, rows, K, N):
  """bfloat16 weights and int8 values are widened exactly, so the product is the float32 product
  of the matrix they stand for (including the odd K and N that take the scalar tails; 33 rows
  take two calls)."""
  x = jax.random.normal(jax.random.key(rows), (rows, K))
  w, wide = narrow_weights(jax.random.normal(jax.random.key(K + N), (N, K)), dtype)
  got = jax.jit(kernels.rows_matmul)(x, w)
  np.testing.assert_allclose(got, np.asarray(x, np.float64) @ wide.T, rtol=1e-5,
                             atol=1e-4 * np.sqrt(K))
  assert got.dtype == jnp.float32
  if rows == 1:  # XLA's own path, asked for by name
    np.testing.assert_allclose(kernels.rows_matmul(x, w, use_kernel=False), got, rtol=1e-5,
                               atol=1e-4 * np.sqrt(K))


def test_int8_rows_round_each_output_row_to_its_own_scale():
  """A scale per output row over every input axis: each value within half a step of the float
  matrix, the row's largest magnitude exactly at 127 steps, an all-zero row zero."""
  w = jax.random.normal(jax.random.key(0), (3, 5, 4, 8)) * jnp.arange(1, 6)[None, :, None, None]
  w = w.at[1, 2].set(0.0)
  q = kernels.quantize_rows(w, in_dims=2)
  assert q.values.dtype == jnp.int8 and q.scale.shape == (3, 5) and q.shape == w.shape
  scale = np.asarray(q.scale)[..., None, None]
  wide = np.asarray(q.values, np.float64) * scale
  assert np.all(np.abs(wide - np.asarray(w)) <= scale / 2 * (1 + 1e-6))
  np.testing.assert_array_equal(np.max(np.abs(np.asarray(q.values)), axis=(2, 3)),
                                np.where(np.asarray(q.scale) > 0, 127, 0))
  assert q.scale[1, 2] == 0 and not np.any(np.asarray(q.values[1, 2]))
  flat = q.reshape(15, -1)
  assert flat.values.shape == (15, 32) and flat.scale.shape == (15,)


@pytest.mark.parametrize('T,G,beside,E', [(1, 1, 0, 32), (1, 3, 0, 64), (4, 3, 0, 32),
                                           (2, 2, 0, 48), (4, 3, 2, 64), (3, 1, 1, 32),
                                           (10, 2, (2, 3), 32)])
def test_cache_attention_matches_xla(T, G, beside, E):
  """With `beside` > 0 the last queries are alternatives to the second: at its position, stored
  in the slots after the chain (decode's first-draft alternatives); with `beside` = (n, r), n
  branches of r drafts each, at the positions of the chain's first r. Head dims of 2, 3 and 4
  vectors (the kernel is compiled for each)."""
  B, L, K = 3, 40, 2
  keys = jax.random.split(jax.random.key(T * 10 + G), 4)
  q = jax.random.normal(keys[0], (B, T, K * G, E))
  k_new = jax.random.normal(keys[1], (B, T, K, E))
  v_new = jax.random.normal(keys[2], (B, T, K, E))
  cache = {'k': jax.random.normal(keys[3], (B, L, K, E)),
           'v': jax.random.normal(keys[3], (B, L, K, E)) * 2}
  # each row at its own position; entries past it (stale drafts) must not be seen
  slots = jnp.asarray([[3], [17], [L - T]]) + jnp.arange(T)[None]
  n, r = beside if isinstance(beside, tuple) else (beside, 1)
  positions = slots.at[:, T - n * r:].set(slots[:, 1:2] + jnp.tile(jnp.arange(r), n)[None])
  want, want_cache = attend(q, k_new, v_new, positions, cache, use_kernel=False, slots_BxT=slots)
  got, got_cache = jax.jit(lambda *a: attend(*a, use_kernel=True, slots_BxT=slots))(
      q, k_new, v_new, positions, cache)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_cache['k'], want_cache['k'])
  # an entry past every query's slot changes nothing
  stale = {n: c.at[0, 30].set(100.0) for n, c in cache.items()}
  again, _ = attend(q, k_new, v_new, positions, stale, use_kernel=True, slots_BxT=slots)
  np.testing.assert_array_equal(again[0], got[0])
  if n:  # a branch sees the prefix and itself: neither the chain past it nor the other
    # branches, so it equals the same queries after the pending one, alone, over the prefix
    pick = jnp.asarray([0] + list(range(T - r, T)))
    prefix = (jnp.arange(L)[None] < slots[:, :1])[:, :, None, None]
    alone, _ = attend(q[:, pick], k_new[:, pick], v_new[:, pick], positions[:, pick],
                      {name: c * prefix for name, c in want_cache.items()},
                      slots_BxT=slots[:, pick])
    np.testing.assert_allclose(got[:, pick], alone, rtol=1e-5, atol=1e-5)
    # A branch holding the chain's own first r entries: the kernel sums what each sees in the
    # order of their positions, so it gives the chain's outputs bit for bit (summed in slot order,
    # they differed by a rounding, and greedy decoding with branches could split from `ar`).
    twin = lambda x: x.at[:, T - r:].set(x[:, 1:1 + r])
    same, _ = jax.jit(lambda *a: attend(*a, use_kernel=True, slots_BxT=slots))(
        twin(q), twin(k_new), twin(v_new), positions, cache)
    np.testing.assert_array_equal(same[:, T - r:], same[:, 1:1 + r])


def test_cache_attention_refuses_shapes_that_disagree():
  """k, v, positions and slots that do not fit q are a ValueError at trace time, not a kernel
  that reads past its buffers."""
  q = jnp.ones((2, 3, 4, 32))
  k = jnp.ones((2, 10, 2, 32))
  at = jnp.zeros((2, 3), jnp.int32)
  for args in ((q, k, k[..., :16], at, at), (q, k[:1], k[:1], at, at), (q, k, k, at[:, :2], at),
               (q, k, k, at, at[:1])):
    with pytest.raises(ValueError, match='cache_attention: q'):
      kernels.cache_attention(*args)


def argmax_cases(V: int, seed: int = 0):
  """Rows of logits for argmax checks, each row V wide: random ones; the maximum repeated where
  a lane that keeps its first maximum, or a merge that takes the wrong one, would answer wrong
  (two indices 16 or 64 apart, which share a lane of one vector set; an index in a later lane
  below one in an earlier lane's later vector; one of them past the last full set of vectors);
  the maximum only past the last set; a row of -inf; -inf with one finite value at the end; a
  row with a NaN."""
  rng = np.random.default_rng(seed)
  rows = [rng.standard_normal(V).astype(np.float32) for _ in range(3)]
  for ties in ([5, 21], [5, 69], [21, 5 + 64], [3, V - 2], [V - 3, V - 1], [V - 1]):
    row = rng.standard_normal(V).astype(np.float32)
    row[[t for t in ties if 0 <= t < V]] = 9.0
    rows.append(row)
  rows.append(np.full(V, -np.inf, np.float32))
  row = np.full(V, -np.inf, np.float32)
  row[-1] = -3.0
  rows.append(row)
  row = rng.standard_normal(V).astype(np.float32)
  row[V // 2] = np.nan
  rows.append(row)
  return np.stack(rows)


@pytest.mark.parametrize('V', [1, 7, 100, 8192 + 13])
def test_argmax_is_greedys_token(V):
  """kernels.argmax takes the first index of each row's maximum, the token layers.greedy takes
  (a row holding a NaN: V - 1, where greedy gives some valid id); one row at a time and many
  (threads), any leading axes, under vmap and jit, and with no gradient to take."""
  from mtp_jax.layers import greedy
  x = argmax_cases(V)
  want = np.asarray(greedy(jnp.asarray(x)))
  nan = np.isnan(x).any(axis=1)
  expected = np.where(nan, V - 1, np.argmax(x, axis=1))
  np.testing.assert_array_equal(want[~nan], expected[~nan])
  assert np.all((want >= 0) & (want < V))
  for rows in (x[:1], x, np.tile(x, (40, 1))):  # 40 copies: past the threads' threshold
    np.testing.assert_array_equal(np.asarray(kernels.argmax(jnp.asarray(rows))),
                                  np.tile(expected, 40)[:len(rows)])
  shaped = jax.jit(kernels.argmax)(jnp.asarray(x).reshape(-1, 1, V))
  assert shaped.shape == (len(x), 1) and shaped.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(shaped)[:, 0], expected)
  np.testing.assert_array_equal(jax.vmap(kernels.argmax)(jnp.asarray(x)), expected)
  # the argmax a constant: only the factor x[0, 0] has a gradient
  grad = np.asarray(jax.grad(lambda x: kernels.argmax(x).sum() * x[0, 0])(jnp.asarray(x[:3])))
  assert grad[0, 0] == expected[:3].sum() and np.count_nonzero(grad) == (expected[:3].sum() > 0)


def test_argmax_leaves_bfloat16_and_disabled_kernels_to_xla():
  x = jnp.zeros((2, 8), jnp.bfloat16)
  assert kernels.argmax(x) is None
  assert kernels.argmax(x.astype(jnp.float32), use_kernel=False) is None


def test_square_sums_take_each_row_in_one_fixed_order():
  """kernels.square_sums, the norms' sums where decoding runs the kernels, and layers.row_sums,
  where it cannot: each row's sum the same bits alone as beside others (what greedy decoding's
  equality with `ar` needs), at widths halved to 1, to an odd rest of 9 (SmolLM2's 576) and odd
  ones; the kernel's the bits of row_sums's order with each operation rounded alone (row_sums
  run op by op, unjitted; compiled, its last bit may differ where XLA lets LLVM fuse a square
  and an add into one multiply-add); any leading axes, under jit and vmap; bfloat16 is left to
  row_sums."""
  from mtp_jax.layers import row_sums
  rng = np.random.default_rng(0)
  fallback = jax.jit(lambda x: row_sums(x * x))
  for width in (1, 2, 3, 17, 33, 128, 576, 1537):
    x = jnp.asarray(10 * rng.standard_normal((2, 20, width)), jnp.float32)
    want = np.asarray(row_sums(np.square(np.asarray(x))))  # eager: no op fused with another
    np.testing.assert_allclose(want, np.sum(np.asarray(x, np.float64) ** 2, -1, keepdims=True),
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(jax.jit(kernels.square_sums)(x)), want)
    np.testing.assert_array_equal(np.asarray(jax.vmap(kernels.square_sums)(x)), want)
    np.testing.assert_array_equal(np.asarray(kernels.square_sums(x[1, 3:4])), want[1, 3:4])
    together = np.asarray(fallback(x))
    np.testing.assert_allclose(together, want, rtol=1e-6)
    for row in ((0, 0), (1, 7), (1, 19)):
      np.testing.assert_array_equal(np.asarray(fallback(x[row][None])), together[row][None])
  assert kernels.square_sums(x.astype(jnp.bfloat16)) is None


def test_visible_slots_by_hand():
  """Which cache slots each new entry sees, written out: causal for a prompt and for a chain
  verified after its pending token, and the prefix plus its own drafts for each branch stored
  past the chain (pending token at position 3, chain drafts at 4 and 5, two branches of two
  drafts in slots 6..9)."""
  def seen(positions, slots, length=12):
    before, first, own = (np.asarray(x)[0] for x in visible_slots(
        jnp.asarray([positions]), jnp.asarray([slots]), length))
    return [sorted(set(range(b)) | set(range(f, o + 1))) for b, f, o in zip(before, first, own)]

  prefix = [0, 1, 2, 3]
  assert seen([0, 1, 2], [0, 1, 2]) == [[0], [0, 1], [0, 1, 2]]
  assert seen([3, 4, 5, 4, 5, 4, 5], [3, 4, 5, 6, 7, 8, 9]) == [
      prefix, prefix + [4], prefix + [4, 5], prefix + [6], prefix + [6, 7], prefix + [8],
      prefix + [8, 9]]
  assert seen([3, 4, 4, 4], [3, 4, 5, 6]) == [prefix, prefix + [4], prefix + [5], prefix + [6]]
  assert seen([10, 11], [10, 14], length=12) == [list(range(11)), list(range(12))]  # clipped


def test_kernel_layout_transposes_and_stacks_dense_matrices():
  cfg = tiny_model(**{'model.tie_embeddings': False})
  params = init_params(cfg, jax.random.key(0))['params']
  layout = kernel_layout({'params': params})
  moved = layout['params']
  attn, H = params['blocks_0']['attn'], cfg.num_heads
  qkv = moved['blocks_0']['attn']['qkv']  # (H + 2K, E, D): q, k, v each (heads, E, D)
  assert qkv.shape == (H + 2 * cfg.num_kv_heads, cfg.head_dim, cfg.d_model)
  assert set(moved['blocks_0']['attn']) == {'qkv', 'o'}
  for part, name in zip(np.split(qkv, [H, H + cfg.num_kv_heads]), 'qkv'):
    np.testing.assert_array_equal(part, np.moveaxis(attn[name], 0, -1))
  assert moved['blocks_0']['attn']['o'].shape == (32, 4, 8)  # (D, H, E) from (H, E, D)
  mlp = params['mtp_0']['block']['mlp']
  assert set(moved['mtp_0']['block']['mlp']) == {'gate_up', 'down'}
  np.testing.assert_array_equal(moved['mtp_0']['block']['mlp']['gate_up'],
                                np.stack([mlp['gate'].T, mlp['up'].T]))
  np.testing.assert_array_equal(moved['blocks_1']['mlp']['down'], params['blocks_1']['mlp']['down'].T)
  np.testing.assert_array_equal(moved['mtp_0']['eh_proj'], params['mtp_0']['eh_proj'].T)
  np.testing.assert_array_equal(moved['unembedding'], params['unembedding'].T)
  np.testing.assert_array_equal(moved['embedding'], params['embedding'])
  narrow = narrow_heads(layout, 'bfloat16')['params']
  assert narrow['mtp_0']['block']['attn']['qkv'].dtype == jnp.bfloat16
  assert narrow['mtp_0']['eh_proj'].dtype == jnp.bfloat16
  assert narrow['mtp_0']['block']['attn_norm']['scale'].dtype == jnp.float32
  assert narrow['blocks_0']['attn']['qkv'].dtype == jnp.float32  # the trunk stays
  assert narrow['unembedding'].dtype == jnp.float32
  # int8: a scale per output row, over the matrix's input axes (o's are heads and head dim)
  quarter = narrow_heads(layout, 'int8')['params']
  attn = quarter['mtp_0']['block']['attn']
  assert isinstance(attn['qkv'], kernels.Int8Rows) and attn['qkv'].scale.shape == qkv.shape[:2]
  assert attn['o'].scale.shape == (cfg.d_model,)
  np.testing.assert_array_equal(
      attn['o'].values, kernels.quantize_rows(moved['mtp_0']['block']['attn']['o'], 2).values)
  assert quarter['mtp_0']['block']['attn_norm']['scale'].dtype == jnp.float32
  # narrowed copies share every other array with the layout they come from
  assert quarter['blocks_0']['attn']['qkv'] is layout['params']['blocks_0']['attn']['qkv']
  assert quarter['embedding'] is layout['params']['embedding']


def test_models_share_one_layout_per_params_and_let_old_params_go():
  """Every draft dtype and draft vocabulary reads the same trunk arrays, each conversion is made
  once, and a params object's conversions are dropped once two newer ones were prepared (an
  evaluation during training prepares new params each time)."""
  cfg = tiny_model(**{'model.d_model': 64})
  params = init_params(cfg, jax.random.key(1))
  models = [dec.decode_model(cfg, True, ids, dtype) for dtype in ('float32', 'bfloat16', 'int8')
            for ids in (None, range(40))]
  prepared = [m.prepare(params) for m in models]
  trunk = prepared[0]['params']['blocks_0']['attn']['qkv']
  assert all(p['params']['blocks_0']['attn']['qkv'] is trunk for p in prepared)
  assert all(m.prepare(params) is p for m, p in zip(models, prepared))
  for seed in (2, 3):
    models[0].prepare(init_params(cfg, jax.random.key(seed)))
  assert models[0].prepare(params) is not prepared[0]


@pytest.mark.parametrize('march', ['haswell', 'x86-64'])
def test_the_kernels_built_for_older_instruction_sets_agree(march, tmp_path):
  """The kernels have AVX-512, AVX2 (8-lane, other block sizes) and generic forms, and the native
  build takes one of them; here the library is also built for AVX2 (haswell) and for plain
  x86-64, loaded as FFI targets of its own, and its row products for 1 to 5 rows (every block
  form) checked against float64 and, bit for bit, against the same rows taken one at a time;
  with AVX2 (its FMAs and F16C), scaled tiles' products alike (check_scaled_fma); its argmax
  against NumPy's."""
  out = str(tmp_path / 'decode_ops.so')
  assert kernels.compile_library(out, march) is None
  library = ctypes.cdll.LoadLibrary(out)
  K, N = 100, 37  # a tail past the last full vector, rows past every block size
  x = jax.random.normal(jax.random.key(0), (5, K))
  assert library.TiledReady() == 0  # no tile unit in these instruction sets
  assert library.ScaledReady() == (march == 'haswell')  # scaled tiles on AVX2's FMAs
  for dtype in ('float32', 'bfloat16', 'int8'):
    symbol = kernels.ROWS_TARGETS[dtype][1]
    name = f'test_rows_matmul_{march}_{dtype}'
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
    w, wide = narrow_weights(jax.random.normal(jax.random.key(1), (N, K)), dtype)
    values = w.values if dtype == 'int8' else w
    product = lambda x: np.asarray(  # noqa: E731
        jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((x.shape[0], N), jnp.float32))(x, values))
    alone = np.concatenate([product(x[i:i + 1]) for i in range(5)])
    for rows in range(1, 6):
      got = product(x[:rows])
      np.testing.assert_array_equal(got, alone[:rows])
      if dtype == 'int8':
        got = got * np.asarray(w.scale)
      np.testing.assert_allclose(got, np.asarray(x[:rows], np.float64) @ wide.T, rtol=1e-5,
                                 atol=1e-4 * np.sqrt(K))
  if march == 'haswell':
    check_scaled_fma(library, march)
  # The argmax's 8-lane form: ties, -inf, a tail past the last vector set
  jax.ffi.register_ffi_target(f'test_argmax_{march}', jax.ffi.pycapsule(library.Argmax),
                              platform='cpu')
  logits = argmax_cases(8192 + 13, seed=1)
  got = jax.ffi.ffi_call(f'test_argmax_{march}', jax.ShapeDtypeStruct((len(logits),),
                                                                      jnp.int32))(logits)
  np.testing.assert_array_equal(got, np.where(np.isnan(logits).any(axis=1), len(logits[0]) - 1,
                                              np.argmax(logits, axis=1)))


def test_the_compiler_may_be_a_command_of_several_words(tmp_path, monkeypatch):
  """$CXX is split as a shell splits it, as build systems set it ('ccache g++'; here 'env g++',
  which needs no ccache): taken whole, it named no program, and the kernels were not built."""
  source = tmp_path / 'one.cc'
  source.write_text('extern "C" int One() { return 1; }\n')
  # a program whose path holds a space, named whole as it worked before
  spaced = tmp_path / 'my tools' / 'g++'
  spaced.parent.mkdir()
  spaced.symlink_to(shutil.which('g++'))
  for i, cxx in enumerate(('env g++', str(spaced))):
    monkeypatch.setenv('CXX', cxx)
    out = str(tmp_path / f'one{i}.so')
    assert kernels.compile_library(out, 'x86-64', str(source)) is None, cxx
    assert ctypes.cdll.LoadLibrary(out).One() == 1
  # an unbalanced quote names no program: a reason, not a traceback
  monkeypatch.setenv('CXX', 'g++ "')
  assert kernels.compile_library(str(tmp_path / 'two.so'), 'x86-64', str(source))


def check_scaled_fma(library, march):
  """A library's scaled products on FMAs (ScaledReady, no tile unit), every GGUF form ScaledTiles
  holds, 3 blocks of 16 rows, 1 to 9 input rows: each row bit for bit its product alone, and all
  within float32 rounding of float64's."""
  assert library.ScaledReady() == 1 and library.TiledReady() == 0
  for form in EXACT:
    w = EXACT[form](jax.random.normal(jax.random.key(2), (48, 96)) * 0.05)
    t = kernels.scaled_tiles_if_exact(w)
    name = f'test_scaled_{march}_{form}'
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(
        library, kernels.SCALED_TARGETS[jnp.dtype(t.q.dtype).name][1])), platform='cpu')
    product = lambda x: np.asarray(jax.ffi.ffi_call(  # noqa: E731
        name, jax.ShapeDtypeStruct((x.shape[0], 48), jnp.float32))(x, t.q, t.scales))
    xs = jax.random.normal(jax.random.key(3), (9, 96))
    alone = np.concatenate([product(xs[i:i + 1]) for i in range(9)])
    for rows in range(1, 10):
      got = product(xs[:rows])
      np.testing.assert_array_equal(got, alone[:rows])
      np.testing.assert_allclose(got, np.asarray(xs[:rows], np.float64) @ np.asarray(
          w, np.float64).T, rtol=1e-5, atol=1e-5 * np.sqrt(96))


@pytest.mark.parametrize('march', ['skylake-avx512', 'sapphirerapids'])
def test_the_avx512_and_amx_forms_compile(march, tmp_path):
  """The kernels take 16-lane vectors with AVX-512 and 8-lane ones elsewhere, and the tiled
  product is built only for a CPU with AMX; a machine without them runs neither, so they are at
  least compiled everywhere. Where the CPU has AVX-512, the skylake-avx512 build is also loaded
  and its scaled products on FMAs checked (a CPU with AMX takes the tile unit in its own build,
  so this is where its FMA form runs)."""
  out = str(tmp_path / 'decode_ops.so')
  assert kernels.compile_library(out, march) is None
  if march == 'skylake-avx512' and 'avx512f' in kernels.measure.cpu_flags().split():
    check_scaled_fma(ctypes.cdll.LoadLibrary(out), march)


@pytest.mark.parametrize('dtype,gap', [('bfloat16', 0.02), ('int8', 0.02), ('q4_1', 0.2)])
def test_narrow_drafts_keep_greedy_output(dtype, gap):
  """Heads and draft rows in bfloat16, int8 or Q4_1's form change what is drafted, never what is
  committed; Q4_1's form where scaled tiles run (int8 elsewhere), for every matrix in whole
  tiles (the 40 draft rows are not: int8)."""
  cfg = tiny_model(**{'model.d_model': 64})
  params = init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  arr, lens = dec.pad_prompts([rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 11)])
  ar = dec.Settings(draft_len=0, max_new_tokens=24)
  want = dec.outputs(dec.compiled_decoder(dec.decode_model(cfg, False), ar, dec.cache_length(
      arr.shape[1], ar))(params, arr, lens, jax.random.key(0)))
  model = dec.decode_model(cfg, True, range(40), dtype)
  prepared = model.prepare(params)
  gate_up = prepared['params']['mtp_1']['block']['mlp']['gate_up']
  if dtype == 'q4_1':
    assert model.draft_dtype == ('q4_1' if kernels.scaled_usable() else 'int8')
    assert prepared['draft']['out'].dtype == 'int8'
    if kernels.scaled_usable():
      assert isinstance(gate_up, kernels.ScaledTiles) and gate_up.affine
      as_int8 = dec.decode_model(cfg, True, None, 'int8').prepare(params)
      assert gate_up.shape == as_int8['params']['mtp_1']['block']['mlp']['gate_up'].shape
  else:
    assert prepared['draft']['out'].dtype == dtype
    assert gate_up.dtype == dtype
  s = dec.Settings(draft_len=2, max_new_tokens=24)
  state = dec.compiled_decoder(model, s, dec.cache_length(arr.shape[1], s))(
      params, arr, lens, jax.random.key(0))
  assert dec.outputs(state) == want
  assert dec.decode_model(cfg, False, None, dtype).draft_dtype == 'float32'  # XLA: float32
  # what is drafted comes from the rounded heads: close to the float32 heads', not equal
  wide = dec.decode_model(cfg, True, range(40))
  h0 = jax.random.normal(jax.random.key(2), (1, 6, cfg.d_model))
  tokens, positions = jnp.ones((1, 6), jnp.int32), jnp.arange(6)[None]
  outs = []
  for m in (model, wide):
    h1, _ = m.head(m.prepare(params), 1, h0, tokens, positions, None)
    outs.append((h1, m.head_logits(m.prepare(params), 1, h1)))
  for narrow, full in zip(*outs):
    seen = np.max(np.abs(np.asarray(narrow) - np.asarray(full)))
    assert 0 < seen < gap * np.max(np.abs(np.asarray(full)))


def test_q4_1_tiles_round_to_the_nearest_level():
  """q4_1_tiles keeps every entry within half a scale step of w (plus the offset's float16
  rounding), its scales and offsets float16 numbers, and matches Q4_1's form exactly:
  scaled_tiles_if_exact finds the same tiles in the matrix they stand for."""
  rng = np.random.default_rng(3)
  w = rng.standard_normal((32, 96)).astype(np.float32) * 0.05
  w[0, :32] = 0.25  # a constant run: scale 0, every entry its offset
  t = kernels.q4_1_tiles(w)
  assert t.q.dtype == jnp.uint8 and t.shape == (32, 96) and t.affine
  back = np.asarray(kernels.unscaled(t))
  runs = w.reshape(32, 3, 32)
  step = (runs.max(-1) - runs.min(-1)) / 15
  err = np.abs(back - w).reshape(32, 3, 32).max(-1)
  assert np.all(err <= step * 0.5 + (np.abs(runs.min(-1)) + step * 15) * 2 ** -10 + 1e-7)
  assert np.all(back[0, :32] == np.float32(np.float16(0.25)))
  again = kernels.scaled_tiles_if_exact(back)
  np.testing.assert_array_equal(np.asarray(again.q), np.asarray(t.q))
  np.testing.assert_array_equal(np.asarray(again.scales), np.asarray(t.scales))
  assert kernels.q4_1_tiles(w[:, :48]) is None  # K not whole runs of 32 tiles


def test_rows_matmul_refuses_a_matrix_of_another_shape():
  """A weight that is not (N, K) for the input's K, or ScaledTiles whose recorded shape is not the
  one its tiles hold, is a ValueError at trace time, not a kernel that writes past its output."""
  x = jnp.ones((2, 96), jnp.float32)
  t = kernels.q4_1_tiles(np.ones((32, 96), np.float32))
  for w, words in ((t.reshape(2, 16, 96), r'got \(2, 16, 96\)'),
                   (t.reshape(96, 32), r'got \(96, 32\) holding \(32, 96\)'),
                   (jnp.ones((8, 64)), r'K=96\), got \(8, 64\)')):
    with pytest.raises(ValueError, match=words):
      jax.jit(kernels.rows_matmul)(x if w.shape[-1] != 32 else jnp.ones((2, 32)), w)


@pytest.mark.parametrize('kind,S,K', [('sequential', 0, 1), ('sequential', 2, 1), ('parallel', 2, 1),
                                      ('medusa', 2, 1), ('sequential', 2, 24)])
def test_decoding_with_kernels_matches_without(kind, S, K):
  """Greedy tokens are the same with and without kernels (head dim 16, so the attention kernel
  runs too), and the hidden states agree to float32 rounding; with 24 first-draft candidates,
  where some alternatives are accepted (more first drafts than the chain alone)."""
  cfg = tiny_model(**{'mtp.kind': kind, 'model.d_model': 64, 'model.tie_embeddings': kind != 'parallel'})
  params = init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 11, 8)]
  s = dec.Settings(draft_len=S, max_new_tokens=24, candidates=K)
  arr, lens = dec.pad_prompts(prompts)
  results = []
  for use in (False, True):
    model = dec.decode_model(cfg, use)
    assert model.kernels == use
    fn = dec.compiled_decoder(model, s, dec.cache_length(arr.shape[1], s))
    results.append(fn(params, arr, lens, jax.random.key(0)))
  assert dec.outputs(results[0]) == dec.outputs(results[1])
  if K > 1:
    chain = dataclasses.replace(s, candidates=1)
    alone = dec.compiled_decoder(model, chain, dec.cache_length(arr.shape[1], chain))(
        params, arr, lens, jax.random.key(0))
    assert np.sum(results[1].out_accepted[:, 0]) > np.sum(alone.out_accepted[:, 0])
  np.testing.assert_allclose(results[1].rows.hidden[0], results[0].rows.hidden[0], rtol=1e-4,
                             atol=1e-4)


def two_bfloat16_exact(w):
  """w with every entry made exactly the sum of two bfloat16 numbers (its bfloat16 rounding and
  that of the rest), as a GGUF file's 4-bit blocks dequantize to."""
  w = jnp.asarray(w, jnp.float32)
  hi = w.astype(jnp.bfloat16).astype(jnp.float32)
  return hi + (w - hi).astype(jnp.bfloat16).astype(jnp.float32)


def q8_0_exact(w):
  """w as a GGUF Q8_0 tensor dequantizes (gguf's own quantizer): each run of 32 entries along a
  row a float16 scale (the run's largest magnitude / 127) times integers of at most 127."""
  return gguf_rounded(w, GGMLQuantizationType.Q8_0)


def q4_1_exact(w):
  """w as a GGUF Q4_1 tensor dequantizes (gguf's own quantizer): each run of 32 entries along a
  row a float16 scale ((largest - least) / 15) times integers 0 to 15, plus the run's least
  entry in float16."""
  return gguf_rounded(w, GGMLQuantizationType.Q4_1)


EXACT = {'q8_0': q8_0_exact, 'q4_1': q4_1_exact,
         'q4_0': lambda w: gguf_rounded(w, GGMLQuantizationType.Q4_0),  # d (q - 8), q 0..15
         'q5_0': lambda w: gguf_rounded(w, GGMLQuantizationType.Q5_0)}  # d (q - 16), q 0..31


@pytest.mark.parametrize('form', ['q8_0', 'q4_1', 'q4_0', 'q5_0'])
def test_scaled_tiles_hold_exactly_a_gguf_matrix_and_nothing_else(form):
  """Q8_0 and Q5_0 matrices as a scale times int8 integers a run, Q4_1's and Q4_0's as a scale
  times integers 0 to 15 two to a byte plus an offset (Q4_0's: -8 times the scale), every entry
  as it was; other matrices not."""
  w = EXACT[form](jax.random.normal(jax.random.key(0), (48, 96)))
  t = kernels.scaled_tiles_if_exact(w)
  S = 2 if form in ('q4_1', 'q4_0') else 1  # a scale, and an offset
  # Q8_0's integers one byte each (int8), Q4_1's (0 to 15) two to a byte
  assert t.shape == w.shape and t.ndim == 2
  assert t.q.dtype == (jnp.uint8 if S == 2 else jnp.int8)
  assert t.q.shape == ((48, 48) if S == 2 else w.shape)
  assert t.affine == (S == 2)
  assert t.scales.shape == (3, 3, S, 16) and t.scales.dtype == jnp.float16
  np.testing.assert_array_equal(kernels.unscaled(t), w)
  # Entry (17, 41): row block 1, column block 1 (of 3), column pair 4, row 1, second of its pair
  at = (1 * 3 + 1) * 512 + 4 * 32 + 1 * 2 + 1
  if S == 1:
    q = np.asarray(t.q).ravel()[at]
  else:  # the tile's 512 entries in 256 bytes: in each run of 64, 32 low nibbles, 32 high ones
    tile, entry = divmod(at, 512)
    run, j = divmod(entry, 64)
    byte = np.asarray(t.q).ravel()[tile * 256 + run * 32 + j % 32]
    q = byte & 15 if j < 32 else byte >> 4
  scales = np.asarray(t.scales, np.float32)[1, 1, :, 1]
  offset = scales[1] if S == 2 else 0
  value = np.float32(q)
  assert value == np.round(value) and value * scales[0] + offset == w[17, 41]
  assert kernels.scaled_tiles_if_exact(jax.random.normal(jax.random.key(0), (48, 96))) is None
  assert kernels.scaled_tiles_if_exact(two_bfloat16_exact(
      jax.random.normal(jax.random.key(0), (48, 96)))) is None
  assert kernels.scaled_tiles_if_exact(w[:40]) is None  # not whole tiles
  if form == 'q5_0':  # the integers within the form's own range
    assert np.abs(np.asarray(t.q)).max() == 16
    return
  if form == 'q4_0':  # every offset -8 times its scale
    scales = np.asarray(t.scales, np.float32)
    np.testing.assert_array_equal(scales[:, :, 1], -8 * scales[:, :, 0])
    return
  if form == 'q4_1':
    # one run of integers 0 to 15 times a scale that is no float16 number, plus an offset: not
    # the file's form (the whole run exact in float32 still)
    ints = np.arange(32) % 16
    scale = np.float32(1 / 3)
    assert np.float16(scale) != scale
    assert kernels.scaled_tiles_if_exact(w.at[0, :32].set(ints * scale - 2)) is None
    return
  # one run of integers times its scale whose largest integer is 126, not 127: not the form
  # (its scale is not the largest magnitude / 127)
  run = np.asarray(w[0, :32])
  scale = np.abs(run).max() / 127
  ints = np.round(run / scale)
  ints[np.abs(ints) == 127] = np.sign(ints[np.abs(ints) == 127]) * 126
  assert np.abs(ints).max() == 126
  assert kernels.scaled_tiles_if_exact(w.at[0, :32].set(ints * scale)) is None


def test_tiled_matrices_hold_exactly_the_matrix_in_amx_tile_order():
  w = two_bfloat16_exact(jax.random.normal(jax.random.key(0), (48, 96)))
  assert kernels.two_bfloat16(w)
  assert not kernels.two_bfloat16(jax.random.normal(jax.random.key(0), (48, 96)))
  t = kernels.tiled(w)
  assert t.shape == w.shape and t.dtype == jnp.uint32
  np.testing.assert_array_equal(kernels.untiled(t), w)
  # Entry (17, 41) by hand: row block 1, column block 1 (of 3), column pair 4, row 1 of its
  # block, second of its pair; the block's hi tile, then its lo tile, 512 halves each.
  halves = np.asarray(t).view(np.uint16).ravel()
  at = ((1 * 3 + 1) * 2) * 512 + 4 * 32 + 1 * 2 + 1
  hi = np.asarray(w[17, 41].astype(jnp.bfloat16)).view(np.uint16)
  lo = np.asarray((w[17, 41] - w[17, 41].astype(jnp.bfloat16).astype(jnp.float32))
                  .astype(jnp.bfloat16)).view(np.uint16)
  assert (halves[at], halves[at + 512]) == (hi, lo)


def test_the_tile_unit_runs_where_the_cpu_has_one():
  """Tiles only where the CPU lists AMX; and where it does, with the kernels built and tiles not
  turned off, they run (unless the compiler cannot build for AMX, which compiling for
  sapphirerapids below would show)."""
  flags = kernels.measure.cpu_flags().split()
  amx = {'amx_tile', 'amx_bf16', 'avx512_bf16'} <= set(flags)
  if kernels.tiles_usable():
    assert amx
  if amx and kernels.usable() and os.environ.get('MTP_JAX_TILES', '1') != '0':
    assert kernels.tiles_usable()
  # scaled tiles: on the tile unit, else on the FMAs of AVX-512 or AVX2 (with F16C)
  fmas = 'avx512f' in flags or {'avx2', 'fma', 'f16c'} <= set(flags)
  assert kernels.scaled_usable() == (
      fmas and kernels.usable() and os.environ.get('MTP_JAX_TILES', '1') != '0')


@pytest.mark.parametrize('layout', ['tiled', 'q8_0', 'q4_1', 'q4_0'])
@pytest.mark.parametrize('K,N', [(96, 48), (96, 80), (96, 112), (576, 960)])
def test_a_tiled_product_is_the_float32_product_whatever_the_rows_beside_it(layout, K, N):
  """Both tile layouts (two bfloat16 halves; ScaledTiles of a Q8_0 or Q4_1 matrix): within float32
  rounding of the product in float64 for every row count (1-16 rows take one input block, more
  take several) and for groups of 3, 2 and 1 weight-row blocks (48 / 80 / 112 rows); where the
  layout's kernel runs (two halves: the tile unit; scaled tiles: it or the FMAs), also bit
  for bit the same for a row whatever the rows beside it, as the float32 kernel's (the XLA
  fallback elsewhere)."""
  w = jax.random.normal(jax.random.key(K), (N, K)) * 0.05
  if layout == 'tiled':
    w = two_bfloat16_exact(w)
    t = kernels.tiled(w)
  else:
    w = EXACT[layout](w)
    t = kernels.scaled_tiles_if_exact(w)
    assert t.affine == (layout in ('q4_1', 'q4_0'))
  x = jax.random.normal(jax.random.key(1), (40, K))
  product = jax.jit(kernels.rows_matmul)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  alone = np.concatenate([np.asarray(product(x[i:i + 1], t)) for i in range(40)])
  np.testing.assert_allclose(alone, want, rtol=1e-5, atol=1e-5 * np.sqrt(K))
  for rows in (2, 5, 16, 17, 32, 33, 40):
    got = np.asarray(product(x[:rows], t))
    np.testing.assert_allclose(got, want[:rows], rtol=1e-5, atol=1e-5 * np.sqrt(K))
    if kernels.tiles_usable() if layout == 'tiled' else kernels.scaled_usable():
      np.testing.assert_array_equal(got, alone[:rows])
  np.testing.assert_allclose(kernels.rows_matmul(x, t, use_kernel=False), want, rtol=1e-5,
                             atol=1e-5 * np.sqrt(K))


def tiles_model(form='halves', **overrides):
  """A tiny model whose trunk matrices fit whole tiles (width 64, MLP 192, vocabulary 96), with
  every float entry of its params exactly the sum of two bfloat16 numbers, except the embedding's,
  which are Q8_0's (as SmolLM2's file has them); with form='q4_1', the trunk's matrices (an untied
  output matrix too) are also Q4_1's along their input axes, as SmolLM2's blocks are."""
  cfg = tiny_model(**{'model.d_model': 64, **overrides})
  params = jax.tree.map(two_bfloat16_exact, init_params(cfg, jax.random.key(1)))

  def q4_1(path, leaf):
    keys = _keys(path)
    n_in = _dense_inputs(keys)
    if form != 'q4_1' or not n_in or _in_heads(keys):
      return leaf
    w = leaf.reshape(math.prod(leaf.shape[:n_in]), -1).T  # (out, in): runs along the input
    return q4_1_exact(w).T.reshape(leaf.shape)
  inner = jax.tree_util.tree_map_with_path(q4_1, params)['params']
  return cfg, {**params, 'params': {**inner, 'embedding': q8_0_exact(inner['embedding'])}}


def block_matrices(cfg) -> set[str]:
  return {f"['blocks_{i}']['{part}']['{w}']" for i in range(cfg.num_layers)
          for part, w in (('attn', 'qkv'), ('attn', 'o'), ('mlp', 'gate_up'), ('mlp', 'down'))}


@pytest.mark.parametrize('tied', [True, False])
@pytest.mark.parametrize('form', ['halves', 'q4_1'])
def test_tile_trunk_tiles_the_trunks_exact_matrices_only(tied, form):
  """The blocks' matrices and an untied output matrix, as ScaledTiles where they are Q4_1's, else
  in two halves; never the embedding (looked up by id) or the heads. A tied Q8_0 embedding is
  added as ScaledTiles for the output projection."""
  from mtp_jax.model import tile_trunk
  cfg, params = tiles_model(form, **{'model.tie_embeddings': tied})
  layout = kernel_layout(params)
  tiled = dict(tile_trunk(layout)['params'])
  output = tiled.pop('output_tiles', None)
  assert (output is not None) == tied  # untied: the unembedding is tiled in place
  if tied:
    np.testing.assert_array_equal(kernels.unscaled(output), params['params']['embedding'])
  scaled = form == 'q4_1'
  names = {jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(
      tiled, is_leaf=lambda x: isinstance(x, kernels.ScaledTiles))
      if isinstance(leaf, kernels.ScaledTiles) or leaf.dtype == jnp.uint32}
  assert names == block_matrices(cfg) | (set() if tied else {"['unembedding']"})
  originals = jax.tree.leaves(layout['params'])
  for (path, leaf), original in zip(jax.tree_util.tree_leaves_with_path(
      tiled, is_leaf=lambda x: isinstance(x, kernels.ScaledTiles)), originals):
    if jax.tree_util.keystr(path) not in names:
      assert leaf is original
      continue
    assert isinstance(leaf, kernels.ScaledTiles) == scaled and leaf.shape == original.shape
    width = cfg.mlp_dim if 'down' in jax.tree_util.keystr(path) else cfg.d_model
    flat = leaf.reshape(-1, width)
    back = kernels.unscaled(flat) if scaled else kernels.untiled(flat)
    np.testing.assert_array_equal(back.reshape(leaf.shape), original)
    if scaled:
      assert flat.affine
  # the layout before ScaledTiles: every such matrix in two halves
  halves = dict(tile_trunk(layout, scaled=False)['params'])
  halves.pop('output_tiles', None)
  assert sum(leaf.dtype == jnp.uint32 for leaf in jax.tree.leaves(halves)) == len(names)
  assert not any(isinstance(leaf, kernels.ScaledTiles) for leaf in jax.tree.leaves(
      halves, is_leaf=lambda x: isinstance(x, kernels.ScaledTiles)))
  # float32 weights in general are neither: nothing is tiled
  plain = kernel_layout(init_params(cfg, jax.random.key(1)))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(tile_trunk(plain)))
  assert 'output_tiles' not in tile_trunk(plain)['params']


def test_an_untied_q8_0_output_matrix_is_read_as_scaled_tiles():
  """An unembedding in Q8_0's form (runs of 32 along its input axis) that does not split in two
  halves is tiled in place as ScaledTiles, V x D."""
  from mtp_jax.model import tile_trunk
  cfg, params = tiles_model(**{'model.tie_embeddings': False})
  inner = params['params']
  unembedding = q8_0_exact(inner['unembedding'].T).T  # stored D x V
  assert not kernels.two_bfloat16(unembedding)
  layout = kernel_layout({**params, 'params': {**inner, 'unembedding': unembedding}})
  tiled = tile_trunk(layout)['params']
  assert 'output_tiles' not in tiled and not tiled['unembedding'].affine
  np.testing.assert_array_equal(kernels.unscaled(tiled['unembedding']), unembedding.T)


@pytest.mark.parametrize('S,K,tied,draft,form', [
    (2, 1, True, False, 'halves'), (2, 6, True, False, 'q4_1'), (2, 1, False, True, 'halves'),
    (2, 1, True, True, 'q4_1'), (2, 1, False, True, 'q4_1')])
def test_decoding_with_tiles_keeps_greedy_output(S, K, tied, draft, form):
  """Greedy MTP with tiled trunk products is `ar` with them, token for token (a verify's rows
  are the ar steps' bit for bit), chain and draft tree; the trunk's matrices in two halves, or
  Q4_1's as ScaledTiles (configs/smollm2.py's case); a tied Q8_0 output matrix read as scaled
  tiles, with or without a draft vocabulary, and an untied one tiled in place (in two halves, or
  as Q4_1's ScaledTiles) with a draft vocabulary's rows taken from it; the trunk's features agree
  with the float32 kernel's to float32 rounding."""
  cfg, params = tiles_model(form, **{'model.tie_embeddings': tied})
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 11, 8)]
  arr, lens = dec.pad_prompts(prompts)
  draft = range(40) if draft else None
  outputs, hidden = {}, {}
  for tiles in (True, False):
    model = dec.decode_model(cfg, True, draft, use_tiles=tiles)
    assert model.tiles == (tiles and kernels.scaled_usable())
    # the blocks' matrices and the output matrix, an untied one in two halves too (two halves
    # only on the tile unit; heads drafting in Q4_1's form not counted)
    scaled = form == 'q4_1' or kernels.tiles_usable()
    assert model.tiled_matrices(params) == (
        4 * cfg.num_layers * scaled + (tied or scaled) if model.tiles else 0)
    assert dec.decode_model(cfg, True, draft, 'q4_1', use_tiles=tiles).tiled_matrices(
        params) == model.tiled_matrices(params)
    for s in (dec.Settings(draft_len=0, max_new_tokens=24),
              dec.Settings(draft_len=S, max_new_tokens=24, candidates=K)):
      state = dec.compiled_decoder(model, s, dec.cache_length(arr.shape[1], s))(
          params, arr, lens, jax.random.key(0))
      outputs[s.draft_len] = dec.outputs(state)
      hidden[tiles] = np.asarray(state.rows.hidden[0])
    assert outputs[S] == outputs[0]
  np.testing.assert_allclose(hidden[True], hidden[False], rtol=1e-4, atol=1e-4)
