"""Config checking and the typed model hyperparameters that modules take instead of a ConfigDict.

`validate` runs before anything is compiled or written; every failure is one line naming the field.
"""

import dataclasses
import math
import os
import stat
import tempfile

# No JAX here: launch.py checks a config with this module before it imports JAX, so bad input is
# reported in a second.
KINDS = ('sequential', 'parallel', 'medusa')
ATTENTION = ('einsum', 'fused')
DTYPES = ('float32', 'bfloat16')
MAX_COUNT = 2**31 - 1  # steps and sizes: what the step counter (int32) holds
# float32's largest number and smallest normal one: the number fields are used in float32
FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38
HEAD_LOSSES = ('data', 'distill')
DRAFT_DTYPES = ('float32', 'bfloat16', 'int8', 'q4_1')  # decode.draft_dtype


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  dtype: str
  tie_embeddings: bool
  rope_theta: float
  max_seq_len: int
  norm_eps: float
  remat: bool
  mtp_kind: str
  mtp_depth: int
  head_mlp_dim: int  # 0: each kind's own default (see heads.py)
  attention: str
  head_blocks: int = 1  # Transformer blocks in each sequential module or parallel head
  kernels: bool = False  # decoding: native CPU kernels for few-row products and cache attention
  # with kernels: every row's product its own however many rows (kernels.rows_matmul); False
  # lets XLA's faster dot take products past kernels.MAX_UNROLLED_ROWS rows (writing data, where
  # no row is compared with another decoding's). The norms' fixed-order sums go with `kernels`.
  exact_products: bool = True
  feature_layers: tuple = ()  # blocks whose outputs follow h0 in the trunk's features
  detach_chain: bool = False  # training: depth k's loss sends no gradient into modules < k
  qkv_bias: bool = False  # biases on q, k and v (Qwen2)
  qk_norm: bool = False  # q and k RMS-normalised per head (Qwen3)
  head_width: int = 0  # model.head_dim: an attention head's width; 0: d_model / num_heads
  rope_factors: tuple = ()  # what divides each rotary frequency (Llama 3's scaling); (): none

  @property
  def feature_dim(self) -> int:
    """Width of the trunk's features: its last hidden state, then each of feature_layers'."""
    return self.d_model * (1 + len(self.feature_layers))

  @property
  def head_dim(self) -> int:
    return self.head_width or self.d_model // self.num_heads

  @property
  def mtp_chains(self) -> bool:
    """Whether depth k reads depth k-1's hidden state and token t_{i+k} (sequential modules);
    otherwise every head reads only the trunk's last hidden state."""
    return self.mtp_kind == 'sequential'

  @property
  def mtp_attends(self) -> bool:
    """Whether the heads attend over the sequence (and so keep a KV cache when decoding)."""
    return self.mtp_kind != 'medusa'

  @property
  def compute_dtype(self):
    import jax.numpy as jnp
    return getattr(jnp, self.dtype)  # one of DTYPES (validate)

  @classmethod
  def from_config(cls, config) -> 'ModelConfig':
    m = config.model
    mlp_dim = m.mlp_dim or default_mlp_dim(m.d_model)
    return cls(
        vocab_size=config.data.vocab_size, d_model=m.d_model, num_layers=m.num_layers,
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, mlp_dim=mlp_dim, dtype=m.dtype,
        tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta, max_seq_len=m.max_seq_len,
        norm_eps=m.norm_eps, remat=m.remat, mtp_kind=config.mtp.kind, mtp_depth=config.mtp.depth,
        head_mlp_dim=config.mtp.head_mlp_dim, attention=m.attention,
        head_blocks=config.mtp.head_blocks, detach_chain=config.mtp.detach_chain,
        feature_layers=parse_layers(config.mtp.feature_layers), qkv_bias=m.qkv_bias,
        qk_norm=m.qk_norm, head_width=m.head_dim,
        rope_factors=tuple(float(f) for f in m.rope_factors))


