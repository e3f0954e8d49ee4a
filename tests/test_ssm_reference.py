"""The pure-PyTorch reference path against plain textbook formulas (float64), and the mixer's
stacked two-branch computation against the released two-branch layout written out literally."""

import torch
import torch.nn.functional as F

from vimssl.models import create_model
from vimssl.models.mixer import BiMambaMixer
from vimssl.ssm import causal_conv1d_ref, selective_scan_ref


def scan_textbook(u, delta, A, B, C, D, z, delta_bias):
    """One channel, one state, one step at a time: the recurrence exactly as written."""
    bsz, dim, seqlen = u.shape
    groups = B.shape[1]
    delta = F.softplus(delta + delta_bias[None, :, None])
    y = torch.zeros_like(u)
    for b in range(bsz):
        for e in range(dim):
            g = e // (dim // groups)
            h = torch.zeros(A.shape[1], dtype=u.dtype)
            for t in range(seqlen):
                h = torch.exp(delta[b, e, t] * A[e]) * h + delta[b, e, t] * u[b, e, t] * B[b, g, :, t]
                y[b, e, t] = (h * C[b, g, :, t]).sum() + D[e] * u[b, e, t]
    return y * F.silu(z)


def test_selective_scan_matches_textbook_recurrence():
    bsz, dim, seqlen, n = 2, 6, 7, 4
    kw = dict(dtype=torch.float64)
    u, delta, z = (torch.randn(bsz, dim, seqlen, **kw) for _ in range(3))
    A = -torch.rand(dim, n, **kw) - 0.1
    B, C = torch.randn(bsz, 2, n, seqlen, **kw), torch.randn(bsz, 2, n, seqlen, **kw)
    D, bias = torch.randn(dim, **kw), torch.randn(dim, **kw)
    out = selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, scan_textbook(u, delta, A, B, C, D, z, bias))
    # ungrouped B/C (B, N, L) is the one-group case
    out1 = selective_scan_ref(u, delta, A, B[:, 0], C[:, 0], D, z=z, delta_bias=bias, delta_softplus=True)
    ref1 = scan_textbook(u, delta, A, B[:, :1], C[:, :1], D, z, bias)
    torch.testing.assert_close(out1, ref1)


def test_selective_scan_gradients_match_float64_autograd_of_textbook():
    bsz, dim, seqlen, n = 1, 4, 5, 3
    kw = dict(dtype=torch.float64, requires_grad=True)
    args = [
        torch.randn(bsz, dim, seqlen, **kw),  # u
        torch.randn(bsz, dim, seqlen, **kw),  # delta
        (-torch.rand(dim, n, dtype=torch.float64) - 0.1).requires_grad_(),  # A
        torch.randn(bsz, 2, n, seqlen, **kw),  # B
        torch.randn(bsz, 2, n, seqlen, **kw),  # C
        torch.randn(dim, **kw),  # D
        torch.randn(bsz, dim, seqlen, **kw),  # z
        torch.randn(dim, **kw),  # delta_bias
    ]
    grads_ref = torch.autograd.grad(scan_textbook(*args).square().sum(), args)
    u, delta, A, B, C, D, z, bias = args
    out = selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    grads = torch.autograd.grad(out.square().sum(), args)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


def test_selective_scan_keeps_float32_math_for_bf16_inputs():
    u, delta = torch.randn(2, 8, 9), torch.randn(2, 8, 9)
    A, B, C = -torch.rand(8, 4), torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    ref = selective_scan_ref(u, delta, A, B, C, delta_softplus=True)
    out = selective_scan_ref(
        u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), delta_softplus=True
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_causal_conv_matches_loop_and_is_causal():
    x, w, b = torch.randn(2, 5, 9), torch.randn(5, 4), torch.randn(5)
    out = causal_conv1d_ref(x, w, b, activation="silu")
    ref = torch.zeros_like(x)
    for t in range(9):
        for k in range(4):  # weight[k] multiplies x[t - 3 + k]
            if t - 3 + k >= 0:
                ref[..., t] += w[:, k] * x[..., t - 3 + k]
    torch.testing.assert_close(out, F.silu(ref + b[:, None]))
    y = x.clone()
    y[..., 6:] += 1.0  # the future must not change the past
    torch.testing.assert_close(causal_conv1d_ref(y, w, b)[..., :6], causal_conv1d_ref(x, w, b)[..., :6])


def mixer_two_branches(m: BiMambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The released "v2" mixer written out literally: two separate branches, the backward one on
    flipped x and z, each gated inside, outputs flipped back, summed, halved, projected."""
    xz = m.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
    x, z = xz.chunk(2, dim=1)
    e, r, n = m.d_inner, m.dt_rank, m.d_state

    def branch(x, z, s):
        conv, x_proj, dt_proj = (getattr(m, f"{k}{s}") for k in ("conv1d", "x_proj", "dt_proj"))
        A = -torch.exp(getattr(m, f"A{s}_log"))
        x = causal_conv1d_ref(x, conv.weight.squeeze(1), conv.bias, "silu")
        dbc = x_proj(x.transpose(1, 2))  # (B, L, R+2N)
        dt, B, C = dbc.split([r, n, n], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(
            x, delta, A, B.transpose(1, 2), C.transpose(1, 2), getattr(m, f"D{s}"),
            z=z, delta_bias=dt_proj.bias, delta_softplus=True,
        )  # fmt: skip

    out_f = branch(x, z, "")
    out_b = branch(x.flip(-1), z.flip(-1), "_b")
    out = (out_f + out_b.flip(-1)) / 2
    assert out.shape[1] == e
    return m.out_proj(out.transpose(1, 2))


def test_mixer_equals_literal_two_branch_release_layout():
    m = BiMambaMixer(16, backend="torch").double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))  # make both branches differ
    hidden = torch.randn(2, 11, 16, dtype=torch.float64)
    torch.testing.assert_close(m(hidden), mixer_two_branches(m, hidden))


def test_model_backend_torch_and_auto_agree_on_cpu():
    model = create_model("vim_test", backend="auto").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_backend("torch")
    torch.testing.assert_close(model(x), ref)
