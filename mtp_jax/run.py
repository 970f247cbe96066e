"""One function per launch mode, so launch.py stays a thin flag parser."""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import data as data_lib
from mtp_jax import inference
from mtp_jax import sharding
from mtp_jax import train as train_lib
from mtp_jax.cli import DECODING_MODES, MODES
from mtp_jax.config import ConfigError, check_address, check_mtp_decoding, validate
from mtp_jax.pretrained import export as export_lib
from mtp_jax.pretrained import fetch
from mtp_jax.pretrained.resolve import resolve_config

# Errors that mean "the user's input is wrong": printed as one line, exit code 2.
USER_ERRORS = (ConfigError, data_lib.DataError, ckpt_lib.CheckpointError,
               train_lib.TrainingError)


def persist_compiled_programs() -> None:
  """Keeps what a run compiles for the next one (a repeated demo or bench, a resumed training)
  under $MTP_JAX_CACHE/xla (~/.cache/mtp_jax/xla), at most 4 GiB, the least recently used
  dropped first. JAX_COMPILATION_CACHE_DIR names another directory (with JAX's own size
  setting); JAX_ENABLE_COMPILATION_CACHE=false turns it off."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.join(fetch.cache_dir(), 'xla'))
  jax.config.update('jax_compilation_cache_max_size', 4 << 30)


def init_distributed(dist_cfg) -> None:
  """Starts jax.distributed before anything touches a device. distributed.coordinator_address is
  '' for one process, 'host:port' with num_processes and process_id from the config, or 'auto'
  for JAX to read them from the cluster's environment (SLURM, Open MPI, Kubernetes, Cloud TPU).
  On CPU the processes' collectives run over Gloo, JAX's default. Started once: the modes run
  after training, or one after the other, share it."""
  address, count, index = (dist_cfg.coordinator_address, dist_cfg.num_processes,
                           dist_cfg.process_id)
  if not address or jax.distributed.is_initialized():
    return
  if address == 'auto':
    try:
      jax.distributed.initialize()
    except ValueError as e:  # JAX names the value no cluster environment gave it
      raise ConfigError(f'distributed.coordinator_address=auto, but JAX found no cluster to read '
                        f'the address from ({e})') from None
    return
  check_address(address)
  if not (isinstance(count, int) and count >= 1 and isinstance(index, int)
          and 0 <= index < count):
    raise ConfigError(f'distributed.process_id={index!r} must be in 0..distributed.num_processes-1'
                      f' (num_processes={count!r})')
  if count > 1:
    jax.distributed.initialize(address, num_processes=count, process_id=index)


def check_modes(modes: list[str], config, workdir: str, prompt: str, prompt_file: str) -> None:
  """Several modes in one command (demo,generate; generate,export): the input of each decoding
  mode after the first (its prompts, the cache they need, its settings) is checked before the
  first runs, where it was found only after the modes before it had compiled, run and written;
  an eval or export after it finds the checkpoint it reads (check_trained), and its model (an
  eval's batches too) divides over the mesh and fits memory (check_fits). A mode after a train
  is checked by the training's session, before its first step (a model trained here gets its
  tokenizer there, from its data); the first mode checks its own."""
  trained = modes.index('train') if 'train' in modes else len(modes)
  later = modes[1:trained]
  if not later:
    return
  init_distributed(config.distributed)
  config = resolve_config(config)
  validate(config)
  for mode in later:
    if mode not in DECODING_MODES:  # eval, export: their checkpoint, or what stands for it
      train_lib.check_fits(config, mode)
      train_lib.check_trained(mode, config, workdir)
      continue
    session = train_lib.Session(config, workdir, data=not config.model.init_from, reads=mode)
    try:
      inference.check_mode(session, mode, prompt, prompt_file)
    finally:
      session.checkpointer.close()


def needs_data(config, mode: str) -> bool:
  """Whether a decoding mode reads the data: for its tokenizer (a model trained here) or, in
  bench, for validation prompts where decode.prompts names none."""
  return not config.model.init_from or (mode == 'bench' and not config.decode.prompts)


def _decode_mode(mode: str, config, workdir: str, prompt: str, prompt_file: str):
  if mode == 'generate':
    check_mtp_decoding(config)
  session = train_lib.Session(config, workdir, data=needs_data(config, mode), reads=mode)
  prompts = (inference.read_prompts(session, prompt, prompt_file)
             if mode == 'generate' else None)
  step, params = inference.load_params(session)
  with sharding.active(session.mesh):
    if mode == 'demo':
      return inference.demo(session, params, prompt or config.decode.demo_prompt)
    if mode == 'generate':
      return inference.generate(session, params, prompts, config)
    return inference.bench(session, params, config, step)


def export(config, workdir: str, dtype: str) -> dict:
  """The latest checkpoint (or a pretrained model's initial params) in Hugging Face's layout,
  under WORKDIR/export: the trunk as LlamaForCausalLM (Qwen2ForCausalLM with model.qkv_bias,
  Qwen3ForCausalLM with model.qk_norm) and the heads in mtp_heads.safetensors."""
  if dtype not in export_lib.DTYPES:
    raise ConfigError(f"--export_dtype must be one of {', '.join(export_lib.DTYPES)}, got {dtype!r}")
  directory = os.path.join(workdir, 'export')
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise ConfigError(f'{directory} is not a folder, and export writes one there: move it')
  session = train_lib.Session(config, workdir, data=not config.model.init_from, reads='export')
  step, params = inference.load_params(session)
  m = session.model_file
  # The trunk is still the file's when no checkpoint was trained, or training froze it.
  unchanged = m is not None and (step == 0 or config.train.freeze_trunk)
  # Every process takes part in gathering params sharded over processes; process 0 writes.
  host = jax.tree.map(lambda a: np.asarray(a) if a.is_fully_addressable
                      else multihost_utils.process_allgather(a, tiled=True), params)
  files = []
  try:
    if jax.process_index() == 0:
      files = export_lib.export(
          directory, host['params'], session.config, session.cfg,
          tokenizer=session.tokenizer, eos_id=session.eos_id, bos_id=session.bos_id,
          stop_ids=session.stop_ids, chat_template=session.chat_template, dtype=dtype,
          token_rank=session.token_rank(), same_trunk_as=m.identity if unchanged else '',
          context_length=m.context_length if m else None,
          special={'pad_token': m.pad_id, 'unk_token': m.unk_id} if m else {},
          generation=m.generation if m else {})
      print(f'step {step} written to {directory}: {", ".join(files)}')
  finally:  # the others wait for it, whether it wrote or refused
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('mtp_jax:export')
  return {'step': step, 'directory': directory, 'files': files}


def run(mode: str, config, workdir: str, prompt: str = '', prompt_file: str = '',
        export_dtype: str = 'float32', then: tuple[str, ...] = ()):
  """One mode; `then`: the modes the command runs after it, whose input a training checks before
  its first step, as it checks those run_after_train names."""
  if mode not in MODES:
    raise ConfigError(f'--mode must be one of {", ".join(MODES)}, got {mode!r}')
  after = [m for m in config.run_after_train.split(',') if m]
  init_distributed(config.distributed)
  config = resolve_config(config)
  if mode == 'train':
    later = [(m, prompt, prompt_file) for m in then] + [(m, '', '') for m in after]

    def check(session):  # check_mode passes over the modes that are not decoding ones
      for m, text, path in later:
        inference.check_mode(session, m, text, path)
    summary = train_lib.train(config, workdir, eval_hook=inference.eval_hook(config), check=check)
    # What run_after_train finished is recorded in summary.json (`after_train`), so that a rerun
    # of a finished run runs only what a crash or a signal cut short, not what is done.
    # (A summary of an earlier, shorter training in the workdir is not this one's.)
    old = train_lib.read_summary(workdir)
    done = (old.get('after_train', []) if summary['resumed_from'] >= summary['step']
            and old.get('step') == summary['step'] else [])
    summary['after_train'] = [m for m in after if m in done]
    bench_json = inference.bench_file(workdir)
    if 'bench' in done:
      summary['bench'] = bench_json

    def save():
      if jax.process_index() == 0:
        train_lib.write_summary(workdir, summary)
    save()
    todo = [m for m in after if m not in done] if summary['stopped_by'] is None else []
    for m in todo:
      result = run(m, config, workdir)
      if m == 'bench':
        summary['bench'] = bench_json
      elif m == 'eval':
        summary['eval'] = result['eval']
      summary['after_train'].append(m)
      save()
    return summary
  if mode == 'eval':
    return train_lib.evaluate(config, workdir)
  if mode == 'export':
    return export(config, workdir, export_dtype)
  return _decode_mode(mode, config, workdir, prompt, prompt_file)
