"""About 125M parameters on one GPU: a 12-layer, width-768 trunk (110M parameters with the tied
32768-token embedding) and one sequential MTP module (D = 1, 8M more), 118M in all; sequence 1024,
bfloat16 compute over float32 master weights, 32 sequences (32768 tokens) a step in two
micro-batches of 16. Without rematerialization the backward pass keeps about 2.3 GiB of
activations per sequence (JAX's saved residuals; most of it the T x T attention probabilities),
so 32 at once would not fit an H100's 80 GB and 16 take about 37 GiB.
--config.model.attention=fused (cuDNN flash attention) keeps no T x T probabilities;
experiments/gpu_check.sh times both attentions.

Run:   python launch.py --config configs/gpu_125m.py --workdir runs/gpu_125m
Bench: python experiments/bench_train.py --config configs/gpu_125m.py --depths 0,1 \
         --kinds sequential --memory_depths 1 --peak_tflops 989
Produces: 5000 steps (164M tokens) on the Python standard library's source (2.8M training tokens
at this vocabulary, after a tokenizer that takes about 20 s to train, so the run sees them about
60 times: point data.sources at a larger corpus for a model worth keeping), checkpoints every
1000 steps and TensorBoard logs under the workdir. The final loss: not yet measured. Step time on
an H200 (experiments/RESULTS.md, "On a GPU"): 124 ms a step at D = 0 and 158 ms at D = 1 with
einsum attention, 19% MFU. The target is MFU >= 45%; at that rate a step takes about 70 ms and
the run about 6 minutes plus evaluations.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.dtype = 'bfloat16'
  c.model.max_seq_len = 2048
  c.data.vocab_size = 32768
  c.mtp.depth = 1
  c.train.steps = 5000
  c.train.batch_size = 32
  c.train.grad_accum = 2
  c.train.seq_len = 1024
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.checkpoint_every = 1000
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.train.log_every = 50
  return c
