"""What the CPU test suite shares: tiny configs and the real text they train on; launch.py and the
experiments run as a user runs them, and what a run leaves (its printed summary, TensorBoard
scalars, checkpoints); tiny Llama files in llama.cpp's and Hugging Face's formats."""

import atexit
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.append(os.path.join(REPO, 'experiments'))  # tests import scripts' functions; last, so
# a script's name never hides a package

# One persistent XLA compilation cache for this test process and every subprocess it starts
# (they inherit the environment): tests build the same small programs again and again, in new
# sessions and in launch.py subprocesses, and compiling them is most of a tiny run's time. Set
# before jax is imported; removed at exit, or by the next run when this one was killed (the
# directory's name holds the pid of the process that made it).
CACHE_PREFIX = 'mtp_jax_xla_cache_'


def _remove_caches_of_dead_runs():
  for path in glob.glob(os.path.join(tempfile.gettempdir(), CACHE_PREFIX + '*_*')):
    try:
      os.kill(int(os.path.basename(path)[len(CACHE_PREFIX):].split('_')[0]), 0)
    except ProcessLookupError:
      shutil.rmtree(path, ignore_errors=True)
    except (ValueError, PermissionError):
      pass  # not one of ours, or another user's live process


if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _remove_caches_of_dead_runs()
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix=f'{CACHE_PREFIX}{os.getpid()}_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.2'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

# The tests compile hundreds of small programs and run each a few times, so the compiler's work
# on fast code costs more than it saves: without LLVM's optimisations a compile takes about half
# the time, and with XLA's older (elemental) emitter for fused loops half of that again. Users'
# runs keep XLA's defaults. Subprocesses get the same flags through cpu_env().
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# The suite is the CPU's (its kernels, exact decoding, these flags), also on a machine with a GPU.
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator, event_file_loader  # noqa: E402

from configs import base  # noqa: E402
from mtp_jax import checkpoint as ckpt_lib  # noqa: E402
from mtp_jax import decode as dec  # noqa: E402
from mtp_jax import train  # noqa: E402
from mtp_jax.config import ModelConfig, apply_overrides  # noqa: E402
from mtp_jax.model import MTPLanguageModel, init_params  # noqa: E402

# The real text that tiny runs train on: modules of the standard library, read in place. Their
# paths stay the same from run to run, and so does the train/valid split (a hash of each path).
CORPUS_FILES = ('textwrap.py', 'string.py', 'bisect.py', 'heapq.py', 'shlex.py', 'fnmatch.py',
                'colorsys.py', 'keyword.py', 'glob.py', 'calendar.py', 'difflib.py', 'queue.py')


def tiny_config(**overrides):
  """base config shrunk to a 2-layer width-32 model; overrides as 'section.field'=value."""
  c = base.get_config()
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.max_seq_len = 128
  c.data.vocab_size = 96
  c.mtp.depth = 2
  c.train.steps = 4
  c.train.batch_size = 4
  c.train.seq_len = 16
  c.train.warmup_steps = 1
  c.train.checkpoint_every = 2
  c.train.eval_every = 4
  c.train.eval_batches = 1
  c.train.log_every = 1
  c.decode.eval_prompts = 0
  return apply_overrides(c, overrides)


def text_config(**overrides):
  """tiny_config trained on the real text of CORPUS_FILES; 300 tokens leave room for 43 BPE
  merges."""
  return tiny_config(**{'data.sources': stdlib_corpus(), 'data.vocab_size': 300, **overrides})


def shrunk(config, **overrides):
  """A shipped config (quickstart, ablate_cpu, ...) shrunk to a 1-layer width-32 model on the real
  text of CORPUS_FILES that trains 2 steps in seconds; then `overrides`."""
  return apply_overrides(config, {
      'model.d_model': 32, 'model.num_layers': 1, 'model.num_heads': 4, 'model.num_kv_heads': 2,
      'data.sources': stdlib_corpus(), 'data.vocab_size': 300, 'train.steps': 2,
      'train.batch_size': 2, 'train.seq_len': 16, 'train.eval_batches': 1, **overrides})


def tiny_model(**overrides) -> ModelConfig:
  return ModelConfig.from_config(tiny_config(**overrides))


