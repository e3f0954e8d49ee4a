"""The ``triton`` kernel path: the whole bidirectional mixer core as one autograd Function.

``bimamba_core_triton(xz, mixer)`` computes what :func:`vimssl.models.mixer.bimamba_core` computes
(xz (B, L, 2E) -> gated, combined y (B, L, E)) with Triton kernels and block-diagonal matmuls:

forward   conv+SiLU of both branches (one kernel)  -> x_proj matmul -> dt_proj matmul
          -> scan of both branches + D skip + SiLU(z) gate + combine (one kernel)
backward  conv recompute -> dt_proj recompute -> scan backward (one kernel, both branches)
          -> dt_proj / x_proj backward matmuls -> conv backward (two kernels)

Saved for the backward: xz, the x_proj output (small) and the ungated branch sum (B, L, E); the
conv output and delta are recomputed. Long sequences at small batches run the scans in chunks
(see :func:`_chunk_len`); short ones with too few programs to fill the GPU run the forward scan's
two branches in separate programs and combine them in one more kernel (see :func:`_split`).
Without gradients (inference, frozen encoders) the core runs the same forward without autograd,
with its derived weights cached on the mixer. Triton is imported only when this module is.
"""

from __future__ import annotations

import functools

import torch

from vimssl.ssm import triton_kernels as K
from vimssl.ssm.dispatch import cdiv, next_pow2, on_device_of, sm_count

# channels per scan program (forward, backward) and warps; conv tile (tokens, channels) and warps.
# From the H100 sweeps in docs/kernel-notes.md.
SEQ_BE_FWD, SEQ_BE_BWD, SEQ_WARPS = 64, 32, 1
# scan backward: keep the recomputed decays in registers (see the kernel)
SEQ_KEEP = False
# ... and compute them again from the kept delta made opaque to the compiler (fewer instructions
# than loading dt again; see K._decay_again)
SEQ_FRESH_DECAY = True
SEQ_RS = True  # scan backward: lane reduce-scatter for the dB/dC sums (see the kernel)
SEQ_PART_BF16 = True  # scan backward: dB/dC partials in bf16 for bf16 runs (see scan_bwd)
SEQ_NARROW = True  # narrower scan programs when a batch gives too few of them (see _seq_channels)
# ... below how many one-warp programs per SM the launchers narrow them (H100, seventh session:
# narrowing Vim-T's 224 px forward at 8 per SM made it slower, 0.32 -> 0.39 ms a layer; splitting
# its branches instead made it faster, 0.32 -> 0.23 ms)
SEQ_NARROW_FILL = 2
# the unchunked forward scan splits its two branches into separate programs (then combined by
# one more kernel) below this many programs per SM (see _split); SEQ_SPLIT True or False forces
# it either way (tests, sweeps)
SEQ_SPLIT_FILL = 8
SEQ_SPLIT: bool | None = None
COMBINE_BR, COMBINE_BE = 16, 128  # tile (rows, channels) of the split forward's combine
# Two-level (chunked) scans for long sequences, see _chunk_len. SEQ_CHUNK: None picks the chunk
# length by occupancy on a GPU; an int forces that many tokens per chunk (tests and sweeps), 0
# never chunks; a pair forces the forward's and the backward's separately.
# SEQ_FILL_{FWD,BWD} = (start, aim): chunking starts when the unchunked scan has fewer one-warp
# programs than ``start`` per SM (about what fits by registers) and aims at ``aim`` per SM;
# chunks are at least SEQ_MIN_CHUNK tokens. From the H100 chunk sweep (docs/kernel-notes.md).
SEQ_CHUNK: int | tuple[int, int] | None = None
# the carry passes skip the chunk whose carry no look-back reads (see K.scan_state_kernel)
SEQ_SKIP_UNREAD = True
SEQ_FILL_FWD, SEQ_FILL_BWD, SEQ_MIN_CHUNK = (12, 24), (8, 48), 128
# Chunk lengths by a wave model (see _wave_chunk) instead of SEQ_FILL's aims. SEQ_WAVE_{FWD,BWD}
# = (one-warp scan programs per SM that fit by registers: 168 and 255; the carry passes' programs
# per SM: 124-128 and 76-88 registers; the carry passes' cost per token against the scan's, from
# the v11 profiles of Vim-S at 1024 px, batch 8: forward state pass 7.14 ms against the forward
# scan's 12.35 in inference, the backward's two passes 0.37 ms each against the scan backward's
# 2.43 per layer). SEQ_PROGRAM_STEPS: a program's fixed cost in token steps (setup, look-back),
# fitted to the v8 chunk sweep.
SEQ_WAVES = True
SEQ_WAVE_FWD, SEQ_WAVE_BWD, SEQ_PROGRAM_STEPS = (12, 16, 0.58), (8, 23, 0.3), 16
SEQ_WAVE_GAIN = 0.05  # the model's pick replaces SEQ_FILL's only when it models this much less time
# The gradient carry pass (scan_state_kernel with GRAD) under a register cap when that saves a
# wave of its programs (see _grad_cap; SEQ_GRAD_CAP True or False forces it): 86-88 registers let
# 20 one-warp programs share an SM (Hopper shares registers per quarter SM: 5 warps of 88 each), 64
# let 32 (the most one-warp programs an SM holds) at 84 bytes of spills.
SEQ_GRAD_CAP: bool | None = None
SEQ_GRAD_MAXNREG, SEQ_GRAD_SLOTS = 64, (20, 32)
# With the forward's states (SEQ_SAVE_CARRY): no gradient carry pass; the scan backward's first
# pass sums each chunk's local gradient carry and publishes it to the chunks before it in
# gradient order, which wait for it (K.scan_bwd_kernel's WSELF). H200, whole training steps at
# 1024 px, batch 8 (v22, by program id): Vim-T +3.7%, Vim-S +0.9-1.3%, Vim-B even (its capped
# gradient pass was the cheapest); Vim-T at 512 px, batch 32, +1.3-1.4%.
SEQ_WSELF = True
# ... its programs in gradient order by program id, the order GPUs start programs in (as CUB's
# single-pass scan relies on), or (True) by ticket, an atomic counter, which holds whatever the
# order but measured 1-4% slower (v22, H200: Vim-T 512 px 592 img/s by id, 562 by ticket, 584
# with the gradient pass; Vim-S 1024 px 77.2 / 75.6 / 76.5)
SEQ_WSELF_TICKET = False
# training with both scans chunked: the forward scan also stores the state entering each of the
# backward's chunks (the backward's chunk length then a multiple of the forward's), so that the
# backward needs one carry pass (the gradient's) instead of two (see chunk_lengths, scan_fwd)
SEQ_SAVE_CARRY = True
# ... the backward's chunk then the longest multiple of the forward's whose modelled time is within
# this fraction of the least (the model's resolution: it undercounts a program's fixed cost). H100,
# Vim-B at 1024 px, batch 8 (twenty-first session): 520 tokens (modelled 0.03% more than 260)
# trained 0.5% faster in two calls, with 2% less memory; 0 keeps the exact least
SEQ_ALIGN_TIE = 0.001
# ... and in training, the (forward, backward) pair picked together (see _joint_chunks): the pair
# with the least modelled time of both scans and their carry passes, a forward token step of the
# model weighted SEQ_JOINT_FWD against a backward one (H100, Vim-B at 1024 px, batch 8, v27
# profile: 34.4 against 34.6 us of step time per modelled token step), where it models at least
# SEQ_JOINT_GAIN less time than the pair picked apart; False: the forward's own pick, the
# backward's aligned to it (_aligned_chunk, the v27 rule). Inference keeps the forward's own pick
# either way. H100 (twenty-fourth session), training img/s picked apart -> together: Vim-B 1024 px
# batch 8 (260, 520) -> (188, 376), modelled -1.8%: 36.6 -> 36.8 (three calls each); Vim-S 1024 px
# batch 16, the same pairs: 75.8 -> 76.0; Vim-T 512 px batch 32 (128, 128) -> (132, 264), modelled
# -2.7%: 562.8 -> 561.4; Vim-T 1024 px batch 8 (128, 384) -> (188, 376), modelled -0.5%: 139.8 ->
# 137.8, which the gain of 1% keeps apart
SEQ_JOINT = True
SEQ_JOINT_FWD = 1.0
SEQ_JOINT_GAIN = 0.01
CONV_BT, CONV_BE, CONV_WARPS = 8, 128, 4
# conv backward's first kernel: one program per (batch row, channels) walking the tokens (H100 sweep,
# Vim-S layer, with the second kernel and the sum: 221 us at 8 x 128, one warp; 233 at 16 x 64)
CONV_GP_BT, CONV_GP_BE, CONV_GP_WARPS = 8, 128, 1
# ... and the token spans per batch row that it walks in separate programs: CONV_GP_SPLIT spans,
# or (None) enough for CONV_GP_FILL programs per SM (each walk is latency-bound, one warp). H100,
# Vim-S layer at 224 px: 0.205-0.217 ms for 1 to 6 spans; at 1024 px, batch 8, one walk per row
# would be 48 programs for 132 SMs
CONV_GP_SPLIT: int | None = None
CONV_GP_FILL = 16
# conv forward and backward as token walks (K.conv_fwd_walk_kernel, K.conv_bwd_walk_kernel) for
# widths up to 4: each input row is loaded once and the backward is one kernel (dx from the
# recomputed pre-activation gradients, never stored); False, and wider convs: the tile kernels
# above. A walk program takes CONV_WALK_BE channels (CONV_WALK_WARPS warps) of one batch row and
# a span of tokens; the spans aim at CONV_WALK_FILL = (forward, backward) programs per SM, with at
# least CONV_WALK_MIN_SPAN tokens each (CONV_WALK_SPAN forces the span: tests, sweeps)
CONV_WALK = True
CONV_WALK_BE, CONV_WALK_WARPS = 128, 1
CONV_WALK_FILL, CONV_WALK_MIN_SPAN = (8, 8), 16
CONV_WALK_SPAN: int | None = None
# ... and the forward walk's spans raised, where that is more, to as many as one wave of
# CONV_WALK_WAVE programs per SM holds (16: what fits at its 128 registers on the H100 and H200;
# None: off). A fill of 16 was 10% faster than 8 for Vim-S at 1024 px, batch 8 in the H200 kernel
# sweep (v20) but 7-17% slower at 224 px, batch 128, where 16 per SM take more than one wave;
# the one-wave rule keeps 8's spans there. Training img/s off -> on, H100, two alternations each
# (twenty-sixth session, v30): Vim-T 224 px +0.3%, 512 px 0.0%, 1024 px +0.4%; Vim-S 512 px 0.0%;
# Vim-B 512 px +0.4%, 1024 px +0.3% (Vim-S and Vim-B at 224 px: the same spans)
CONV_WALK_WAVE: int | None = 16
CONV_PACK_BT = 8  # tokens per tile of the forward walk's B/C packing
# ... done by every channel block's programs, a share of the span's rows each, instead of by the
# first block's alone (which made the backward's recompute 13 us slower than the forward per
# Vim-S layer on an H200, v20). Training img/s off -> on: H200 Vim-S 224 px 1,947 -> 1,955, 1024
# px 75.9 -> 76.3 (fifteenth session); H100 Vim-B 1024 px 36.7-36.8 -> 37.0 (twenty-fifth): on
# since the twenty-fifth session
CONV_PACK_SPREAD = True
# training keeps the x_proj output but not the packed float32 B/C built from it: the backward's
# conv recompute rebuilds it in the same launch (2N float32 per token and layer less memory)
BC_IN_CONV = True
PART_BT = 32  # tokens per program of the dB/dC partial sum
COLSUM_BR, COLSUM_BW = 128, 32  # rows per step and columns per program of the weight-gradient sums
# the float32 casts of the x_proj and dt_proj weight gradients (strided diagonal blocks of the
# matmuls' products) done by extra programs of the conv backward's column-sum launch, COLSUM_BC
# elements each, instead of by two copy kernels per layer. With triton_norm's NORM_DW_ROWS +1.2%
# Vim-T training at 224 px on an H100 (v26, docs/kernel-notes.md)
WGRAD_CAST_IN_COLSUM = True
COLSUM_BC = 1024
PREP_BE = 64  # channels per program of the derived-weights kernel
# training: whether out_proj runs inside the core's Function, whose backward then rebuilds the
# gated output y (the scan backward writes it again, from the kept branch sum and z) instead of
# out_proj's autograd keeping it for the weight gradient (see bimamba_core_out_triton). None:
# when the forward saves its carries (SEQ_SAVE_CARRY), so that the long sequences that keep them
# keep (B, L, E) less per layer; True / False: always / never
Y_REBUILD: bool | None = None
# in_proj's weight gradient, and out_proj's where it runs as a module after the core (short
# sequences), written as float32 by their matmuls (half precision inputs on the GPU, float32
# weights) through HalfLinearFn (see linear) instead of autocast's half precision product and
# cast: +0.6% Vim-T training at 224 px on an H100, even at Vim-B 1024 px (v26)
LINEAR_WGRAD_F32 = True
# ... and out_proj's where it runs inside the core's Function (long sequences, Y_REBUILD). Not yet
# measured on a GPU (v25's float32-output batched matmul was much slower than cuBLAS's split-K
# kernels; the plain matmul of LINEAR_WGRAD_F32 was not): off
OUT_WGRAD_F32 = False
# fill of the chunk carries' buffers before scan_state_kernel writes them: None leaves them
# uninitialised; the interpreter check sets NaN, so that reading a carry no program wrote (the
# last chunk's, which it skips) shows in the results
CARRY_FILL: float | None = None
LAST: dict = {}  # the last launch handle of each kernel (registers and spills, for benchmarks)


