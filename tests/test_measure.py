"""The shared measuring helpers: the timing loop's order, warm-up and fastest-of semantics on a
scripted clock, the machine line's format, the rooflines' reported work, and the operations a
compiled module runs inside its while loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import measure


def test_machine_line():
  line = measure.machine()
  assert re.fullmatch(r'.+: \w+ .+ x\d+, \d+ CPUs, jax [\w.]+', line), line
  assert line.endswith(f'jax {jax.__version__}') and f'x{jax.device_count()},' in line


def test_fastest_interleaves_rounds_and_keeps_each_calls_fastest(monkeypatch):
  """Two calls whose every run takes a scripted time: the warm-up round runs first and is not
  timed (it is the fastest run of all), then rounds alternate a, b, a, b; each call's fastest
  timed run and last output come back."""
  clock, log = [0.0], []
  durations = {'a': [0.5, 5.0, 3.0, 4.0], 'b': [0.5, 2.0, 7.0, 6.0]}
  monkeypatch.setattr(measure.time, 'perf_counter', lambda: clock[0])

  def call(name):
    def run():
      clock[0] += durations[name][sum(n == name for n in log)]
      log.append(name)
      return f'{name}{len(log)}'
    return run

  seconds, outputs = measure.fastest([call('a'), call('b')], rounds=3, warmup=True)
  assert log == ['a', 'b'] * 4
  assert seconds == [3.0, 2.0]
  assert outputs == ['a7', 'b8']
  log.clear()
  seconds, outputs = measure.fastest([call('a')], rounds=2)
  assert log == ['a', 'a'] and seconds == [0.5] and outputs == ['a2']
  assert measure.fastest([call('a')], rounds=0) == ([float('inf')], [None])


def test_a_rate_repeats_a_short_call_and_keeps_its_fastest_run(monkeypatch):
  """A call of 1/8 s by a scripted clock, after a warm-up call, is repeated 4 times a run (to
  last min_seconds); the rate is the work of a run's 4 calls over its fastest run."""
  clock = [0.0]
  durations = iter([1.0, 0.125] + [0.25] * 4 + [0.125] * 4 + [0.2] * 4)
  monkeypatch.setattr(measure.time, 'perf_counter', lambda: clock[0])

  def call():
    clock[0] += next(durations)
    return jnp.zeros(())
  assert measure._best_rate(call, (), work=3.0, runs=3, min_seconds=0.5) == 3.0 * 4 / 0.5
  assert next(durations, None) is None


def test_rooflines_report_the_work_they_timed(monkeypatch):
  """The work each roofline reports is that of the call it timed: the timing loop (the real one)
  is watched for what it was given."""
  timed, real = [], measure._best_rate

  def watched(fn, args, work, runs, **kw):
    timed.append((fn, args, work))
    return real(fn, args, work, runs, **kw)
  monkeypatch.setattr(measure, '_best_rate', watched)
  mm = measure.matmul_roofline('float32', n=64, runs=2)
  (fn, (a, b), work), = timed
  assert a.shape == b.shape == (64, 64) and a.dtype == b.dtype == jnp.float32
  np.testing.assert_allclose(fn(a, b), np.asarray(a) @ np.asarray(b), rtol=1e-5, atol=1e-4)
  assert mm['n'] == 64 and mm['flops'] == work == 2 * 64**3 and mm['flops_per_s'] > 0
  bw = measure.read_bandwidth(nbytes=2**20, runs=2)
  (fn, (x,), work) = timed[1]
  assert x.nbytes == work == bw['bytes'] == 2**20 and bw['bytes_per_s'] > 0
  np.testing.assert_allclose(fn(x), np.asarray(x).sum(), rtol=1e-6)


def test_loop_operations_are_those_inside_the_largest_while_loop():
  """A compiled function with work before its loop, a conditional and a smaller loop inside the
  loop's body, and work after it: the loop's operations are those of its body (the conditional's
  branches and the inner loop's body included) and condition, none of those outside it."""
  def f(x):
    x = jnp.cos(x)  # before the loop

    def inner(c):
      return c[0] + 1, jnp.tanh(c[1])

    def body(c):
      i, y = c
      y = jax.lax.cond(y.sum() > 0, lambda z: z * 2.0, lambda z: z - 1.0, y)
      y = jax.lax.while_loop(lambda d: d[0] < 2, inner, (0, y))[1]
      return i + 1, jnp.sin(y) @ y
    return jnp.exp(jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1])  # exp: after it
  text = jax.jit(f).lower(jnp.ones((4, 4))).compile().as_text()
  inside = measure.loop_operations(text)
  ops = {m.group(1): m.group(2) for m in re.finditer(
      r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*op_name="([^"]*)"', text, re.M)}
  named = lambda word: {name for name, op in ops.items() if op.endswith('/' + word)}
  for word in ('sin', 'tanh', 'mul', 'sub'):  # the body, the inner loop, both branches
    assert named(word) and named(word) <= inside, (word, named(word), inside)
  for word in ('cos', 'exp'):
    assert named(word) and not named(word) & inside, (word, named(word))
  assert measure.loop_operations('ENTRY %main () -> f32[] {\n}\n') == set()
