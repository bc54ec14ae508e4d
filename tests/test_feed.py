"""normlab._feed: one rule for feeding a batch to a model, checked against calling the model by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab._feed import Fed, batch_size, feed, model_device, unpack


class Recorder(nn.Module):
    """Records how it was called; its output is its input times its weight (so feeding is observable)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))
        self.calls = []

    def forward(self, x, mask=None, **extra):
        self.calls.append((x, mask, extra))
        return x * self.weight


def test_a_tensor_is_the_input():
    m, x = Recorder(), torch.randn(4, 3)
    assert torch.equal(feed(m, x), x * 2)
    ((got, mask, extra),) = m.calls
    assert got is x and mask is None and extra == {}  # already on the model's device: not copied


@pytest.mark.parametrize("kind", [tuple, list])
def test_x_y_feeds_x_and_keeps_y_as_the_target(kind):
    x, y = torch.randn(4, 3), torch.arange(4)
    m = Recorder()
    assert torch.equal(feed(m, kind((x, y))), x * 2)
    assert m.calls[0][1] is None
    fed = unpack(kind((x, y)))
    assert isinstance(fed, Fed) and len(fed.args) == 1 and fed.args[0] is x and fed.kwargs == {} and fed.target is y


def test_a_bool_third_element_is_the_mask_and_anything_else_is_not():
    x, y, mask = torch.randn(4, 5, 3), torch.arange(4), torch.rand(4, 5) > 0.5
    m = Recorder()
    feed(m, (x, y, mask))
    assert m.calls[0][1] is mask
    feed(m, (x, y, mask.float()))  # e.g. sample weights: not a mask
    assert m.calls[1][1] is None


def test_a_dict_is_keyword_arguments():
    x, mask = torch.randn(4, 3), torch.ones(4, dtype=torch.bool)
    m = Recorder()
    feed(m, {"x": x, "mask": mask, "tag": "a"})
    got, got_mask, extra = m.calls[0]
    assert got is x and got_mask is mask and extra == {"tag": "a"}


@pytest.mark.parametrize("batch", ["text", 3, [], (), [1, 2], None])
def test_anything_else_is_one_clear_type_error_naming_the_caller(batch):
    with pytest.raises(TypeError, match=r"^audit: cannot feed a batch of type .*forward=lambda model, batch"):
        feed(Recorder(), batch, who="audit")


def test_inputs_and_target_move_to_the_model_device():
    m = Recorder().to(torch.float64)
    assert model_device(m) == torch.device("cpu")
    fed = unpack((torch.randn(2, 3), torch.arange(2), torch.ones(2, dtype=torch.bool)), "meta")
    assert fed.args[0].device.type == "meta" and fed.target.device.type == "meta"
    assert fed.kwargs["mask"].device.type == "meta"
    assert unpack({"x": torch.zeros(1), "n": 3}, "meta").kwargs["x"].device.type == "meta"
    meta_model = nn.Linear(3, 2, device="meta")
    assert model_device(meta_model).type == "meta"
    assert feed(meta_model, torch.randn(5, 3)).device.type == "meta"  # moved before the call


def test_model_device_of_a_model_without_parameters():
    assert model_device(nn.ReLU()) == torch.device("cpu")
    buffers_only = nn.Module()
    buffers_only.register_buffer("b", torch.zeros(1, device="meta"))
    assert model_device(buffers_only).type == "meta"


@pytest.mark.parametrize(
    "batch, n",
    [
        (torch.zeros(7, 3), 7),
        ((torch.zeros(5, 2), torch.zeros(5)), 5),
        ({"ids": torch.zeros(3, 9), "mask": torch.zeros(3, 9)}, 3),
        (((torch.zeros(6, 2), torch.zeros(6, 1)), torch.zeros(6)), 6),  # nested: a custom forward's batch
        (torch.tensor(1.0), 0),
        (["no tensor"], 0),
    ],
)
def test_batch_size_is_axis_0_of_the_first_tensor(batch, n):
    assert batch_size(batch) == n
