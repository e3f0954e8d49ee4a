"""Triton kernels of the fused bidirectional Mamba mixer core (the ``triton`` kernel path).

Every tensor stays in the original token order, channel-last (B, L, channels): the backward
branch's depthwise conv is the anti-causal mirror of a causal conv, and its scan walks the tokens
from last to first by index. Nothing is flipped or transposed in memory.

Channel layout of the stacked tensors (B, L, 2E): forward branch in [0, E), backward in [E, 2E).

The scans are sequential over tokens: a program owns one batch row and ``BE`` channels (both
directions in the forward kernel; one direction in the backward kernel), each thread holds its
channels' N states in registers, and the loop takes four tokens per iteration. The backward
recomputes states instead of keeping them from the forward: a first pass stores the state entering
every group of four tokens (float32 scratch), a second walks the groups in reverse. Long sequences
with too few such programs to fill the GPU are split into chunks (a two-level scan): chunk-local
carries first (:func:`scan_state_kernel`), then every chunk starts from the carry of the chunks
before it. All arithmetic is float32 whatever the input dtype; no atomics, so results are
deterministic. The design and its
measured history (including the chunked associative-scan version this replaced) are in
``docs/kernel-notes.md``.

Imported only when the ``triton`` path is used (``import triton`` at module level).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# PTX inline assembly (fast log2) except under the CPU interpreter (TRITON_INTERPRET=1)
_PTX: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _log2(x):
    if _PTX:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _fresh(x):
    """x, as a value the compiler cannot prove equal to x (an opaque move that stays in program
    order): what is computed from it is computed again here, not kept live from an earlier use."""
    if _PTX:
        return tl.inline_asm_elementwise(
            "add.f32 $0, $1, 0f00000000;", "=f,f", [x], dtype=tl.float32, is_pure=False, pack=1
        )
    else:
        return x


LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp2(x):
    # one MUFU.EX2 flushing denormal results to zero (tl.exp2 adds a 4-instruction range fix-up)
    if _PTX:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _softplus(x):
    # torch's softplus with threshold 20, through exp2/log2 (no libdevice branches in the loop)
    return tl.where(x > 20.0, x, LN2 * _log2(1.0 + _exp2(tl.minimum(x, 20.0) * LOG2E)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + _exp2(x * -LOG2E))


@triton.jit
def _silu(x):
    return x * _sigmoid(x)


@triton.jit
def _dsilu(x):
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


# ----------------------------------------------------------------------------------------------
# derived weights: the mixer's parameters as the kernels and matmuls take them, in one launch
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pick(pf, pb, off, mf, mb):
    """The forward-branch parameter where ``mf``, the backward-branch one where ``mb``, else 0
    (float32); ``off`` is the offset inside either parameter."""
    a = tl.load(pf + off, mask=mf, other=0.0).to(tl.float32)
    return a + tl.load(pb + off, mask=mb, other=0.0).to(tl.float32)


@triton.jit
def prep_kernel(
    cwf, cwb, cbf, cbb, xwf, xwb, dwf, dwb, dbf, dbb, alf, alb, Df, Db,
    cw_o, cb_o, at_o, d_o, dtb_o, xw_o, dtw_o,
    E, R, N,
    K: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """Both branches' parameters (suffix f: forward, b: backward; contiguous, any float dtype)
    stacked over 2E channels, for channel block ``program_id(0)``: conv weight (2E, K) and bias,
    A log2(e) (N, 2E), D and dt bias (2E,), all float32; the block-diagonal x_proj weight
    (2P, 2E), P = R + 2N, and the dt_proj weight (2E, 2P) in the output's dtype, zeros included.
    dt_proj's blocks sit in the columns of the x_proj output's dt rows (0..R-1 and P..P+R-1), so
    that dt_proj takes the whole x_proj output: no copy of its dt columns.
    Replaces about fifteen small torch launches per layer and call (cat, block_diag, casts)."""
    c = tl.program_id(0) * BE + tl.arange(0, BE)  # (BE,) stacked channels
    mc = c < 2 * E
    bwd = c >= E
    mf, mb = mc & ~bwd, mc & bwd
    cl = tl.where(bwd, c - E, c)  # channel inside its branch
    # per-channel vectors
    tl.store(cb_o + c, _pick(cbf, cbb, cl, mf, mb), mask=mc)
    tl.store(d_o + c, _pick(Df, Db, cl, mf, mb), mask=mc)
    tl.store(dtb_o + c, _pick(dbf, dbb, cl, mf, mb), mask=mc)
    # conv weight (E, 1, K) per branch -> (2E, K)
    k = tl.arange(0, BK)[None, :]
    mk = k < K
    tl.store(cw_o + c[:, None] * K + k, _pick(cwf, cwb, cl[:, None] * K + k, mf[:, None] & mk, mb[:, None] & mk),
             mask=mc[:, None] & mk)  # fmt: skip
    # A = -exp(A_log) (E, N) per branch -> A log2(e), transposed (N, 2E)
    n = tl.arange(0, BN)[:, None]
    mn = n < N
    a = _pick(alf, alb, cl[None, :] * N + n, mn & mf[None, :], mn & mb[None, :])
    tl.store(at_o + n * (2 * E) + c[None, :], -tl.exp(a) * LOG2E, mask=mn & mc[None, :])
    P = R + 2 * N
    # dt_proj (E, R) per branch -> (2E, 2P), blocks at columns 0 and P
    j = tl.arange(0, BP)[None, :]
    jb = j - P  # column inside the backward branch's block
    v = _pick(dwf, dwb, cl[:, None] * R + tl.where(bwd[:, None], jb, j),
              mf[:, None] & (j < R), mb[:, None] & (jb >= 0) & (jb < R))  # fmt: skip
    tl.store(dtw_o + c[:, None] * (2 * P) + j, v.to(dtw_o.dtype.element_ty), mask=mc[:, None] & (j < 2 * P))
    # x_proj (P, E) per branch -> block-diagonal (2P, 2E)
    i = tl.arange(0, BP)[:, None]
    ib = i - P
    v = _pick(xwf, xwb, tl.where(bwd[None, :], ib, i) * E + cl[None, :],
              (i < P) & mf[None, :], (ib >= 0) & (ib < P) & mb[None, :])  # fmt: skip
    tl.store(xw_o + i * (2 * E) + c[None, :], v.to(xw_o.dtype.element_ty), mask=(i < 2 * P) & mc[None, :])


# ----------------------------------------------------------------------------------------------
# depthwise conv1d + SiLU, both directions
# ----------------------------------------------------------------------------------------------


@triton.jit
def conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, dbc_ptr, bc_ptr,
    L, E, P, R, N2,
    sx_b, sx_l, so_b, so_l,
    K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, PACK: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """x (B, L, E) [channel stride 1] -> out (B, L, 2E) = SiLU(conv(x) + bias), forward branch causal
    (taps t-K+1..t), backward branch anti-causal (taps t..t+K-1). w: (2E, K) float32, bias: (2E,).
    With PACK, the programs of the first channel block also write their tokens' B and C, columns
    R..R+N2 of each branch's P columns of the x_proj output dbc (B*L, 2P), as float32 to bc
    (B, L, 2, N2) contiguous: the backward rebuilds the scans' packed B/C here instead of keeping
    it from the forward or spending a launch on it."""
    pid_t, pid_e, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    if PACK:
        if pid_e == 0:
            j = tl.arange(0, BJ)
            mj = (t < L)[:, None] & (j < N2)[None, :]
            row = b * L + t  # (BT,) rows of dbc
            for D in tl.static_range(2):
                v = tl.load(dbc_ptr + row[:, None] * (2 * P) + D * P + R + j[None, :], mask=mj, other=0.0)
                tl.store(bc_ptr + (row * 2 + D)[:, None] * N2 + j[None, :], v.to(tl.float32), mask=mj)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    x_base = x_ptr + b * sx_b + e[None, :]
    acc_f = tl.zeros((BT, BE), tl.float32) + tl.load(bias_ptr + e, mask=me, other=0.0)[None, :]
    acc_b = tl.zeros((BT, BE), tl.float32) + tl.load(bias_ptr + E + e, mask=me, other=0.0)[None, :]
    for k in tl.static_range(K):
        tf = t - (K - 1) + k
        xf = tl.load(
            x_base + tf[:, None] * sx_l, mask=((tf >= 0) & (tf < L))[:, None] & me[None, :], other=0.0
        )
        acc_f += tl.load(w_ptr + e * K + k, mask=me, other=0.0)[None, :] * xf.to(tl.float32)
        tb = t + (K - 1) - k
        xb = tl.load(x_base + tb[:, None] * sx_l, mask=(tb < L)[:, None] & me[None, :], other=0.0)
        acc_b += tl.load(w_ptr + (E + e) * K + k, mask=me, other=0.0)[None, :] * xb.to(tl.float32)
    m = (t < L)[:, None] & me[None, :]
    o = out_ptr + b * so_b + t[:, None] * so_l + e[None, :]
    tl.store(o, _silu(acc_f).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(o + E, _silu(acc_b).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_pre(
    x_base,
    sx_l,
    w_ptr,
    bias_ptr,
    e,
    me,
    s,
    L,
    E,
    D: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
):
    """Pre-activation of branch D (0 forward, 1 backward) at output rows s: (BT, BE) float32."""
    acc = tl.zeros((BT, BE), tl.float32) + tl.load(bias_ptr + D * E + e, mask=me, other=0.0)[None, :]
    for k in tl.static_range(K):
        if D == 0:
            tx = s - (K - 1) + k
        else:
            tx = s + (K - 1) - k
        xv = tl.load(
            x_base + tx[:, None] * sx_l, mask=((tx >= 0) & (tx < L))[:, None] & me[None, :], other=0.0
        )
        acc += tl.load(w_ptr + (D * E + e) * K + k, mask=me, other=0.0)[None, :] * xv.to(tl.float32)
    return acc


@triton.jit
def _tap(x_base, sx_l, t, me, L, k, D: tl.constexpr, K: tl.constexpr):
    """The input under tap k of branch D for output rows t: (BT, BE) float32 (0 outside)."""
    if D == 0:
        tx = t - (K - 1) + k
    else:
        tx = t + (K - 1) - k
    xv = tl.load(x_base + tx[:, None] * sx_l, mask=((tx >= 0) & (tx < L))[:, None] & me[None, :], other=0.0)
    return xv.to(tl.float32)


@triton.jit
def _tap_sum(gp, x_base, sx_l, t, me, L, k, D: tl.constexpr, K: tl.constexpr):
    """sum over the tile's tokens of gp * (the input under tap k of branch D): (BE,) float32."""
    return tl.sum(gp * _tap(x_base, sx_l, t, me, L, k, D, K), axis=0)


@triton.jit
def _w(w_ptr, e, me, E, k, D: tl.constexpr, K: tl.constexpr):
    """Tap k's weight of branch D, (1, BE) float32 (0 for taps past K)."""
    return tl.load(w_ptr + (D * E + e) * K + k, mask=me & (k < K), other=0.0)[None, :]


