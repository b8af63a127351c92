"""MindSpore settings and kernel swaps that make mindtorch fast on CPU, same results.

Measured on a 2-core CPU (t5-small config, one value-and-grad step): prefix tuning at 8 x 24 from
4.6 s as MindSpore starts to 0.75 s, LoRA at 8 x 128 from 9.3 s to 2.2 s (BENCHMARKS.md has the
runs, and benchmarks/mindspore_cpu_settings.py makes them).

- Kernel launch: PyNative queues each op for a runtime thread; on a few CPU cores that pipeline
  competes with the kernels themselves and every shape or dtype read waits on it. Synchronous
  launch (``mindspore.runtime.launch_blocking``) removes the hand-off.
- Kernel threads: MindSpore's CPU kernels default to 25 threads whatever the machine has; use the
  cores this process may run on (or ``OMP_NUM_THREADS``, as torch does).
- Linear layers: mindtorch maps ``F.linear`` to MindSpore's Dense kernel, which on CPU takes
  2.5-3x as long as MatMul with a transposed weight on the same operands ((192, 512) x (512, 512):
  3.0 ms against 1.2 ms). The swap reshapes to 2-D, multiplies, adds the bias.
- RMS norms (T5, Llama): elementwise ops whose operands broadcast run 25-30x slower than on equal
  shapes ((8, 128, 512) * (512,): 6.2 ms against 0.25 ms), and T5's norm does two of them. The
  swap computes the same formula with equal-shape elementwise ops; the mean's sum runs in another
  order, so results agree to float32 rounding (tests/test_parity.py checks both backends).

Only for ``--device cpu``: Ascend needs the asynchronous pipeline and has its own Dense kernel.
``DUALTUNE_MINDSPORE_CPU_SPEED=0`` leaves MindSpore as it starts, to measure what this is worth.
"""

from __future__ import annotations

import os


def cpu_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def synchronous_launch() -> str:
    import mindspore

    mindspore.runtime.launch_blocking()
    return "synchronous kernel launch"


def kernel_threads() -> str:
    from mindspore.device_context.cpu import op_tuning

    threads = cpu_threads()
    if not op_tuning.RuntimeConf.get_instance().is_op_threads_num_configured():
        op_tuning.threads_num(threads)  # MindSpore refuses a second setting in one process
    return f"{threads} kernel threads"


def configure_runtime() -> list[str]:
    """Before mindnlp is imported: synchronous launch and kernel threads. Returns what was set."""
    return [synchronous_launch(), kernel_threads()]


def patch_linear() -> str:
    """After mindnlp is imported: mindtorch's CPU ``dense`` as MatMul(transpose_b) + bias."""
    from mindtorch._apis import cpu
    from mindtorch._op_prim.cpu import legacy

    if getattr(cpu.dense, "dualtune_matmul", False):
        return "linear as MatMul"
    dense = cpu.dense

    def dense_as_matmul(input, weight, bias=None):
        if input.ndim < 2:
            return dense(input, weight, bias)
        shape = input.shape
        rows = legacy.reshape(input, (-1, shape[-1])) if input.ndim > 2 else input
        out = legacy.mat_mul(rows, weight, False, True)
        if bias is not None:
            out = legacy.add(out, bias)
        return legacy.reshape(out, (*shape[:-1], out.shape[-1])) if input.ndim > 2 else out

    dense_as_matmul.dualtune_matmul = True
    cpu.dense = dense_as_matmul
    return "linear as MatMul"


# RMS norms written as pow/mean/rsqrt/broadcast mul (each model file has its own copy).
RMS_NORMS = [
    ("transformers.models.t5.modeling_t5", "T5LayerNorm"),
    ("transformers.models.mt5.modeling_mt5", "MT5LayerNorm"),
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
]


def patch_rms_norms() -> str:
    """After mindnlp is imported: float32 RMS norms without broadcasting elementwise kernels.

    ``weight * (x * rsqrt(mean(x * x) + eps))``, with the mean over the last dimension as a matmul
    by a 1/d column and each broadcast as an outer product with ones (exact: one product, no sum),
    so every elementwise op has operands of one shape. Other dtypes keep the model's own forward."""
    import torch  # mindtorch here

    from dualtune.backends.mindspore.compat import model_classes

    patched = []
    for cls in model_classes(RMS_NORMS):
        if not getattr(cls.forward, "dualtune_rows", False):
            cls.forward = _rms_norm_by_rows(cls.forward, torch)
        patched.append(cls.__name__)
    return "RMS norms without broadcasts (" + ", ".join(patched) + ")"


def _rms_norm_by_rows(model_forward, torch):
    def forward(self, hidden_states):
        if hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32 or hidden_states.ndim < 2:
            return model_forward(self, hidden_states)
        shape, width = hidden_states.shape, hidden_states.shape[-1]
        rows = hidden_states.reshape(-1, width)
        device = rows.device
        mean_square = torch.matmul(rows * rows, torch.full((width, 1), 1.0 / width, device=device))
        scale = torch.matmul(torch.rsqrt(mean_square + self.variance_epsilon), torch.ones(1, width, device=device))
        weight = torch.matmul(torch.ones(rows.shape[0], 1, device=device), self.weight.reshape(1, width))
        return (weight * (rows * scale)).reshape(shape)

    forward.dualtune_rows = True
    return forward


def enabled(device: str) -> bool:
    return device == "cpu" and os.environ.get("DUALTUNE_MINDSPORE_CPU_SPEED", "1") != "0"