def depth_logits(params, cfg, tokens_BxW):
  """Every depth's logits over a window of T + D + 1 tokens (the training path, no cache)."""
  return [np.asarray(x) for x in MTPLanguageModel(cfg).apply(params, tokens_BxW)]


def assert_bitwise_equal(got, want):
  """Same tree, and every leaf the same dtype, shape and bytes."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    name = jax.tree_util.keystr(path)
    assert g.dtype == w.dtype and g.shape == w.shape, name
    assert g.tobytes() == w.tobytes(), name


def snapshot(root) -> dict:
  """{path under root: sha1 of its bytes} for every file."""
  hashes = {}
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        hashes[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return hashes


def stdlib_corpus(*names) -> str:
  """data.sources of these standard-library modules (all of CORPUS_FILES when none is named)."""
  stdlib = sysconfig.get_paths()['stdlib']
  return ','.join(os.path.join(stdlib, name) for name in names or CORPUS_FILES)


@pytest.fixture(autouse=True, scope='module')
def _programs_of_one_module():
  """Lets each test file's compiled programs go when it ends (jax's caches, and the decoders
  decode.compiled_decoder keeps): every XLA CPU executable maps about six memory regions while
  it lives, and a worker that kept every program of half the suite came within a few thousand of
  Linux's default limit of 65530 regions a process (vm.max_map_count), past which an mmap fails
  and XLA crashed (a segmentation fault while compiling or serialising a program). The
  persistent compilation cache above makes a program compiled again cheap."""
  yield
  dec.compiled_decoder.cache_clear()
  jax.clear_caches()


@pytest.fixture(scope='session')
def corpus() -> str:
  """CORPUS_FILES as data.sources, for the tests that take the corpus as a fixture."""
  return stdlib_corpus()


def model_param_counts(cfg: ModelConfig) -> dict:
  """{'trunk', 'heads', 'total'} parameters of the model as init_params builds it (shapes only):
  the count that costs.param_counts and the sweeps built on it must give."""
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  heads, trunk = train.split_heads(shapes)

  def size(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

  return {'trunk': size(trunk), 'heads': size(heads), 'total': size(shapes)}


def cpu_env(devices: int = 0, xla_flags: str = TEST_XLA_FLAGS, **extra) -> dict:
  """The environment of a subprocess on the CPU: JAX_PLATFORMS=cpu, XLA_FLAGS replaced by
  `xla_flags` (the tests' own; '' for XLA's defaults, as users compile) and `devices` host devices
  when > 0, and `extra` variables (None removes one)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if devices:
    xla_flags += f' --xla_force_host_platform_device_count={devices}'
  if xla_flags.strip():
    env['XLA_FLAGS'] = xla_flags.strip()
  env = {**env, 'JAX_PLATFORMS': 'cpu', **extra}
  return {k: v for k, v in env.items() if v is not None}


def start_as_in_a_terminal(*args, env=None, **popen) -> subprocess.Popen:
  """`python ARGS` in the repository on the CPU, started with SIGINT at its default action, as a
  terminal's foreground job has it, so that a SIGINT sent to it is a Ctrl-C: pytest-xdist's
  workers ignore SIGINT, as a shell's background job does, a child inherits that, and Python
  raises KeyboardInterrupt only where it finds the default. A Python that restores it execs the
  command (a preexec_fn would fork this process, whose JAX runs threads). Output piped, as text,
  unless `popen` says otherwise."""
  restore = ('import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
             'os.execv(sys.executable, [sys.executable, *sys.argv[1:]])')
  popen = {'stdout': subprocess.PIPE, 'stderr': subprocess.PIPE, **popen}
  return subprocess.Popen([sys.executable, '-c', restore, *args], cwd=REPO, text=True,
                          env=env or cpu_env(), **popen)


def run_script(script, *args, timeout=300, xla_flags=TEST_XLA_FLAGS, stdin='',
               **env) -> subprocess.CompletedProcess:
  """`python SCRIPT ARGS` in the repository on the CPU (`-m MODULE ARGS` runs a module), as a
  user runs launch.py or an experiment, `stdin` piped to it; its output captured as text. `env`:
  variables to set (None removes one)."""
  return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                        input=stdin, timeout=timeout, env=cpu_env(xla_flags=xla_flags, **env))


