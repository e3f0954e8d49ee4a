"""Compile the triton path's kernels for an H100 (sm_90a) on any machine, no GPU needed, and
count their SASS instructions by opcode, with registers and spills: the device-free check used
for the v5/v6 kernels in docs/kernel-notes.md (the loop bodies dominate the counts).

    python benchmarks/sass_counts.py                      # scan forward and backward, defaults
    python benchmarks/sass_counts.py --kernel scan_bwd_kernel --set BE=64 KEEP=True RS=False
    python benchmarks/sass_counts.py --kernel scan_fwd_kernel scan_bwd_kernel --set CHUNKED=True
    python benchmarks/sass_counts.py --all --json counts.json   # every kernel, every launch variant
    python benchmarks/sass_counts.py --all --jobs 2             # ... two compiles at a time
    python benchmarks/sass_counts.py --kernel conv_fwd_kernel --warps 8 --stages 1 --set BT=16
    python benchmarks/sass_counts.py --kernel scan_state_kernel --set BE=64 --loops  # per loop body

``--all`` compiles every kernel of the path (the mixer core's and the fused norm's) in every
constexpr variant the launchers use, with their defaults: a compile check for a Triton release
(Triton 3.0 and later; the compile API changed at 3.1 and 3.3) without a GPU. It exits non-zero
if a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import inspect
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vimssl.ssm import triton_core as tc
from vimssl.ssm import triton_kernels as K
from vimssl.ssm import triton_norm as TN

_SCAN_F32 = {
    "At_ptr",
    "D_ptr",
    "dtb_ptr",
    "bc_ptr",
    "hc_ptr",
    "sc_ptr",
    "wc_ptr",
    "hst_ptr",
    "acc_ptr",
    "hin_ptr",
}
_NORM_ROWS, _NORM_BD, _NORM_WARPS = TN._tile(384)  # Vim-S rows
# Per kernel: its module, float32 pointer arguments (other pointers: bf16, the activations of a
# bf16 run), float scalar arguments (other scalars: int32), warps, the integer arguments that are
# not multiples of 16 at the Vim-S 224 px training shape (``odd``: the JIT marks every other
# integer and every pointer divisible by 16, and the compiler vectorises and simplifies on that),
# and the constexpr variants the launchers use, the first being the default of --kernel.
KERNELS = {
    "prep_kernel": dict(
        mod=K, odd={"R"}, warps=4,
        f32={"cwf", "cwb", "cbf", "cbb", "xwf", "xwb", "dwf", "dwb", "dbf", "dbb", "alf", "alb", "Df", "Db",
             "cw_o", "cb_o", "at_o", "d_o", "dtb_o"},
        variants=[dict(K=4, BK=4, BN=16, BP=128, BE=tc.PREP_BE)],
    ),
    "conv_fwd_kernel": dict(
        mod=K, odd={"L", "P", "R"}, warps=tc.CONV_WARPS, f32={"w_ptr", "bias_ptr", "bc_ptr"},
        variants=[dict(K=4, BT=tc.CONV_BT, BE=tc.CONV_BE, PACK=p, BJ=32) for p in (False, True)],
    ),
    "conv_bwd_gp_kernel": dict(
        mod=K, odd={"L", "T", "n_split"}, warps=tc.CONV_GP_WARPS, f32={"w_ptr", "bias_ptr", "dwb_ptr"},
        variants=[dict(K=4, BK=8, BT=tc.CONV_GP_BT, BE=tc.CONV_GP_BE)],
    ),
    "conv_bwd_dx_kernel": dict(
        mod=K, odd={"L"}, warps=tc.CONV_WARPS, f32={"w_ptr"},
        variants=[dict(K=4, BT=tc.CONV_BT, BE=tc.CONV_BE)],
    ),
    "conv_fwd_walk_kernel": dict(
        mod=K, odd={"L", "P", "R", "T"}, warps=tc.CONV_WALK_WARPS, f32={"w_ptr", "bias_ptr", "bc_ptr"},
        variants=[
            dict(K=4, BE=tc.CONV_WALK_BE, PACK=p, BJ=32, BTP=tc.CONV_PACK_BT, SPREAD=s)
            for p, s in ((False, tc.CONV_PACK_SPREAD), (True, tc.CONV_PACK_SPREAD), (True, not tc.CONV_PACK_SPREAD))
        ],
    ),
    "conv_bwd_walk_kernel": dict(
        mod=K, odd={"L", "T", "n_split"}, warps=tc.CONV_WALK_WARPS, f32={"w_ptr", "bias_ptr", "dwb_ptr"},
        variants=[dict(K=4, BE=tc.CONV_WALK_BE)],
    ),
    "scan_fwd_kernel": dict(
        mod=K, odd={"L", "T", "n_ch", "n_b"}, warps=tc.SEQ_WARPS, f32=_SCAN_F32,
        variants=[
            dict(SAVE_SUM=True, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, CHUNKED=False, SPLIT=False, SAVE_CARRY=False),
            dict(SAVE_SUM=False, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, CHUNKED=False, SPLIT=False, SAVE_CARRY=False),
            dict(SAVE_SUM=True, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, CHUNKED=False, SPLIT=True, SAVE_CARRY=False),
            dict(SAVE_SUM=True, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, CHUNKED=True, SPLIT=False, SAVE_CARRY=False),
            dict(SAVE_SUM=True, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, CHUNKED=True, SPLIT=False, SAVE_CARRY=True),
            dict(SAVE_SUM=True, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=False, CHUNKED=False, SPLIT=False, SAVE_CARRY=False),
        ],
    ),
    "combine_kernel": dict(
        mod=K, odd=set(), warps=4, f32=set(),
        variants=[dict(SAVE_SUM=s, BR=tc.COMBINE_BR, BE=tc.COMBINE_BE) for s in (True, False)],
    ),
    "scan_state_kernel": dict(
        mod=K, odd={"L", "n_ch"}, warps=tc.SEQ_WARPS, f32=_SCAN_F32,
        variants=[
            dict(GRAD=False, BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, SKIP=tc.SEQ_SKIP_UNREAD, SUMS=False),
            dict(GRAD=False, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, SKIP=tc.SEQ_SKIP_UNREAD, SUMS=False),
            dict(GRAD=True, BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, SKIP=tc.SEQ_SKIP_UNREAD, SUMS=False),
            dict(GRAD=True, BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, SKIP=tc.SEQ_SKIP_UNREAD, SUMS=True),
            dict(GRAD=False, BE=tc.SEQ_BE_FWD, BN=16, EVEN_N=True, SKIP=not tc.SEQ_SKIP_UNREAD, SUMS=False),
            dict(GRAD=True, BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, SKIP=not tc.SEQ_SKIP_UNREAD, SUMS=False),
        ],
    ),
    "scan_bwd_kernel": dict(
        mod=K, odd={"L", "T", "n_ch", "n_eblocks"}, warps=tc.SEQ_WARPS, f32=_SCAN_F32, i32p={"flag_ptr"},
        variants=[
            dict(BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, KEEP=tc.SEQ_KEEP, RS=tc.SEQ_RS, CHUNKED=False, FRESH=tc.SEQ_FRESH_DECAY, HIN=False, Y_OUT=False, WSELF=False, TICKET=False),
            dict(BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, KEEP=tc.SEQ_KEEP, RS=tc.SEQ_RS, CHUNKED=True, FRESH=tc.SEQ_FRESH_DECAY, HIN=False, Y_OUT=False, WSELF=False, TICKET=False),
            dict(BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, KEEP=tc.SEQ_KEEP, RS=tc.SEQ_RS, CHUNKED=True, FRESH=tc.SEQ_FRESH_DECAY, HIN=True, Y_OUT=True, WSELF=False, TICKET=False),
            dict(BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, KEEP=tc.SEQ_KEEP, RS=tc.SEQ_RS, CHUNKED=True, FRESH=tc.SEQ_FRESH_DECAY, HIN=True, Y_OUT=True, WSELF=True, TICKET=tc.SEQ_WSELF_TICKET),
            dict(BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, KEEP=tc.SEQ_KEEP, RS=tc.SEQ_RS, CHUNKED=True, FRESH=tc.SEQ_FRESH_DECAY, HIN=True, Y_OUT=True, WSELF=True, TICKET=not tc.SEQ_WSELF_TICKET),
            dict(BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=False, KEEP=tc.SEQ_KEEP, RS=False, CHUNKED=False, FRESH=tc.SEQ_FRESH_DECAY, HIN=False, Y_OUT=False, WSELF=False, TICKET=False),
            dict(BE=tc.SEQ_BE_BWD, BN=16, EVEN_N=True, KEEP=tc.SEQ_KEEP, RS=tc.SEQ_RS, CHUNKED=False, FRESH=not tc.SEQ_FRESH_DECAY, HIN=False, Y_OUT=False, WSELF=False, TICKET=False),
        ],
    ),
    "part_sum_kernel": dict(mod=K, odd={"L", "n_parts"}, warps=4, f32=set(), variants=[dict(BT=tc.PART_BT, BJ=32)]),
    "colsum_kernel": dict(
        mod=K, odd={"T", "n_a", "n_w", "c0_rc", "c0_c", "c0_sr", "c1_rc", "c1_c", "c1_sr"}, warps=4,
        f32={"src_ptr", "a_ptr", "b_ptr", "c0_dst_ptr", "c1_dst_ptr"},
        variants=[dict(BR=tc.COLSUM_BR, BW=tc.COLSUM_BW, CAST=c, BC=tc.COLSUM_BC) for c in (False, True)],
    ),
    "add_rms_fwd_kernel": dict(
        mod=TN, odd={"rows_per_s"}, warps=_NORM_WARPS, f32={"res_ptr", "w_ptr", "rout_ptr", "rstd_ptr", "s_ptr"},
        floats={"eps", "inv_keep"},
        variants=[dict(HAS_X=x, HAS_S=s, ROWS=_NORM_ROWS, BD=_NORM_BD) for x, s in ((True, False), (False, False), (True, True))],
    ),
    "add_rms_bwd_kernel": dict(
        mod=TN, odd={"rows_per_s"}, warps=_NORM_WARPS,
        f32={"drout_ptr", "rout_ptr", "rstd_ptr", "w_ptr", "dres_ptr", "dw_ptr", "s_ptr"}, floats={"inv_keep"},
        variants=[
            dict(HAS_DROUT=r, HAS_DX=x, HAS_S=s, ROWS=_NORM_ROWS, BD=_NORM_BD)
            for r, x, s in ((True, True, False), (False, True, False), (True, False, False), (True, True, True))
        ],
    ),
}  # fmt: skip
OPS = ["MUFU", "SHFL", "FFMA", "FMUL", "FADD", "LDG", "STG", "LDL", "STL", "LDS", "STS", "BAR", "IMAD", "SEL"]


def tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _version() -> tuple[int, int]:
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def _source(fn, sig: dict, consts: dict, div16: set) -> ASTSource:
    """What triton.compile takes for ``fn``, in this Triton's API: 3.3 and later key the signature
    by name with the constexprs in it; 3.1 and 3.2 by name without them, 3.0 by index. ``div16``:
    the arguments the JIT would mark divisible by 16 (not passed to 3.2, whose descriptor wants
    the argument values)."""
    idx = fn.arg_names.index
    if "constexprs" in inspect.signature(ASTSource).parameters:
        attrs = {(idx(a),): [["tt.divisibility", 16]] for a in div16}
        return ASTSource(
            fn=fn, signature=sig, constexprs={(idx(k),): v for k, v in consts.items()}, attrs=attrs
        )
    key = (lambda a: a) if _version() >= (3, 1) else idx
    extra = {}
    if _version() < (3, 2):
        from triton.compiler.compiler import AttrsDescriptor

        extra["attrs"] = AttrsDescriptor(divisible_by_16={key(a) for a in div16})
    return ASTSource(
        fn=fn,
        signature={key(a): t for a, t in sig.items() if a not in consts},
        constants={key(a): v for a, v in consts.items()},
        **extra,
    )


def _arg_type(spec: dict, name: str) -> str:
    if name in spec.get("i32p", ()):
        return "*i32"
    if name.endswith("_ptr") or name.endswith("_o") or name in spec["f32"]:
        return "*fp32" if name in spec["f32"] else "*bf16"
    return "fp32" if name in spec.get("floats", ()) else "i32"


def counts(
    kernel: str, consts: dict, warps: int | None = None, maxnreg: int | None = None, stages: int | None = None
) -> dict:
    spec = KERNELS[kernel]
    fn = getattr(spec["mod"], kernel)
    sig = {a: "constexpr" if a in consts else _arg_type(spec, a) for a in fn.arg_names}
    div16 = {a for a, t in sig.items() if t.startswith("*") or (t == "i32" and a not in spec.get("odd", ()))}
    ck = triton.compile(
        _source(fn, sig, consts, div16),
        target=GPUTarget("cuda", 90, 32),
        options={
            "num_warps": warps or spec["warps"],
            **({"maxnreg": maxnreg} if maxnreg else {}),
            **({"num_stages": stages} if stages else {}),
        },
    )
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = Path(d) / "k.cubin", Path(d) / "k.ptx"
        cubin.write_bytes(ck.asm["cubin"])
        ptx.write_text(ck.asm["ptx"])
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
        info = subprocess.run([tool("ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(d) / "o")],
                              capture_output=True, text=True).stderr  # fmt: skip
    ops = collections.Counter(_INSTR.findall(sass))
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(kernel=kernel, consts=consts, registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill.group(1)) if spill else None, total=sum(ops.values()),
                ops={k: ops[k] for k in OPS}, loops=loops(sass))  # fmt: skip


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)")


def loops(sass: str, top: int = 8) -> list[dict]:
    """The loops of nvdisasm output: every branch back to a label above it, with the instructions
    from the label to the branch (the loop body, inner loops included) and its commonest opcodes.
    The scan kernels' time is in these bodies (one per group of four tokens)."""
    found, labels, body = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(body)
            continue
        op = _INSTR.search(line)
        if not op:
            continue
        body.append(op.group(1))
        target = _BRANCH.search(line)
        if target and target.group(1) in labels:
            ops = collections.Counter(body[labels[target.group(1)] :])
            found.append(
                dict(label=target.group(1), instructions=sum(ops.values()), ops=dict(ops.most_common(top)))
            )
    return found


