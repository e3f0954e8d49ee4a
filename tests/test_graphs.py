"""The CUDA-graph option on the CPU: it runs the eager steps there, and the combination it cannot
capture is refused with the option named. Capture itself is tested on a GPU
(``test_gpu_graphs.py``)."""

import pytest
import torch

from vimssl.classify import ImageClassifier
from vimssl.models import create_model
from vimssl.models.graphs import CudaGraphed, check_single_device, eager_gpu_hint
from vimssl.pretrain import MaskedPretraining


def test_cpu_tensors_run_the_eager_function():
    model = create_model("vim_test").eval()
    calls = []

    def fn(x):
        calls.append(x.shape)
        return model(x)

    g = CudaGraphed(model, fn)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    out = g(x)
    torch.manual_seed(0)
    assert torch.equal(out, model(x)) and calls == [x.shape] and not g.graphs and g.failed is None


def test_gradients_that_may_alias_a_graph_buffer_get_their_own_copy():
    """What runs before each training replay (the replays themselves: test_gpu_graphs.py)."""
    model = torch.nn.Linear(4, 3)
    g = CudaGraphed(model, model)
    g._remember_tensors()  # what the first capture does
    buffer = torch.randn(3, 4)  # a graph's static gradient buffer
    model.weight.grad = buffer.detach()  # what autograd keeps from a replayed backward: a view
    g._own_grads()
    own = model.weight.grad
    assert own.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    assert torch.equal(own, buffer) and model.bias.grad is None
    buffer.zero_()  # the next backward replay writes the buffer: the kept gradient stays
    assert own.abs().sum() > 0
    g._own_grads()
    assert model.weight.grad is own  # a copy it made is not copied again
    model.weight.grad = own.detach()  # but a gradient someone else set is
    g._own_grads()
    assert model.weight.grad is not own and torch.equal(model.weight.grad, own)


def test_cuda_graphs_refuses_grad_checkpointing():
    with pytest.raises(ValueError, match="cuda_graphs and grad_checkpointing"):
        ImageClassifier("vim_test", num_classes=3, img_size=32, cuda_graphs=True, grad_checkpointing=True)
    with pytest.raises(ValueError, match="cuda_graphs and grad_checkpointing"):
        MaskedPretraining("vim_test", img_size=32, cuda_graphs=True, grad_checkpointing=True)
    # a frozen encoder has no backward to recompute: its features are graphed, the flag is moot
    module = ImageClassifier(
        "vim_test", num_classes=3, img_size=32, mode="linear", cuda_graphs=True, grad_checkpointing=True
    )
    assert set(module._graphs) == {"model"}


@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_classifier_with_cuda_graphs_runs_eagerly_on_the_cpu(mode):
    torch.manual_seed(0)
    kw = dict(num_classes=3, img_size=32, mode=mode, ema_decay=0.9, drop_path_rate=0.0)
    plain = ImageClassifier("vim_test", **kw).eval()
    graphed = ImageClassifier("vim_test", cuda_graphs=True, **kw).eval()
    graphed.load_state_dict(plain.state_dict())
    assert set(graphed._graphs) == {"model", "ema"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for use_ema in (False, True):
            torch.testing.assert_close(graphed(x, use_ema=use_ema), plain(x, use_ema=use_ema))
    assert not any(g.graphs for g in graphed._graphs.values())
    assert "_graphs" not in "".join(graphed.state_dict())


def test_inference_calls_are_eager_unless_asked_for():
    model = create_model("vim_test").eval()
    calls = []

    def fn(x):
        calls.append(torch.is_grad_enabled())
        return model(x)

    for inference in (False, True):
        g = CudaGraphed(model, fn, inference=inference)
        with torch.no_grad():
            g(torch.randn(1, 3, 32, 32))  # CPU tensors: eager either way
        assert g._mode((torch.randn(1),)) is None and not g.graphs
    assert calls == [False, False]


def test_cuda_graphs_option_trains_eagerly_on_the_cpu():
    module = MaskedPretraining(
        "vim_test", img_size=32, decoder_dim=32, decoder_depth=1, cuda_graphs=True
    ).train()
    loss = module.training_loss(torch.randn(4, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and not module._graphed.graphs
    assert module.encoder.cls_token.grad is not None
    assert "_graphed" not in "".join(module.state_dict())  # nothing of the option in checkpoints


def test_cuda_graphs_is_refused_with_several_processes():
    check_single_device(True, 1)
    check_single_device(False, 8)
    with pytest.raises(ValueError, match="cuda_graphs.*single GPU.*8 processes"):
        check_single_device(True, 8)


def test_a_single_gpu_run_without_graphs_is_told_about_them(caplog):
    gpu = torch.device("cuda", 0)
    assert "cuda_graphs=true" in eager_gpu_hint(False, 1, gpu, grad_checkpointing=False)
    # not when it uses them, cannot (several processes, grad checkpointing) or runs on the CPU
    assert eager_gpu_hint(True, 1, gpu, False) is None
    assert eager_gpu_hint(False, 2, gpu, False) is None
    assert eager_gpu_hint(False, 1, gpu, True) is None
    assert eager_gpu_hint(False, 1, torch.device("cpu"), False) is None
    # the LightningModules say it when fitting starts (a trainer of one process, on a GPU)
    from types import SimpleNamespace

    modules = [
        MaskedPretraining("vim_test", img_size=32, decoder_dim=32, decoder_depth=1),
        ImageClassifier("vim_test", num_classes=3, img_size=32),
        ImageClassifier("vim_test", num_classes=3, img_size=32, mode="linear", grad_checkpointing=True),
    ]
    for module in modules:
        module._trainer = SimpleNamespace(world_size=1, datamodule=None)
        module._device = gpu
        caplog.clear()
        with caplog.at_level("INFO", logger="vimssl"):
            module.on_fit_start()
        assert "cuda_graphs=true" in caplog.text, type(module).__name__
    module = ImageClassifier("vim_test", num_classes=3, img_size=32, grad_checkpointing=True)
    module._trainer, module._device = SimpleNamespace(world_size=1, datamodule=None), gpu
    caplog.clear()
    with caplog.at_level("INFO", logger="vimssl"):
        module.on_fit_start()
    assert "cuda_graphs" not in caplog.text  # fine-tuning with grad checkpointing cannot use them