def launch_summary(stdout: str, mode: int = -1) -> dict:
  """The JSON summary launch.py printed on stdout for its `mode`-th mode, by default the last
  (progress lines may come before it, and a run of several modes prints one summary each)."""
  starts = [m.start() for m in re.finditer(r'^\{$', stdout, re.M)]
  assert starts, stdout[-3000:]
  return json.JSONDecoder().raw_decode(stdout[starts[mode]:])[0]


def assert_no_traceback(stderr: str):
  # Besides crashes, this catches Orbax's reads of a failed restore, which can outlive it and
  # then print "Exception ignored in <coroutine ...>" with a page of TensorStore spec each.
  assert 'Traceback' not in stderr, stderr[max(0, stderr.index('Traceback') - 300):][:3000]


def error_line(stderr: str, *patterns) -> str:
  """The one 'error:' line of stderr, which must match every regex pattern; no traceback."""
  lines = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, stderr[-3000:]
  assert_no_traceback(stderr)
  for pattern in patterns:
    assert re.search(pattern, lines[0]), (pattern, lines[0])
  return lines[0]


def assert_user_error(result, *words):
  """launch.py refused its input as a user error: exit code 2 and one last line 'error: ...' that
  holds every word, no traceback."""
  assert words and max(map(len, words)) > 1, f'words, not one string spread out: {words}'
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  line = error_line(result.stderr, *map(re.escape, words))
  assert result.stderr.strip().splitlines()[-1] == line, result.stderr[-3000:]


def scalars(workdir) -> dict:
  """{tag: [(step, value), ...]} as TensorBoard shows them (events orphaned by a restart purged)."""
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, 'tb'),
                                          size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def raw_events(path, tag) -> list[tuple[int, float]]:
  """[(step, value)] of `tag` in one event file, as written (nothing purged)."""
  events = event_file_loader.LegacyEventFileLoader(path).Load()
  return [(e.step, v.simple_value) for e in events for v in e.summary.value if v.tag == tag]


def raw_steps(workdir, tag) -> list[int]:
  """Every step at which any event file under WORKDIR/tb holds `tag`, duplicates included."""
  return sorted(step for path in glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
                for step, _ in raw_events(path, tag))


@contextlib.contextmanager
def another_run_holding(workdir, capfd, meanwhile):
  """Holds WORKDIR's lock as the process 0 of a run training there does, in a thread (training
  installs signal handlers, so the run under test is the main thread's); once that run says it
  waits, calls meanwhile() (the other run's work while it waits) and lets go. Yields a dict that
  then holds 'err', what was printed until then, and 'files', what the workdir held then."""
  from mtp_jax import atomic
  os.makedirs(workdir, exist_ok=True)
  held, seen = threading.Event(), {}

  def hold():
    with atomic.exclusive(workdir):
      held.set()
      err, give_up = '', time.monotonic() + 300  # a guard against hanging, not a timing
      while 'waiting for another run' not in err and time.monotonic() < give_up:
        time.sleep(0.05)
        err += capfd.readouterr().err
      seen.update(err=err, files=sorted(os.listdir(workdir)))
      meanwhile()

  holder = threading.Thread(target=hold, daemon=True)
  holder.start()
  held.wait()
  try:
    yield seen
  finally:
    holder.join()


@contextlib.contextmanager
def opened_checkpointer(workdir):
  """The project's Checkpointer on workdir, closed on the way out."""
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    yield checkpointer
  finally:
    checkpointer.close()


def checkpoint_steps(workdir) -> list[int]:
  with opened_checkpointer(workdir) as checkpointer:
    return checkpointer.all_steps()


def read_checkpoint(workdir, step):
  """(state, meta) of one checkpoint as saved (no config: what is on disk)."""
  with opened_checkpointer(workdir) as checkpointer:
    return checkpointer.restore(step, None)


def restore(config, workdir, step=None):
  """(session, state): checkpoint `step` of workdir (None: the latest), restored onto config's
  mesh and abstract state as a resumed run restores it."""
  session = train.Session(config, workdir)
  try:
    state, _ = session.checkpointer.restore(step, session.abstract_state)
  finally:
    session.checkpointer.close()
  return session, state


