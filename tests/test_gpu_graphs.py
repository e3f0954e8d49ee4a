"""Training and inference steps replayed from CUDA graphs (:mod:`vimssl.models.graphs`) on a GPU:
the same loss and gradients as the eager step over several optimizer steps, fresh drop-path draws
at every replay, inference outputs that follow in-place parameter updates, captures again after
the model moved, other batch shapes run eagerly, and the LightningModules' ``cuda_graphs``
option. Skipped without a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vimssl.models import create_model
from vimssl.models.graphs import CudaGraphed
from vimssl.ssm.dispatch import triton_kernels_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and triton_kernels_available()),
        reason="needs a CUDA GPU (compute capability 8.0+) with triton",
    ),
]


def _model(backend: str, drop_path_rate: float = 0.0):
    torch.manual_seed(0)
    kw = dict(img_size=64, embed_dim=64, depth=4, drop_path_rate=drop_path_rate, backend=backend)
    return create_model("vim_test", num_classes=10, **kw).cuda().train()


def _step(fwd, x, y, opt):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(fwd(x).float(), y)
    loss.backward()
    grads = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graphed_steps_match_eager_steps(backend):
    eager = _model(backend)
    graphed = copy.deepcopy(eager)
    g = CudaGraphed(graphed, graphed)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1)
    for _ in range(3):  # the replays see the parameters the optimizer updated in place
        x = torch.randn(8, 3, 64, 64, device="cuda")
        y = torch.randint(0, 10, (8,), device="cuda")
        le, ge = _step(eager, x, y, opt_e)
        lg, gg = _step(g, x, y, opt_g)
        assert g.failed is None and len(g.graphs) == 1
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-5)
        for a, b in zip(gg, ge):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_accumulate_over_replays(set_to_none):
    """Two micro-batches per optimizer step (accumulate_grad_batches=2), gradients set to None or
    zeroed in place between steps: the graphed sums are the eager ones, not twice the last
    micro-batch's (a replayed backward returns views of the graph's gradient buffers)."""
    eager = _model("triton")
    graphed = copy.deepcopy(eager)
    g = CudaGraphed(graphed, graphed)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1)
    for _ in range(3):
        for _ in range(2):
            x = torch.randn(8, 3, 64, 64, device="cuda")
            y = torch.randint(0, 10, (8,), device="cuda")
            for fwd in (eager, g):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(fwd(x).float(), y)
                loss.backward()
        assert g.failed is None and len(g.graphs) == 1
        for (name, a), b in zip(graphed.named_parameters(), eager.parameters()):
            torch.testing.assert_close(
                a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )
        for opt in (opt_e, opt_g):
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)


def test_drop_path_draws_are_fresh_at_every_replay():
    model = _model("triton", drop_path_rate=0.5)
    g = CudaGraphed(model, model)
    x = torch.randn(8, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = [g(x).float() for _ in range(3)]
    assert len(g.graphs) == 1
    assert not torch.equal(outs[1], outs[2])  # same input, new masks
    model.eval()  # no drop path: the eager forward, the same at every call
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(g(x), g(x))


def test_other_shapes_and_eval_run_eagerly():
    model = _model("triton")
    g = CudaGraphed(model, model)
    x = torch.randn(8, 3, 64, 64, device="cuda")
    g(x).sum().backward()
    small = torch.randn(3, 3, 64, 64, device="cuda")  # a smaller last batch
    out = g(small)
    assert len(g.graphs) == 1 and out.shape == (3, 10)
    torch.testing.assert_close(out, model(small), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(g(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(g.graphs) == 1


@pytest.mark.parametrize("kind", ["classifier", "mae"])
def test_lightning_modules_train_from_graphs(kind):
    from vimssl.classify import ImageClassifier
    from vimssl.pretrain import MaskedPretraining

    torch.manual_seed(0)
    if kind == "classifier":
        module = ImageClassifier("vim_test", num_classes=10, img_size=32, backend="triton", cuda_graphs=True)
        batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    else:
        module = MaskedPretraining("vim_test", img_size=32, backend="triton", decoder_dim=32, decoder_depth=1,
                                   cuda_graphs=True)  # fmt: skip
        batch = (torch.randn(8, 3, 32, 32),)
    module = module.cuda().train()
    batch = tuple(t.cuda() for t in batch)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_loss(batch[0]) if kind == "mae" else _classifier_loss(module, batch)
        loss.backward()
        assert torch.isfinite(loss)
        # the replayed backward reaches every trainable parameter of the module
        missing = [n for n, p in module.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
        assert not missing
        opt.step()
        opt.zero_grad()
    graphed = module._graphs["model"] if kind == "classifier" else module._graphed
    assert graphed.failed is None, graphed.failed
    assert len(graphed.graphs) == 1


def _classifier_loss(module, batch):
    imgs, labels = batch
    return F.cross_entropy(module(imgs).float(), labels)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inference_graphs_follow_the_parameters(backend):
    model = _model(backend).eval()
    g = CudaGraphed(model, model, inference=True)
    x, x2 = torch.randn(2, 8, 3, 64, 64, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(g(x), model(x), rtol=1e-5, atol=1e-5)
        assert len(g.graphs) == 1 and g.failed is None
    with torch.no_grad():  # what an optimizer or an EMA update does between evaluations
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out, ref = g(x2), model(x2)
    assert len(g.graphs) == 1  # the same graph, replayed with the new weights and input
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # another signature: eager
        torch.testing.assert_close(g(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(g.graphs) == 1


def test_graphs_are_captured_again_after_the_model_moved():
    model = _model("triton").eval()
    g = CudaGraphed(model, model, inference=True)
    x = torch.randn(8, 3, 64, 64, device="cuda")
    with torch.no_grad():
        g(x)
        first = g._addresses
        old = [t.data for t in g._tensors]  # keeps the old memory, so that the new is elsewhere
        model.cpu()
        model.cuda()  # new storage for every parameter: the old graph would read the old memory
        for t in old:
            t.zero_()
        torch.testing.assert_close(g(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(g.graphs) == 1 and g._addresses != first


@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_classifier_evaluates_and_probes_from_graphs(mode):
    from vimssl.classify import ImageClassifier

    torch.manual_seed(0)
    kw = dict(num_classes=10, img_size=32, backend="triton", mode=mode, ema_decay=0.9)
    module = ImageClassifier("vim_test", cuda_graphs=True, **kw).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _classifier_loss(module, (x, y))
        loss.backward()
        assert module.model.head.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        module.ema.update_parameters(module.model)
    module.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for use_ema, enc in ((False, module.model), (True, module.ema.module)):
            feats = module.features(x, enc)
            ref = enc.head(module.feat_norm(feats.float()) if mode == "linear" else feats)
            torch.testing.assert_close(module(x, use_ema=use_ema), ref, rtol=1e-4, atol=1e-4)
    modes = {k[0] for g in module._graphs.values() for k in g.graphs}
    assert modes == ({"infer"} if mode == "linear" else {"train", "infer"})
    assert all(g.failed is None for g in module._graphs.values())
    assert len(module._graphs["ema"].graphs) == 1


def test_trainer_accumulates_graphed_gradients_like_eager_steps():
    """``accumulate_grad_batches=2`` through a Lightning Trainer: the parameters after two
    optimizer steps from replayed graphs are those of the eager run."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vimssl.classify import ImageClassifier

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    )

    def trained(cuda_graphs: bool) -> tuple[dict, dict]:
        torch.manual_seed(0)
        module = ImageClassifier(
            "vim_test", num_classes=10, img_size=32, backend="triton", cuda_graphs=cuda_graphs,
            optimizer="sgd", lr=0.1, warmup_steps=0, weight_decay=0.0, label_smoothing=0.0,
            drop_path_rate=0.0,  # (graphed and eager steps draw different masks)
        )  # fmt: skip
        start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        trainer = L.Trainer(
            accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, accumulate_grad_batches=2,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=8))
        if cuda_graphs:
            assert module._graphs["model"].failed is None and len(module._graphs["model"].graphs) == 1
        return start, {n: p.detach().cpu() for n, p in module.model.named_parameters()}

    (start, eager), (start_g, graphed) = trained(False), trained(True)
    # trained: the head, and most of the encoder (whose steps under the new head's 2e-5 init are
    # small enough that some round to nothing)
    moved = [n for n, p in eager.items() if not torch.equal(p, start[n].cpu())]
    assert "head.weight" in moved and len(moved) > len(eager) // 2, moved
    for name, p in eager.items():
        torch.testing.assert_close(start_g[name], start[name], rtol=0, atol=0)  # the same start
        torch.testing.assert_close(graphed[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
