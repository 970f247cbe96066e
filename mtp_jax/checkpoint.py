"""Saving and restoring the train state with Orbax, plus the run's config.json, so that a run
resumes from its newest intact checkpoint and refuses a workdir that holds a different model.
"""

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtp_jax import atomic
from mtp_jax.config import same_widths


MANIFEST = 'mtp_jax_files.json'  # beside Orbax's files in each step: their names and sizes


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: none intact, or one of a different model."""


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _reason(error: BaseException) -> str:
  """One short line for an exception. Orbax wraps TensorStore's error in one whose message is
  a page of spec, so the innermost cause is the one that says what is wrong."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0] if lines else ""}'
  return text if len(text) <= 160 else text[:157] + '...'


class Checkpointer:
  """Numbered checkpoints under WORKDIR/checkpoints, each holding the train state ('state')
  and a small JSON dict ('meta'); only the newest `keep` remain. The directory is made by the
  first save, so a run that only reads (a decoding mode, or one stopped by bad input) writes
  nothing."""

  def __init__(self, workdir: str, *, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False),
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reload(self) -> None:
    """Reads the steps on disk again: Orbax's manager keeps those it saw when it was made, so a
    run that waited for another to finish in its workdir would restore from before that run's
    saves, and train over them."""
    self._manager.reload()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict | None = None) -> None:
    """Starts saving `state` (any pytree of arrays) and `meta` as `step`, whatever Orbax's own
    save policy would say. It returns once the arrays are copied to host, so the caller may
    donate or overwrite them; the files are complete after wait(). Saving a step that exists
    raises."""
    self.wait()
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
        force=True,
    )

  def wait(self) -> None:
    """Waits for the save in flight, then records the file sizes of every finished step."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in self.all_steps():
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)):
          atomic.write_json(os.path.join(path, MANIFEST), _file_sizes(path))

  def _check_files(self, step: int) -> str | None:
    """What is wrong with `step`'s files against its manifest (None when nothing is, or when
    it has no manifest because the run stopped between the save and the manifest). Checking
    sizes first means a truncated or deleted file is reported plainly, without handing Orbax a
    broken checkpoint (which prints pages of asynchronous read errors)."""
    path = os.path.join(self.directory, str(step))
    try:
      with open(os.path.join(path, MANIFEST)) as f:
        expected = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      return None
    actual = _file_sizes(path)
    for name, size in expected.items():
      if name not in actual:
        return f'{name} is missing'
      if actual[name] != size:
        return f'{name} has {actual[name]} of its {size} bytes'
    return None

  def latest_meta(self) -> dict:
    """The small JSON dict of the latest step, read without its arrays; {} where there is no
    step or it cannot be read (restore_latest_valid reports a damaged one)."""
    step = self.latest_step()
    if step is None:
      return {}
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta or {})
    except Exception:  # Orbax and TensorStore raise many types for a damaged file.
      return {}

  def restore(self, step: int | None, target) -> tuple:
    """Returns (state, meta) of `step` (None: the latest). `target` has the saved structure;
    each leaf, an array or a jax.ShapeDtypeStruct, gives the dtype and, if it has one, the
    sharding to restore onto (a leaf without one gets the sharding it was saved with)."""
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f'no checkpoint in {self.directory}')
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    return restored.state, restored.meta

  def restore_latest_valid(self, target, set_aside: bool = True) -> tuple:
    """Returns (step, state, meta) of the newest checkpoint that restores, or (None, None, {})
    when there is none. Damaged newer steps are reported and, with `set_aside` (a run that goes
    on to save), renamed to STEP.damaged, so that it can save those step numbers again; a mode
    that only reads the workdir (eval, decoding, export) leaves them as they are, since another
    process may still be training there."""
    names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
    for name in sorted(names):
      if ocp.utils.TMP_DIR_SUFFIX in name:
        # Orbax writes a step under this name and renames it when complete; Orbax ignores
        # it, and a new save of the same step replaces it.
        _warn(f'ignoring incomplete checkpoint {name} (its save never finished)')
    steps = self.all_steps()[::-1]
    damaged, found, state, meta = [], None, None, {}
    for step, previous in zip(steps, steps[1:] + [None]):
      then = f'falling back to step {previous}' if previous is not None else 'no step left'
      problem = self._check_files(step)
      if problem is None:
        try:
          state, meta = self.restore(step, target)
        except Exception as e:  # Orbax and TensorStore raise many types for a damaged file.
          problem = _reason(e)
      if problem is None:
        found = step
        break
      _warn(f'checkpoint step {step} is damaged ({problem}); {then}')
      damaged.append(step)
      last_problem = problem
    _agree(found, self.directory)
    if found is None and damaged:
      raise CheckpointError(
          f'every checkpoint in {self.directory} is damaged (steps {damaged}); '
          f'the last problem: {last_problem}')
    if found is not None and set_aside:
      self._set_aside(damaged)
    return found, state, meta

  def _set_aside(self, steps: list[int]) -> None:
    # Renamed rather than deleted: a restore can also fail for a passing reason (a network
    # filesystem error), and the files may still be wanted.
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        aside, n = path + '.damaged', 0
        while os.path.exists(aside):  # one set aside before is kept too
          n += 1
          aside = f'{path}.damaged.{n}'
        os.replace(path, aside)
    ocp.multihost.sync_global_processes('mtp_jax:checkpoint_set_aside')
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def _agree(step: int | None, directory: str) -> None:
  """Every process of a run restores the same step, or all stop: one that read a step the others
  found damaged (a read error on one host) would otherwise train on from another state, or wait
  at a barrier the others never reach."""
  if jax.process_count() == 1:
    return
  every = np.asarray(multihost_utils.process_allgather(
      np.asarray(-1 if step is None else step, np.int64))).ravel().tolist()
  if len(set(every)) > 1:
    by = ', '.join(f'process {i}: {s if s >= 0 else "none"}' for i, s in enumerate(every))
    raise CheckpointError(f'the processes found different checkpoints to restore in {directory} '
                          f'({by}): a step one of them could not read')


def _file_sizes(root: str) -> dict:
  sizes = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name != MANIFEST:
        path = os.path.join(folder, name)
        sizes[os.path.relpath(path, root)] = os.path.getsize(path)
  return sizes



def holds_checkpoints(workdir: str, in_flight: bool = True) -> bool:
  """Whether WORKDIR/checkpoints holds anything: a step, one set aside or, with `in_flight`, one
  being saved (Orbax's temporary folder: another run may be saving its first step; a run that
  holds the workdir knows it was left by a killed one). Until it does, the config.json and
  tokenizer.json a run left there bind no later run."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except FileNotFoundError:
    return False
  return any(in_flight or ocp.utils.TMP_DIR_SUFFIX not in name for name in names)


