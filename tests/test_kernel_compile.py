"""Every Triton kernel compiles for a Hopper GPU (sm_90) without one: tools/compile_kernels.py
records each launch of the ops under the interpreter and compiles it with Triton's own ptxas,
for every configuration its autotuner may pick on the GPU."""

import os
import subprocess
import sys

from opd_setup import ROOT

KERNELS = {"_fwd_kernel", "_grad_hidden_kernel", "_segment_sum_kernel", "_lse_gather_kernel",
           "_union_kernel", "_union_kl_kernel", "_rope_kernel", "_decode_attention_kernel",
           "_merge_splits_kernel", "_add_rms_norm_kernel", "_swiglu_linear_kernel",
           "_split_k_linear_kernel"}


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_kernels.py"),
                           "--arch", "90"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    compiled = [line.split() for line in proc.stdout.splitlines()
                if line.startswith(("ok ", "SPILLS "))]
    assert {words[1] for words in compiled} == KERNELS
    # the union KL at the default top-k (a union of 64) once per divergence and configuration
    assert sum(w[1] == "_union_kl_kernel" and "UP=64" in w for w in compiled) == 3 * 5