@triton.jit
def conv_bwd_gp_kernel(
    x_ptr, w_ptr, bias_ptr, g_ptr, gp_ptr, dwb_ptr,
    L, E, T, n_split,
    sx_b, sx_l, sg_b, sg_l,
    K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """First half of the conv backward, for one batch row, one span of T tokens (program axis 2;
    n_split spans per row) and BE channels of both branches, walking the span in tiles of BT. g
    (B, L, 2E): gradient of the SiLU outputs. Writes gp = g * SiLU'(pre-activation) (B, L, 2E,
    same strides as g) and this span's weight and bias gradients dwb (B, n_split, K + 1, 2E)
    float32 (rows 0..K-1 the taps, K the bias), summed over the batch and spans by the caller. Up to four taps (Vim's d_conv) the per-tap sums stay in separate
    accumulators of the reduced layout, so the token walk needs no layout conversions; wider
    kernels gather them in one (BE, BK) accumulator (a shared-memory round trip per tap and tile)."""
    pid_e, b, sp = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    x_base = x_ptr + b * sx_b + e[None, :]
    kk = tl.arange(0, BK)[None, :]  # (1, BK): tap, or K for the bias
    out = dwb_ptr + (b * n_split + sp) * (K + 1) * (2 * E) + e  # (BE,) at tap 0 of the forward branch
    hi = tl.minimum(sp * T + T, L)
    for D in tl.static_range(2):
        a0 = tl.zeros((BE,), tl.float32)
        a1 = tl.zeros((BE,), tl.float32)
        a2 = tl.zeros((BE,), tl.float32)
        a3 = tl.zeros((BE,), tl.float32)
        ab = tl.zeros((BE,), tl.float32)
        acc = tl.zeros((BE, BK), tl.float32)
        if K <= 4:  # the taps' weights, held for the walk
            w0, w1 = _w(w_ptr, e, me, E, 0, D, K), _w(w_ptr, e, me, E, 1, D, K)
            w2, w3 = _w(w_ptr, e, me, E, 2, D, K), _w(w_ptr, e, me, E, 3, D, K)
            bias = tl.load(bias_ptr + D * E + e, mask=me, other=0.0)[None, :]
        for t0 in range(sp * T, hi, BT):
            t = t0 + tl.arange(0, BT)
            m = (t < hi)[:, None] & me[None, :]
            off = b * sg_b + t[:, None] * sg_l + D * E + e[None, :]
            g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
            if K <= 4:  # each tap's input loaded once, for the pre-activation and its weight gradient
                x0 = _tap(x_base, sx_l, t, me, L, 0, D, K)
                x1 = _tap(x_base, sx_l, t, me, L, 1, D, K) if K > 1 else x0
                x2 = _tap(x_base, sx_l, t, me, L, 2, D, K) if K > 2 else x0
                x3 = _tap(x_base, sx_l, t, me, L, 3, D, K) if K > 3 else x0
                pre = bias + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3  # (w_k = 0 past K)
                gp = tl.where(m, g * _dsilu(pre), 0.0)
                a0 += tl.sum(gp * x0, axis=0)
                a1 += tl.sum(gp * x1, axis=0)
                a2 += tl.sum(gp * x2, axis=0)
                a3 += tl.sum(gp * x3, axis=0)
            else:
                pre = _conv_pre(x_base, sx_l, w_ptr, bias_ptr, e, me, t, L, E, D, K, BT, BE)
                gp = tl.where(m, g * _dsilu(pre), 0.0)
            tl.store(gp_ptr + off, gp.to(gp_ptr.dtype.element_ty), mask=m)
            ab += tl.sum(gp, axis=0)
            if K > 4:
                for k in tl.static_range(K):
                    acc += tl.where(kk == k, _tap_sum(gp, x_base, sx_l, t, me, L, k, D, K)[:, None], 0.0)
        o = out + D * E
        tl.store(o + K * (2 * E), ab, mask=me)
        if K <= 4:
            tl.store(o, a0, mask=me)
            if K > 1:
                tl.store(o + 2 * E, a1, mask=me)
            if K > 2:
                tl.store(o + 4 * E, a2, mask=me)
            if K > 3:
                tl.store(o + 6 * E, a3, mask=me)
        else:
            tl.store(o[:, None] + kk * (2 * E), acc, mask=me[:, None] & (kk < K))


@triton.jit
def conv_bwd_dx_kernel(
    gp_ptr, w_ptr, dx_ptr,
    L, E,
    sg_b, sg_l, sdx_b, sdx_l,
    K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """Second half: dx[t] = sum_j w_fwd[j] gp_fwd[t + K-1 - j] + w_bwd[j] gp_bwd[t - K+1 + j]."""
    pid_t, pid_e, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    g_base = gp_ptr + b * sg_b + e[None, :]
    dx = tl.zeros((BT, BE), tl.float32)
    for j in tl.static_range(K):
        sf = t + (K - 1) - j
        gf = tl.load(g_base + sf[:, None] * sg_l, mask=(sf < L)[:, None] & me[None, :], other=0.0)
        dx += tl.load(w_ptr + e * K + j, mask=me, other=0.0)[None, :] * gf.to(tl.float32)
        sb = t - (K - 1) + j
        gb = tl.load(
            g_base + E + sb[:, None] * sg_l, mask=((sb >= 0) & (sb < L))[:, None] & me[None, :], other=0.0
        )
        dx += tl.load(w_ptr + (E + e) * K + j, mask=me, other=0.0)[None, :] * gb.to(tl.float32)
    m = (t < L)[:, None] & me[None, :]
    tl.store(dx_ptr + b * sdx_b + t[:, None] * sdx_l + e[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


# Token walks (CONV_WALK, up to four taps: Vim's d_conv). A program walks a span of tokens of one
# batch row and BE channels, one token per step, loading each input row once and keeping the
# last three in registers: the window x[t-3..t] gives both branches' outputs, the forward
# branch's at t and the backward branch's at t-3. The tile kernels above load a tile's rows
# once per tap and branch (eight shifted loads covering 14 distinct rows as 64 for 8-token
# tiles), which keeps the L1/TEX pipe 85-90% busy (docs/kernel-notes.md). Weights are laid out
# over the window, taps past the conv's width zero: forward tap j (of x[t-3+j]) is w_f[j-4+K],
# backward tap j (of x[t-3+j] for the output at t-3) is w_b[K-1-j].


@triton.jit
def _wf4(w_ptr, e, me, j: tl.constexpr, K: tl.constexpr):
    """Forward branch, window tap j: w_f[j - 4 + K] (BE,) float32, zero for j < 4 - K."""
    if j < 4 - K:
        return tl.zeros(e.shape, tl.float32)
    else:
        return tl.load(w_ptr + e * K + (j - 4 + K), mask=me, other=0.0)


@triton.jit
def _wb4(w_ptr, e, me, E, j: tl.constexpr, K: tl.constexpr):
    """Backward branch, window tap j: w_b[K - 1 - j] (BE,) float32, zero for j >= K."""
    if j >= K:
        return tl.zeros(e.shape, tl.float32)
    else:
        return tl.load(w_ptr + (E + e) * K + (K - 1 - j), mask=me, other=0.0)


@triton.jit
def _row(base, t, s_l, me, L):
    """Row t (BE,) of a (tokens, channels) slice at ``base``, float32; 0 outside [0, L)."""
    return tl.load(base + t * s_l, mask=me & (t >= 0) & (t < L), other=0.0).to(tl.float32)


@triton.jit
def _walk_weights(w_ptr, bias_ptr, e, me, E, K: tl.constexpr):
    """Both branches' window taps (:func:`_wf4`, :func:`_wb4`) and biases for channels e."""
    wf0, wf1 = _wf4(w_ptr, e, me, 0, K), _wf4(w_ptr, e, me, 1, K)
    wf2, wf3 = _wf4(w_ptr, e, me, 2, K), _wf4(w_ptr, e, me, 3, K)
    wb0, wb1 = _wb4(w_ptr, e, me, E, 0, K), _wb4(w_ptr, e, me, E, 1, K)
    wb2, wb3 = _wb4(w_ptr, e, me, E, 2, K), _wb4(w_ptr, e, me, E, 3, K)
    bf = tl.load(bias_ptr + e, mask=me, other=0.0)
    bb = tl.load(bias_ptr + E + e, mask=me, other=0.0)
    return wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb


@triton.jit
def _rows7(base, t, s_l, me, L):
    """Rows t .. t+6 (:func:`_row`)."""
    r0, r1, r2 = _row(base, t, s_l, me, L), _row(base, t + 1, s_l, me, L), _row(base, t + 2, s_l, me, L)
    r3, r4 = _row(base, t + 3, s_l, me, L), _row(base, t + 4, s_l, me, L)
    return r0, r1, r2, r3, r4, _row(base, t + 5, s_l, me, L), _row(base, t + 6, s_l, me, L)


@triton.jit
def _fwd_step(x0, x1, x2, x3, t, lo, hi, ob, so_l, E, me, wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb):
    """One step of the forward walk: window x[t-3..t] -> out[t] (forward branch, stored when t
    is in [lo, hi)) and out[t-3] (backward branch, stored when t-3 is)."""
    yf = bf + wf0 * x0 + wf1 * x1 + wf2 * x2 + wf3 * x3
    yb = bb + wb0 * x0 + wb1 * x1 + wb2 * x2 + wb3 * x3
    tl.store(ob + t * so_l, _silu(yf).to(ob.dtype.element_ty), mask=me & (t >= lo) & (t < hi))
    s = t - 3
    tl.store(ob + s * so_l + E, _silu(yb).to(ob.dtype.element_ty), mask=me & (s >= lo) & (s < hi))


@triton.jit
def _pack_rows(dbc_ptr, bc_ptr, b, L, t0, hi, P, R, N2, BJ: tl.constexpr, BTP: tl.constexpr):
    """Rows [t0, min(t0 + BTP, hi)) of batch row b: both branches' B and C (columns R..R+N2 of
    each branch's P columns of the x_proj output dbc) as float32 to bc (B, L, 2, N2)."""
    j = tl.arange(0, BJ)[None, :]
    row = b * L + t0 + tl.arange(0, BTP)[:, None]  # (BTP, 1) rows of dbc
    mj = (t0 + tl.arange(0, BTP)[:, None] < hi) & (j < N2)
    for D in tl.static_range(2):
        v = tl.load(dbc_ptr + row * (2 * P) + D * P + R + j, mask=mj, other=0.0)
        tl.store(bc_ptr + (row * 2 + D) * N2 + j, v.to(tl.float32), mask=mj)


@triton.jit
def conv_fwd_walk_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, dbc_ptr, bc_ptr,
    L, E, P, R, N2, T,
    sx_b, sx_l, so_b, so_l,
    K: tl.constexpr, BE: tl.constexpr, PACK: tl.constexpr, BJ: tl.constexpr, BTP: tl.constexpr,
    SPREAD: tl.constexpr,
):  # fmt: skip
    """What :func:`conv_fwd_kernel` computes, by token walks: program (channel block, batch row,
    span) writes out rows [span T, span T + T) of both branches, reading x rows from 3 before to
    3 after. K <= 4. PACK as in :func:`conv_fwd_kernel`, over the span's rows in tiles of BTP: by
    the first channel block's programs, or (SPREAD) shared among every channel block's."""
    pid_e, b, sp = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    lo = sp * T
    hi = tl.minimum(lo + T, L)
    if PACK:
        if SPREAD:
            for t0 in range(lo + pid_e * BTP, hi, BTP * tl.num_programs(0)):
                _pack_rows(dbc_ptr, bc_ptr, b, L, t0, hi, P, R, N2, BJ, BTP)
        elif pid_e == 0:
            for t0 in range(lo, hi, BTP):
                _pack_rows(dbc_ptr, bc_ptr, b, L, t0, hi, P, R, N2, BJ, BTP)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    xb = x_ptr + b * sx_b + e
    ob = out_ptr + b * so_b + e
    wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb = _walk_weights(w_ptr, bias_ptr, e, me, E, K)
    x0, x1, x2, p0, p1, p2, p3 = _rows7(xb, lo - 3, sx_l, me, L)  # the window, and the first group
    for t0 in range(lo, hi + 3, 4):  # steps t in [lo, hi + 3): the last backward output is hi - 1
        # the next four rows, loaded while these four are computed
        n0, n1 = _row(xb, t0 + 4, sx_l, me, L), _row(xb, t0 + 5, sx_l, me, L)
        n2, n3 = _row(xb, t0 + 6, sx_l, me, L), _row(xb, t0 + 7, sx_l, me, L)
        _fwd_step(x0, x1, x2, p0, t0, lo, hi, ob, so_l, E, me, wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb)
        _fwd_step(
            x1, x2, p0, p1, t0 + 1, lo, hi, ob, so_l, E, me, wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb
        )
        _fwd_step(
            x2, p0, p1, p2, t0 + 2, lo, hi, ob, so_l, E, me, wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb
        )
        _fwd_step(
            p0, p1, p2, p3, t0 + 3, lo, hi, ob, so_l, E, me, wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb
        )
        x0, x1, x2 = p1, p2, p3
        p0, p1, p2, p3 = n0, n1, n2, n3


@triton.jit
def _bwd_step(x0, x1, x2, x3, gf, gb, f1, f2, f3, g1, g2, g3, t, lo, hi, dxb, sdx_l, me,
              wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb):  # fmt: skip
    """One step of the backward walk at window x[t-3..t], with gf = g_fwd[t] and gb = g_bwd[t-3]
    (the SiLU outputs' gradients) and the pre-activation gradients already computed: f1..f3 of
    the forward branch at t-3..t-1, g1..g3 of the backward branch at t-6..t-4. Computes the
    forward branch's at t and the backward branch's at t-3, adds their products with the window
    to the weight and bias gradients when their rows are in [lo, hi), stores dx[t-3] when it is,
    and returns the two new pre-activation gradients and the accumulators."""
    pf = gf * _dsilu(bf + wf0 * x0 + wf1 * x1 + wf2 * x2 + wf3 * x3)
    pb = gb * _dsilu(bb + wb0 * x0 + wb1 * x1 + wb2 * x2 + wb3 * x3)
    s = t - 3
    kf = tl.where((t >= lo) & (t < hi), pf, 0.0)  # this span's rows only (halo rows belong to others)
    kb = tl.where((s >= lo) & (s < hi), pb, 0.0)
    af0, af1, af2, af3, afb = af0 + kf * x0, af1 + kf * x1, af2 + kf * x2, af3 + kf * x3, afb + kf
    ab0, ab1, ab2, ab3, abb = ab0 + kb * x0, ab1 + kb * x1, ab2 + kb * x2, ab3 + kb * x3, abb + kb
    # dx[s] = sum_j wf[j] gp_f[s + 3 - j] + wb[j] gp_b[s - j]
    dx = wf0 * pf + wf1 * f3 + wf2 * f2 + wf3 * f1 + wb0 * pb + wb1 * g3 + wb2 * g2 + wb3 * g1
    tl.store(dxb + s * sdx_l, dx.to(dxb.dtype.element_ty), mask=me & (s >= lo) & (s < hi))
    return pf, pb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb


@triton.jit
def _store_dw(out, ab, a0, a1, a2, a3, E, me, FWD: tl.constexpr, K: tl.constexpr):
    """The window taps' gradients of one branch as the conv's taps, rows 0..K-1 of ``out``
    ((K + 1) rows of 2E at this span and branch), and the bias gradient as row K."""
    tl.store(out + K * (2 * E), ab, mask=me)
    _store_tap(out, a0, E, me, 0, FWD, K)
    _store_tap(out, a1, E, me, 1, FWD, K)
    _store_tap(out, a2, E, me, 2, FWD, K)
    _store_tap(out, a3, E, me, 3, FWD, K)


@triton.jit
def _store_tap(out, a, E, me, j: tl.constexpr, FWD: tl.constexpr, K: tl.constexpr):
    """Window tap j's gradient to its conv tap's row: j - 4 + K (forward branch), K - 1 - j
    (backward branch); nothing for the zero taps of convs narrower than the window."""
    if FWD:
        if j >= 4 - K:
            tl.store(out + (j - 4 + K) * (2 * E), a, mask=me)
    else:
        if j < K:
            tl.store(out + (K - 1 - j) * (2 * E), a, mask=me)


@triton.jit
def conv_bwd_walk_kernel(
    x_ptr, w_ptr, bias_ptr, g_ptr, dx_ptr, dwb_ptr,
    L, E, T, n_split,
    sx_b, sx_l, sg_b, sg_l, sdx_b, sdx_l,
    K: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """The conv backward in one token walk (K <= 4): program (channel block, batch row, span)
    writes dx rows [span T, span T + T) and the span's weight and bias gradients dwb
    (B, n_split, K + 1, 2E) float32 (as :func:`conv_bwd_gp_kernel`), from x and g (B, L, 2E),
    the gradient of the SiLU outputs (not written). The pre-activation gradients are
    recomputed for the three halo rows on each side instead of being stored and read again."""
    pid_e, b, sp = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    lo = sp * T
    hi = tl.minimum(lo + T, L)
    e = pid_e * BE + tl.arange(0, BE)
    me = e < E
    xb = x_ptr + b * sx_b + e
    gfb = g_ptr + b * sg_b + e  # forward branch's g
    gbb = gfb + E
    dxb = dx_ptr + b * sdx_b + e
    wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb = _walk_weights(w_ptr, bias_ptr, e, me, E, K)
    z = tl.zeros((BE,), tl.float32)
    af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb = z, z, z, z, z, z, z, z, z, z
    f1, f2, f3, g1, g2, g3 = z, z, z, z, z, z  # pre-activation gradients before the walk: unused
    x0, x1, x2, p0, p1, p2, p3 = _rows7(xb, lo - 3, sx_l, me, L)  # the window, and the first group
    q0, q1 = _row(gfb, lo, sg_l, me, L), _row(gfb, lo + 1, sg_l, me, L)
    q2, q3 = _row(gfb, lo + 2, sg_l, me, L), _row(gfb, lo + 3, sg_l, me, L)
    r0, r1 = _row(gbb, lo - 3, sg_l, me, L), _row(gbb, lo - 2, sg_l, me, L)
    r2, r3 = _row(gbb, lo - 1, sg_l, me, L), _row(gbb, lo, sg_l, me, L)
    for t0 in range(lo, hi + 3, 4):  # steps t in [lo, hi + 3): the last dx row is hi - 1
        # the next four steps' rows, loaded while these four are computed
        n0, n1 = _row(xb, t0 + 4, sx_l, me, L), _row(xb, t0 + 5, sx_l, me, L)
        n2, n3 = _row(xb, t0 + 6, sx_l, me, L), _row(xb, t0 + 7, sx_l, me, L)
        nq0, nq1 = _row(gfb, t0 + 4, sg_l, me, L), _row(gfb, t0 + 5, sg_l, me, L)
        nq2, nq3 = _row(gfb, t0 + 6, sg_l, me, L), _row(gfb, t0 + 7, sg_l, me, L)
        nr0, nr1 = _row(gbb, t0 + 1, sg_l, me, L), _row(gbb, t0 + 2, sg_l, me, L)
        nr2, nr3 = _row(gbb, t0 + 3, sg_l, me, L), _row(gbb, t0 + 4, sg_l, me, L)
        pf, pb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb = _bwd_step(
            x0, x1, x2, p0, q0, r0, f1, f2, f3, g1, g2, g3, t0, lo, hi, dxb, sdx_l, me,
            wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb)  # fmt: skip
        f1, f2, f3, g1, g2, g3 = f2, f3, pf, g2, g3, pb
        pf, pb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb = _bwd_step(
            x1, x2, p0, p1, q1, r1, f1, f2, f3, g1, g2, g3, t0 + 1, lo, hi, dxb, sdx_l, me,
            wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb)  # fmt: skip
        f1, f2, f3, g1, g2, g3 = f2, f3, pf, g2, g3, pb
        pf, pb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb = _bwd_step(
            x2, p0, p1, p2, q2, r2, f1, f2, f3, g1, g2, g3, t0 + 2, lo, hi, dxb, sdx_l, me,
            wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb)  # fmt: skip
        f1, f2, f3, g1, g2, g3 = f2, f3, pf, g2, g3, pb
        pf, pb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb = _bwd_step(
            p0, p1, p2, p3, q3, r3, f1, f2, f3, g1, g2, g3, t0 + 3, lo, hi, dxb, sdx_l, me,
            wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb, af0, af1, af2, af3, afb, ab0, ab1, ab2, ab3, abb)  # fmt: skip
        f1, f2, f3, g1, g2, g3 = f2, f3, pf, g2, g3, pb
        x0, x1, x2 = p1, p2, p3
        p0, p1, p2, p3 = n0, n1, n2, n3
        q0, q1, q2, q3 = nq0, nq1, nq2, nq3
        r0, r1, r2, r3 = nr0, nr1, nr2, nr3
    out = dwb_ptr + (b * n_split + sp) * (K + 1) * (2 * E) + e  # tap 0 of the forward branch
    _store_dw(out, afb, af0, af1, af2, af3, E, me, True, K)
    _store_dw(out + E, abb, ab0, ab1, ab2, ab3, E, me, False, K)


# ----------------------------------------------------------------------------------------------
# selective scan, both directions, D skip, SiLU(z) gate and combine. A program owns one batch row
# and BE channels; each thread holds its channels' N states in registers (tensors (BN, BE)), the
# recurrence needs no cross-thread traffic, and the loops take four tokens per iteration. The
# forward loads a group's four tokens together before computing them; the backward keeps its
# per-channel vectors as (1, BE) tensors in the state layout (no shared-memory conversions) and
# loads the next group's inputs while computing the current one (software prefetch: it is
# otherwise bound by global-load latency). Decays are
# exp2(A log2(e) * delta): the launchers pass A log2(e), transposed ("At2", (N, 2E)).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tp(i, lo, cnt, D):
    """Token index of step i of the chunk of ``cnt`` tokens from ``lo`` (lo + i in the forward
    branch, lo + cnt-1-i in the backward branch), clamped into the chunk. Unchunked: lo 0, cnt L."""
    return lo + tl.minimum(tl.maximum(tl.where(D == 0, i, cnt - 1 - i), 0), cnt - 1)


@triton.jit
def _chunk(c, T, L, CHUNKED: tl.constexpr):
    """First token and token count of chunk c of T tokens (unchunked: 0 and L, which cost no
    registers in the scan loops: the backward kernel is at 255)."""
    if CHUNKED:
        lo = c * T
        return lo, tl.minimum(T, L - lo)
    else:
        return 0, L


@triton.jit
def _lookback(loc, sdel, c, n_ch, At2, mA, me, ASC, cs_loc, cs_s, flags=None, WAIT: tl.constexpr = False):
    """The carry entering chunk ``c`` from the chunks before it in scan order, from their
    chunk-local carries ``loc`` (pointers at chunk 0, (BN, BE)) and sums of delta ``sdel``
    (pointers at chunk 0, channel-shaped): x <- exp2(A log2(e) * sum delta) * x + loc over chunks
    0..c-1 (``ASC``) or n_ch-1 down to c+1. The same recurrence carries the states forwards and the
    gradient w = a dh backwards; a chunk's decay product is exp(A * its sum of delta).
    WAIT: the carries are written by other programs of the same launch: wait for chunk cc's flag
    (``flags`` + cc, nonzero once written) before reading its carry, past the SM's L1 (.cg)."""
    x = tl.zeros(At2.shape, tl.float32)
    for k in range(tl.where(ASC, c, n_ch - 1 - c)):
        cc = tl.where(ASC, k, n_ch - 1 - k)
        if WAIT:
            while tl.atomic_add(flags + cc, 0, sem="acquire") == 0:
                pass
            s = tl.load(sdel + cc * cs_s, mask=me, other=0.0, cache_modifier=".cg")
            x = _exp2(At2 * s) * x + tl.load(loc + cc * cs_loc, mask=mA, other=0.0, cache_modifier=".cg")
        else:
            s = tl.load(sdel + cc * cs_s, mask=me, other=0.0)
            x = _exp2(At2 * s) * x + tl.load(loc + cc * cs_loc, mask=mA, other=0.0)
    return x


@triton.jit
def _gate_grad(dyb, zb, t, m, sy_l, sz_l):
    """The gradient of one branch's output at token t, dy SiLU(z) / 2 (the branches are averaged),
    (1, BE) float32; 0 where m is false."""
    return _ld(dyb, t, sy_l, m) * _silu(_ld(zb, t, sz_l, m)) * 0.5


@triton.jit
def _wself_step(P, wl, ss, a, d, g, cv):
    """One token of the scan backward's first pass under WSELF: P, the product of the chunk's
    decays up to and with this one (scan order), wl += P C_t g_t (the chunk's local gradient
    carry w = a_first dh_first, summed forwards; no exps), ss += delta."""
    P = P * a
    return P, wl + P * (cv * g), ss + d


@triton.jit
def _ld(base, t, stride, m):
    return tl.load(base + t * stride, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _ud(ub, db, t, m, su_l, sd_l):
    """u and raw dt (without bias) of token t; ub, db already offset to the row and channels."""
    return _ld(ub, t, su_l, m), _ld(db, t, sd_l, m)


@triton.jit
def _vec(bc_base, t, sbc_l, off, n, mn, EVEN_N: tl.constexpr):
    """B or C of token t as (BN, 1) float32; t is always in range, so only the state mask remains."""
    if EVEN_N:
        return tl.load(bc_base + t * sbc_l + off + n).to(tl.float32)
    else:
        return tl.load(bc_base + t * sbc_l + off + n, mask=mn, other=0.0).to(tl.float32)


@triton.jit
def _bc_vecs(bc_base, t, sbc_l, off, N, n, mn, EVEN_N: tl.constexpr):
    """B and C of token t, each (BN, 1) float32 (:func:`_vec`)."""
    return _vec(bc_base, t, sbc_l, off, n, mn, EVEN_N), _vec(bc_base, t, sbc_l, off + N, n, mn, EVEN_N)


@triton.jit
def _delta(raw, m):
    """softplus(raw) where m, else 0 (past the end: decay 1, drive 0, the state passes through)."""
    return tl.where(m, _softplus(raw), 0.0)


@triton.jit
def _decay(At2, delta):
    return _exp2(At2 * delta)  # (BN, BE)


@triton.jit
def _tok_in(u_base, dt_base, i, lo, cnt, D, ch, me, bias, su_l, sd_l):
    """Inputs of step i of the chunk: token t, mask m (false past its end), u, raw dt (with bias),
    delta."""
    t = _tp(i, lo, cnt, D)
    m = me & (i < cnt)
    u, raw = _ud(u_base + ch, dt_base + ch, t, m, su_l, sd_l)
    raw += bias
    return t, m, u, raw, _delta(raw, m)


@triton.jit
def _rev_in(ub, db, dyb, zb, sb, t, m, fwd, su_l, sd_l, sy_l, sz_l):
    """What the reverse pass reads at token t: u, raw dt, the gradient dy of the gated output, z,
    and the ungated branch sum (only for the forward-branch programs, ``fwd``)."""
    u, r = _ud(ub, db, t, m, su_l, sd_l)
    return u, r, _ld(dyb, t, sy_l, m), _ld(zb, t, sz_l, m), _ld(sb, t, sy_l, m & fwd)


@triton.jit
def scan_fwd_kernel(
    u_ptr, dt_ptr, bc_ptr, z_ptr, At_ptr, D_ptr, dtb_ptr, y_ptr, ysum_ptr, hc_ptr, sc_ptr, hin_ptr,
    L, E, N, R, T, n_ch, TB, n_b,
    su_b, su_l, sd_b, sd_l, sbc_b, sbc_l, sbc_d, sz_b, sz_l, sy_b, sy_l, sy_d,
    SAVE_SUM: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, EVEN_N: tl.constexpr,
    CHUNKED: tl.constexpr, SPLIT: tl.constexpr, SAVE_CARRY: tl.constexpr,
):  # fmt: skip
    """Both branches of one batch row, BE channels and one chunk of T tokens (program axis 2;
    unchunked: T = L, one chunk), or (SPLIT, unchunked) one branch: program axis 2 is the branch.

    u (xc, B, L, 2E), dt (raw dt_proj output without bias, B, L, 2E), bc (B and C of both
    branches, B, L, 2, 2N, strided by sbc_d between branches, starting at offset R), z (B, L, E),
    At = A log2(e) transposed (N, 2E) with A = -exp(A_log), D and dt bias (2E,), all float32.
    Writes y = (y_fwd + y_bwd) / 2 * SiLU(z) to y (B, L, E), and the ungated y_fwd + y_bwd to
    ysum when SAVE_SUM (kept for the backward). The forward branch's outputs are parked in y
    until the backward branch combines them. SPLIT: each branch writes its ungated output to y
    at offset D * sy_d instead, for :func:`combine_kernel` (twice the programs, each half as
    long: for batches too small to fill the GPU). EVEN_N: N == BN (no state mask). CHUNKED: each
    branch starts its chunk from the carry of the chunks before it (:func:`_lookback` over the
    chunk-local states hc (B, n_ch, BN, 2E) and sums of delta sc (B, n_ch, 2E) written by
    :func:`scan_state_kernel`). SAVE_CARRY (chunked, training): the state each branch starts its
    chunk from is also the state entering one of the backward's chunks of TB tokens (a multiple
    of T) when the chunk's first token in scan order begins one: then it is stored to hin
    (B, n_b, BN, 2E) at that backward chunk, for :func:`scan_bwd_kernel` (HIN). The backward
    chunks whose carry is zero (the first in each branch's scan order) are not stored.
    """
    pid_e, b, pid2 = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    e = pid_e * BE + tl.arange(0, BE)
    if SPLIT:
        _fwd_branch(pid2, 0, 0, L, n_ch, b, e, u_ptr, dt_ptr, bc_ptr, z_ptr, At_ptr, D_ptr, dtb_ptr,
                    y_ptr + pid2 * sy_d, ysum_ptr, hc_ptr, sc_ptr, hin_ptr, TB, n_b, E, N, R, su_b, su_l,
                    sd_b, sd_l, sbc_b, sbc_l, sbc_d, sz_b, sz_l, sy_b, sy_l, False, SAVE_SUM, BE, BN, EVEN_N,
                    False, False)  # fmt: skip
    else:
        lo, cnt = _chunk(pid2, T, L, CHUNKED)
        for D in tl.static_range(2):
            _fwd_branch(D, pid2, lo, cnt, n_ch, b, e, u_ptr, dt_ptr, bc_ptr, z_ptr, At_ptr, D_ptr,
                        dtb_ptr, y_ptr, ysum_ptr, hc_ptr, sc_ptr, hin_ptr, TB, n_b, E, N, R, su_b, su_l,
                        sd_b, sd_l, sbc_b, sbc_l, sbc_d, sz_b, sz_l, sy_b, sy_l, True, SAVE_SUM, BE, BN,
                        EVEN_N, CHUNKED, SAVE_CARRY)  # fmt: skip
            if D == 0:
                tl.debug_barrier()


@triton.jit
def _fwd_branch(
    D, c, lo, cnt, n_ch, b, e, u_ptr, dt_ptr, bc_ptr, z_ptr, At_ptr, D_ptr, dtb_ptr, y_ptr, ysum_ptr,
    hc_ptr, sc_ptr, hin_ptr, TB, n_b, E, N, R, su_b, su_l, sd_b, sd_l, sbc_b, sbc_l, sbc_d, sz_b, sz_l,
    sy_b, sy_l, COMBINE: tl.constexpr, SAVE_SUM: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr,
    EVEN_N: tl.constexpr, CHUNKED: tl.constexpr, SAVE_CARRY: tl.constexpr,
):  # fmt: skip
    """Branch D of :func:`scan_fwd_kernel` over tokens [lo, lo + cnt) of batch row b, channels e
    (BE,): the outputs are stored to y (the forward branch, or every branch unless COMBINE) or
    combined with what the forward branch parked there (the backward branch, COMBINE)."""
    me = e < E
    n = tl.arange(0, BN)
    mn = n < N
    u_base, dt_base, bc_base = u_ptr + b * su_b, dt_ptr + b * sd_b, bc_ptr + b * sbc_b
    y_base, z_base, s_base = y_ptr + b * sy_b + e, z_ptr + b * sz_b + e, ysum_ptr + b * sy_b + e
    ch = D * E + e
    At2 = tl.load(At_ptr + n[:, None] * (2 * E) + ch[None, :], mask=mn[:, None] & me[None, :], other=0.0)
    Dv = tl.load(D_ptr + ch, mask=me, other=0.0)
    bias = tl.load(dtb_ptr + ch, mask=me, other=0.0)
    off = D * sbc_d + R
    if CHUNKED:
        hc = hc_ptr + (b * n_ch * BN + n[:, None]) * (2 * E) + ch[None, :]
        sc = sc_ptr + b * n_ch * (2 * E) + ch[None, :]
        mA = mn[:, None] & me[None, :]
        h = _lookback(hc, sc, c, n_ch, At2, mA, me[None, :], D == 0, BN * 2 * E, 2 * E)
        if SAVE_CARRY:
            # scan order starts at token lo (forward branch) or lo + cnt - 1 (backward branch); a
            # backward chunk [cb TB, cb TB + TB) starts there when lo (or lo + cnt) is a multiple of TB
            edge = tl.where(D == 0, lo, lo + cnt)
            cb = tl.where(D == 0, edge // TB, edge // TB - 1)
            if (edge % TB == 0) & (tl.where(D == 0, c > 0, c < n_ch - 1)):
                tl.store(hin_ptr + ((b * n_b + cb) * BN + n[:, None]) * (2 * E) + ch[None, :], h, mask=mA)
    else:
        h = tl.zeros((BN, BE), tl.float32)
    for i0 in range(0, cnt, 4):
        t0, m0, u0, _, d0 = _tok_in(u_base, dt_base, i0, lo, cnt, D, ch, me, bias, su_l, sd_l)
        t1, m1, u1, _, d1 = _tok_in(u_base, dt_base, i0 + 1, lo, cnt, D, ch, me, bias, su_l, sd_l)
        t2, m2, u2, _, d2 = _tok_in(u_base, dt_base, i0 + 2, lo, cnt, D, ch, me, bias, su_l, sd_l)
        t3, m3, u3, _, d3 = _tok_in(u_base, dt_base, i0 + 3, lo, cnt, D, ch, me, bias, su_l, sd_l)
        B0, C0 = _bc_vecs(bc_base, t0, sbc_l, off, N, n, mn, EVEN_N)
        B1, C1 = _bc_vecs(bc_base, t1, sbc_l, off, N, n, mn, EVEN_N)
        B2, C2 = _bc_vecs(bc_base, t2, sbc_l, off, N, n, mn, EVEN_N)
        B3, C3 = _bc_vecs(bc_base, t3, sbc_l, off, N, n, mn, EVEN_N)
        h = _decay(At2, d0) * h + B0[:, None] * (d0 * u0)[None, :]
        y0 = tl.sum(h * C0[:, None], axis=0) + Dv * u0
        h = _decay(At2, d1) * h + B1[:, None] * (d1 * u1)[None, :]
        y1 = tl.sum(h * C1[:, None], axis=0) + Dv * u1
        h = _decay(At2, d2) * h + B2[:, None] * (d2 * u2)[None, :]
        y2 = tl.sum(h * C2[:, None], axis=0) + Dv * u2
        h = _decay(At2, d3) * h + B3[:, None] * (d3 * u3)[None, :]
        y3 = tl.sum(h * C3[:, None], axis=0) + Dv * u3
        if COMBINE and D == 1:
            _combine(y_base, z_base, s_base, t0, m0, y0, sy_l, sz_l, SAVE_SUM)
            _combine(y_base, z_base, s_base, t1, m1, y1, sy_l, sz_l, SAVE_SUM)
            _combine(y_base, z_base, s_base, t2, m2, y2, sy_l, sz_l, SAVE_SUM)
            _combine(y_base, z_base, s_base, t3, m3, y3, sy_l, sz_l, SAVE_SUM)
        else:
            tl.store(y_base + t0 * sy_l, y0.to(y_ptr.dtype.element_ty), mask=m0)
            tl.store(y_base + t1 * sy_l, y1.to(y_ptr.dtype.element_ty), mask=m1)
            tl.store(y_base + t2 * sy_l, y2.to(y_ptr.dtype.element_ty), mask=m2)
            tl.store(y_base + t3 * sy_l, y3.to(y_ptr.dtype.element_ty), mask=m3)


@triton.jit
def combine_kernel(
    y2_ptr, z_ptr, y_ptr, ysum_ptr, BL, E, sy_d, sz_r,
    SAVE_SUM: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """The split forward's combine: y2 holds the two branches' ungated outputs (2, B*L, E,
    branch stride sy_d); writes y = (y_fwd + y_bwd) / 2 * SiLU(z) and, if SAVE_SUM, the sum
    y_fwd + y_bwd, all (B*L, E) contiguous; z (B*L, E) with row stride sz_r."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
    e = tl.program_id(1) * BE + tl.arange(0, BE)[None, :]
    m = (r < BL) & (e < E)
    o = r * E + e
    ys = tl.load(y2_ptr + o, mask=m, other=0.0).to(tl.float32)
    ys += tl.load(y2_ptr + sy_d + o, mask=m, other=0.0).to(tl.float32)
    _gated_out(y_ptr + o, ysum_ptr + o, z_ptr + r * sz_r + e, ys, m, SAVE_SUM)


@triton.jit
def _combine(y_base, z_base, s_base, t, m, y_b, sy_l, sz_l, SAVE_SUM: tl.constexpr):
    """The backward branch's output y_b of token t added to the forward branch's, parked in y."""
    ys = tl.load(y_base + t * sy_l, mask=m, other=0.0).to(tl.float32) + y_b
    _gated_out(y_base + t * sy_l, s_base + t * sy_l, z_base + t * sz_l, ys, m, SAVE_SUM)


@triton.jit
def _gated_out(y_ptrs, s_ptrs, z_ptrs, ys, m, SAVE_SUM: tl.constexpr):
    """The output (y_fwd + y_bwd) / 2 * SiLU(z) from the branch sum ys, and the sum itself for the
    backward when SAVE_SUM."""
    z = tl.load(z_ptrs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (ys * _silu(z) * 0.5).to(y_ptrs.dtype.element_ty), mask=m)
    if SAVE_SUM:
        tl.store(s_ptrs, ys.to(s_ptrs.dtype.element_ty), mask=m)


@triton.jit
def _lanes(pid_e, D, E, N, At_ptr, BE: tl.constexpr, BN: tl.constexpr):
    """A one-branch program's channels and states in the state layout: channel e (1, BE) of its
    block and mask, state n (BN, 1) and mask, stacked channel ch = D E + e, the (BN, BE) mask and
    A log2(e) (BN, BE)."""
    e = pid_e * BE + tl.arange(0, BE)[None, :]  # (1, BE)
    me = e < E
    n = tl.arange(0, BN)[:, None]  # (BN, 1)
    mn = n < N
    ch = D * E + e
    mA = mn & me
    return e, me, n, mn, ch, mA, tl.load(At_ptr + n * (2 * E) + ch, mask=mA, other=0.0)


@triton.jit
def scan_state_kernel(
    u_ptr, dt_ptr, bc_ptr, z_ptr, dy_ptr, At_ptr, dtb_ptr, hc_ptr, sc_ptr,
    L, E, N, R, T, n_ch,
    su_b, su_l, sd_b, sd_l, sbc_b, sbc_l, sbc_d, sz_b, sz_l, sy_b, sy_l,
    GRAD: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, EVEN_N: tl.constexpr, SKIP: tl.constexpr,
    SUMS: tl.constexpr,
):  # fmt: skip
    """First level of the chunked (two-level) scan, for sequences too long for one sequential
    program per (batch row, channel block) to fill the GPU. Program (channel block, batch row,
    2 c + D) walks chunk c (tokens [c T, c T + T)) of branch D from a zero carry and stores the
    chunk-local carry to hc (B, n_ch, BN, 2E):
    - GRAD false: the state at the chunk's end in scan order, and the chunk's sum of delta to
      sc (B, n_ch, 2E) (its decay product is exp(A * that sum));
    - GRAD true: the gradient carry w = a dh leaving the chunk's first step, from the reverse
      recurrence dh_t = C_t g_t + a_{t+1} dh_{t+1} started at zero at the chunk's end.
    GRAD with SUMS also stores the chunk's sum of delta to sc (when the forward saved the states,
    the state pass that would store it does not run).
    The scan kernels then start each chunk from :func:`_lookback` over these carries. No look-back
    reads the carry of the last chunk in its direction's order (the states: chunk n_ch-1 of the
    forward branch, chunk 0 of the backward one; the gradient: the other way round), so those
    programs skip their walk (SKIP): the state pass stores only that chunk's sum of delta (the
    gradient look-back still reads it), the gradient pass stores nothing."""
    pid_e, b, pid2 = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    D, c = pid2 % 2, pid2 // 2
    # the last chunk of the states' scan order (SKIP false: none, every program walks its chunk)
    last = tl.where(D == 0, n_ch - 1, 0) if SKIP else -2
    if GRAD and c == n_ch - 1 - last:  # the gradient's last chunk: no look-back reads its carry
        return
    lo, cnt = _chunk(c, T, L, True)
    e, me, n, mn, ch, mA, At2 = _lanes(pid_e, D, E, N, At_ptr, BE, BN)
    bias = tl.load(dtb_ptr + ch, mask=me, other=0.0)
    ub, db = u_ptr + b * su_b + ch, dt_ptr + b * sd_b + ch
    bc_base = bc_ptr + b * sbc_b
    off = D * sbc_d + R
    x = tl.zeros((BN, BE), tl.float32)
    if GRAD:
        dyb, zb = dy_ptr + b * sy_b + e, z_ptr + b * sz_b + e
        ssum = tl.zeros((1, BE), tl.float32)
        for i0 in range(0, cnt, 4):
            for k in tl.static_range(4):
                i = cnt - 1 - (i0 + k)  # the chunk's steps in reverse
                t = _tp(i, lo, cnt, D)
                m = me & (i >= 0)
                d = _delta(_ld(db, t, sd_l, m) + bias, m)
                g = _gate_grad(dyb, zb, t, m, sy_l, sz_l)
                x = _decay(At2, d) * (_vec(bc_base, t, sbc_l, off + N, n, mn, EVEN_N) * g + x)
                if SUMS:
                    ssum += d
        if SUMS:
            tl.store(sc_ptr + (b * n_ch + c) * (2 * E) + ch, ssum, mask=me)
    else:
        ssum = tl.zeros((1, BE), tl.float32)
        if c == last:  # the sum of delta only (no states: no look-back reads them), in walk order
            for i0 in range(0, cnt, 4):
                for k in tl.static_range(4):
                    m = me & (i0 + k < cnt)
                    ssum += _delta(_ld(db, _tp(i0 + k, lo, cnt, D), sd_l, m) + bias, m)
        else:
            for i0 in range(0, cnt, 4):
                for k in tl.static_range(4):
                    t = _tp(i0 + k, lo, cnt, D)
                    m = me & (i0 + k < cnt)
                    u, r = _ud(ub, db, t, m, su_l, sd_l)
                    d = _delta(r + bias, m)
                    x = _decay(At2, d) * x + _vec(bc_base, t, sbc_l, off, n, mn, EVEN_N) * (d * u)
                    ssum += d
        tl.store(sc_ptr + (b * n_ch + c) * (2 * E) + ch, ssum, mask=me)
    if GRAD or c != last:
        tl.store(hc_ptr + ((b * n_ch + c) * BN + n) * (2 * E) + ch, x, mask=mA)


# Lane reduce-scatter (RS): the sums over a warp's 32 channels of a token's 16 dB and 16 dC
# contributions (one channel per lane, every state in the thread) in 31 shuffles (16 + 8 + 4 + 2
# + 1) instead of 5 per value (160). Each step pairs lane l with lane l ^ M: the lane whose bit M
# is clear keeps the low half (lo) of what it holds and receives its partner's low half, the other
# keeps and receives the high half; after the last step lane l holds the total of value l. Lane ids
# are read inside the assembly (%laneid), so they always belong to the thread that runs it.


def _bfly_asm(m: int) -> str:
    """PTX of one reduce-scatter step with the lane at xor-distance ``m``."""
    return (
        f"{{ .reg .pred p; .reg .b32 l, s, k, r; mov.u32 l, %laneid; and.b32 l, l, {m}; setp.ne.u32 p, l, 0; "
        f"selp.b32 s, $1, $2, p; selp.b32 k, $2, $1, p; shfl.sync.bfly.b32 r, s, {m}, 31, -1; add.f32 $0, k, r; }}"
    )


_BFLY16: tl.constexpr = tl.constexpr(_bfly_asm(16))
_BFLY8: tl.constexpr = tl.constexpr(_bfly_asm(8))
_BFLY4: tl.constexpr = tl.constexpr(_bfly_asm(4))
_BFLY2: tl.constexpr = tl.constexpr(_bfly_asm(2))
_BFLY1: tl.constexpr = tl.constexpr(_bfly_asm(1))


@triton.jit
def _lane_partner(x, M: tl.constexpr):
    """x (R, 32) with column l holding column l ^ M's values: what lane l reads from lane l ^ M
    with a butterfly shuffle, for the CPU interpreter (where column = lane)."""
    R: tl.constexpr = x.shape[0]
    a, b = tl.split(tl.permute(tl.reshape(x, (R, 16 // M, 2, M)), (0, 1, 3, 2)))  # (R, 16/M, M)
    return tl.reshape(tl.permute(tl.join(b, a), (0, 1, 3, 2)), (R, 32))


@triton.jit
def _lane_ids(x):
    """The lane of each of x's (1, 32) elements, as int32: %laneid, or the column under the CPU
    interpreter."""
    if _PTX:
        return tl.inline_asm_elementwise(
            "mov.u32 $0, %laneid;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        return tl.arange(0, 32)[None, :]


@triton.jit
def _bfly(lo, hi, M: tl.constexpr):
    """One reduce-scatter step between lanes l and l ^ M (elementwise over lo and hi): the lanes
    with bit M clear keep lo plus their partner's lo, the others hi plus their partner's hi."""
    if not _PTX:  # the same arithmetic on columns, for the CPU interpreter
        up = (tl.arange(0, 32)[None, :] & M) != 0
        return tl.where(up, hi, lo) + _lane_partner(tl.where(up, lo, hi), M)
    elif M == 16:
        return tl.inline_asm_elementwise(_BFLY16, "=r,r,r", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)
    elif M == 8:
        return tl.inline_asm_elementwise(_BFLY8, "=r,r,r", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)
    elif M == 4:
        return tl.inline_asm_elementwise(_BFLY4, "=r,r,r", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)
    elif M == 2:
        return tl.inline_asm_elementwise(_BFLY2, "=r,r,r", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_BFLY1, "=r,r,r", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _halve(x, M: tl.constexpr):
    """(R, 32) -> (R/2, 32): rows [0, R/2) summed into the lanes with bit M clear, the rest into
    the others."""
    R: tl.constexpr = x.shape[0]
    lo, hi = tl.split(tl.permute(tl.reshape(x, (2, R // 2, 32)), (1, 2, 0)))
    return _bfly(lo, hi, M)


@triton.jit
def _store_dbc_rs(part, t, ok, dBp, dCp):
    """Store sum over channels of dBp and dCp (16, 32) to part[t, 0:16] and part[t, 16:32]."""
    v = _bfly(dBp, dCp, 16)  # (16, 32): lanes 0-15 hold dB, 16-31 dC, each summed over 2 lanes
    v = _halve(v, 8)
    v = _halve(v, 4)
    v = _halve(v, 2)
    v = _halve(v, 1)  # (1, 32): lane l holds value l of [dB | dC], summed over the 32 lanes
    tl.store(part + t * 32 + _lane_ids(v), v.to(part.dtype.element_ty), mask=ok)


@triton.jit
def _decay_again(At2, d, db, t, sd_l, m, bias, FRESH: tl.constexpr):
    """The decays of token t computed again, so that the compiler does not keep the first ones
    live through the group: from its delta made opaque (FRESH: one add), or from its raw dt
    loaded again (a load, a softplus)."""
    if FRESH:
        return _decay(At2, _fresh(d))
    else:
        return _decay(At2, _delta(_ld(db, t, sd_l, m) + bias, m))


@triton.jit
def _bwd_tok(t, ok, m, u, raw, delta, dy, z, ys, s, a, Bv, Cv, w, dA, dD, dtb, ch, At2, Dv,
             dz_base, du_base, ddt_base, part, sdz_l, su_l, sd_l, N, n, mn, D, RS: tl.constexpr,
             yo_base, sy_l, Y_OUT: tl.constexpr, hp, PREV: tl.constexpr):  # fmt: skip
    """Gradients at token t (ok: in range; m: and channel in range) given its inputs (u, raw dt
    with bias, delta), the gradient dy of the
    gated output, z, the ungated branch sum ys (used by the forward branch), its state s (BN, BE),
    decay a, and w = a_next * dh_next. Stores du, ddt, this program's share of dB and dC (and dz
    in the forward-branch programs, and with Y_OUT the gated output ys * SiLU(z) / 2 again, at
    yo_base + t * sy_l); returns the new w (for the token before) and the updated
    dA, dD and dt-bias gradient accumulators. PREV: ``hp`` is the state before (h_{t-1}), so
    dh a_t h_{t-1} comes as w_new h_{t-1} with w_new = a_t dh, which is needed anyway; otherwise
    a_t h_{t-1} = h_t - delta_t u_t B_t."""
    sz = _silu(z) * 0.5
    g = dy * sz  # (1, BE)
    du_ = delta * u
    dh = Cv * g + w  # (BN, BE)
    w_new = a * dh
    if PREV:
        q = w_new * hp  # dh * a_t * h_{t-1}
    else:
        q = dh * (s - Bv * du_)
    dB_in = tl.sum(dh * Bv, axis=0, keep_dims=True)
    ddelta = tl.sum(q * At2, axis=0, keep_dims=True) * LN2 + u * dB_in
    dA += q * delta
    dD += g * u
    draw = tl.where(m, ddelta * _sigmoid(raw), 0.0)  # gradient of the raw dt (and of its bias)
    dtb += draw
    tl.store(du_base + t * su_l + ch, (Dv * g + delta * dB_in).to(du_base.dtype.element_ty), mask=m)
    tl.store(ddt_base + t * sd_l + ch, draw.to(ddt_base.dtype.element_ty), mask=m)
    if D == 0:
        tl.store(dz_base + t * sdz_l, (dy * ys * 0.5 * _dsilu(z)).to(dz_base.dtype.element_ty), mask=m)
        if Y_OUT:
            tl.store(yo_base + t * sy_l, (ys * sz).to(yo_base.dtype.element_ty), mask=m)
    if RS:
        _store_dbc_rs(part, t, ok, dh * du_, s * g)
    else:
        dbp, dcp = tl.sum(dh * du_, axis=1, keep_dims=True), tl.sum(s * g, axis=1, keep_dims=True)
        tl.store(part + t * (2 * N) + n, dbp.to(part.dtype.element_ty), mask=mn & ok)
        tl.store(part + t * (2 * N) + N + n, dcp.to(part.dtype.element_ty), mask=mn & ok)
    return w_new, dA, dD, dtb


@triton.jit
def scan_bwd_kernel(
    u_ptr, dt_ptr, bc_ptr, z_ptr, At_ptr, D_ptr, dtb_ptr, dy_ptr, ysum_ptr, hst_ptr,
    du_ptr, ddt_ptr, dz_ptr, dbc_part_ptr, acc_ptr, hc_ptr, sc_ptr, wc_ptr, yo_ptr, flag_ptr,
    L, E, N, R, n_eblocks, T, n_ch,
    su_b, su_l, sd_b, sd_l, sbc_b, sbc_l, sbc_d, sz_b, sz_l, sy_b, sy_l, sdz_b, sdz_l,
    BE: tl.constexpr, BN: tl.constexpr, EVEN_N: tl.constexpr, KEEP: tl.constexpr, RS: tl.constexpr,
    CHUNKED: tl.constexpr, FRESH: tl.constexpr, HIN: tl.constexpr, Y_OUT: tl.constexpr,
    WSELF: tl.constexpr = False,
    TICKET: tl.constexpr = False,
):  # fmt: skip
    """Backward of :func:`scan_fwd_kernel` for one branch and one chunk of T tokens (program axis
    2: 2 chunk + branch; unchunked T = L), one batch row and BE channels. dy (B, L, E): gradient of the gated output. Writes du (B, L, 2E): gradient of u;
    ddt (B, L, 2E): gradient of the raw dt (before bias and softplus); dz (B, L, E, strided): the
    gradient of z (by the forward-branch programs); dbc_part (B, 2, eblocks, L, 2N): this
    program's share of the gradients of B and C; acc (B, n_ch, N + 2, 2E): this batch row's and
    chunk's share of the gradients of A_log (rows 0..N-1), D (row N) and the dt bias (row N+1),
    summed by the caller in one reduction.
    hst: float32 scratch (B, n_ch, ceil(T / 4), BN, 2E). CHUNKED: the chunk starts from the state
    carried in from the chunks before it and the gradient carry w from those after it
    (:func:`_lookback` over hc, sc and wc from :func:`scan_state_kernel`). HIN (chunked): hc
    holds the states entering the chunks themselves, stored by the forward (SAVE_CARRY), read
    as they are; the first chunk in each branch's scan order starts from zero. Y_OUT: the
    forward-branch programs also write the gated output (ysum * SiLU(z) / 2, (B, L, E) with
    dy's strides) to yo, for the out_proj weight gradient when the forward did not keep it.
    WSELF (chunked, HIN): no gradient carry pass ran; each program's first pass also sums its
    chunk's local gradient carry (:func:`_wself_step`) and sum of delta into wc and sc and then
    raises its flag in flag (B, eblocks, 2, n_ch) int32, zeroed by the caller with one more
    element after them, a ticket counter. The programs take their work in gradient order (channel
    block fastest, then batch row, then 2 k + branch: chunk n_ch-1-k of the forward branch, chunk
    k of the backward one), by program id or (TICKET) by ticket from the counter, and the second
    pass's look-back waits for the flags of the chunks it reads (:func:`_lookback` with WAIT),
    which earlier programs took: they are running or done, since GPUs start programs in id order
    (TICKET: whatever the order).

    The first pass stores the state entering every group of four tokens; the second walks the
    groups backwards, recomputes their four states in registers and runs the gradient recurrence
    dh_t = C_t g_t + a_{t+1} dh_{t+1} through them, using a_t h_{t-1} = h_t - delta_t u_t B_t
    (no division by a decay). Both passes load the next group's inputs (and the second its
    checkpoint) before computing the current one. KEEP keeps the four recomputed decays in
    registers instead of computing them again (one exp per state and token fewer, more
    registers; FRESH: how they are computed again, see :func:`_decay_again`). RS sums dB and dC
    over the channels with the lane reduce-scatter (needs N == 16, BE == 32, one warp;
    :func:`_bfly`)."""
    pid_e, b, pid2 = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    if WSELF:  # gradient order, by ticket (TICKET: the chunks a program's look-back waits for hold
        # earlier tickets, so they are running or done whatever order the GPU starts programs in)
        # or by program id (the order GPUs start programs in)
        if TICKET:
            nb = tl.num_programs(1)
            tk = tl.atomic_add(flag_ptr + nb * n_eblocks * 2 * n_ch, 1, sem="relaxed")
            pid_e, b, pid2 = tk % n_eblocks, ((tk // n_eblocks) % nb).to(tl.int64), tk // (n_eblocks * nb)
        D, nc = pid2 % 2, n_ch
        c = tl.where(D == 0, n_ch - 1 - pid2 // 2, pid2 // 2)
    elif CHUNKED:
        D, c, nc = pid2 % 2, pid2 // 2, n_ch
    else:  # (constants: the kernel is at 255 registers)
        D, c, nc = pid2, 0, 1
    lo, cnt = _chunk(c, T, L, CHUNKED)
    e, me, n, mn, ch, mA, At2 = _lanes(pid_e, D, E, N, At_ptr, BE, BN)
    Dv = tl.load(D_ptr + ch, mask=me, other=0.0)
    bias = tl.load(dtb_ptr + ch, mask=me, other=0.0)
    ub, db = u_ptr + b * su_b + ch, dt_ptr + b * sd_b + ch
    bc_base = bc_ptr + b * sbc_b
    off = D * sbc_d + R
    n_groups = tl.cdiv(cnt, 4)
    # (BN, BE) at this batch row's group 0; chunk c's groups start at slot c0 (a scalar added per
    # access: folded into the pointer tensor, the chunk offset costs registers and spills)
    hst = hst_ptr + (b * nc * tl.cdiv(T, 4) * BN + n) * (2 * E) + ch
    c0 = c * tl.cdiv(T, 4)
    if CHUNKED:
        hcb = hc_ptr + (b * n_ch * BN + n) * (2 * E) + ch
        scb = sc_ptr + b * n_ch * (2 * E) + ch
        wcb = wc_ptr + (b * n_ch * BN + n) * (2 * E) + ch

    # pass 1: the state entering every group of four tokens
    if CHUNKED:
        if HIN:
            h = tl.load(hcb + c * (BN * 2 * E), mask=mA & (c != tl.where(D == 0, 0, n_ch - 1)), other=0.0)
        else:
            h = _lookback(hcb, scb, c, n_ch, At2, mA, me, D == 0, BN * 2 * E, 2 * E)
    else:
        h = tl.zeros((BN, BE), tl.float32)
    u0, r0 = _ud(ub, db, _tp(0, lo, cnt, D), me & (0 < cnt), su_l, sd_l)
    u1, r1 = _ud(ub, db, _tp(1, lo, cnt, D), me & (1 < cnt), su_l, sd_l)
    u2, r2 = _ud(ub, db, _tp(2, lo, cnt, D), me & (2 < cnt), su_l, sd_l)
    u3, r3 = _ud(ub, db, _tp(3, lo, cnt, D), me & (3 < cnt), su_l, sd_l)
    if WSELF:  # the chunk's local gradient carry, its decay product so far, its sum of delta
        dyb, zb = dy_ptr + b * sy_b + e, z_ptr + b * sz_b + e
        wl, P, ss = (
            tl.zeros((BN, BE), tl.float32),
            tl.full((BN, BE), 1.0, tl.float32),
            tl.zeros((1, BE), tl.float32),
        )
        g0 = _gate_grad(dyb, zb, _tp(0, lo, cnt, D), me & (0 < cnt), sy_l, sz_l)
        g1 = _gate_grad(dyb, zb, _tp(1, lo, cnt, D), me & (1 < cnt), sy_l, sz_l)
        g2 = _gate_grad(dyb, zb, _tp(2, lo, cnt, D), me & (2 < cnt), sy_l, sz_l)
        g3 = _gate_grad(dyb, zb, _tp(3, lo, cnt, D), me & (3 < cnt), sy_l, sz_l)
    for g4 in range(n_groups):
        tl.store(hst + (c0 + g4) * (BN * 2 * E), h, mask=mA)
        i0, i1 = g4 * 4, g4 * 4 + 4
        t0, t1 = _tp(i1, lo, cnt, D), _tp(i1 + 1, lo, cnt, D)
        t2, t3 = _tp(i1 + 2, lo, cnt, D), _tp(i1 + 3, lo, cnt, D)
        nu0, nr0 = _ud(ub, db, t0, me & (i1 < cnt), su_l, sd_l)
        nu1, nr1 = _ud(ub, db, t1, me & (i1 + 1 < cnt), su_l, sd_l)
        nu2, nr2 = _ud(ub, db, t2, me & (i1 + 2 < cnt), su_l, sd_l)
        nu3, nr3 = _ud(ub, db, t3, me & (i1 + 3 < cnt), su_l, sd_l)
        if WSELF:
            ng0 = _gate_grad(dyb, zb, t0, me & (i1 < cnt), sy_l, sz_l)
            ng1 = _gate_grad(dyb, zb, t1, me & (i1 + 1 < cnt), sy_l, sz_l)
            ng2 = _gate_grad(dyb, zb, t2, me & (i1 + 2 < cnt), sy_l, sz_l)
            ng3 = _gate_grad(dyb, zb, t3, me & (i1 + 3 < cnt), sy_l, sz_l)
        d0 = _delta(r0 + bias, me & (i0 < cnt))
        a0 = _decay(At2, d0)
        h = a0 * h + _vec(bc_base, _tp(i0, lo, cnt, D), sbc_l, off, n, mn, EVEN_N) * (d0 * u0)
        d1 = _delta(r1 + bias, me & (i0 + 1 < cnt))
        a1 = _decay(At2, d1)
        h = a1 * h + _vec(bc_base, _tp(i0 + 1, lo, cnt, D), sbc_l, off, n, mn, EVEN_N) * (d1 * u1)
        d2 = _delta(r2 + bias, me & (i0 + 2 < cnt))
        a2 = _decay(At2, d2)
        h = a2 * h + _vec(bc_base, _tp(i0 + 2, lo, cnt, D), sbc_l, off, n, mn, EVEN_N) * (d2 * u2)
        d3 = _delta(r3 + bias, me & (i0 + 3 < cnt))
        a3 = _decay(At2, d3)
        h = a3 * h + _vec(bc_base, _tp(i0 + 3, lo, cnt, D), sbc_l, off, n, mn, EVEN_N) * (d3 * u3)
        if WSELF:
            cN = off + N
            P, wl, ss = _wself_step(
                P, wl, ss, a0, d0, g0, _vec(bc_base, _tp(i0, lo, cnt, D), sbc_l, cN, n, mn, EVEN_N)
            )
            P, wl, ss = _wself_step(
                P, wl, ss, a1, d1, g1, _vec(bc_base, _tp(i0 + 1, lo, cnt, D), sbc_l, cN, n, mn, EVEN_N)
            )
            P, wl, ss = _wself_step(
                P, wl, ss, a2, d2, g2, _vec(bc_base, _tp(i0 + 2, lo, cnt, D), sbc_l, cN, n, mn, EVEN_N)
            )
            P, wl, ss = _wself_step(
                P, wl, ss, a3, d3, g3, _vec(bc_base, _tp(i0 + 3, lo, cnt, D), sbc_l, cN, n, mn, EVEN_N)
            )
            g0, g1, g2, g3 = ng0, ng1, ng2, ng3
        u0, r0, u1, r1, u2, r2, u3, r3 = nu0, nr0, nu1, nr1, nu2, nr2, nu3, nr3
    if WSELF:  # publish the chunk's carry, then its flag (every lane's stores before it)
        tl.store(wcb + c * (BN * 2 * E), wl, mask=mA)
        tl.store(scb + c * (2 * E), ss, mask=me)
        tl.debug_barrier()
        tl.atomic_xchg(flag_ptr + ((b * n_eblocks + pid_e) * 2 + D) * n_ch + c, 1, sem="release")
    tl.debug_barrier()

    # pass 2: the groups in reverse
    dyb, zb = dy_ptr + b * sy_b + e, z_ptr + b * sz_b + e
    sb, dz_base = ysum_ptr + b * sy_b + e, dz_ptr + b * sdz_b + e
    yo_base = yo_ptr + b * sy_b + e
    du_base, ddt_base = du_ptr + b * su_b, ddt_ptr + b * sd_b
    part = dbc_part_ptr + (((b * 2 + D) * n_eblocks + pid_e) * L) * (2 * N)
    fwd = D == 0  # only the forward-branch programs need the branch sum (for dz)
    if CHUNKED:
        fl = flag_ptr + ((b * n_eblocks + pid_e) * 2 + D) * n_ch
        w = _lookback(wcb, scb, c, n_ch, At2, mA, me, D == 1, BN * 2 * E, 2 * E, fl, WSELF)
    else:
        w = tl.zeros((BN, BE), tl.float32)
    dA = tl.zeros((BN, BE), tl.float32)
    dD = tl.zeros((1, BE), tl.float32)
    dtb = tl.zeros((1, BE), tl.float32)
    i0 = (n_groups - 1) * 4
    h = tl.load(hst + (c0 + n_groups - 1) * (BN * 2 * E), mask=mA, other=0.0)
    t0, t1 = _tp(i0, lo, cnt, D), _tp(i0 + 1, lo, cnt, D)
    t2, t3 = _tp(i0 + 2, lo, cnt, D), _tp(i0 + 3, lo, cnt, D)
    m0, m1, m2, m3 = me & (i0 < cnt), me & (i0 + 1 < cnt), me & (i0 + 2 < cnt), me & (i0 + 3 < cnt)
    u0, r0, y0, z0, s0 = _rev_in(ub, db, dyb, zb, sb, t0, m0, fwd, su_l, sd_l, sy_l, sz_l)
    u1, r1, y1, z1, s1 = _rev_in(ub, db, dyb, zb, sb, t1, m1, fwd, su_l, sd_l, sy_l, sz_l)
    u2, r2, y2, z2, s2 = _rev_in(ub, db, dyb, zb, sb, t2, m2, fwd, su_l, sd_l, sy_l, sz_l)
    u3, r3, y3, z3, s3 = _rev_in(ub, db, dyb, zb, sb, t3, m3, fwd, su_l, sd_l, sy_l, sz_l)
    for gg in range(n_groups):
        i0 = (n_groups - 1 - gg) * 4
        # prefetch the group before (clamped at group 0, whose repeat load is never used)
        j0 = tl.maximum(i0 - 4, 0)
        nh = tl.load(hst + (c0 + j0 // 4) * (BN * 2 * E), mask=mA, other=0.0)
        q0, q1 = _tp(j0, lo, cnt, D), _tp(j0 + 1, lo, cnt, D)
        q2, q3 = _tp(j0 + 2, lo, cnt, D), _tp(j0 + 3, lo, cnt, D)
        nu0, nr0, ny0, nz0, ns0 = _rev_in(ub, db, dyb, zb, sb, q0, me, fwd, su_l, sd_l, sy_l, sz_l)
        nu1, nr1, ny1, nz1, ns1 = _rev_in(ub, db, dyb, zb, sb, q1, me, fwd, su_l, sd_l, sy_l, sz_l)
        nu2, nr2, ny2, nz2, ns2 = _rev_in(ub, db, dyb, zb, sb, q2, me, fwd, su_l, sd_l, sy_l, sz_l)
        nu3, nr3, ny3, nz3, ns3 = _rev_in(ub, db, dyb, zb, sb, q3, me, fwd, su_l, sd_l, sy_l, sz_l)

        t0, t1 = _tp(i0, lo, cnt, D), _tp(i0 + 1, lo, cnt, D)
        t2, t3 = _tp(i0 + 2, lo, cnt, D), _tp(i0 + 3, lo, cnt, D)
        m0, m1, m2, m3 = me & (i0 < cnt), me & (i0 + 1 < cnt), me & (i0 + 2 < cnt), me & (i0 + 3 < cnt)
        r0, r1, r2, r3 = r0 + bias, r1 + bias, r2 + bias, r3 + bias
        d0, d1, d2, d3 = _delta(r0, m0), _delta(r1, m1), _delta(r2, m2), _delta(r3, m3)
        a0 = _decay(At2, d0)
        h0 = a0 * h + _vec(bc_base, t0, sbc_l, off, n, mn, EVEN_N) * (d0 * u0)
        a1 = _decay(At2, d1)
        h1 = a1 * h0 + _vec(bc_base, t1, sbc_l, off, n, mn, EVEN_N) * (d1 * u1)
        a2 = _decay(At2, d2)
        h2 = a2 * h1 + _vec(bc_base, t2, sbc_l, off, n, mn, EVEN_N) * (d2 * u2)
        a3 = _decay(At2, d3)
        h3 = a3 * h2 + _vec(bc_base, t3, sbc_l, off, n, mn, EVEN_N) * (d3 * u3)
        if not KEEP:  # decays again from a fresh delta, so that the first ones are not kept live
            a3 = _decay_again(At2, d3, db, t3, sd_l, m3, bias, FRESH)
        bv3, cv3 = _bc_vecs(bc_base, t3, sbc_l, off, N, n, mn, EVEN_N)  # (no starred call: Triton 3.0)
        w, dA, dD, dtb = _bwd_tok(t3, i0 + 3 < cnt, m3, u3, r3, d3, y3, z3, s3, h3, a3,
                             bv3, cv3,
                             w, dA, dD, dtb, ch, At2, Dv, dz_base, du_base, ddt_base, part, sdz_l, su_l, sd_l, N, n, mn, D, RS, yo_base, sy_l, Y_OUT, h2, True)  # fmt: skip
        if not KEEP:
            a2 = _decay_again(At2, d2, db, t2, sd_l, m2, bias, FRESH)
        bv2, cv2 = _bc_vecs(bc_base, t2, sbc_l, off, N, n, mn, EVEN_N)  # (no starred call: Triton 3.0)
        w, dA, dD, dtb = _bwd_tok(t2, i0 + 2 < cnt, m2, u2, r2, d2, y2, z2, s2, h2, a2,
                             bv2, cv2,
                             w, dA, dD, dtb, ch, At2, Dv, dz_base, du_base, ddt_base, part, sdz_l, su_l, sd_l, N, n, mn, D, RS, yo_base, sy_l, Y_OUT, h1, True)  # fmt: skip
        if not KEEP:
            a1 = _decay_again(At2, d1, db, t1, sd_l, m1, bias, FRESH)
        bv1, cv1 = _bc_vecs(bc_base, t1, sbc_l, off, N, n, mn, EVEN_N)  # (no starred call: Triton 3.0)
        w, dA, dD, dtb = _bwd_tok(t1, i0 + 1 < cnt, m1, u1, r1, d1, y1, z1, s1, h1, a1,
                             bv1, cv1,
                             w, dA, dD, dtb, ch, At2, Dv, dz_base, du_base, ddt_base, part, sdz_l, su_l, sd_l, N, n, mn, D, RS, yo_base, sy_l, Y_OUT, h0, True)  # fmt: skip
        if not KEEP:
            a0 = _decay_again(At2, d0, db, t0, sd_l, m0, bias, FRESH)
        bv0, cv0 = _bc_vecs(bc_base, t0, sbc_l, off, N, n, mn, EVEN_N)  # (no starred call: Triton 3.0)
        w, dA, dD, dtb = _bwd_tok(t0, i0 < cnt, m0, u0, r0, d0, y0, z0, s0, h0, a0,
                             bv0, cv0,
                             w, dA, dD, dtb, ch, At2, Dv, dz_base, du_base, ddt_base, part, sdz_l, su_l, sd_l, N, n, mn, D, RS, yo_base, sy_l, Y_OUT, h0, False)  # fmt: skip
        h = nh
        u0, r0, y0, z0, s0 = nu0, nr0, ny0, nz0, ns0
        u1, r1, y1, z1, s1 = nu1, nr1, ny1, nz1, ns1
        u2, r2, y2, z2, s2 = nu2, nr2, ny2, nz2, ns2
        u3, r3, y3, z3, s3 = nu3, nr3, ny3, nz3, ns3
    bc_row = b * nc + c  # this batch row's and chunk's share
    acc = acc_ptr + bc_row * ((N + 2) * 2 * E) + ch  # rows 0..N-1: dA_log, N: dD, N+1: dt bias
    tl.store(acc + n * (2 * E), dA * At2 * LN2, mask=mA)  # d/dA_log = d/dA * A
    tl.store(acc + N * (2 * E), dD, mask=me)
    tl.store(acc + (N + 1) * (2 * E), dtb, mask=me)


@triton.jit
def part_sum_kernel(part_ptr, out_ptr, L, n_parts, so_b, so_l, so_d, N2, BT: tl.constexpr, BJ: tl.constexpr):
    """The dB/dC partials of :func:`scan_bwd_kernel` (B, 2, n_parts, L, N2) summed over the
    parts in float32, in order (deterministic), and written in the output's dtype to out
    (B, L, 2, N2) with strides (so_b, so_l, so_d, 1): the B/C columns of the x_proj output's
    gradient, so that no concatenation follows. One program per (BT tokens, batch row, branch)."""
    pid_t, b, D = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)[:, None]
    j = tl.arange(0, BJ)[None, :]
    m = (t < L) & (j < N2)
    src = part_ptr + ((b * 2 + D) * n_parts * L + t) * N2 + j
    s = tl.zeros((BT, BJ), tl.float32)
    for k in range(n_parts):
        s += tl.load(src + k * L * N2, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * so_b + D * so_d + t * so_l + j, s.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cast_job(src, dst, k, n, rc, c, sb, sr):
    """Elements k (of n) of a strided (blocks, rows, cols) tensor at src (rc = rows * cols
    elements a block, block stride sb, row stride sr, unit column stride) stored to the same
    elements of a contiguous float32 tensor at dst."""
    m = (k >= 0) & (k < n)
    blk = k // rc
    rem = k - blk * rc
    row = rem // c
    off = blk.to(tl.int64) * sb + row.to(tl.int64) * sr + (rem - row * c)
    tl.store(dst + k, tl.load(src + off, mask=m, other=0.0).to(tl.float32), mask=m)


@triton.jit
def _colsum(src_ptr, a_ptr, b_ptr, R, T, W, n_a, pid_w, t, BR: tl.constexpr, BW: tl.constexpr):
    w = pid_w * BW + tl.arange(0, BW)
    mw = w < W
    r = tl.arange(0, BR)[:, None]
    src = src_ptr + (r * T + t).to(tl.int64) * W + w[None, :]
    s = tl.zeros((BR, BW), tl.float32)
    for r0 in range(0, R, BR):
        s += tl.load(src, mask=(r0 + r < R) & mw[None, :], other=0.0)
        src += BR * T * W
    s = tl.sum(s, axis=0)
    if t < n_a:
        tl.store(a_ptr + w * n_a + t, s, mask=mw)
    else:
        tl.store(b_ptr + (t - n_a) * W + w, s, mask=mw)


@triton.jit
def colsum_kernel(
    src_ptr, a_ptr, b_ptr, R, T, W, n_a, n_w,
    c0_ptr, c0_dst_ptr, c0_n, c0_rc, c0_c, c0_sb, c0_sr, c1_ptr, c1_dst_ptr, c1_n, c1_rc, c1_c, c1_sb, c1_sr,
    BR: tl.constexpr, BW: tl.constexpr, CAST: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Per-program partial sums (R, T, W) float32 summed over R in order (deterministic): rows
    t < n_a written transposed to a (W, n_a), the others as they are to b (T - n_a, W). One
    program per (BW columns, row t), n_w of them along the first axis. What the weight gradients
    need: the scan backward's dA_log partials (t < N) become dA_log (2E, N) and its dD / dt-bias
    rows two (2E,) vectors; the conv backward's tap partials the conv weight (2E, K) and its bias
    row the bias (2E,).

    With CAST, the programs past the first n_w along the first axis instead copy two strided
    tensors (c0, then c1: :func:`_cast_job`'s arguments), any dtype, to contiguous float32, BC
    elements a program: the block-diagonal weight gradients of x_proj and dt_proj, cast in a
    launch that runs anyway rather than in two copy kernels of their own."""
    pid_w, t = tl.program_id(0), tl.program_id(1)
    if CAST:
        if pid_w >= n_w:
            i = ((pid_w - n_w) * T + t) * BC + tl.arange(0, BC)
            _cast_job(c0_ptr, c0_dst_ptr, i, c0_n, c0_rc, c0_c, c0_sb, c0_sr)
            _cast_job(c1_ptr, c1_dst_ptr, i - c0_n, c1_n, c1_rc, c1_c, c1_sb, c1_sr)
        else:
            _colsum(src_ptr, a_ptr, b_ptr, R, T, W, n_a, pid_w, t, BR, BW)
    else:
        _colsum(src_ptr, a_ptr, b_ptr, R, T, W, n_a, pid_w, t, BR, BW)
