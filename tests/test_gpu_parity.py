"""The CUDA kernel path against the pure-PyTorch reference: outputs and gradients of every input
and parameter, float32 and bf16. Runs on a CUDA GPU with mamba-ssm and causal-conv1d installed;
skipped elsewhere."""

import pytest
import torch

from vimssl.ssm import causal_conv1d_ref, cuda_kernels_available, selective_scan_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cuda_kernels_available()),
        reason="needs a CUDA GPU with mamba-ssm and causal-conv1d",
    ),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()  # an all-zero reference (e.g. dA when L = 1) compares absolutely
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


# shapes: (batch, channels, length, groups); odd lengths, batch 1, long sequences
SHAPES = [(1, 64, 1, 1), (2, 96, 17, 2), (3, 128, 197, 2), (1, 256, 1025, 2), (2, 64, 4097, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_parity(shape, dtype):
    from vimssl.ssm import cuda

    bsz, dim, seqlen, groups = shape
    dev = "cuda"
    n = 16
    u = torch.randn(bsz, dim, seqlen, device=dev, dtype=dtype, requires_grad=True)
    delta = (0.5 * torch.randn(bsz, dim, seqlen, device=dev)).to(dtype).requires_grad_()
    A = (-torch.rand(dim, n, device=dev) * 4 - 0.1).requires_grad_()
    B = torch.randn(bsz, groups, n, seqlen, device=dev, dtype=dtype, requires_grad=True)
    C = torch.randn(bsz, groups, n, seqlen, device=dev, dtype=dtype, requires_grad=True)
    D = torch.randn(dim, device=dev, requires_grad=True)
    bias = (torch.rand(dim, device=dev) - 4).requires_grad_()
    inputs = [u, delta, A, B, C, D, bias]

    outs, grads, g = [], [], None
    for fn in (selective_scan_ref, cuda.selective_scan):
        out = fn(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
        g = torch.randn_like(out, dtype=torch.float32) if g is None else g
        grads.append(torch.autograd.grad(out.float(), inputs, g, allow_unused=True, materialize_grads=True))
        outs.append(out)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(outs[1], outs[0]) < tol
    for name, g_cuda, g_ref in zip(["u", "delta", "A", "B", "C", "D", "bias"], grads[1], grads[0]):
        assert torch.isfinite(g_cuda).all(), name
        assert rel_err(g_cuda, g_ref) < tol * 5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv_parity(dtype):
    from vimssl.ssm import cuda

    x = torch.randn(2, 128, 197, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(128, 4, device="cuda", requires_grad=True)
    b = torch.randn(128, device="cuda", requires_grad=True)
    ref = causal_conv1d_ref(x, w.to(dtype), b.to(dtype), "silu")
    out = cuda.causal_conv1d(x, w, b, "silu")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        assert rel_err(a, r) < tol * 5


@pytest.mark.parametrize(
    "name,img,batch",
    [("vim_test", 32, 4), ("vim_tiny_patch16_224", 224, 2), ("vim_tiny_patch16_224", (160, 96), 1)],
)
@pytest.mark.parametrize("amp", [False, True])
def test_model_parity_outputs_and_all_gradients(name, img, batch, amp, model_parity):
    model_parity(name, img, batch, "cuda", amp)


def test_fused_add_norm_matches_plain():
    from vimssl.layers.norm import RMSNorm, add_rms_norm
    from vimssl.ssm import cuda

    norm = RMSNorm(64).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, res = torch.randn(2, 9, 64, device="cuda"), torch.randn(2, 9, 64, device="cuda")
    for hidden in (None, x):
        a, ra = cuda.add_rms_norm(hidden, res, norm)
        b, rb = add_rms_norm(hidden, res, norm)
        assert ra.dtype == torch.float32
        assert rel_err(a, b) < 1e-5 and rel_err(ra, rb) < 1e-6


def test_auto_picks_the_fastest_path_there_is_on_gpu():
    from vimssl.ssm import resolve_backend
    from vimssl.ssm.dispatch import triton_kernels_available

    expected = "triton" if triton_kernels_available() else "cuda"
    assert resolve_backend("auto", torch.device("cuda")) == expected
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
