"""Compile the triton path's kernels for an H100 (sm_90a) on any machine, no GPU needed, and
count their SASS instructions by opcode, with registers and spills: the device-free check used
for the v5/v6 kernels in docs/kernel-notes.md (the loop bodies dominate the counts).

    python benchmarks/sass_counts.py                      # scan forward and backward, defaults
    python benchmarks/sass_counts.py --kernel scan_bwd_kernel --set BE=64 KEEP=True RS=False
    python benchmarks/sass_counts.py --kernel scan_fwd_kernel scan_bwd_kernel --set CHUNKED=True
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vimssl.ssm import triton_core as tc
from vimssl.ssm import triton_kernels as K

FLOAT32_ARGS = {"At_ptr", "D_ptr", "dtb_ptr", "hst_ptr", "dbc_part_ptr", "acc_ptr", "bc_ptr",
                "w_ptr", "bias_ptr", "dwb_ptr", "hc_ptr", "sc_ptr", "wc_ptr"}  # fmt: skip
DEFAULTS = {
    "scan_fwd_kernel": dict(SAVE_SUM=True, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, CHUNKED=False, SPLIT=False),
    "scan_bwd_kernel": dict(
        BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, KEEP=tc.SEQ_KEEP, RS=tc.SEQ_RS, CHUNKED=False
    ),
    "scan_state_kernel": dict(GRAD=False, BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True),
    "conv_bwd_gp_kernel": dict(K=4, BK=8, BT=tc.CONV_GP_BT, BE=tc.CONV_GP_BE),
}
OPS = ["MUFU", "SHFL", "FFMA", "FMUL", "FADD", "LDG", "STG", "LDL", "STL", "LDS", "STS", "BAR", "IMAD", "SEL"]


def tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def counts(kernel: str, consts: dict, warps: int = 1, maxnreg: int | None = None) -> dict:
    fn = getattr(K, kernel)
    sig = {
        a: "constexpr"
        if a in consts
        else ("*fp32" if a in FLOAT32_ARGS else "*bf16")
        if a.endswith("_ptr")
        else "i32"
        for a in fn.arg_names
    }
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ck = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})},
    )
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = Path(d) / "k.cubin", Path(d) / "k.ptx"
        cubin.write_bytes(ck.asm["cubin"])
        ptx.write_text(ck.asm["ptx"])
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
        info = subprocess.run([tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(d) / "o")],
                              capture_output=True, text=True).stderr  # fmt: skip
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(kernel=kernel, consts=consts, registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill.group(1)) if spill else None, total=sum(ops.values()),
                ops={k: ops[k] for k in OPS})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=sorted(DEFAULTS), nargs="*", default=sorted(DEFAULTS))
    ap.add_argument("--set", nargs="*", default=[], help="constexpr overrides, e.g. BE=64 RS=False")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (ptxas)")
    args = ap.parse_args()
    for kernel in args.kernel:
        consts = dict(DEFAULTS[kernel])
        for kv in args.set:
            k, v = kv.split("=")
            if k in consts:
                consts[k] = v == "True" if v in ("True", "False") else int(v)
        r = counts(kernel, consts, maxnreg=args.maxnreg)
        print(f"{kernel} {r['consts']}: {r['registers']} registers, {r['spill_store_bytes']} bytes of spill "
              f"stores, {r['total']} instructions: {r['ops']}")  # fmt: skip


if __name__ == "__main__":
    main()