def _line(r: dict, with_loops: bool = False) -> str:
    line = (
        f"{r['kernel']} {r['consts']}: {r['registers']} registers, {r['spill_store_bytes']} bytes of spill "
        f"stores, {r['total']} instructions: {r['ops']}"
    )
    if with_loops:  # loops of more than a few instructions (not the spin-waits and tails)
        line += "".join(
            f"\n  loop at {lp['label']}: {lp['instructions']} instructions: {lp['ops']}"
            for lp in r["loops"]
            if lp["instructions"] > 16
        )
    return line


def _override(ap: argparse.ArgumentParser, kv: str) -> tuple[str, bool | int]:
    """``NAME=VALUE`` of --set: VALUE True, False or an integer."""
    k, sep, v = kv.partition("=")
    if not sep or not (v in ("True", "False") or v.lstrip("-").isdigit()):
        ap.error(f"--set {kv}: expected NAME=True, NAME=False or NAME=<integer>")
    return k, (v == "True" if v in ("True", "False") else int(v))


def _compile(job: tuple) -> tuple[dict, str | None]:
    """:func:`counts` of one (kernel, constexprs, options) job: (result, None), or (the error's
    record, its traceback) when the kernel fails to compile."""
    kernel, consts, options = job
    try:
        return counts(kernel, consts, **options), None
    except Exception as exc:
        return dict(
            kernel=kernel, consts=consts, error=f"{type(exc).__name__}: {exc}"[:2000]
        ), traceback.format_exc()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--kernel", choices=sorted(KERNELS), nargs="*", default=["scan_bwd_kernel", "scan_fwd_kernel"]
    )
    ap.add_argument("--set", nargs="*", default=[], help="constexpr overrides, e.g. BE=64 RS=False")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (ptxas)")
    ap.add_argument("--warps", type=int, default=None, help="warps per program (default: the launcher's)")
    ap.add_argument("--stages", type=int, default=None, help="software-pipelining stages (default: Triton's)")
    ap.add_argument("--all", action="store_true", help="every kernel in every launch variant")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument(
        "--loops", action="store_true", help="also each loop body's instructions and commonest opcodes"
    )
    ap.add_argument("--jobs", type=int, default=1, help="compile this many kernel variants at once")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: expected 1 or more compiles at a time")
    if args.all:
        if args.set:
            ap.error("--set applies to --kernel's default variants, not to --all's launch variants")
        jobs = [(k, dict(v)) for k, spec in KERNELS.items() for v in spec["variants"]]
    else:
        overrides = dict(_override(ap, kv) for kv in args.set)
        jobs = [(kernel, dict(KERNELS[kernel]["variants"][0])) for kernel in args.kernel]
        for k in overrides:
            if not any(k in consts for _, consts in jobs):
                ap.error(f"--set {k}: no constexpr {k!r} in {', '.join(args.kernel)}")
        for _, consts in jobs:
            consts.update({k: v for k, v in overrides.items() if k in consts})
    options = dict(warps=args.warps, maxnreg=args.maxnreg, stages=args.stages)
    if args.jobs > 1:  # compiles in worker processes (each compile uses one core), results in order
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            outcomes = list(pool.map(_compile, [(k, c, options) for k, c in jobs]))
    else:
        outcomes = map(_compile, [(k, c, options) for k, c in jobs])
    results, failed = [], 0
    for (kernel, consts), (r, trace) in zip(jobs, outcomes):
        if trace is None:
            print(_line(r, args.loops), flush=True)
        else:  # report every kernel, then fail
            failed += 1
            print(f"{kernel} {consts}: FAILED to compile\n{trace}", file=sys.stderr, flush=True)
        results.append(r)
    if args.json:
        args.json.write_text(
            json.dumps(dict(triton=triton.__version__, target="sm_90a", kernels=results), indent=1)
        )
    print(f"Triton {triton.__version__}: {len(results) - failed} of {len(results)} kernel variants compiled")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
