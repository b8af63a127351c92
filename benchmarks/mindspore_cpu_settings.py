"""What each of dualtune's MindSpore CPU settings (dualtune/backends/mindspore/cpu_speed.py) is worth.

Times one value-and-grad step of a t5-small-config T5 (random weights) with prefix tuning under
mindtorch, in a fresh process per setting (MindSpore takes its runtime settings once per process):

    .venv/bin/python benchmarks/mindspore_cpu_settings.py [--length 24] [--steps 4] [--method prefix|lora]

Prints the median step seconds per setting and the speed-up over MindSpore as it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from models import T5_SMALL_CONFIG  # this directory: the bench's t5-small config

SETTINGS = {  # name -> cpu_speed functions applied, in order
    "as MindSpore starts": [],
    "+ synchronous launch": ["synchronous_launch"],
    "+ kernel threads = cores": ["synchronous_launch", "kernel_threads"],
    "+ linear as MatMul": ["synchronous_launch", "kernel_threads", "patch_linear"],
    "+ RMS norms by rows": ["synchronous_launch", "kernel_threads", "patch_linear", "patch_rms_norms"],
    "+ transposes as row gathers": [
        "synchronous_launch",
        "kernel_threads",
        "patch_linear",
        "patch_rms_norms",
        "patch_transposes",
    ],
    # not a cpu_speed function: the backend's value_and_grad leaves a frozen encoder unrecorded
    "+ frozen encoder unrecorded (dualtune)": [
        "synchronous_launch",
        "kernel_threads",
        "patch_linear",
        "patch_rms_norms",
        "patch_transposes",
        "frozen_encoder",
    ],
}
AFTER_IMPORT = ("patch_linear", "patch_rms_norms", "patch_transposes")  # these patch mindtorch / transformers


def child(names: list[str], length: int, steps: int, method: str) -> None:
    os.environ.setdefault("GLOG_v", "3")
    import mindspore

    from dualtune.backends.mindspore import cpu_speed

    mindspore.set_device("CPU")
    for name in names:
        if name not in (*AFTER_IMPORT, "frozen_encoder"):
            getattr(cpu_speed, name)()
    from dualtune.backends.mindspore import import_mindnlp

    import_mindnlp()  # from here on, `import torch` is mindtorch
    import numpy as np
    import torch
    from mindtorch.autograd import value_and_grad
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    from dualtune.backends.mindspore.step import encoder_outputs, frozen_encoder

    for name in names:
        if name in AFTER_IMPORT:
            getattr(cpu_speed, name)()
    config = T5Config(**{**T5_SMALL_CONFIG, "dropout_rate": 0.0})
    torch.manual_seed(0)
    peft_config = (
        PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=20)
        if method == "prefix"
        else LoraConfig(task_type="SEQ_2_SEQ_LM", r=8, target_modules=["q", "v"])
    )
    model = get_peft_model(T5ForConditionalGeneration(config), peft_config)
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(5, 32000, (8, length)), dtype=torch.int64)
    labels = torch.tensor(rng.integers(5, 32000, (8, 3)), dtype=torch.int64)
    params = [p for p in model.parameters() if p.requires_grad]
    mask = torch.ones_like(ids)
    encoder = frozen_encoder(model, params) if "frozen_encoder" in names else None
    step = value_and_grad(
        lambda *outputs: (
            model(input_ids=ids, attention_mask=mask, labels=labels, encoder_outputs=outputs or None).loss
        ),
        params,
        attach_grads=False,
    )
    seconds = []
    for _ in range(1 + steps):  # the first is a warm-up
        started = time.perf_counter()
        loss, _ = step(*(() if encoder is None else encoder_outputs(encoder, ids, mask)))
        float(loss)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"seconds": seconds[1:], "loss": float(loss)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=24, help="input tokens per row (batch 8)")
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up")
    p.add_argument("--method", choices=["prefix", "lora"], default="prefix")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child), args.length, args.steps, args.method)
        return 0
    base = None
    print(f"t5-small config, {args.method}, batch 8 x {args.length}, median of {args.steps} steps")
    for label, names in SETTINGS.items():
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                json.dumps(names),
                "--length",
                str(args.length),
                "--steps",
                str(args.steps),
                "--method",
                args.method,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        median = statistics.median(got["seconds"])
        base = base or median
        print(f"{label:<40}{median:>8.3f} s/step{base / median:>8.2f}x   loss {got['loss']:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
