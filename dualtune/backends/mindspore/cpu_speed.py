"""MindSpore settings and kernel swaps that make mindtorch fast on CPU, same results.

Measured on a 2-core CPU (t5-small config, one value-and-grad step): prefix tuning at 8 x 25 from
4.2 s as MindSpore starts to 0.45 s, LoRA at 8 x 128 from 7.6 s to 1.7 s (BENCHMARKS.md has the
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
- Transposes: mindtorch's transpose is a strided view, and the kernel that next needs it
  contiguous copies it element by element (4-6 ms for (8, 128, 8, 64), four per attention layer).
  The swap gathers whole rows instead, and multiplies by a last-two-axes transpose with
  ``transpose_b``. A gathered transpose is a copy: in-place writes to it do not reach its source.

Only for ``--device cpu``: Ascend needs the asynchronous pipeline and has its own Dense kernel.
``DUALTUNE_MINDSPORE_CPU_SPEED=0`` leaves MindSpore as it starts, to measure what this is worth.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def cpu_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def marked(function: F, mark: str) -> F:
    """``function`` with the attribute ``mark`` set: how a patch knows its replacement is already
    installed (a second patch would wrap the replacement in itself)."""
    setattr(function, mark, True)
    return function


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

    def dense_as_matmul(input: Any, weight: Any, bias: Any = None) -> Any:
        if input.ndim < 2:
            return dense(input, weight, bias)
        shape = input.shape
        rows = legacy.reshape(input, (-1, shape[-1])) if input.ndim > 2 else input
        out = legacy.mat_mul(rows, weight, False, True)
        if bias is not None:
            out = legacy.add(out, bias)
        return legacy.reshape(out, (*shape[:-1], out.shape[-1])) if input.ndim > 2 else out

    cpu.dense = marked(dense_as_matmul, "dualtune_matmul")
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


def _rms_norm_by_rows(model_forward: Callable[[Any, Any], Any], torch: Any) -> Callable[[Any, Any], Any]:
    @functools.lru_cache(maxsize=64)
    def constants(rows: int, width: int, device: Any) -> tuple[Any, Any, Any]:
        # made once per shape: three small allocations per norm were ~1 ms of every call
        return (
            torch.full((width, 1), 1.0 / width, device=device),
            torch.ones(1, width, device=device),
            torch.ones(rows, 1, device=device),
        )

    def forward(self: Any, hidden_states: Any) -> Any:
        if (
            hidden_states.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or hidden_states.ndim < 2
        ):
            return model_forward(self, hidden_states)
        shape, width = hidden_states.shape, hidden_states.shape[-1]
        rows = hidden_states.reshape(-1, width)
        mean_column, ones_row, ones_column = constants(rows.shape[0], width, rows.device)
        mean_square = torch.matmul(rows * rows, mean_column)
        scale = torch.matmul(torch.rsqrt(mean_square + self.variance_epsilon), ones_row)
        weight = torch.matmul(ones_column, self.weight.reshape(1, width))
        return (weight * (rows * scale)).reshape(shape)

    return marked(forward, "dualtune_rows")


def patch_transposes() -> str:
    """After mindnlp is imported: mindtorch's CPU transposes without strided copies.

    A transpose is a strided view, and the next kernel that needs its data contiguous copies it
    element by element: 4-6 ms for an (8, 128, 8, 64) float32 tensor, against 0.6 ms for torch.
    Attention does four per layer. Instead:
    - a transpose or permute that keeps the last axis in place becomes a row gather (the rows are
      the last axis, so the copy moves whole rows: 1 ms), with the inverse gather as its gradient;
    - a swap of the last two axes stays a view, and ``matmul`` multiplies by the view's source
      with ``transpose_b`` (``q @ k.transpose(-1, -2)``) instead of copying it.
    Values are the same numbers moved, not recomputed."""
    from mindtorch._apis import cpu
    from mindtorch._op_prim.cpu import legacy

    done = "transposes as row gathers"
    if getattr(cpu.transpose_view, "dualtune_rows", False):
        return done
    view_transpose, view_permute, matmul = cpu.transpose_view, cpu.permute, cpu.matmul

    def transpose_view(input: Any, dim0: int, dim1: int) -> Any:
        perm = list(range(input.ndim))
        perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
        return _permuted(input, tuple(perm), lambda: view_transpose(input, dim0, dim1))

    def permute(input: Any, dims: Any) -> Any:
        return _permuted(input, tuple(d % input.ndim for d in dims), lambda: view_permute(input, dims))

    def matmul_of_transposed(self: Any, other: Any) -> Any:
        source = getattr(other, "dualtune_transpose_of", None)
        if source is not None and self.ndim == other.ndim:
            if self.ndim == 2:
                return legacy.mat_mul(self, source, False, True)
            return legacy.batch_mat_mul(self, source, False, True)
        return matmul(self, other)

    cpu.transpose_view = marked(transpose_view, "dualtune_rows")
    cpu.permute, cpu.matmul = permute, matmul_of_transposed
    return done


def _permuted(input: Any, perm: tuple[int, ...], as_view: Callable[[], Any]) -> Any:
    ndim = input.ndim
    if perm == tuple(range(ndim)) or input.numel() == 0 or not input.is_contiguous():
        return as_view()
    if perm[-1] == ndim - 1:
        return _row_gather()(input, perm)
    if perm == (*range(ndim - 2), ndim - 1, ndim - 2):
        out = as_view()
        out.dualtune_transpose_of = input  # read by matmul: multiply with transpose_b
        return out
    return as_view()


@functools.cache
def _row_gather() -> Callable[[Any, tuple[int, ...]], Any]:
    """A mindspore custom autograd function: rows gathered forward, gathered back for the gradient.
    Built on first use: its base class exists only once MindSpore is imported."""
    import mindspore
    import numpy as np
    from mindtorch._op_prim.cpu import legacy

    @functools.lru_cache(maxsize=512)
    def indices(shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[Any, Any]:
        rows = np.arange(int(np.prod(shape[:-1]))).reshape(shape[:-1]).transpose(perm[:-1]).reshape(-1)
        return mindspore.Tensor(rows.astype(np.int32)), mindspore.Tensor(np.argsort(rows).astype(np.int32))

    class RowGather(mindspore._Function):
        @staticmethod
        def forward(ctx: Any, input: Any, rows: Any, inverse: Any, out_shape: tuple[int, ...]) -> Any:
            ctx.inverse, ctx.in_shape = inverse, input.shape
            flat = legacy.reshape(input, (-1, input.shape[-1]))
            return legacy.reshape(legacy.gather(flat, rows, 0, 0), out_shape)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None, None, None]:
            flat = legacy.reshape(grad, (-1, grad.shape[-1]))
            return legacy.reshape(legacy.gather(flat, ctx.inverse, 0, 0), ctx.in_shape), None, None, None

    def apply(input: Any, perm: tuple[int, ...]) -> Any:
        shape = tuple(input.shape)
        rows, inverse = indices(shape, perm)
        return RowGather.apply(input, rows, inverse, tuple(shape[d] for d in perm))

    return apply


def enabled(device: str) -> bool:
    return device == "cpu" and os.environ.get("DUALTUNE_MINDSPORE_CPU_SPEED", "1") != "0"
