"""semantics §2 / §7 errors are ValueError with distgn's messages."""
import pytest
import torch

import distgn.torch as dgn


def test_groups_do_not_divide_channels():
    with pytest.raises(ValueError, match=r"^Number of groups \(3\) does not divide the number of channels \(8\)\.$"):
        dgn.GroupNorm(3, 8)
    with pytest.raises(ValueError, match=r"Number of groups \(0\) does not divide"):
        dgn.group_norm(torch.randn(2, 8, 3), 0)


def test_group_size_errors():
    with pytest.raises(ValueError, match=r"^Either `num_groups` or `group_size` should be specified\. If `group_size` "
                                         r"is to be specified, pass `num_groups=None` as argument to override the "
                                         r"default `num_groups` value of 32\.$"):
        dgn.GroupNorm(4, 8, group_size=2)
    with pytest.raises(ValueError, match=r"^Number of channels \(8\) is not multiple of the group size \(3\)\.$"):
        dgn.GroupNorm(None, 8, group_size=3)


def test_wrong_channels_and_mask():
    layer = dgn.GroupNorm(4, 8)
    with pytest.raises(ValueError, match="Expected 8 channels"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 8, 3), mask=torch.ones(2, 8, 4, dtype=torch.bool))


def test_unsupported_dtype():
    with pytest.raises(ValueError, match="float32, float64, float16 and bfloat16"):
        dgn.group_norm(torch.ones(2, 4, 3, dtype=torch.int32), 2)


def test_other_devices_raise():
    from distgn import _distgn
    with pytest.raises(ValueError, match="runs on CPU and CUDA tensors, not meta"):
        dgn.group_norm(torch.empty(2, 4, 3, device="meta"), 2)
    with pytest.raises(ValueError, match='device must be "cpu" or "cuda"'):
        _distgn.View(0, [2], "f32", "nhwc", "tpu")