def save_config(workdir: str, config) -> None:
  """Writes WORKDIR/config.json."""
  atomic.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))


def foreign_config(workdir: str) -> bool:
  """Whether WORKDIR/config.json is there and is not a run's record (a Hugging Face model's, say,
  where the workdir is the model's own directory): a run would write over it."""
  try:
    saved = load_config(workdir)
  except CheckpointError:  # not JSON, not UTF-8, not an object, a directory
    return True
  return saved is not None and not {'model', 'mtp', 'train', 'data'} <= saved.keys()


def load_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:  # JSON's errors and a file not in UTF-8 are ValueErrors
    saved = e
  if not isinstance(saved, dict):
    reason = saved if isinstance(saved, Exception) else 'not a JSON object'
    raise CheckpointError(f'{path} is not a readable run config ({reason}); it records the run '
                          'this workdir holds: restore it, or use another --workdir')
  return saved


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


_ABSENT = object()
# Model fields that change how the parameters are computed, not what they are (max_seq_len sizes
# the rotary table and bounds a decode's cache: a longer generation on trained heads is the same
# model).
COMPUTE_ONLY = ('model.dtype', 'model.remat', 'model.attention', 'model.max_seq_len')
# The fields that define the model a checkpoint holds (a section means all its fields).
MODEL_FIELDS = ('model', 'mtp.kind', 'mtp.depth', 'mtp.head_mlp_dim', 'mtp.head_blocks',
                'mtp.feature_layers', 'data.vocab_size')
# Model-defining fields added after checkpoints were first written, with the value that gives
# the model those checkpoints hold; an older config.json without the field is read as having it.
ADDED_FIELDS = {'mtp.head_mlp_dim': 0, 'mtp.feature_layers': '', 'mtp.head_blocks': 1,
                'model.qkv_bias': False, 'model.qk_norm': False, 'model.head_dim': 0,
                'model.rope_factors': []}


def _show(value) -> str:
  return 'absent' if value is _ABSENT else json.dumps(value)


def _both(saved: dict, config) -> tuple[dict, dict]:
  # Through JSON, so both sides hold the same types (lists, not tuples) as config.json; a width
  # of 0 as the width it picks.
  return (same_widths({**ADDED_FIELDS, **_flatten(saved)}),
          same_widths({**ADDED_FIELDS, **_flatten(json.loads(config.to_json_best_effort()))}))


def _diffs(old: dict, new: dict, keep) -> list[str]:
  """'name: old -> new' for each field whose name `keep` accepts and whose values differ."""
  return [f'{name}: {_show(old.get(name, _ABSENT))} -> {_show(new.get(name, _ABSENT))}'
          for name in sorted(old.keys() | new.keys())
          if keep(name) and old.get(name, _ABSENT) != new.get(name, _ABSENT)]


def _in(name: str, fields) -> bool:
  return any(name == f or name.startswith(f + '.') for f in fields)


def check_compatible(saved: dict, config) -> None:
  """Raises CheckpointError naming every model-defining field (a section means all its
  fields) that differs between the saved config and `config`, or train.freeze_trunk, which
  decides what the optimizer state holds. Other training fields may differ, and so may the
  fields that choose how the same parameters are computed (COMPUTE_ONLY)."""
  old, new = _both(saved, config)
  if old.get('model.init_from') and new.get('model.init_from'):
    # the same file by another path (a trailing slash, relative, moved): its identity, which
    # the checkpoints record, is checked once it is open (train.Session._check_trunk)
    new['model.init_from'] = old['model.init_from']
  diffs = _diffs(old, new, lambda n: _in(n, MODEL_FIELDS) and n not in COMPUTE_ONLY)
  if diffs:
    raise CheckpointError('workdir holds a checkpoint of a different model: ' + ', '.join(diffs))
  frozen = old.get('train.freeze_trunk', False)
  if frozen != new.get('train.freeze_trunk', False):
    held = 'the heads alone' if frozen else 'every parameter'
    raise CheckpointError(
        f'train.freeze_trunk={not frozen}: the workdir\'s run trains with '
        f'train.freeze_trunk={frozen}, and its checkpoints hold optimizer state for {held}; keep '
        f'train.freeze_trunk={frozen} here, or start another workdir from this one\'s '
        '--mode export (model.init_from and mtp.init_from)')


def changed_settings(saved: dict, config) -> list[str]:
  """The fields a resumed run may change (all but the model-defining ones), as 'name: old ->
  new', where `config` differs from the run's saved config; a field the saved config lacks
  (added to the project since) shows as absent."""
  old, new = _both(saved, config)
  return _diffs(old, new, lambda n: not _in(n, MODEL_FIELDS) or n in COMPUTE_ONLY)
