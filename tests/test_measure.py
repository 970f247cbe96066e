"""The shared measuring helpers: the timing loop's order, warm-up and fastest-of semantics on a
scripted clock, the machine line's format, and the rooflines' reported work."""

import re

import jax

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


def test_rooflines_report_the_work_they_timed():
  mm = measure.matmul_roofline('float32', n=64, runs=2)
  assert mm['flops'] == 2 * 64**3 and mm['flops_per_s'] > 0
  assert abs(mm['seconds'] * mm['flops_per_s'] - mm['flops']) < 1e-6 * mm['flops']
  bw = measure.read_bandwidth(nbytes=2**20, runs=2)
  assert bw['bytes'] == 2**20 and bw['bytes_per_s'] > 0
