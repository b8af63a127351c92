"""MindSpore settings and one kernel swap that make mindtorch fast on CPU; results do not change.

Measured on a 2-core CPU (t5-small config, prefix tuning, batch 8 x 24, one value-and-grad step):
4.5 s as MindSpore starts, 1.3 s with synchronous kernel launch, 0.66 s with linear layers as
MatMul as well (BENCHMARKS.md has the runs).

- Kernel launch: PyNative queues each op for a runtime thread; on a few CPU cores that pipeline
  competes with the kernels themselves and every shape or dtype read waits on it. Synchronous
  launch (``mindspore.runtime.launch_blocking``) removes the hand-off.
- Kernel threads: MindSpore's CPU kernels default to 25 threads whatever the machine has; use the
  cores this process may run on (or ``OMP_NUM_THREADS``, as torch does).
- Linear layers: mindtorch maps ``F.linear`` to MindSpore's Dense kernel, which on CPU takes
  2.5-3x as long as MatMul with a transposed weight on the same operands ((192, 512) x (512, 512):
  3.0 ms against 1.2 ms). The swap reshapes to 2-D, multiplies, adds the bias.

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


def configure_runtime() -> list[str]:
    """Before mindnlp is imported: synchronous launch and kernel threads. Returns what was set."""
    import mindspore

    from mindspore.device_context.cpu import op_tuning

    threads = cpu_threads()
    mindspore.runtime.launch_blocking()
    if not op_tuning.RuntimeConf.get_instance().is_op_threads_num_configured():
        op_tuning.threads_num(threads)  # MindSpore refuses a second setting in one process
    return ["synchronous kernel launch", f"{threads} kernel threads"]


def patch_linear() -> list[str]:
    """After mindnlp is imported: mindtorch's CPU ``dense`` as MatMul(transpose_b) + bias."""
    from mindtorch._apis import cpu
    from mindtorch._op_prim.cpu import legacy

    if getattr(cpu.dense, "dualtune_matmul", False):
        return ["linear as MatMul"]
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
    return ["linear as MatMul"]


def enabled(device: str) -> bool:
    return device == "cpu" and os.environ.get("DUALTUNE_MINDSPORE_CPU_SPEED", "1") != "0"