def _check(xz: torch.Tensor, e: int) -> None:
    if xz.dim() != 3 or xz.shape[-1] != 2 * e:
        raise ValueError(f"expected xz of shape (batch, tokens, {2 * e}), got {tuple(xz.shape)}")
    if xz.stride(-1) != 1:
        raise ValueError("xz must be contiguous in its last (channel) dimension")


def _walks(w: torch.Tensor) -> bool:
    """Whether the conv runs as token walks (CONV_WALK, up to four taps)."""
    return CONV_WALK and w.shape[1] <= 4


def _walk_span(x: torch.Tensor, bsz: int, seqlen: int, e: int, fill: int, wave: int | None = None) -> int:
    """Tokens per span of a conv token walk: enough spans for ``fill`` programs per SM, or (if
    more) as many as one wave of ``wave`` programs per SM holds, of at least CONV_WALK_MIN_SPAN
    tokens (one span per row off the GPU, unless CONV_WALK_SPAN forces it)."""
    if CONV_WALK_SPAN is not None:
        return CONV_WALK_SPAN
    if x.device.type != "cuda":
        return seqlen
    sms, per_span = sm_count(x.device), bsz * cdiv(e, CONV_WALK_BE)  # programs of one span per row
    n = cdiv(fill * sms, per_span)
    if wave is not None:
        n = max(n, wave * sms // per_span)
    n = max(1, min(n, seqlen // CONV_WALK_MIN_SPAN))
    return cdiv(seqlen, n)


def conv_fwd(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, pack: tuple | None = None
) -> torch.Tensor:
    """x (B, L, E) view, channel stride 1 -> out (B, L, 2E): both branches' SiLU(conv + bias).
    ``pack`` = (dbc (B*L, 2P) contiguous, R, bc (B, L, 2, 2N) float32 contiguous): also writes
    :func:`_bc_pack` of dbc into bc, in the same launch."""
    bsz, seqlen, e = x.shape
    dbc, r, bc = pack if pack is not None else (x, 0, out)
    n2, p = (bc.shape[-1], dbc.shape[1] // 2) if pack is not None else (0, 0)
    bj = next_pow2(max(n2, 1))
    if _walks(w):
        span = _walk_span(x, bsz, seqlen, e, CONV_WALK_FILL[0], CONV_WALK_WAVE)
        grid = (cdiv(e, CONV_WALK_BE), bsz, cdiv(seqlen, span))
        LAST["conv_fwd_walk_kernel"] = K.conv_fwd_walk_kernel[grid](
            x, w, bias, out, dbc, bc, seqlen, e, p, r, n2, span,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            K=w.shape[1], BE=CONV_WALK_BE, PACK=pack is not None, BJ=bj, BTP=CONV_PACK_BT,
            SPREAD=CONV_PACK_SPREAD, num_warps=CONV_WALK_WARPS,
        )  # fmt: skip
        return out
    grid = (cdiv(seqlen, CONV_BT), cdiv(e, CONV_BE), bsz)
    LAST["conv_fwd_kernel"] = K.conv_fwd_kernel[grid](
        x, w, bias, out, dbc, bc, seqlen, e, p, r, n2, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        K=w.shape[1], BT=CONV_BT, BE=CONV_BE, PACK=pack is not None, BJ=bj, num_warps=CONV_WARPS,
    )  # fmt: skip
    return out


def conv_bwd(x, w, bias, g, dx, casts: tuple = ()):
    """Gradients of :func:`conv_fwd`: writes dx (B, L, E); returns dw (2E, K), dbias (2E,) float32
    and ``casts`` (up to two strided 3-D tensors) cast to contiguous float32 in its column-sum
    launch (:func:`colsum`). ``g`` (the SiLU outputs' gradient) may be overwritten (the tile
    kernels write the pre-activation gradient over it)."""
    bsz, seqlen, e = x.shape
    k = w.shape[1]
    if _walks(w):
        span = _walk_span(x, bsz, seqlen, e, CONV_WALK_FILL[1])
        n_split = cdiv(seqlen, span)
        dwb = torch.empty(bsz, n_split, k + 1, 2 * e, device=x.device, dtype=torch.float32)
        LAST["conv_bwd_walk_kernel"] = K.conv_bwd_walk_kernel[(cdiv(e, CONV_WALK_BE), bsz, n_split)](
            x, w, bias, g, dx, dwb, seqlen, e, span, n_split,
            x.stride(0), x.stride(1), g.stride(0), g.stride(1), dx.stride(0), dx.stride(1),
            K=k, BE=CONV_WALK_BE, num_warps=CONV_WALK_WARPS,
        )  # fmt: skip
    else:
        span = _conv_span(x, bsz, seqlen, e)
        n_split = cdiv(seqlen, span)
        dwb = torch.empty(bsz, n_split, k + 1, 2 * e, device=x.device, dtype=torch.float32)
        LAST["conv_bwd_gp_kernel"] = K.conv_bwd_gp_kernel[(cdiv(e, CONV_GP_BE), bsz, n_split)](
            x, w, bias, g, g, dwb, seqlen, e, span, n_split, x.stride(0), x.stride(1), g.stride(0), g.stride(1),
            K=k, BK=next_pow2(k + 1), BT=CONV_GP_BT, BE=CONV_GP_BE, num_warps=CONV_GP_WARPS,
        )  # fmt: skip
        grid = (cdiv(seqlen, CONV_BT), cdiv(e, CONV_BE), bsz)
        LAST["conv_bwd_dx_kernel"] = K.conv_bwd_dx_kernel[grid](
            g, w, dx, seqlen, e, g.stride(0), g.stride(1), dx.stride(0), dx.stride(1),
            K=k, BT=CONV_BT, BE=CONV_BE, num_warps=CONV_WARPS,
        )  # fmt: skip
    # contiguous, as the parameters are
    dw, db, cast = colsum(dwb.view(bsz * n_split, k + 1, 2 * e), k, casts)
    return dw, db[0], cast


def _conv_span(x: torch.Tensor, bsz: int, seqlen: int, e: int) -> int:
    """Tokens per span of the conv backward's token walk (a multiple of CONV_GP_BT): the walk
    is split when one program per (batch row, channel block) would leave the SMs short of warps
    (the long sequences of small batches, and Vim-S's 224 px rows too), into spans of at least
    four tiles (unless CONV_GP_SPLIT forces a count)."""
    if CONV_GP_SPLIT is not None:
        n = CONV_GP_SPLIT
    elif x.device.type != "cuda":
        n = 1
    else:
        n = cdiv(CONV_GP_FILL * sm_count(x.device), bsz * cdiv(e, CONV_GP_BE))
        n = min(n, cdiv(seqlen, 4 * CONV_GP_BT))
    return CONV_GP_BT * cdiv(cdiv(seqlen, max(n, 1)), CONV_GP_BT)


def colsum(src: torch.Tensor, n_a: int, casts: tuple = ()) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """src (R, T, W) float32 partials summed over R (:func:`K.colsum_kernel`): rows t < n_a
    transposed, (W, n_a), and the rest, (T - n_a, W); both contiguous float32. Also ``casts``
    (up to two 3-D tensors of any strides with unit stride along the last dimension, any
    dtype) as contiguous float32 copies, made by the same launch."""
    r, t, w = src.shape
    f32 = dict(device=src.device, dtype=torch.float32)
    a, b = torch.empty(w, n_a, **f32), torch.empty(t - n_a, w, **f32)
    if len(casts) > 2 or any(c.dim() != 3 or c.stride(-1) != 1 for c in casts):
        raise ValueError("colsum casts: up to two 3-D tensors with unit stride along the last dimension")
    outs = tuple(torch.empty(c.shape, **f32) for c in casts)
    jobs = [
        (c, o, c.numel(), c.shape[1] * c.shape[2], c.shape[2], c.stride(0), c.stride(1))
        for c, o in zip(casts, outs)
    ]
    jobs += [(src, src, 0, 1, 1, 0, 0)] * (2 - len(jobs))  # (no elements: never read)
    n_w = cdiv(w, COLSUM_BW)
    n_c = cdiv(cdiv(sum(c.numel() for c in casts), COLSUM_BC), t)
    K.colsum_kernel[(n_w + n_c, t)](
        src, a, b, r, t, w, n_a, n_w, *jobs[0], *jobs[1],
        BR=COLSUM_BR, BW=COLSUM_BW, CAST=bool(casts), BC=COLSUM_BC, num_warps=4,
    )  # fmt: skip
    return a, b, outs


def _seq_channels(x: torch.Tensor, bsz: int, e: int, widest: int) -> int:
    """Channels per sequential-scan program: ``widest`` (fewest instructions per channel) unless
    that leaves fewer than SEQ_NARROW_FILL programs per SM (small batches of long sequences), then
    narrower: each program walks its tokens in sequence, so too few of them leave the SMs
    waiting on that chain."""
    if x.device.type != "cuda" or not SEQ_NARROW:
        return widest
    be = widest
    while be > 8 and bsz * cdiv(e, be) < SEQ_NARROW_FILL * sm_count(x.device):
        be //= 2
    return be


def _cached_under(*names: str):
    """``functools.lru_cache`` for a pick that depends on the launch shape and on the module
    settings ``names``, which join the cache key: sweeps and tests that change a setting get a
    fresh pick, not a stale one."""

    def wrap(fn):
        @functools.lru_cache(maxsize=256)
        def keyed(settings: tuple, *args):
            return fn(*args)

        @functools.wraps(fn)
        def call(*args):
            return keyed(tuple(globals()[name] for name in names), *args)

        return call

    return wrap


def _chunk_len(
    x: torch.Tensor, seqlen: int, programs: int, fill: tuple[int, int], sms: int | None = None
) -> int:
    """Tokens per chunk of the two-level scan (``seqlen``: no chunking). A sequential scan runs
    one warp per (batch row, channel block, branch): batch 8 at 1024 px gives a few hundred
    programs of 4,097 steps each, too few to fill an H100's warp slots (about 12 per SM for the
    forward, 8 for the backward, by registers). Splitting the tokens into chunks multiplies the
    programs; the cost is one more pass over the tokens for the chunk-local carries. More
    programs than fit at once still help (shorter tails, more latency hidden), hence ``aim``.
    ``sms``: the GPU's SM count (default: ``x``'s device's)."""
    if SEQ_CHUNK is not None:
        forced = SEQ_CHUNK if isinstance(SEQ_CHUNK, int) else SEQ_CHUNK[fill is SEQ_FILL_BWD]
        return min(forced, seqlen) if forced > 0 else seqlen
    if x.device.type != "cuda":
        return seqlen
    sms = sms or sm_count(x.device)
    start, aim = fill
    if programs >= start * sms or seqlen < 2 * SEQ_MIN_CHUNK:
        return seqlen
    n_ch = cdiv(aim * sms, programs)
    return max(SEQ_MIN_CHUNK, 4 * cdiv(cdiv(seqlen, n_ch), 4))


def chunk_lengths(
    x: torch.Tensor, bsz: int, seqlen: int, e: int, training: bool = True, sms: int | None = None
) -> tuple[int, int]:
    """Tokens per chunk of the forward and backward scans of ``bsz`` rows of ``seqlen`` tokens and
    ``e`` inner channels (``seqlen``: one chunk), from their full-width program counts: the
    forward has one program per (row, SEQ_BE_FWD channels), the backward one per (row,
    SEQ_BE_BWD channels, branch). Whether to chunk follows SEQ_FILL's first numbers; how long
    the chunks are, :func:`_wave_chunk` (unless SEQ_WAVES is off or SEQ_CHUNK forces a length).
    The carry passes run the backward's grid, and the forward's with both branches as programs.
    With SEQ_SAVE_CARRY and both scans chunked, the backward's length is a multiple of the
    forward's, so that the forward can store the states its backward chunks start from: in
    ``training`` (SEQ_JOINT) the pair that models the least time of both scans together
    (:func:`_joint_chunks`), otherwise the multiple of the forward's own pick that models the
    least time of the backward (:func:`_aligned_chunk`). Inference (``training`` False) uses only
    the forward's length, which is then the forward's own pick. ``sms``: the GPU's SM count
    (default: ``x``'s device's; ``benchmarks/chunk_picks.py`` lists the picks for a GPU it names)."""
    fwd_programs, bwd_programs = bsz * cdiv(e, SEQ_BE_FWD), 2 * bsz * cdiv(e, SEQ_BE_BWD)

    def gpu_sms() -> int:  # (asked only where the scans chunk: x is then a CUDA tensor)
        return sms or sm_count(x.device)

    def pick(programs: int, fill: tuple, wave: tuple, state_programs: int) -> int:
        chunk = _chunk_len(x, seqlen, programs, fill, sms)
        if chunk == seqlen or not SEQ_WAVES or SEQ_CHUNK is not None:
            return chunk
        slots, state_slots, weight = wave
        n = gpu_sms()
        return _wave_chunk(seqlen, chunk, programs, slots * n, state_programs, state_slots * n, weight)

    fwd = pick(fwd_programs, SEQ_FILL_FWD, SEQ_WAVE_FWD, 2 * fwd_programs)
    bwd = pick(bwd_programs, SEQ_FILL_BWD, SEQ_WAVE_BWD, bwd_programs)
    if SEQ_SAVE_CARRY and SEQ_CHUNK is None and max(fwd, bwd) < seqlen:
        if bwd % fwd:
            bwd = _aligned_chunk(seqlen, fwd, bwd, bwd_programs, gpu_sms())
        if training and SEQ_JOINT and SEQ_WAVES:
            return _joint_chunks(seqlen, fwd_programs, bwd_programs, gpu_sms(), (fwd, bwd))
    return fwd, bwd


def saves_carries(seqlen: int, chunks: tuple[int, int]) -> bool:
    """Whether a training forward with these (forward, backward) chunk lengths stores the states
    its backward's chunks start from (SEQ_SAVE_CARRY, both scans chunked, the backward's chunk a
    multiple of the forward's)."""
    fwd, bwd = chunks
    return SEQ_SAVE_CARRY and max(fwd, bwd) < seqlen and bwd % fwd == 0


@_cached_under("SEQ_WAVES", "SEQ_WAVE_BWD", "SEQ_PROGRAM_STEPS", "SEQ_ALIGN_TIE")
def _aligned_chunk(seqlen: int, fwd: int, bwd: int, programs: int, sms: int) -> int:
    """The backward's chunk length as a multiple of the forward's ``fwd`` (shorter than
    ``seqlen``): with the wave model (SEQ_WAVES), the longest whose modelled time of the scan
    backward and its one carry pass (the gradient's: the states come from the forward) is within
    SEQ_ALIGN_TIE of the least; otherwise the one nearest the unaligned pick ``bwd`` (the longer
    on a tie)."""
    cands = range(fwd, seqlen, fwd)
    if not SEQ_WAVES:
        return min(cands, key=lambda c: (abs(c - bwd), -c))
    costs = {c: _bwd_cost(seqlen, c, programs, sms) for c in cands}
    least = min(costs.values())
    return max(c for c, t in costs.items() if t <= (1 + SEQ_ALIGN_TIE) * least)


def _scan_cost(
    seqlen: int,
    chunk: int,
    programs: int,
    slots: int,
    state_programs: int,
    state_slots: int,
    state_weight: float,
) -> float:
    """The wave model's time (token steps) of a scan in chunks of ``chunk`` tokens: its
    :func:`_makespan` (``programs`` per chunk on ``slots``) plus ``state_weight`` times that of its
    carry passes (``state_programs`` per chunk on ``state_slots``)."""
    scan = _makespan(seqlen, chunk, programs, slots)
    return scan + state_weight * _makespan(seqlen, chunk, state_programs, state_slots)


def _fwd_cost(seqlen: int, chunk: int, programs: int, sms: int) -> float:
    """:func:`_scan_cost` of the scan forward (``programs`` per chunk) with its state pass (both
    branches as programs) on ``sms`` SMs: what :func:`_wave_chunk` minimises for the forward."""
    slots, state_slots, weight = SEQ_WAVE_FWD
    return _scan_cost(seqlen, chunk, programs, slots * sms, 2 * programs, state_slots * sms, weight)


def _bwd_cost(seqlen: int, chunk: int, programs: int, sms: int) -> float:
    """:func:`_scan_cost` of the scan backward (``programs`` per chunk) with its one carry pass
    (the gradient's: the states come from the forward) on ``sms`` SMs."""
    slots, state_slots, weight = SEQ_WAVE_BWD
    return _scan_cost(seqlen, chunk, programs, slots * sms, programs, state_slots * sms, weight / 2)


@_cached_under(
    "SEQ_WAVE_FWD", "SEQ_WAVE_BWD", "SEQ_PROGRAM_STEPS", "SEQ_ALIGN_TIE", "SEQ_MIN_CHUNK", "SEQ_JOINT_FWD",
    "SEQ_JOINT_GAIN",
)  # fmt: skip
def _joint_chunks(
    seqlen: int, fwd_programs: int, bwd_programs: int, sms: int, base: tuple[int, int]
) -> tuple[int, int]:
    """The (forward, backward) chunk lengths of a training step whose scans are both chunked, picked
    together: the forward's a multiple of 4 of at least SEQ_MIN_CHUNK tokens, the backward's a
    multiple of it, shorter than ``seqlen``; the pair with the least modelled time, SEQ_JOINT_FWD
    times the forward's (its scan on ``fwd_programs`` per chunk and its state pass on twice as
    many, :func:`_fwd_cost`) plus the backward's (:func:`_bwd_cost`). Among the pairs
    within SEQ_ALIGN_TIE of the least, the longest backward chunk, then the longest forward one
    (fewer carries, less memory). ``base`` (the pair picked apart) unless the joint pair models
    SEQ_JOINT_GAIN less time.

    Picked apart, each scan's length fills its own waves, but the backward's must then be a
    multiple of the forward's, which may fill its waves badly: Vim-B at 1024 px, batch 8, H100,
    the forward's own 260 tokens (16 chunks) leave the backward 520 (8 chunks, 6,144 programs on
    1,056 slots: 5.8 waves, 6 waves' time); 188 and 376 (11 chunks, 8,448 programs) fill 8 waves
    exactly, for a forward that models 5% more time."""
    # each length's cost once (a forward length is paired with every multiple of it)
    fwd = functools.lru_cache(maxsize=None)(lambda chunk: _fwd_cost(seqlen, chunk, fwd_programs, sms))
    bwd = functools.lru_cache(maxsize=None)(lambda chunk: _bwd_cost(seqlen, chunk, bwd_programs, sms))
    costs = {
        (f, b): SEQ_JOINT_FWD * fwd(f) + bwd(b)
        for f in range(SEQ_MIN_CHUNK, seqlen, 4)
        for b in range(f, seqlen, f)
    }
    least = min(costs.values())
    best = max((b, f) for (f, b), t in costs.items() if t <= (1 + SEQ_ALIGN_TIE) * least)[::-1]
    base_cost = SEQ_JOINT_FWD * fwd(base[0]) + bwd(base[1])
    return best if costs[best] <= (1 - SEQ_JOINT_GAIN) * base_cost else base


def _makespan(seqlen: int, chunk: int, programs: int, slots: int) -> int:
    """Token steps until the last of a chunked scan's programs ends: ``programs`` per chunk, each
    walking its chunk (the last one is shorter) plus SEQ_PROGRAM_STEPS, started in launch order
    (chunk by chunk) on ``slots`` slots, each taking the next program as soon as it is free.
    Programs of equal length run in waves, so a wave that is only partly filled costs as much as
    a full one."""
    n_full, rest = divmod(seqlen, chunk)
    step, last = chunk + SEQ_PROGRAM_STEPS, rest + SEQ_PROGRAM_STEPS
    full = programs * n_full
    if full == 0:
        return cdiv(programs, slots) * last
    waves = cdiv(full, slots)
    if rest == 0:
        return waves * step
    idle = slots - (full - (waves - 1) * slots)  # slots without a program in the last full wave
    late = programs - min(programs, idle)  # the short chunk's programs that wait for that wave
    if late == 0:
        return max(waves * step, (waves - 1) * step + last)
    return waves * step + cdiv(late, slots) * last


@_cached_under("SEQ_MIN_CHUNK", "SEQ_PROGRAM_STEPS", "SEQ_WAVE_GAIN")
def _wave_chunk(
    seqlen: int,
    base: int,
    programs: int,
    slots: int,
    state_programs: int,
    state_slots: int,
    state_weight: float,
) -> int:
    """A chunk length (a multiple of 4, at least SEQ_MIN_CHUNK) with the least modelled time: the
    scan's :func:`_makespan` (``programs`` per chunk on ``slots``) plus ``state_weight`` times
    that of its carry passes; ``base`` (SEQ_FILL's pick) unless that models SEQ_WAVE_GAIN less
    time (the model is coarse: it does not move measured picks for a few percent).

    Programs of equal length run in waves, so the chunk count decides how full the last wave is:
    at 1024 px, batch 8, Vim-S's backward in 17 chunks of 244 tokens makes 6.2 waves (7 waves'
    time), in 11 of 376 it makes 4.0. On the v8 chunk sweep (1024 px, batch 8, 128-2,048 tokens)
    the model ranked the measured times: the backward's of Vim-S and Vim-B (training minus
    inference) and the forward's of Vim-S and Vim-T (inference) exactly, Vim-B's forward but for
    two lengths within 1% of each other."""

    def cost(chunk: int) -> float:
        return _scan_cost(seqlen, chunk, programs, slots, state_programs, state_slots, state_weight)

    # the least cost; among equal costs the longest chunk (fewer carries)
    best = min(range(SEQ_MIN_CHUNK, seqlen, 4), key=lambda chunk: (cost(chunk), -chunk))
    return best if cost(best) <= (1 - SEQ_WAVE_GAIN) * cost(base) else base


def _bc_pack(dbc: torch.Tensor, r: int) -> torch.Tensor:
    """B and C of both branches from the x_proj output (B, L, 2, R+2N), repacked contiguous
    float32, (B, L, 2, 2N): 16-byte vector loads with no conversion in the scan loops."""
    return dbc[..., r:].float().contiguous()


def scan_fwd(
    xc, dt, bc, z, At2, D, dt_bias, save_sum, chunks: tuple[int, int] | None = None, save_carry: bool = False
):
    """xc, dt (B, L, 2E), bc (B, L, 2, 2N) float32, z (B, L, E); At2 (N, 2E) A log2(e) from :func:`derived_weights`,
    D, dt_bias (2E,) float32. ``chunks``: the (forward, backward) chunk lengths (default:
    :func:`chunk_lengths`'s). Returns y (B, L, E), the ungated branch sum if ``save_sum`` (else
    None), and with ``save_carry`` (which needs :func:`saves_carries` of ``chunks``) the states
    entering the backward's chunks, (B, n_b, BN, 2E) float32, for :func:`scan_bwd`'s
    ``carries`` (else None)."""
    bsz, seqlen, e2 = xc.shape
    e, d_state = e2 // 2, bc.shape[-1] // 2
    y = torch.empty(bsz, seqlen, e, device=xc.device, dtype=xc.dtype)
    ysum = torch.empty_like(y) if save_sum else y
    bn = next_pow2(d_state)
    chunk, carry_chunk = (
        chunks if chunks is not None else chunk_lengths(xc, bsz, seqlen, e, save_sum or save_carry)
    )
    if save_carry and not saves_carries(seqlen, (chunk, carry_chunk)):
        raise ValueError(
            f"save_carry needs both scans chunked (< {seqlen} tokens) and the backward's chunk a multiple of "
            f"the forward's, got chunks ({chunk}, {carry_chunk}) with SEQ_SAVE_CARRY={SEQ_SAVE_CARRY}"
        )
    n_ch = cdiv(seqlen, chunk)
    be = _seq_channels(xc, bsz * n_ch, e, SEQ_BE_FWD)
    split = n_ch == 1 and _split(xc, bsz * cdiv(e, be)) and z.stride(0) == seqlen * z.stride(1)
    # split: the branches' ungated outputs go to a (2, B, L, E) buffer that combine_kernel reads
    out = torch.empty(2, bsz, seqlen, e, device=xc.device, dtype=xc.dtype) if split else y
    strides = (
        xc.stride(0), xc.stride(1), dt.stride(0), dt.stride(1), bc.stride(0), bc.stride(1), bc.stride(2),
        z.stride(0), z.stride(1), out.stride(-3), out.stride(-2), out.stride(0) if split else 0,
    )  # fmt: skip
    hc, sc = _chunk_states(xc, dt, bc, z, None, At2, dt_bias, chunk, n_ch, be, strides[:-3], y.stride())
    n_b = cdiv(seqlen, carry_chunk) if save_carry else 1
    hin = torch.empty(bsz, n_b, bn, e2, device=xc.device, dtype=torch.float32) if save_carry else None
    if save_carry and CARRY_FILL is not None:
        hin.fill_(CARRY_FILL)
    LAST["scan_fwd_kernel"] = K.scan_fwd_kernel[(cdiv(e, be), bsz, 2 if split else n_ch)](
        xc, dt, bc, z, At2, D, dt_bias, out, ysum, hc, sc, hin if save_carry else hc,
        seqlen, e, d_state, 0, chunk, n_ch, carry_chunk if save_carry else 1, n_b, *strides,
        SAVE_SUM=save_sum, BE=be, BN=bn, EVEN_N=bn == d_state, CHUNKED=n_ch > 1, SPLIT=split,
        SAVE_CARRY=save_carry, num_warps=SEQ_WARPS,
    )  # fmt: skip
    if split:
        rows = bsz * seqlen
        K.combine_kernel[(cdiv(rows, COMBINE_BR), cdiv(e, COMBINE_BE))](
            out, z, y, ysum, rows, e, out.stride(0), z.stride(1),
            SAVE_SUM=save_sum, BR=COMBINE_BR, BE=COMBINE_BE, num_warps=4,
        )  # fmt: skip
    return y, (ysum if save_sum else None), hin


def _split(x: torch.Tensor, programs: int) -> bool:
    """Whether the (unchunked) forward scan runs its two branches in separate programs: when its
    ``programs`` (each walking both branches in turn) are fewer than SEQ_SPLIT_FILL per SM.
    Twice the programs, each half as long, for one more pass over the output (the combine).
    It needs z's rows evenly strided (z a view of a contiguous xz, or contiguous)."""
    if SEQ_SPLIT is not None:
        return SEQ_SPLIT
    return x.device.type == "cuda" and programs < SEQ_SPLIT_FILL * sm_count(x.device)


def _chunk_states(xc, dt, bc, z, dy, At2, dt_bias, chunk, n_ch, be, in_strides, dy_strides, grad_sums=False):
    """The chunk-local carries of the two-level scan (:func:`K.scan_state_kernel`): the states
    and sums of delta (``dy`` None) or the gradient carries (``dy`` given; with ``grad_sums``,
    the sums of delta too). Returns (carries (B, n_ch, BN, 2E), sums of delta (B, n_ch, 2E) or None)
    float32; (xc, xc) placeholders when there is one chunk (the kernels do not read them then)."""
    if n_ch == 1:
        return xc, xc
    bsz, seqlen, e2 = xc.shape
    e, d_state = e2 // 2, bc.shape[-1] // 2
    bn = next_pow2(d_state)
    f32 = dict(device=xc.device, dtype=torch.float32)
    grad = dy is not None
    with_sums = not grad or grad_sums
    carry = torch.empty(bsz, n_ch, bn, e2, **f32)
    sums = torch.empty(bsz, n_ch, e2, **f32) if with_sums else xc
    if CARRY_FILL is not None:
        carry.fill_(CARRY_FILL)
        if with_sums:
            sums.fill_(CARRY_FILL)
    name = "scan_state_kernel" + ("_grad" if grad else "")
    LAST[name] = K.scan_state_kernel[(cdiv(e, be), bsz, 2 * n_ch)](
        xc, dt, bc, z, dy if grad else xc, At2, dt_bias, carry, sums, seqlen, e, d_state, 0, chunk, n_ch,
        *in_strides, *dy_strides[:2], GRAD=grad, BE=be, BN=bn, EVEN_N=bn == d_state, SKIP=SEQ_SKIP_UNREAD,
        SUMS=grad and with_sums, num_warps=SEQ_WARPS,
        **({"maxnreg": SEQ_GRAD_MAXNREG} if grad and _grad_cap(xc, bsz * cdiv(e, be), n_ch) else {}),
    )  # fmt: skip
    return carry, (sums if with_sums else None)


def _grad_cap(x: torch.Tensor, programs: int, n_ch: int) -> bool:
    """Whether the gradient carry pass runs under SEQ_GRAD_MAXNREG registers: when its programs
    (``programs`` per chunk and branch, less the chunk per branch it skips) take fewer waves with
    the cap's SEQ_GRAD_SLOTS[1] programs per SM than with SEQ_GRAD_SLOTS[0]. At 1024 px, batch 8,
    on the H200's 132 SMs: Vim-S's 3,840 programs take one wave instead of two, Vim-B's 11,520
    three instead of five; Vim-T's 1,920 fit one wave either way, and the cap's spills cost it 2%."""
    if SEQ_GRAD_CAP is not None:
        return SEQ_GRAD_CAP
    if x.device.type != "cuda" or not SEQ_GRAD_MAXNREG:
        return False
    working = 2 * programs * (n_ch - 1 if SEQ_SKIP_UNREAD else n_ch)
    free, capped = (slots * sm_count(x.device) for slots in SEQ_GRAD_SLOTS)
    return cdiv(working, capped) < cdiv(working, free)


def _rs(be: int, d_state: int) -> bool:
    """Whether the scan backward uses the lane reduce-scatter (inline PTX on a GPU; under the CPU
    interpreter, the same arithmetic on the block's 32 channel columns)."""
    return SEQ_RS and be == 32 and d_state == 16 and SEQ_WARPS == 1


def scan_bwd(
    xc, dt, bc, z, At2, D, dt_bias, dy, ysum, dz,
    sum_parts: bool = True, chunk: int | None = None, carries=None, y_out=None,
):  # fmt: skip
    """Inputs as :func:`scan_fwd`, dy (B, L, E) the gradient of y. Returns du, ddt (B, L, 2E) in
    xc's dtype, dBC (B, L, 2, 2N) in xc's dtype, dA_log (2E, N), dD and d_dt_bias (2E,) float32;
    writes dz (B, L, E). ``sum_parts=False`` returns dBC's per-program partials instead, for
    :func:`sum_dbc_parts` to write where the caller wants them. ``chunk``: tokens per chunk
    (default: :func:`chunk_lengths`'s); ``carries``: the states entering those chunks from
    :func:`scan_fwd` (its ``save_carry``, with this ``chunk`` as its backward chunk), which spare the
    backward its state pass.
    ``y_out`` (B, L, E) contiguous: also write the gated output y there again (from ysum and z),
    for a caller that did not keep it."""
    bsz, seqlen, e2 = xc.shape
    e, d_state = e2 // 2, bc.shape[-1] // 2
    bn = next_pow2(d_state)
    if chunk is None:
        chunk = chunk_lengths(xc, bsz, seqlen, e)[1]
    n_ch = cdiv(seqlen, chunk)
    hin = carries is not None and n_ch > 1
    if hin and tuple(carries.shape) != (bsz, n_ch, bn, e2):
        raise ValueError(f"carries of shape {tuple(carries.shape)} for {n_ch} chunks of {chunk} tokens")
    be = _seq_channels(xc, bsz * n_ch, e, SEQ_BE_BWD)
    n_eb = cdiv(e, be)
    f32 = dict(device=xc.device, dtype=torch.float32)
    # the state entering each group of 4 tokens, per chunk
    hst = torch.empty(bsz, n_ch, cdiv(chunk, 4), bn, e2, **f32)
    du, ddt = torch.empty_like(xc), torch.empty_like(xc)
    # dB/dC partials (each a float32 sum over one program's channels): bf16 for bf16 runs, which
    # halves their bytes and the sum's; float32 otherwise (fp16's range is too narrow for them)
    part_dtype = torch.bfloat16 if SEQ_PART_BF16 and xc.dtype == torch.bfloat16 else torch.float32
    part = torch.empty(bsz, 2, n_eb, seqlen, 2 * d_state, device=xc.device, dtype=part_dtype)
    acc = torch.empty(bsz * n_ch, d_state + 2, e2, **f32)  # dA_log (N rows), dD, dt bias
    dy = dy.contiguous()
    if y_out is not None and (y_out.shape != dy.shape or y_out.stride() != dy.stride()):
        raise ValueError(
            f"y_out must be contiguous of shape {tuple(dy.shape)}, got shape {tuple(y_out.shape)} "
            f"with strides {y_out.stride()}"
        )
    in_strides = (
        xc.stride(0), xc.stride(1), dt.stride(0), dt.stride(1),
        bc.stride(0), bc.stride(1), bc.stride(2), z.stride(0), z.stride(1),
    )  # fmt: skip
    # the two-level scan's chunk-local carries (placeholders when there is one chunk)
    # (with the forward's states, the gradient pass also sums delta per chunk for its look-back)
    args = (xc, dt, bc, z)
    wself = hin and SEQ_WSELF
    flags = dy  # (a placeholder unless wself: the kernel does not read it)
    if wself:  # the scan backward writes the gradient carries and sums of delta itself
        hc = carries
        wc, sc = torch.empty(bsz, n_ch, bn, e2, **f32), torch.empty(bsz, n_ch, e2, **f32)
        if CARRY_FILL is not None:
            wc.fill_(CARRY_FILL)
            sc.fill_(CARRY_FILL)
        # the chunks' flags, then the programs' ticket counter
        flags = torch.zeros(bsz * n_eb * 2 * n_ch + 1, device=xc.device, dtype=torch.int32)
    elif hin:
        hc = carries
        wc, sc = _chunk_states(
            *args, dy, At2, dt_bias, chunk, n_ch, be, in_strides, dy.stride(), grad_sums=True
        )
    else:
        hc, sc = _chunk_states(*args, None, At2, dt_bias, chunk, n_ch, be, in_strides, dy.stride())
        wc, _ = _chunk_states(*args, dy, At2, dt_bias, chunk, n_ch, be, in_strides, dy.stride())
    LAST["scan_bwd_kernel"] = K.scan_bwd_kernel[(n_eb, bsz, 2 * n_ch)](
        xc, dt, bc, z, At2, D, dt_bias, dy, ysum, hst, du, ddt, dz, part, acc, hc, sc, wc,
        dy if y_out is None else y_out, flags,
        seqlen, e, d_state, 0, n_eb, chunk, n_ch, *in_strides,
        dy.stride(0), dy.stride(1), dz.stride(0), dz.stride(1),
        BE=be, BN=bn, EVEN_N=bn == d_state, KEEP=SEQ_KEEP, RS=_rs(be, d_state), CHUNKED=n_ch > 1,
        FRESH=SEQ_FRESH_DECAY, HIN=hin, Y_OUT=y_out is not None, WSELF=wself,
        TICKET=SEQ_WSELF_TICKET,
        num_warps=SEQ_WARPS,
    )  # fmt: skip
    dA_log, rest, _ = colsum(acc, d_state)
    dbc = sum_dbc_parts(part, xc.dtype) if sum_parts else part
    return du, ddt, dbc, dA_log, rest[0], rest[1]


def sum_dbc_parts(part: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dB/dC partials of :func:`scan_bwd` (B, 2, n_parts, L, 2N) summed over the parts
    (:func:`K.part_sum_kernel`) into ``out`` (B, L, 2, 2N), any strides with channel stride 1, or
    a new tensor of ``dtype``."""
    bsz, _, n_parts, seqlen, n2 = part.shape
    if out is None:
        out = torch.empty(bsz, seqlen, 2, n2, device=part.device, dtype=dtype)
    LAST["part_sum_kernel"] = K.part_sum_kernel[(cdiv(seqlen, PART_BT), bsz, 2)](
        part, out, seqlen, n_parts, out.stride(0), out.stride(1), out.stride(2), n2,
        BT=PART_BT, BJ=next_pow2(n2), num_warps=4,
    )  # fmt: skip
    return out


def derived_weights(params: tuple, dtype: torch.dtype) -> tuple:
    """What the kernels and matmuls take, from the mixer's parameters in :func:`_core_params`
    order (both branches stacked over 2E channels), in one launch (:func:`K.prep_kernel`): conv
    weight (2E, K) and bias (2E,) float32; block-diagonal x_proj (2P, 2E), P = R + 2N, and
    dt_proj (2E, 2P; zero in the B/C columns of the x_proj output) weights in the activation
    ``dtype``; A log2(e) (N, 2E), D and dt bias (2E,) float32.
    The scans take their decays as exp2 with A log2(e) precomputed and transposed (channels
    contiguous): computing it inside the scan kernels from A_log made Triton lay the state tensors
    out along the states, measured 1.5x slower."""
    params = tuple(p.contiguous() for p in params)
    cwf, xwf, dwf, alf = params[0], params[4], params[6], params[10]
    e, k = cwf.shape[0], cwf.shape[-1]
    p_rows, r, n = xwf.shape[0], dwf.shape[1], alf.shape[1]
    e2 = 2 * e
    f = torch.empty(e2 * (k + n + 3), device=cwf.device, dtype=torch.float32)
    a = torch.empty(2 * e2 * 2 * p_rows, device=cwf.device, dtype=dtype)
    cw, cb, at, d, dtb = f.split([e2 * k, e2, n * e2, e2, e2])
    xw, dtw = a.split([2 * p_rows * e2, e2 * 2 * p_rows])
    K.prep_kernel[(cdiv(e2, PREP_BE),)](
        *params, cw, cb, at, d, dtb, xw, dtw, e, r, n,
        K=k, BK=next_pow2(k), BN=next_pow2(n),
        BP=next_pow2(2 * p_rows), BE=PREP_BE, num_warps=4,
    )  # fmt: skip
    return cw.view(e2, k), cb, xw.view(2 * p_rows, e2), dtw.view(e2, 2 * p_rows), at.view(n, e2), d, dtb


def core_forward(xz, weights, d_state: int, save_sum: bool, chunks: tuple[int, int] | None = None):
    """xz (B, L, 2E) -> y (B, L, E) with ``weights`` from :func:`derived_weights`; also returns
    the x_proj output [dt_in | B | C] of both branches (B*L, 2P), packed B/C, the ungated
    branch sum (None unless ``save_sum``) and (chunk length, states entering those chunks or
    None) for the backward's scan (with ``save_sum`` and :func:`saves_carries`: :func:`scan_fwd`).
    ``chunks``: the (forward, backward) chunk lengths, default :func:`chunk_lengths`'s."""
    cw, cb, x_w, dt_w, At2, D32, dtb32 = weights
    bsz, seqlen, e2 = xz.shape
    e, p = e2 // 2, dt_w.shape[1] // 2
    x, z = xz[..., :e], xz[..., e:]
    xc = conv_fwd(x, cw, cb, torch.empty(bsz, seqlen, e2, device=xz.device, dtype=xz.dtype))
    dbc = xc.view(-1, e2) @ x_w.t()  # (B*L, 2P)
    dt = (dbc @ dt_w.t()).view(bsz, seqlen, e2)  # dt_proj reads the dt columns (zero weights elsewhere)
    bc = _bc_pack(dbc.view(bsz, seqlen, 2, p), p - 2 * d_state)
    chunks = chunks or chunk_lengths(xc, bsz, seqlen, e, training=save_sum)
    carry = save_sum and saves_carries(seqlen, chunks)
    y, ysum, hin = scan_fwd(xc, dt, bc, z, At2, D32, dtb32, save_sum, chunks=chunks, save_carry=carry)
    return y, dbc, bc, ysum, (chunks[1], hin)


class BiMambaCoreFn(torch.autograd.Function):
    """The whole core in one Function, taking the mixer's parameters as they are (both branches
    separately, :func:`_core_params` order) so that no stacking op enters the autograd graph.
    The derived weights (one :func:`derived_weights` launch), the x_proj output and the packed B
    and C are computed once in the forward and kept for the backward: fewer launches per layer,
    which matters because a Vim training step is otherwise partly bound by the host.

    With ``out_w`` (out_proj's weight, (D, E)) it also applies out_proj and returns (B, L, D);
    the gated output y is then not kept for out_proj's weight gradient: the scan backward
    writes it again (Y_REBUILD)."""

    @staticmethod
    def forward(ctx, xz, d_state: int, chunks, out_w, *params):
        weights = derived_weights(params, xz.dtype)
        save = any(ctx.needs_input_grad)  # (grad mode is always off inside forward)
        y, dbc, bc, ysum, (ctx.chunk, hin) = core_forward(xz, weights, d_state, save, chunks)
        ctx.out = out_w is not None
        w = out_w.to(y.dtype) if ctx.out else None
        if save:  # (with BC_IN_CONV the packed B/C is rebuilt in the backward's conv recompute)
            opt = {"bc": None if BC_IN_CONV else bc, "hin": hin, "w": w}
            ctx.kept = [k for k, v in opt.items() if v is not None]
            ctx.save_for_backward(xz, dbc, ysum, *weights, *(opt[k] for k in ctx.kept))
            ctx.dtypes = [t.dtype for t in params]
            ctx.out_dtype = out_w.dtype if ctx.out else None
        return (y @ w.t()) if ctx.out else y

    @staticmethod
    def backward(ctx, g_out):
        xz, dbc, ysum, cw, cb, x_w, dt_w, At2, D32, dtb32, *rest = ctx.saved_tensors
        kept = dict(zip(ctx.kept, rest))
        bsz, seqlen, e2 = xz.shape
        e, p, n = e2 // 2, dbc.shape[1] // 2, At2.shape[0]
        bl, r = bsz * seqlen, p - 2 * n
        x, z = xz[..., :e], xz[..., e:]
        y_out = None
        if ctx.out:  # out = y @ w.T, y written again by the scan backward for w's gradient
            w = kept["w"]
            g_out = g_out.reshape(bl, -1).to(w.dtype)
            dy = (g_out @ w).view(bsz, seqlen, e)
            if ctx.needs_input_grad[3]:  # (xz, d_state, chunks, out_w, ...)
                y_out = torch.empty(bsz, seqlen, e, device=xz.device, dtype=xz.dtype)
        else:
            dy = g_out
        xc = torch.empty(bsz, seqlen, e2, device=xz.device, dtype=xz.dtype)
        hin = kept.get("hin")
        if "bc" in kept:
            bc = kept["bc"]
            conv_fwd(x, cw, cb, xc)
        else:
            bc = torch.empty(bsz, seqlen, 2, 2 * n, device=xz.device, dtype=torch.float32)
            conv_fwd(x, cw, cb, xc, (dbc, r, bc))
        dt = (dbc @ dt_w.t()).view(bsz, seqlen, e2)
        dxz = torch.empty_like(xz)
        du, ddt, part, dA_log, dD, d_dt_bias = scan_bwd(
            xc, dt, bc, z, At2, D32, dtb32, dy.to(xz.dtype), ysum, dxz[..., e:],
            sum_parts=False, chunk=ctx.chunk, carries=hin, y_out=y_out,
        )  # fmt: skip
        d_out_w = None
        if ctx.out and ctx.needs_input_grad[3]:
            d_out_w = _wgrad(g_out.t(), y_out.view(bl, e), ctx.out_dtype, OUT_WGRAD_F32)
        # dt_proj: dt = dbc @ dt_w.T (+ bias inside the kernel), dt_w zero in the B/C columns.
        # The gradient of the x_proj output [dt_in | B | C] per branch: d dt_in from the matmul
        # (zeros in the B/C columns), then dB, dC written into their columns
        ddt2 = ddt.view(bl, e2)
        d_dbc2 = ddt2 @ dt_w  # (B*L, 2P)
        sum_dbc_parts(part, xz.dtype, d_dbc2.view(bsz, seqlen, 2, p)[..., r:])
        # the weight gradient's diagonal blocks, cast to float32 contiguous per branch as the
        # parameters are (by the conv backward's column-sum launch, WGRAD_CAST_IN_COLSUM)
        d_dt_w = _blocks(ddt2.t() @ dbc, 2, e, r, p)  # (2, E, R)
        # x_proj: dbc = xc @ x_w.T
        du = du.view(bl, e2).addmm_(d_dbc2, x_w).view(bsz, seqlen, e2)
        d_x_w = _blocks(d_dbc2.t() @ xc.view(bl, e2), 2, p, e)  # (2, P, E)
        casts = (d_x_w, d_dt_w) if WGRAD_CAST_IN_COLSUM else ()
        dcw, dcb, cast = conv_bwd(x, cw, cb, du, dxz[..., :e], casts)
        d_x_w, d_dt_w = cast or (d_x_w.float(), d_dt_w.float())
        dcw = dcw.unsqueeze(1)  # (2E, 1, K)
        grads = (dcw[:e], dcw[e:], dcb[:e], dcb[e:], d_x_w[0], d_x_w[1], d_dt_w[0], d_dt_w[1],
                 d_dt_bias[:e], d_dt_bias[e:], dA_log[:e], dA_log[e:], dD[:e], dD[e:])  # fmt: skip
        return (dxz, None, None, d_out_w) + tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes))


def _wgrad(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, f32_out: bool) -> torch.Tensor:
    """a @ b in ``dtype`` (a weight gradient in its parameter's dtype): with ``f32_out``, half
    precision inputs on the GPU, and a float32 parameter, written as float32 by the matmul itself
    (no cast kernel; float32 accumulation either way, one rounding fewer)."""
    if f32_out and a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(dtype)


def _blocks(m: torch.Tensor, n: int, rows: int, cols: int, col_step: int | None = None) -> torch.Tensor:
    """The n diagonal blocks (rows, cols) of a block-diagonal matrix with rows in its last
    dimension, block i at row i * rows and column i * col_step (default: cols), as a strided
    (n, rows, cols) view."""
    step = rows * m.stride(0) + (cols if col_step is None else col_step)
    return m.as_strided((n, rows, cols), (step, m.stride(0), 1))


def _core_params(m) -> tuple:
    """The mixer parameters the core uses (not in_proj/out_proj), by attribute: cheaper than
    walking ``m.parameters()`` on every call."""
    return (
        m.conv1d.weight, m.conv1d_b.weight, m.conv1d.bias, m.conv1d_b.bias, m.x_proj.weight, m.x_proj_b.weight,
        m.dt_proj.weight, m.dt_proj_b.weight, m.dt_proj.bias, m.dt_proj_b.bias, m.A_log, m.A_b_log, m.D, m.D_b,
    )  # fmt: skip


def _cached_weights(m, params: tuple, xz: torch.Tensor) -> tuple:
    """:func:`derived_weights` of mixer ``m`` for inference on ``xz``, kept on the mixer until a
    parameter changes (its storage or version counter: optimizer steps, ``load_state_dict`` and
    other in-place updates all bump the counter). Saves one launch per layer and call; eager
    inference at batch 128 is bound by the host's launches. While a CUDA graph is captured they
    are derived, not cached: a replay must see the parameters as they are then."""
    dtype = xz.dtype
    if xz.is_cuda and torch.cuda.is_current_stream_capturing():
        with torch.no_grad():
            return derived_weights(params, dtype)
    key = (dtype,) + tuple((p.data_ptr(), p._version) for p in params)
    cache = m.__dict__.get("_triton_weights")
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, derived_weights(params, dtype))
        m.__dict__["_triton_weights"] = cache
    return cache[1]


def _on_input_device(fn):
    """``fn`` run with the GPU of its first tensor argument current: Triton launches on the
    current device (:func:`~vimssl.ssm.dispatch.on_device_of`)."""

    @functools.wraps(fn)
    def run(*args):
        with on_device_of(next(a for a in args if isinstance(a, torch.Tensor))):
            return fn(*args)

    return run


@_on_input_device
def bimamba_core_triton(xz: torch.Tensor, m) -> torch.Tensor:
    """xz (B, L, 2E) -> (B, L, E) for a :class:`~vimssl.models.mixer.BiMambaMixer` ``m``."""
    _check(xz, m.d_inner)
    if not xz.is_contiguous():
        xz = xz.contiguous()
    params = _core_params(m)
    if not torch.is_grad_enabled() or not (xz.requires_grad or any(p.requires_grad for p in params)):
        return core_forward(xz, _cached_weights(m, params, xz), m.d_state, save_sum=False)[0]
    return BiMambaCoreFn.apply(xz, m.d_state, None, None, *params)


@_on_input_device
def bimamba_core_out_triton(xz: torch.Tensor, m) -> torch.Tensor:
    """xz (B, L, 2E) -> out_proj(core(xz)) (B, L, D) for a
    :class:`~vimssl.models.mixer.BiMambaMixer` ``m``. In training with Y_REBUILD (by default:
    the long sequences whose forward saves its carries), out_proj runs inside the core's autograd
    Function, which rebuilds the core's output for out_proj's weight gradient instead of keeping
    it: (B, L, E) less memory per layer. Otherwise, and always for an out_proj that is not a plain
    ``nn.Linear`` without bias and hooks (adapters, feature hooks), out_proj is called as a module
    after the core (at 224 px that measured 0.5% faster than the Function with y kept)."""
    lin = m.out_proj
    params = _core_params(m)
    wants_grad = xz.requires_grad or lin.weight.requires_grad or any(p.requires_grad for p in params)
    if not (_plain_linear(lin) and torch.is_grad_enabled() and wants_grad):
        return linear(bimamba_core_triton(xz, m), lin)
    _check(xz, m.d_inner)
    chunks = chunk_lengths(xz, xz.shape[0], xz.shape[1], m.d_inner)  # (once: the Function takes them)
    if not (Y_REBUILD if Y_REBUILD is not None else saves_carries(xz.shape[1], chunks)):
        return linear(bimamba_core_triton(xz, m), lin)
    return BiMambaCoreFn.apply(xz.contiguous(), m.d_state, chunks, lin.weight, *params)


class HalfLinearFn(torch.autograd.Function):
    """x @ w.T for a half precision x (..., in) and a float32 weight w (out, in): the product in x's
    dtype, as autocast computes it, with the weight's gradient written as float32 by its matmul
    (:func:`_wgrad`) instead of a half precision product that autocast's cast then converts."""

    @staticmethod
    def forward(ctx, x, w):
        wh = w.to(x.dtype)
        ctx.save_for_backward(x, wh)
        return x @ wh.t()

    @staticmethod
    def backward(ctx, g):
        x, wh = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g2 @ wh).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = (
            _wgrad(g2.t(), x.reshape(-1, x.shape[-1]), torch.float32, True)
            if ctx.needs_input_grad[1]
            else None
        )
        return dx, dw


def linear(x: torch.Tensor, lin: torch.nn.Module) -> torch.Tensor:
    """``lin(x)``; with LINEAR_WGRAD_F32, for a plain ``nn.Linear`` without bias or hooks whose
    float32 weight trains, under CUDA autocast with x in autocast's dtype, the same product
    through :class:`HalfLinearFn`."""
    if (
        LINEAR_WGRAD_F32
        and x.is_cuda
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cuda")
        and x.dtype == torch.get_autocast_dtype("cuda")
        and _plain_linear(lin)
        and lin.weight.dtype == torch.float32
        and lin.weight.requires_grad
    ):
        return HalfLinearFn.apply(x, lin.weight)
    return lin(x)


def _plain_linear(lin: torch.nn.Module) -> bool:
    """Whether ``lin`` is an ``nn.Linear`` itself (not a subclass such as an adapter), without bias
    or hooks: what the core may compute in place of calling it."""
    return type(lin) is torch.nn.Linear and lin.bias is None and not _hooked(lin)


def _hooked(lin: torch.nn.Module) -> bool:
    """Whether calling ``lin`` as a module would run hooks (its own or global ones)."""
    own = (lin._forward_hooks, lin._forward_pre_hooks, lin._backward_hooks, lin._backward_pre_hooks)
    mod = torch.nn.modules.module
    glob = [getattr(mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                  "_global_backward_hooks", "_global_backward_pre_hooks")]  # fmt: skip
    return any(own) or any(bool(h) for h in glob)


def available(index: int | None = None) -> bool:
    """True when the kernels can run on CUDA device ``index`` (default: the current one): an
    NVIDIA GPU of compute capability 8.0+. Not on ROCm (AMD) builds of PyTorch, where
    ``torch.cuda`` also reports a device: the kernels use NVIDIA PTX (the fast exps and logs, the
    lane shuffles of the scan backward)."""
    if index is None:
        try:
            index = torch.cuda.current_device() if torch.cuda.is_available() else -1
        except Exception:
            return False
    return _available(index)


@functools.cache  # (resolve_backend asks for every block and forward)
def _available(index: int) -> bool:
    try:
        if index < 0 or not torch.cuda.is_available() or torch.version.hip is not None:
            return False
        return torch.cuda.get_device_capability(index)[0] >= 8
    except Exception:
        return False


def add_rms_norm(x, residual, norm, drop=None):
    """``residual + x`` then RMSNorm: vimssl's own fused Triton kernels (:mod:`vimssl.ssm.triton_norm`),
    so the triton path needs nothing from mamba-ssm."""
    from vimssl.ssm import triton_norm

    with on_device_of(residual):
        return triton_norm.add_rms_norm(x, residual, norm, drop)
