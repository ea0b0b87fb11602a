"""The Triton kernels import as `fastdiff_kernels`, not `kernels`: that name belongs to Hugging Face's package,
which bitsandbytes imports (`from kernels import get_kernel`). With a stand-in `kernels` on the path, both
bitsandbytes' lookup and fastdiff must work in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

STANDIN = '''
import json, os
def get_kernel(name, version=None):
    with open(os.environ["STANDIN_CALLS"], "a") as f:
        f.write(json.dumps([name, version]) + "\\n")
    class Kernel:
        gemm_4bit_forward = None
    return Kernel()
'''

PROBE = '''
import json, torch
import fastdiff.ops, fastdiff_kernels                      # fastdiff's kernels, under their own name
from fastdiff.optim import build_optimizer
from kernels import get_kernel                              # what bitsandbytes imports
import kernels
p = torch.nn.Parameter(torch.randn(4096))
opt = build_optimizer("adamw8bit-bnb", [p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
p.grad = torch.randn(4096)
opt.step()
from bitsandbytes.backends.cpu import ops as bnb_cpu
avx = getattr(bnb_cpu, "has_avx512bf16", lambda: False)()
print(json.dumps({"kernels": kernels.__file__, "fastdiff_kernels": fastdiff_kernels.__file__, "avx512bf16": bool(avx),
                  "attention": fastdiff.ops.temporal_attention.__module__}))
'''


def test_no_top_level_kernels_package_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top_level = {name.split(".")[0] for name in tool["packages"]}
    assert top_level == {"fastdiff", "fastdiff_kernels"}
    assert tool["package-dir"]["fastdiff_kernels"] == "kernels"


def test_a_huggingface_kernels_package_and_fastdiff_live_side_by_side(tmp_path):
    standin = tmp_path / "site" / "kernels"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text(STANDIN)
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "STANDIN_CALLS": str(calls)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["kernels"]).resolve() == (standin / "__init__.py").resolve()
    assert Path(found["fastdiff_kernels"]).resolve().parent == (ROOT / "kernels").resolve()
    assert "cannot import name 'get_kernel'" not in done.stderr
    if found["avx512bf16"]:  # bitsandbytes' CPU backend looked the kernel up, and found the stand-in
        assert calls.exists() and "kernels-community" in calls.read_text()
