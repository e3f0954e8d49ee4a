"""The CUDA-graph training option on the CPU: it runs the eager step there, and the combinations
it cannot capture are refused with the option named. Capture itself is tested on a GPU
(``test_gpu_graphs.py``)."""

import pytest
import torch

from vimssl.classify import ImageClassifier
from vimssl.models import create_model
from vimssl.models.graphs import CudaGraphed, check_single_device
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


@pytest.mark.parametrize(
    "kwargs",
    [dict(mode="linear"), dict(grad_checkpointing=True)],
    ids=["frozen encoder", "grad checkpointing"],
)
def test_cuda_graphs_refuses_what_it_cannot_capture(kwargs):
    with pytest.raises(ValueError, match="cuda_graphs"):
        ImageClassifier("vim_test", num_classes=3, img_size=32, cuda_graphs=True, **kwargs)
    if "mode" not in kwargs:
        with pytest.raises(ValueError, match="cuda_graphs"):
            MaskedPretraining("vim_test", img_size=32, cuda_graphs=True, **kwargs)


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
