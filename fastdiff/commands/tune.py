"""Tune Triton kernel launch configs on this GPU and save them under profiles/<gpu-name>/.

Each kernel's sweep times its candidate configs (for temporal attention: BLOCK_SEQ x num_warps x
num_stages for every (forward|backward, padded T, D, dtype) key) and writes the fastest to
profiles/<gpu-slug>/<op>.json, which the kernels load at run time without re-tuning. A GPU without a
file uses the kernels' built-in heuristics. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import sys

HELP = "tune kernel launch configs on this GPU and save them under profiles/"

# name on the command line -> (op name in profiles/, module path of the kernel with a tune() function)
TUNABLE = {"attention": ("temporal_attention", "fastdiff_kernels.temporal_attention"),
           "adaln": ("adaln_modulate", "fastdiff_kernels.adaln_modulate")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kernel", nargs="?", default="all", choices=[*TUNABLE, "all"],
                        help="which kernel to tune (default: all)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="profiles folder to write into (default: $FASTDIFF_PROFILES, else profiles/)")
    parser.add_argument("--quick", action="store_true",
                        help="bf16 only and fewer shapes: a first profile in a few minutes")


def run(args: argparse.Namespace) -> int:
    import importlib

    import torch

    if not torch.cuda.is_available():
        print("fastdiff tune: cannot tune because no CUDA device is available (tuning times the kernels on "
              "the GPU they will run on; here they use their default configs)", file=sys.stderr)
        return 1

    from fastdiff_kernels import autotune

    gpu = autotune.device_name(torch.device("cuda"))
    names = list(TUNABLE) if args.kernel == "all" else [args.kernel]
    for name in names:
        op, module_path = TUNABLE[name]
        module = importlib.import_module(module_path)
        print(f"tuning {op} on {gpu} ...")
        options = {"dtypes": (torch.bfloat16,), "frames": (16, 32)} if args.quick else {}
        configs = module.tune(torch.device("cuda"), **options)
        if not configs:
            print(f"fastdiff tune: no config of {op} ran on {gpu}; nothing written", file=sys.stderr)
            return 1
        path = autotune.save(op, configs, gpu, root=args.out)
        print(f"wrote {len(configs)} configs to {path}")
    return 0
