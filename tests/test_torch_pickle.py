"""weights.torch_pickle reads torch.save files (zip and legacy formats) exactly, without torch."""
import collections
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from diffusion_jax.weights.diffusers import WeightsError
from diffusion_jax.weights.torch_pickle import load_state_dict


def _state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    sd = collections.OrderedDict()
    sd["encoder.block.0.conv.weight"] = torch.randn(4, 3, 3, 3, generator=g)
    sd["encoder.block.0.norm.bias"] = torch.randn(4, generator=g).half()
    sd["decoder.proj.weight"] = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    sd["decoder.proj.double"] = torch.randn(3, generator=g).double()
    sd["bn.num_batches_tracked"] = torch.tensor(17, dtype=torch.int64)
    sd["ids"] = torch.arange(-5, 7, dtype=torch.int32).reshape(3, 4)
    sd["mask"] = torch.tensor([True, False, True])
    sd["bytes"] = torch.arange(0, 250, 10, dtype=torch.uint8)
    sd["view.transposed"] = base.t()                      # non-contiguous, shares storage
    sd["view.offset_slice"] = base[2:5, 1::3]              # offset + strides, same storage
    sd["view.row"] = base[4]
    sd["empty"] = torch.zeros(0, 3)
    return sd


def _as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_state_dict_round_trip(tmp_path, zip_format):
    sd = _state()
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = load_state_dict(str(path))
    assert list(got) == list(sd)
    for k, t in sd.items():
        want = _as_numpy(t)
        assert got[k].dtype == want.dtype, k
        assert got[k].shape == want.shape, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def test_nested_and_parameters(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "epoch": 3,
                "params": dict(net.named_parameters())}, path)
    got = load_state_dict(str(path))
    for k, t in net.state_dict().items():
        np.testing.assert_array_equal(got[f"model.{k}"], t.numpy())
    np.testing.assert_array_equal(got["params.0.weight"], net[0].weight.detach().numpy())
    assert "epoch" not in got


def test_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict(str(tmp_path / "missing.pth"))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_state_dict(str(bad))
    trunc = tmp_path / "trunc.pth"
    torch.save({"w": torch.ones(1000)}, trunc, _use_new_zipfile_serialization=False)
    trunc.write_bytes(trunc.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="trunc.pth.*truncated"):
        load_state_dict(str(trunc))
    nozip = tmp_path / "other.zip"
    with zipfile.ZipFile(nozip, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(WeightsError, match="other.zip.*data.pkl"):
        load_state_dict(str(nozip))
    evil = tmp_path / "evil.pth"
    torch.save({"f": collections.Counter()}, evil)
    with pytest.raises(WeightsError, match="evil.pth.*collections.Counter"):
        load_state_dict(str(evil))
    single = tmp_path / "single.pth"
    torch.save(torch.ones(2), single)
    with pytest.raises(WeightsError, match="single tensor"):
        load_state_dict(str(single))
