"""About 1B parameters sharded over 8 GPUs: a 20-layer, width-2048 trunk (16 heads of 128, 8 kv
heads; 995M parameters with the tied 32768-token embedding) and one sequential MTP module
(D = 1, 55M more), 1.05B in all. Parameters and optimizer state are split 8 ways over the width
(mesh.fsdp = 8; every further group of 8 devices adds data parallelism), blocks are
rematerialized (the backward pass then keeps about 184 MiB of activations per sequence instead
of 19 GiB, by JAX's saved residuals), compute is bfloat16; 64 sequences of 2048 tokens (131k
tokens) a step, 8 per GPU on one host (train.batch_size must stay a multiple of the GPU count).

Run, one host with 8 GPUs:
  python launch.py --config configs/gpu_1b.py --workdir runs/gpu_1b
Run, N hosts with 8 GPUs each (the same command on every host, i = 0..N-1, a shared workdir):
  python launch.py --config configs/gpu_1b.py --workdir /shared/runs/gpu_1b \
    --config.distributed.coordinator_address=HOST0:1234 \
    --config.distributed.num_processes=N --config.distributed.process_id=i
  (or --config.distributed.coordinator_address=auto under SLURM, Open MPI or Kubernetes).
Produces: 10000 steps (1.3B tokens) on data.sources (the Python standard library unless set:
2.8M tokens, far too little for this model; point it at a real corpus), checkpoints every 1000
steps and TensorBoard logs. Step time, memory, MFU and the final loss: not yet measured.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.d_model = 2048
  c.model.num_layers = 20
  c.model.num_heads = 16
  c.model.num_kv_heads = 8
  c.model.dtype = 'bfloat16'
  c.model.remat = True
  c.model.max_seq_len = 4096
  c.data.vocab_size = 32768
  c.mtp.depth = 1
  c.mesh.data = -1
  c.mesh.fsdp = 8
  c.train.steps = 10000
  c.train.batch_size = 64
  c.train.seq_len = 2048
  c.train.lr = 3e-4
  c.train.warmup_steps = 1000
  c.train.checkpoint_every = 1000
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.log_every = 50
  return c