def flat(tree) -> dict:
  """{path: numpy value} of every leaf."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# A tiny random Llama, written in llama.cpp's and Hugging Face's formats by the formats' own
# libraries, and an independent NumPy forward pass to check an import against.

LLAMA = {'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 2,
         'model.mlp_dim': 64, 'model.rope_theta': 10000.0, 'model.norm_eps': 1e-5,
         'model.tie_embeddings': True, 'model.qkv_bias': False, 'model.qk_norm': False,
         'model.head_dim': 0, 'model.rope_factors': (), 'data.vocab_size': 264}
QWEN2 = {**LLAMA, 'model.qkv_bias': True}  # a Llama with biases on q, k and v
# a Llama with q and k normalised per head, its heads wider than d_model / num_heads
QWEN3 = {**LLAMA, 'model.qk_norm': True, 'model.head_dim': 16}
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokens():
  """GPT-2's 256 byte symbols, five merges and three special tokens: 264 tokens."""
  from tokenizers import pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  merges = ['Ġ t', 'h e', 'Ġt he', 'i n', 'a n']
  tokens = alphabet + [m.replace(' ', '') for m in merges] + ['<|endoftext|>', '<|im_start|>',
                                                                '<|im_end|>']
  return tokens, merges


def random_llama(fields=None, seed=0) -> dict:
  """HF-named, HF-shaped float32 tensors of a random Llama."""
  from mtp_jax.pretrained import llama
  f = {**LLAMA, **(fields or {})}
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in llama.trunk_shapes(f).items():
    scale = 1.0 if name.endswith('norm.weight') else 0.3
    base = 1.0 if name.endswith('norm.weight') else 0.0
    out[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
  return out


def to_gguf_layout(w, heads):
  """llama.cpp's rotary layout of q/k rows, as its converter writes it."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_rounded(w, qtype):
  """The matrix w as a GGUF tensor of type `qtype` dequantizes, through gguf's own quantizer and
  dequantizer (runs of 32 along each row; the row's length a multiple of 32)."""
  import gguf
  w = np.asarray(w, np.float32)
  return jax.numpy.asarray(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype))


def write_gguf(path, tensors, fields=None, qtype=None, arch='llama', drop=(), reshape=None,
               extra=None, floats=None, pre='default', chat=CHAT, eot=None, pad=None, eos=None,
               types=None, merges=None, texts=None):
  """A GGUF file of `tensors` (HF names) through gguf's own writer; matrices quantized to `qtype`
  when given. `drop` (tensors, or the keys llama.attention.layer_norm_rms_epsilon and
  llama.attention.head_count), `reshape`, `extra` (tensors), `floats` and `texts` (metadata keys)
  make broken files for the error tests; `pre` names the pre-tokenizer, `chat` is the chat
  template, `eot` the end-of-turn token id and `pad` the padding token (its text), when given;
  `eos` (an id), `types` (token types) and `merges` replace the file's own, and a `chat` that is a
  number is written as one, for the error tests."""
  import gguf
  f = {**LLAMA, **(fields or {})}
  names = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
           'lm_head.weight': 'output.weight'}
  block = {'input_layernorm': 'attn_norm', 'self_attn.q_norm': 'attn_q_norm',
           'self_attn.k_norm': 'attn_k_norm', 'self_attn.q_proj': 'attn_q',
           'self_attn.k_proj': 'attn_k',
           'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
           'post_attention_layernorm': 'ffn_norm', 'mlp.gate_proj': 'ffn_gate',
           'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(f['model.num_layers'])
  w.add_context_length(512)
  w.add_embedding_length(f['model.d_model'])
  w.add_feed_forward_length(f['model.mlp_dim'])
  if 'llama.attention.head_count' not in drop:
    w.add_head_count(f['model.num_heads'])
  w.add_head_count_kv(f['model.num_kv_heads'])
  if f['model.head_dim']:
    w.add_key_length(f['model.head_dim'])
    w.add_value_length(f['model.head_dim'])
  w.add_rope_freq_base(f['model.rope_theta'])
  if 'llama.attention.layer_norm_rms_epsilon' not in drop:
    w.add_layer_norm_rms_eps(f['model.norm_eps'])
  tokens, own_merges = byte_tokens()
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_merges(own_merges if merges is None else merges)
  w.add_token_types([3 if t.startswith('<|') else 1 for t in tokens] if types is None else types)
  w.add_bos_token_id(tokens.index('<|im_start|>'))
  w.add_eos_token_id(tokens.index('<|im_end|>') if eos is None else eos)
  if eot is not None:
    w.add_eot_token_id(eot)
  if pad is not None:
    w.add_pad_token_id(tokens.index(pad))
  if isinstance(chat, int):
    w.add_uint32('tokenizer.chat_template', chat)
  else:
    w.add_chat_template(chat)
  for key, value in (floats or {}).items():
    w.add_float32(key, value)
  for key, value in (texts or {}).items():
    w.add_string(key, value)
  for hf, t in tensors.items():
    if hf in drop:
      continue
    if hf in names:
      name = names[hf]
    else:
      _, _, i, rest = hf.split('.', 3)
      base, kind = rest.rsplit('.', 1)
      name = f'blk.{i}.{block[base]}.{kind}'
    if arch == 'llama' and hf.endswith('q_proj.weight'):  # Qwen2's converter leaves them
      t = to_gguf_layout(t, f['model.num_heads'])
    elif arch == 'llama' and hf.endswith('k_proj.weight'):
      t = to_gguf_layout(t, f['model.num_kv_heads'])
    if reshape and hf in reshape:
      t = t.reshape(reshape[hf])
    if qtype is not None and t.ndim == 2:
      w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, t)
  if f['model.rope_factors']:  # Llama 3's scaling, as llama.cpp's converter writes it
    w.add_tensor('rope_freqs.weight', np.asarray(f['model.rope_factors'], np.float32))
  for name, t in (extra or {}).items():
    w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def write_hf(directory, tensors, fields=None, shards=1, architecture='LlamaForCausalLM',
             transformers5=False, config_extra=None):
  """A Hugging Face directory: config.json, safetensors (sharded with an index when shards > 1),
  tokenizer.json and tokenizer_config.json. `transformers5`: config.json as transformers 5 writes
  it (the rotary base inside rope_parameters); `config_extra` is merged into config.json."""
  from safetensors.numpy import save_file
  from mtp_jax.pretrained import tokenizer as tok_lib
  f = {**LLAMA, **(fields or {})}
  os.makedirs(directory, exist_ok=True)
  model_type = {'Qwen2ForCausalLM': 'qwen2', 'Qwen3ForCausalLM': 'qwen3'}.get(architecture, 'llama')
  config = {'architectures': [architecture], 'model_type': model_type,
            'hidden_size': f['model.d_model'], 'num_hidden_layers': f['model.num_layers'],
            'num_attention_heads': f['model.num_heads'],
            'num_key_value_heads': f['model.num_kv_heads'], 'intermediate_size': f['model.mlp_dim'],
            'rope_theta': f['model.rope_theta'], 'rms_norm_eps': f['model.norm_eps'],
            'tie_word_embeddings': f['model.tie_embeddings'], 'vocab_size': f['data.vocab_size'],
            'max_position_embeddings': 256, 'hidden_act': 'silu', 'eos_token_id': 263}
  if f['model.head_dim']:
    config['head_dim'] = f['model.head_dim']
  if transformers5:
    config['rope_parameters'] = {'rope_theta': config.pop('rope_theta'), 'rope_type': 'default'}
  config.update(config_extra or {})
  with open(os.path.join(directory, 'config.json'), 'w') as out:
    json.dump(config, out)
  names = sorted(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(directory, 'model.safetensors'))
  else:
    weight_map = {}
    for s in range(shards):
      part = names[s::shards]
      file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
      save_file({n: tensors[n] for n in part}, os.path.join(directory, file))
      weight_map.update({n: file for n in part})
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as out:
      json.dump({'metadata': {}, 'weight_map': weight_map}, out)
  tokens, merges = byte_tokens()
  tokenizer = tok_lib.from_gguf_metadata('test', tokens=tokens, merges=merges,
                                         token_types=[3 if t.startswith('<|') else 1 for t in tokens],
                                         model='gpt2', pre='default', add_bos=False, bos_id=None)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as out:
    json.dump({'chat_template': CHAT, 'eos_token': '<|im_end|>'}, out)
  return str(directory)


