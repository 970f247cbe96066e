"""Measuring helpers the benchmarks share: which machine this is, a timing loop fair to a shared
machine, and the rooflines (matmul FLOP/s, memory read bytes/s) that measured times are read by.
"""

import functools
import glob
import gzip
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import tqdm

from mtp_jax.matmul import precision

MATMUL_SIZE = {'cpu': 2048}  # any other platform (GPU, TPU) gets 8192
BANDWIDTH_BYTES = 512 * 2**20


def bfloat16_products_fast() -> bool:
  """Whether the default device multiplies bfloat16 matrices faster than float32 ones: TPUs and
  GPUs with bfloat16 units do (taken as given for any GPU: an older one, without them, should set
  train.dtype itself), and CPUs with bfloat16 instructions, AMX (Intel since Sapphire Rapids) or
  AVX512_BF16 (AMD since Zen 4), through XLA's CPU backend when mtp_jax.matmul arranges the
  products (a product and its gradients 2.7-3.3x faster than float32 with AMX, 1.7-2.1x with
  AVX512_BF16 alone, experiments/bench_matmul.py). Other CPUs say no: where XLA widens bfloat16
  products to float32 they run no faster than float32 ones."""
  flags = cpu_flags().split()
  return jax.default_backend() != 'cpu' or 'amx_bf16' in flags or 'avx512_bf16' in flags


@functools.cache
def cpu_flags() -> str:
  """The line of /proc/cpuinfo that lists the host CPU's instruction sets ('flags' on x86,
  'Features' on ARM), '' where there is none."""
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith(('flags', 'Features'))), '')
  except OSError:
    return ''


def machine_info() -> dict:
  """The host, its first device and the software, as a dict for a results file."""
  dev = jax.devices()[0]
  info = {'host_name': platform.node() or 'host', 'platform': dev.platform,
          'device_kind': dev.device_kind, 'device_count': jax.device_count(),
          'process_count': jax.process_count(), 'cpu_count': os.cpu_count(),
          'jax_version': jax.__version__, 'python': platform.python_version(),
          'host': platform.machine()}
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  if stats and 'bytes_limit' in stats:
    info['device_memory_bytes'] = int(stats['bytes_limit'])
  return info


def machine(info: dict | None = None) -> str:
  """The machine in one line: 'HOST: PLATFORM DEVICE_KIND xCOUNT, N CPUs, jax VERSION'."""
  m = info or machine_info()
  return (f"{m['host_name']}: {m['platform']} {m['device_kind']} x{m['device_count']}, "
          f"{m['cpu_count']} CPUs, jax {m['jax_version']}")


def timings(calls, rounds: int, warmup: int = 0, desc: str = ''):
  """Runs every call in turn for `warmup` untimed rounds, then `rounds` timed ones, so a slow
  spell of a shared machine slows all of them alike (with a progress bar on stderr when `desc`
  names the work). Returns (each call's seconds per timed round, each call's last output; None
  for a call that never ran)."""
  outputs, seconds = [None] * len(calls), [[] for _ in calls]
  with tqdm.tqdm(total=(warmup + rounds) * len(calls), desc=desc, unit='call', file=sys.stderr,
                 disable=not desc, leave=False, dynamic_ncols=True) as bar:
    for r in range(warmup + rounds):
      for i, call in enumerate(calls):
        start = time.perf_counter()
        outputs[i] = jax.block_until_ready(call())
        if r >= warmup:
          seconds[i].append(time.perf_counter() - start)
        bar.update(1)
  return seconds, outputs


def fastest(calls, rounds: int, warmup: bool = False, desc: str = ''):
  """`timings` with one warm-up run of each call if asked (calls compiled beforehand need none).
  Returns (each call's fastest seconds, each call's last output)."""
  seconds, outputs = timings(calls, rounds, int(warmup), desc)
  return [min(s, default=float('inf')) for s in seconds], outputs


def trace_events(directory: str) -> list[dict]:
  """The operations ('X' events: name, 'dur' in microseconds, thread) of the newest
  jax.profiler trace under `directory`."""
  paths = glob.glob(os.path.join(directory, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no trace under {directory}')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def loop_operations(hlo_text: str) -> set:
  """The names of the operations a compiled module's text (`compiled.as_text()`, as the profiler
  names them in trace_events) runs inside its largest while loop (a decoder's loop of
  iterations): those of its body and condition and of every computation they call, loops and
  conditionals within included; what runs once around the loop (a prefill) is left out."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$', line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif line.startswith('}'):
      current = None
    elif current is not None:
      current.append(line)

  def called(line):
    names = re.findall(r'(?:condition|body|to_apply|calls|true_computation|false_computation)'
                       r'=%?([\w.\-]+)', line)
    for group in re.findall(r'branch_computations=\{([^}]*)\}', line):
      names += [n.strip().lstrip('%') for n in group.split(',')]
    return names

  def reach(roots):
    seen, stack = set(), list(roots)
    while stack:
      name = stack.pop()
      if name in seen or name not in computations:
        continue
      seen.add(name)
      for line in computations[name]:
        stack += called(line)
    return seen

  def names(comps):
    return {m.group(1) for c in comps for line in computations[c]
            if (m := re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+) = ', line))}

  loops = [called(line) for lines in computations.values() for line in lines
           if re.search(r' while\(', line)]
  return max((names(reach(roots)) for roots in loops), key=len, default=set())


def _best_rate(fn, args, work: float, runs: int, min_seconds: float = 0.05) -> float:
  """The highest work / second of fn(*args) over `runs` runs; each run repeats the call enough
  times to last about `min_seconds`, so dispatch overhead does not count."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  repeats = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
  seconds, _ = fastest([lambda: [fn(*args) for _ in range(repeats)]], runs)
  return work * repeats / seconds[0]


def matmul_roofline(dtype_name: str, n: int | None = None, runs: int = 5) -> dict:
  """FLOP/s of an n x n x n matmul on the default device in `dtype_name` (by default n = 2048 on
  CPU, 8192 elsewhere), best of `runs`."""
  n = n or MATMUL_SIZE.get(jax.default_backend(), 8192)
  ka, kb = jax.random.split(jax.random.key(0))
  a_NxN = jax.random.normal(ka, (n, n), jnp.dtype(dtype_name))
  b_NxN = jax.random.normal(kb, (n, n), jnp.dtype(dtype_name))
  product = functools.partial(jnp.matmul, precision=precision(a_NxN))  # as the model's are
  flops_per_s = _best_rate(jax.jit(product), (a_NxN, b_NxN), 2 * n**3, runs)
  return {'n': n, 'dtype': dtype_name, 'seconds': 2 * n**3 / flops_per_s, 'flops': 2 * n**3,
          'flops_per_s': flops_per_s}


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES, runs: int = 5) -> dict:
  """Bytes/s at which the default device reads memory: the sum of an `nbytes` float32 array,
  best of `runs` (a reduction reads every element once and writes nothing back, the access
  pattern of a decoding step reading its weights)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  bytes_per_s = _best_rate(jax.jit(jnp.sum), (x,), x.nbytes, runs)
  return {'bytes': x.nbytes, 'seconds': x.nbytes / bytes_per_s, 'bytes_per_s': bytes_per_s}