def default_mlp_dim(d_model: int) -> int:
  """The MLP width model.mlp_dim = 0 picks: 8/3 * d_model, rounded up to a multiple of 64."""
  return 64 * -(-(8 * d_model // 3) // 64)


def same_widths(fields: dict) -> dict:
  """`fields` (dotted config names: model.d_model, model.mlp_dim, mtp.kind, mtp.head_mlp_dim,
  as ints or their strings) with each 0 that stands for a width replaced by that width (the
  trunk's MLP width for the heads of kinds built of blocks; a Medusa head of width 0 is another
  layer), so that two configs of one model compare equal."""
  out = dict(fields)
  mlp, d_model, head = (out.get(k) for k in ('model.mlp_dim', 'model.d_model', 'mtp.head_mlp_dim'))
  if str(mlp) == '0' and str(d_model).isdigit():
    out['model.mlp_dim'] = mlp = type(mlp)(default_mlp_dim(int(d_model)))
  if str(head) == '0' and mlp is not None and out.get('mtp.kind') != 'medusa':
    out['mtp.head_mlp_dim'] = type(head)(mlp)
  return out


_PROMPT_FILES: dict[tuple, list[str]] = {}  # _file_key -> lines, as this process read them


def _file_key(path: str) -> tuple | None:
  """A regular file as it is now (rewritten, it is another), a pipe or device by its path."""
  try:
    s = os.stat(path)
  except OSError:
    return None
  return (path, s.st_ino, s.st_mtime_ns, s.st_size) if stat.S_ISREG(s.st_mode) else (path,)


def prompt_lines(path: str, name: str, empty: str = 'has no prompt',
                 ids: bool = True) -> list[str]:
  """The non-blank lines of a prompt file, one prompt a line (`name`: the flag or field that
  gives it; `empty`: what the error says of a file without one); ConfigError where the file is
  missing, not UTF-8 text or holds no prompt, or, without `ids`, where a line is token ids
  ('ids: 1 2 3', which only decoding's prompts take). A file is read once a process while it
  stays the same: the prompts checked before the first mode runs are the ones used, and a pipe
  (--prompt_file /dev/stdin) can be given."""
  lines = _read_prompt_lines(path, name, empty)
  if not ids:
    for i, line in enumerate(lines, 1):
      if line.startswith('ids:'):
        raise ConfigError(f"{name}: prompt {i} of {path} is token ids ('ids: ...'), which only "
                          'demo, generate and decode.prompts take; give these prompts as text')
  return lines


def _read_prompt_lines(path: str, name: str, empty: str) -> list[str]:
  key = _file_key(path)
  if key in _PROMPT_FILES:
    return list(_PROMPT_FILES[key])
  try:
    with open(path, encoding='utf-8-sig') as f:  # a byte-order mark is no part of the first
      lines = [line.rstrip('\n') for line in f if line.strip()]
  except FileNotFoundError:
    raise ConfigError(f"{name}: no file '{path}'") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f'{name}: cannot read {path!r} as UTF-8 text of prompts ({e})') from None
  if not lines:
    raise ConfigError(f'{name}: {path} {empty}')
  if key is not None:
    _PROMPT_FILES[key] = lines
  return list(lines)


def unwritable(path: str, name: str) -> str | None:
  """Why this user cannot make files in the folder `path` (given as `name`; made where missing),
  as one line, or None."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  problem = f'{name} {path}: {existing} is not a directory this user can write in'
  if not os.access(existing, os.W_OK | os.X_OK):
    return problem
  try:  # os.access says yes to root everywhere, /proc and read-only mounts included
    os.rmdir(tempfile.mkdtemp(dir=existing, prefix='.mtp_jax-'))
  except OSError:
    return problem
  return None


def folder_problem(path: str, name: str) -> str | None:
  """Why `path` (given as `name`) cannot be a folder to read and make things in (a file, a link
  to nothing, a file above it), as one line, or None."""
  existing = os.path.abspath(path)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if os.path.isdir(existing):
    return None
  where = f'{name} {path}' + ('' if existing == os.path.abspath(path) else f': {existing}')
  if os.path.islink(existing) and not os.path.exists(existing):
    return f'{where} is a link to {os.readlink(existing)}, which does not exist'
  return f'{where} is a file, not a directory'


def write_problem(path: str, name: str) -> str | None:
  """Why `path` (given as `name`) cannot be a folder to make things in, as one line, or None."""
  return folder_problem(path, name) or unwritable(path, name)


def check_address(address: str) -> None:
  """distributed.coordinator_address: '' (one process), 'auto' or 'host:port'."""
  host, _, port = address.rpartition(':')
  _check(address in ('', 'auto')
         or (host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535),
         "distributed.coordinator_address must be '' (one process), 'auto' or 'host:port' (a port "
         f'in 1..65535), got {address!r}')


def stored_head_dim(d_model: int, num_heads: int, head_dim: int) -> int:
  """model.head_dim as configs, model files' fields and checkpoints hold it: 0 where the heads
  are d_model / num_heads wide (so the configs of such models, from before the field, keep their
  keys), else the width."""
  return 0 if head_dim * num_heads == d_model else head_dim


def rotary_frequencies(theta: float, half: int):
  """The rotary angle per position of each of a head's `half` pairs, unscaled, in float64."""
  import numpy as np  # here: the checks before JAX is imported need no NumPy (0.1 s)
  return theta ** (-np.arange(half, dtype=np.float64) / half)


def block_name(j: int) -> str:
  """The name of an MTP head's block j (from 0) in the params: 'block', then 'block_1', ..."""
  return 'block' if j == 0 else f'block_{j}'


def parse_layers(text: str) -> tuple[int, ...]:
  """'I,J,...' -> (I, J, ...); raises ConfigError on an entry that is not an integer."""
  try:
    return tuple(int(item) for item in str(text).split(',') if item.strip())
  except ValueError:
    raise ConfigError(f"mtp.feature_layers must be block indices 'I,J,...', got '{text}'") from None


def as_flags(config, skip=()) -> list[str]:
  """The config as launch.py's --config.FIELD=VALUE flags (sections in `skip` left out), so a
  driver can run launch.py on exactly this config."""
  flat = []
  for name, value in config.items():
    if name in skip:
      continue
    if hasattr(value, 'items'):
      flat += [f'--config.{name}.{k}={v}' for k, v in value.items()]
    else:
      flat.append(f'--config.{name}={value}')
  return flat


def apply_overrides(config, overrides: dict):
  """A copy of `config` with each field named in `overrides` ('section.field', or 'field' at the
  top) set to its value. A name the config lacks raises ConfigError, as a misspelled
  --config.FIELD flag fails, instead of adding a field nothing reads."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *sections, field = key.split('.')
    node = c
    for name in sections:
      node = node.get(name)
      if not hasattr(node, 'items'):
        break
    if not hasattr(node, 'items') or field not in node:
      raise ConfigError(f"'{key}' is not a config field")
    node[field] = value
  return c


def parse_schedule(text: str) -> list[tuple[int, float]]:
  """'STEP:WEIGHT,...' -> sorted [(step, weight)]; raises ConfigError on a malformed entry."""
  pairs = []
  for item in filter(None, (s.strip() for s in text.split(','))):
    try:
      step, weight = item.split(':')
      pairs.append((int(step), float(weight)))
    except ValueError:
      raise ConfigError(f"mtp.loss_weight_schedule: '{item}' is not STEP:WEIGHT "
                        "(e.g. '10000:0.1')") from None
  return sorted(pairs)


def positive_ints(values: list[str], flag: str, allow_empty: bool = False) -> list[int]:
  """A list flag's values (absl's DEFINE_list) as distinct positive integers of at most MAX_COUNT,
  in order, at least one unless `allow_empty`; ConfigError naming the flag otherwise."""
  if not values and not allow_empty:
    raise ConfigError(f'{flag} takes positive integers, got none')
  if not all(v.isascii() and v.isdigit() and int(v) > 0 for v in values):  # not '²': isdigit
    raise ConfigError(f'{flag} takes positive integers, got {",".join(values)}')
  ints = [int(v) for v in values]
  if max(ints, default=0) > MAX_COUNT:
    raise ConfigError(f'{flag}: {max(ints)} is past {MAX_COUNT}, the most a count can be')
  if len(set(ints)) < len(ints):  # each would be timed or swept twice
    raise ConfigError(f'{flag} takes each value once, got {",".join(values)}')
  return ints


def _numbers(config, prefix: str = ''):
  """(dotted name, value) of every float field, in sections and in lists of numbers."""
  for key, value in config.items():
    name = prefix + key
    if hasattr(value, 'items'):
      yield from _numbers(value, name + '.')
    elif isinstance(value, float):
      yield name, value
    elif isinstance(value, (list, tuple)):
      yield from ((name, v) for v in value if isinstance(v, float))


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


# The pieces text is cut into for one trunk forward each when its features are cached.
FEATURE_PIECE_LEN = 512


def validate(config) -> None:
  """Checks every field that could fail later; raises ConfigError with one line. How the
  batch and the model split over the devices is sharding.check_mesh's to check. Writes
  mtp.feature_layers in its canonical form ('I,J,...') and model.head_dim as 0 where it is
  d_model / num_heads."""
  m, t, d, mtp = config.model, config.train, config.decode, config.mtp
  for name, value in _numbers(config):  # inf passes every bound below (train.lr=inf: > 0)
    no_clipping = name == 'train.grad_clip' and value == math.inf
    _check(math.isfinite(value) or no_clipping, f'{name} must be a finite number, got {value}')
    _check(abs(value) <= FLOAT32_MAX or no_clipping,  # it would turn inf where it is used
           f'{name}={value} is past float32\'s largest number ({FLOAT32_MAX:.4g})')
  for name, value in [('model.d_model', m.d_model), ('model.num_layers', m.num_layers),
                      ('model.num_heads', m.num_heads), ('model.num_kv_heads', m.num_kv_heads),
                      ('model.max_seq_len', m.max_seq_len), ('data.vocab_size', config.data.vocab_size),
                      ('train.steps', t.steps), ('train.batch_size', t.batch_size),
                      ('train.seq_len', t.seq_len), ('train.grad_accum', t.grad_accum),
                      ('train.checkpoint_every', t.checkpoint_every),
                      ('train.keep_checkpoints', t.keep_checkpoints),
                      ('train.eval_every', t.eval_every), ('train.eval_batches', t.eval_batches),
                      ('train.log_every', t.log_every), ('decode.max_new_tokens', d.max_new_tokens),
                      ('decode.prompt_len', d.prompt_len),
                      ('decode.bench_prompts', d.bench_prompts), ('mtp.head_blocks', mtp.head_blocks)]:
    _check(isinstance(value, int) and value >= 1, f'{name} must be an integer >= 1, got {value!r}')
    _check(value <= MAX_COUNT, f'{name}={value} is past {MAX_COUNT}, the most a count can be')
  _check(isinstance(config.seed, int) and 0 <= config.seed < 2**32,  # jax.random.key keeps 32
         f'seed must be an integer in 0..{2**32 - 1}, got {config.seed!r}')  # bits of larger ones
  for name, value in [('model.head_dim', m.head_dim), ('model.mlp_dim', m.mlp_dim),
                      ('mtp.depth', mtp.depth), ('mtp.head_mlp_dim', mtp.head_mlp_dim)]:
    _check(not isinstance(value, int) or value <= MAX_COUNT,  # the sizes that may be 0
           f'{name}={value} is past {MAX_COUNT}, the most a count can be')
  _check(isinstance(m.head_dim, int) and m.head_dim >= 0 and m.head_dim % 2 == 0,
         f'model.head_dim must be an even integer >= 0 (0: d_model / num_heads), got '
         f'{m.head_dim!r}')
  m.head_dim = stored_head_dim(m.d_model, m.num_heads, m.head_dim)
  if not m.head_dim:
    _check(m.d_model % m.num_heads == 0,
           f'model.num_heads={m.num_heads} must divide model.d_model={m.d_model}')
    _check((m.d_model // m.num_heads) % 2 == 0,
           f'model.d_model / model.num_heads = {m.d_model // m.num_heads} must be even for RoPE')
  _check(m.num_heads % m.num_kv_heads == 0,
         f'model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}')
  _check(m.mlp_dim >= 0, f'model.mlp_dim must be >= 0 (0 picks 8/3 * d_model), got {m.mlp_dim}')
  _check(m.dtype in DTYPES, f"model.dtype must be one of {sorted(DTYPES)}, got '{m.dtype}'")
  _check(m.attention in ATTENTION,
         f"model.attention must be one of {', '.join(ATTENTION)}, got '{m.attention}'")
  _check(m.rope_theta > 0, f'model.rope_theta must be > 0, got {m.rope_theta}')
  half = (m.head_dim or m.d_model // m.num_heads) // 2
  bad = [f for f in m.rope_factors
         if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0]
  _check(not m.rope_factors or (len(m.rope_factors) == half and not bad),
         f'model.rope_factors must be empty or {half} numbers > 0 (one per rotary frequency), got '
         + (f'{bad[0]!r} among them' if bad else f'{len(m.rope_factors)}'))
  _check(m.norm_eps > 0, f'model.norm_eps must be > 0, got {m.norm_eps}')
  _check(isinstance(m.qkv_bias, bool), f'model.qkv_bias must be True or False, got {m.qkv_bias!r}')
  _check(isinstance(m.qk_norm, bool), f'model.qk_norm must be True or False, got {m.qk_norm!r}')
  _check(mtp.kind in KINDS, f"mtp.kind must be one of {', '.join(KINDS)}, got '{mtp.kind}'")
  _check(isinstance(mtp.depth, int) and mtp.depth >= 0,
         f'mtp.depth must be an integer >= 0, got {mtp.depth!r}')
  _check(isinstance(mtp.head_mlp_dim, int) and mtp.head_mlp_dim >= 0,
         f'mtp.head_mlp_dim must be an integer >= 0 (0: the kind\'s default), '
         f'got {mtp.head_mlp_dim!r}')
  _check(isinstance(mtp.detach_chain, bool)
         and (not mtp.detach_chain or mtp.kind == 'sequential'),
         f'mtp.detach_chain must be True or False, and True only for sequential modules (the '
         f'other kinds do not chain); got {mtp.detach_chain!r} with mtp.kind={mtp.kind}')
  _check(mtp.head_blocks == 1 or mtp.kind != 'medusa',
         f'mtp.head_blocks={mtp.head_blocks}: Medusa heads have no blocks')
  layers = parse_layers(mtp.feature_layers)
  _check(not layers or (mtp.kind == 'sequential' and mtp.depth >= 1),
         f'mtp.feature_layers feeds the first sequential module; mtp.kind={mtp.kind} with '
         f'mtp.depth={mtp.depth} has none')
  _check(all(0 <= i < m.num_layers - 1 for i in layers) and len(set(layers)) == len(layers),
         f'mtp.feature_layers must be distinct block indices in 0..{m.num_layers - 2} (the last '
         f'block\'s output is the trunk\'s last hidden state, always read), got '
         f"'{mtp.feature_layers}'")
  # One spelling from here on ('2, 15,27' and '2,15,27' are one model), so checkpoints and heads
  # files compare the field as a string.
  mtp.feature_layers = ','.join(map(str, layers))
  _check(mtp.loss_weight >= 0, f'mtp.loss_weight must be >= 0, got {mtp.loss_weight}')
  schedule = parse_schedule(mtp.loss_weight_schedule)
  _check(all(0 <= w <= FLOAT32_MAX and 0 <= s <= MAX_COUNT for s, w in schedule),
         f'mtp.loss_weight_schedule: steps must be in 0..{MAX_COUNT} and weights finite and >= 0, '
         f"got '{mtp.loss_weight_schedule}'")
  steps = [s for s, _ in schedule]  # sorted
  twice = [a for a, b in zip(steps, steps[1:]) if a == b]
  if twice:  # which of two weights from one step on would be moot
    raise ConfigError(f"mtp.loss_weight_schedule: step {twice[0]} is given twice in "
                      f"'{mtp.loss_weight_schedule}'")
  _check(t.seq_len + mtp.depth <= m.max_seq_len,
         f'train.seq_len + mtp.depth = {t.seq_len + mtp.depth} exceeds model.max_seq_len='
         f'{m.max_seq_len} (the RoPE range)')
  _check(t.batch_size % t.grad_accum == 0,
         f'train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}')
  _check(t.lr > 0, f'train.lr must be > 0, got {t.lr}')
  _check(isinstance(t.warmup_steps, int) and 0 <= t.warmup_steps <= MAX_COUNT,
         f'train.warmup_steps must be an integer in 0..{MAX_COUNT}, got {t.warmup_steps!r}')
  _check(isinstance(t.inject_nan_step, int) and (t.inject_nan_step == -1
                                                 or 1 <= t.inject_nan_step <= MAX_COUNT),
         f'train.inject_nan_step must be -1 (none) or a step in 1..{MAX_COUNT}, got '
         f'{t.inject_nan_step!r}')
  _check(0 <= t.min_lr_ratio <= 1, f'train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}')
  _check(t.weight_decay >= 0, f'train.weight_decay must be >= 0, got {t.weight_decay}')
  _check(0 <= t.b1 < 1 and 0 <= t.b2 < 1, 'train.b1 and train.b2 must be in [0, 1)')
  _check(t.grad_clip > 0, f'train.grad_clip must be > 0, got {t.grad_clip}')
  _check(t.nonfinite in ('stop', 'skip'), f"train.nonfinite must be stop or skip, got '{t.nonfinite}'")
  _check(isinstance(t.remat_logits, bool),
         f'train.remat_logits must be True or False, got {t.remat_logits!r}')
  _check(t.dtype in ('', 'auto', *DTYPES),
         f"train.dtype must be '' (model.dtype), 'auto' or one of {sorted(DTYPES)}, "
         f"got '{t.dtype}'")
  _check(0 < config.data.valid_fraction < 1,
         f'data.valid_fraction must be in (0, 1), got {config.data.valid_fraction}')
  _check(bool(config.data.sources.strip()), "data.sources is empty (use 'stdlib', 'self' or paths)")
  dist = config.distributed
  check_address(dist.coordinator_address)
  if dist.coordinator_address in ('', 'auto'):  # one process, or the cluster's own count
    _check((dist.num_processes, dist.process_id) == (1, 0),
           f'distributed.num_processes={dist.num_processes!r} and process_id='
           f'{dist.process_id!r} are read only with a coordinator_address of host:port ('
           + ("'auto' takes them from the cluster" if dist.coordinator_address else
              "'' is one process") + '); leave them 1 and 0')
  if config.data.cache_dir:
    problem = write_problem(config.data.cache_dir, 'data.cache_dir')
    _check(not problem, problem)
  _check(not config.data.tokenizer or os.path.isfile(config.data.tokenizer),
         f"data.tokenizer: no file '{config.data.tokenizer}'")
  bad = [m for m in config.run_after_train.split(',') if m not in ('', 'demo', 'bench', 'eval')]
  _check(not bad, f'run_after_train: {bad[0]!r} is not one of demo, bench, eval' if bad else '')
  validate_pretrained(config)
  validate_decode(config)


def validate_pretrained(config) -> None:
  """The fields that train heads on a pretrained trunk."""
  t, data, pretrained = config.train, config.data, bool(config.model.init_from)
  _check(t.head_loss in HEAD_LOSSES,
         f"train.head_loss must be one of {', '.join(HEAD_LOSSES)}, got '{t.head_loss}'")
  _check(isinstance(t.distill_topk, int) and 1 <= t.distill_topk <= config.data.vocab_size,
         f'train.distill_topk must be in 1..data.vocab_size={config.data.vocab_size}, got '
         f'{t.distill_topk!r}')
  _check(isinstance(t.feature_weight, (int, float)) and 0 <= t.feature_weight < math.inf,
         f'train.feature_weight must be a number >= 0, got {t.feature_weight!r}')
  _check(not t.feature_weight or config.mtp.depth >= 1,
         'train.feature_weight weights the MTP heads\' feature gap, but mtp.depth=0')
  _check(isinstance(t.mask_rows, bool), f'train.mask_rows must be True or False, got '
         f'{t.mask_rows!r}')
  _check(isinstance(t.draft_vocab, int) and 0 <= t.draft_vocab <= config.data.vocab_size,
         f'train.draft_vocab must be in 0..data.vocab_size={config.data.vocab_size} (0: all), '
         f'got {t.draft_vocab!r}')
  _check(not t.freeze_trunk or pretrained,
         'train.freeze_trunk needs a pretrained trunk (model.init_from)')
  _check(not t.freeze_trunk or config.mtp.depth >= 1,
         'train.freeze_trunk trains only the MTP heads, but mtp.depth=0')
  _check(not data.features or t.freeze_trunk,
         'data.features caches the trunk\'s features, so it needs train.freeze_trunk=True')
  self_gen = 'self' in [s.strip() for s in data.sources.split(',')]
  _check(not data.features or self_gen or config.model.max_seq_len >= FEATURE_PIECE_LEN,
         f'data.features runs the trunk over text in pieces of {FEATURE_PIECE_LEN} tokens, past '
         f'model.max_seq_len={config.model.max_seq_len} (the RoPE range); use model.max_seq_len '
         f'>= {FEATURE_PIECE_LEN}')
  _check(not self_gen or data.sources.strip() == 'self',
         "data.sources: 'self' (data the trunk generates) cannot be mixed with other sources")
  _check(not self_gen or pretrained, "data.sources=self needs a pretrained trunk (model.init_from)")
  _check(isinstance(data.self_tokens, int) and data.self_tokens >= 1,
         f'data.self_tokens must be an integer >= 1, got {data.self_tokens!r}')
  check_temperature(data.self_temperature, 'data.self_temperature', 'greedy answers')
  if data.self_prompts:  # read here, before anything is written
    prompt_lines(data.self_prompts, 'data.self_prompts', 'holds no user turn', ids=False)
  _check(isinstance(data.self_answer_len, int) and data.self_answer_len >= 1,
         f'data.self_answer_len must be an integer >= 1, got {data.self_answer_len!r}')


def check_temperature(value: float, name: str, zero: str) -> None:
  """0, or a positive number float32 holds, from its smallest normal one (one smaller would be 0
  when divided into, every probability then NaN, not the greedy choice) to its largest."""
  _check(value == 0 or FLOAT32_TINY <= value <= FLOAT32_MAX,
         f'{name} must be 0 ({zero}) or from {FLOAT32_TINY:.4g} (float32\'s smallest normal '
         f'number) to {FLOAT32_MAX:.4g}, got {value}')


def validate_decode(config) -> None:
  d, depth = config.decode, config.mtp.depth
  _check(d.method in ('ar', 'mtp'), f"decode.method must be ar or mtp, got '{d.method}'")
  check_temperature(d.temperature, 'decode.temperature', 'greedy')
  _check(0 < d.top_p <= 1, f'decode.top_p must be in (0, 1], got {d.top_p}')
  _check(d.top_k >= 0, f'decode.top_k must be >= 0 (0: off), got {d.top_k}')
  _check(d.draft_len == -1 or 1 <= d.draft_len <= max(depth, 1),
         f'decode.draft_len must be in 1..mtp.depth={depth} (or -1 for all), got {d.draft_len}')
  _check(isinstance(d.eval_prompts, int) and d.eval_prompts >= 0,
         f'decode.eval_prompts must be an integer >= 0 (0: no decoding while training), got '
         f'{d.eval_prompts!r}')
  _check(isinstance(d.bench_rounds, int) and d.bench_rounds >= 1,
         f'decode.bench_rounds must be an integer >= 1, got {d.bench_rounds!r}')
  if d.prompts:  # read here, before anything is written
    prompt_lines(d.prompts, 'decode.prompts')
  _check(isinstance(d.candidates, int) and d.candidates >= 1,
         f'decode.candidates must be an integer >= 1, got {d.candidates!r}')
  _check(isinstance(d.candidate_depth, int) and 1 <= d.candidate_depth <= max(depth, 1),
         f'decode.candidate_depth must be an integer in 1..mtp.depth={depth}, got '
         f'{d.candidate_depth!r}')
  _check(isinstance(d.draft_vocab, int) and 0 <= d.draft_vocab <= config.data.vocab_size,
         f'decode.draft_vocab must be in 0..data.vocab_size={config.data.vocab_size} (0: all), '
         f'got {d.draft_vocab!r}')
  drafts = d.draft_vocab or config.data.vocab_size
  _check(d.candidates <= drafts, f'decode.candidates={d.candidates}: the draft vocabulary holds '
         f'{drafts} tokens, fewer than that many different first drafts')
  _check(isinstance(d.tiles, bool), f'decode.tiles must be True or False, got {d.tiles!r}')
  _check(d.draft_dtype in DRAFT_DTYPES,
         f"decode.draft_dtype must be one of {', '.join(DRAFT_DTYPES)}, got {d.draft_dtype!r}")


def check_mtp_decoding(config) -> None:
  """For modes that decode with decode.method: mtp needs heads (training a D = 0 baseline
  with the default decode settings is fine)."""
  _check(config.decode.method == 'ar' or config.mtp.depth >= 1,
         'decode.method=mtp needs MTP heads, but mtp.depth=0; use decode.method=ar')
  _check(config.decode.candidates == 1 or draft_len(config) >= 1,
         f'decode.candidates={config.decode.candidates} verifies alternatives to the first MTP '
         'draft, and decode.method=ar drafts none; leave it 1')


def draft_len(config) -> int:
  """S for decode.method=mtp (decode.draft_len, -1 meaning every head); 0 for ar."""
  if config.decode.method == 'ar':
    return 0
  return config.mtp.depth if config.decode.draft_len == -1 else config.decode.draft_len