def numpy_llama_logits(tensors, tokens, fields=None) -> np.ndarray:
  """Llama's forward pass over one sequence in float64 NumPy, from HF-layout tensors: RMSNorm,
  rotate-half RoPE, grouped-query causal attention (with Qwen2's q, k and v biases and Qwen3's q
  and k norms where the tensors have them), SwiGLU, tied or separate output layer."""
  f = {**LLAMA, **(fields or {})}
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  H, K, D = f['model.num_heads'], f['model.num_kv_heads'], f['model.d_model']
  E, T, eps = f['model.head_dim'] or D // H, len(tokens), f['model.norm_eps']

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

  inv = f['model.rope_theta'] ** (-np.arange(0, E, 2) / E)
  if f['model.rope_factors']:  # Llama 3's scaling
    inv = inv / np.asarray(f['model.rope_factors'])
  angle = np.arange(T)[:, None] * inv[None]
  cos, sin = np.concatenate([np.cos(angle)] * 2, -1), np.concatenate([np.sin(angle)] * 2, -1)

  def rotate(x):  # x: heads x T x E
    half = np.concatenate([-x[..., E // 2:], x[..., :E // 2]], -1)
    return x * cos + half * sin

  x = t['model.embed_tokens.weight'][tokens]
  for i in range(f['model.num_layers']):
    p = f'model.layers.{i}.'
    h = norm(x, t[p + 'input_layernorm.weight'])
    proj = lambda n: (h @ t[p + f'self_attn.{n}_proj.weight'].T
                      + t.get(p + f'self_attn.{n}_proj.bias', 0))
    qk_norm = lambda x, n: norm(x, t[p + f'self_attn.{n}_norm.weight']) if f['model.qk_norm'] else x
    q = rotate(qk_norm(proj('q').reshape(T, H, E), 'q').transpose(1, 0, 2))
    k = rotate(qk_norm(proj('k').reshape(T, K, E), 'k').transpose(1, 0, 2))
    v = proj('v').reshape(T, K, E).transpose(1, 0, 2)
    k, v = np.repeat(k, H // K, 0), np.repeat(v, H // K, 0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(E)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + (probs @ v).transpose(1, 0, 2).reshape(T, H * E) @ t[p + 'self_attn.o_proj.weight'].T
    h = norm(x, t[p + 'post_attention_layernorm.weight'])
    gate = h @ t[p + 'mlp.gate_proj.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ t[p + 'mlp.up_proj.weight'].T)) @ \
        t[p + 'mlp.down_proj.weight'].T
  out = t['model.embed_tokens.weight'] if f['model.tie_embeddings'] else t['lm_head.weight']
  return norm(x, t['model.norm.weight']) @ out.T


def pretrained_config_file(path, source, fields: dict) -> str:
  """A config file as a user writes one for a model file: base.pretrained(source), then each
  field of `fields` ({'model.max_seq_len': 128, ...}) set."""
  lines = ['from configs import base', '', '', 'def get_config():',
           f'  c = base.pretrained({str(source)!r})']
  lines += [f'  c.{field} = {value!r}' for field, value in fields.items()]
  path.write_text('\n'.join(lines + ['  return c', '']))
  return str(path)


def heads_config_file(tmp_path, **fields) -> str:
  """A config file training two heads on chats and features a tiny random trunk writes;
  `fields` ({'data.self_tokens': 500}) change it."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  return pretrained_config_file(tmp_path / 'heads.py', path, {
      'model.max_seq_len': 128, 'mtp.depth': 2, 'mtp.init_from': 'last_block',
      'train.freeze_trunk': True, 'train.head_loss': 'distill', 'train.distill_topk': 4,
      'data.sources': 'self', 'data.features': True, 'data.self_tokens': 300,
      'data.self_answer_len': 16, 'data.valid_fraction': 0.3, 'train.steps': 2,
      'train.batch_size': 4, 'train.seq_len': 16, 'train.warmup_steps': 1,
      'train.eval_every': 2, 'train.checkpoint_every': 2, 'decode.eval_prompts': 0, **fields})


def pretrained_config(source, **overrides):
  """configs/base.pretrained(source) shrunk for tests: tiny training and decoding settings."""
  from configs import base as base_cfg
  c = base_cfg.pretrained(source)
  c.model.max_seq_len = 128
  c.mtp.depth = 2
  c.train.steps = 3
  c.train.batch_size = 4
  c.train.seq_len = 16
  c.train.warmup_steps = 1
  c.train.checkpoint_every = 3
  c.train.eval_every = 3
  c.train.eval_batches = 1
  c.train.log_every = 1
  c.decode.eval_prompts = 0
  c.decode.max_new_tokens = 8
  return apply_overrides(c, overrides)
