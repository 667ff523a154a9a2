"""diffusers UNet2DModel -> networks.UNet (weights.diffusers.unet2d): the converted network equals
the PyTorch one on the DDPM CIFAR-10 and CelebA-HQ / LSUN layouts (small channels, random weights,
every norm and bias randomised), from safetensors and .bin folders, with diffusers' timestep n fed
as the DDPM grid's t = (n + 1) / T; bad layouts and stray / missing tensors raise naming the key."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402

from diffusion_jax.networks import UNet  # noqa: E402
from diffusion_jax.weights.diffusers import WeightsError, convert_unet2d, unet2d_fields  # noqa: E402

torch.set_num_threads(1)     # tiny models: threads only contend with XLA's on the 2 CI cores
# Cheaper XLA:CPU compiles for the test-only jits (LLVM -O0); numerics are unaffected.
FAST = {"xla_backend_optimization_level": 0}
STEPS = (0, 10, 500, 999)

# google/ddpm-cifar10-32's config.json, channels divided by 4 (the full one: FULL_CIFAR10).
CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=8, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    act_fn="silu", center_input_sample=False, time_embedding_type="positional",
    mid_block_scale_factor=1)
FULL_CIFAR10 = {**CIFAR10, "block_out_channels": (128, 256, 256, 256), "norm_num_groups": 32}
# google/ddpm-celebahq-256 / ddpm-church-256 / bedroom / cat: 6 levels, attention at 16x16 of 256
# (level 4), here at 64x64 with tiny channels; plus diffusers' newer conventions (symmetric
# downsample padding, [cos, sin] embedding, freq_shift 0, 8-channel heads, eps 1e-5).
CELEBAHQ = dict(
    sample_size=64, in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16, 32, 32),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, attention_head_dim=8,
    norm_num_groups=4, norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0)


def torch_unet(config, seed=0):
    """A diffusers UNet2DModel with random weights: PyTorch's init for weights, and every GroupNorm
    scale 1 + 0.2 N(0, 1) and every bias 0.2 N(0, 1) (none left at 1 / 0)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_scale = name.endswith(".weight")
                p.copy_((1.0 if is_scale else 0.0) + 0.2 * torch.randn_like(p))
    return model


def torch_eps(model, x_nchw, n):
    with torch.no_grad():
        return model(torch.from_numpy(x_nchw), torch.full((x_nchw.shape[0],), n)).sample.numpy()


def jax_eps_fn(fields, params, x_shape):
    """Compiled (params, x NHWC, t) -> output, once per model."""
    net = UNet(**fields)
    fn = jax.jit(lambda p, x, t: net.apply({"params": p}, x, t))
    t = jax.ShapeDtypeStruct((x_shape[0],), jnp.float32)
    return fn.lower(params, jax.ShapeDtypeStruct(x_shape, jnp.float32), t).compile(FAST)


def assert_matches(model, fields, params, batch=2, tol=1e-4, steps=STEPS):
    """The converted UNet at t = (n + 1) / T equals diffusers' at timestep n (relative L2 < tol),
    and the comparison resolves one timestep (n + 1 is far off)."""
    size, c = model.config.sample_size, model.config.in_channels
    x = np.random.RandomState(1).standard_normal((batch, c, size, size)).astype(np.float32)
    xh = jnp.asarray(x.transpose(0, 2, 3, 1))
    f = jax_eps_fn(fields, params, xh.shape)
    errs, refs = {}, {}
    for n in steps:
        refs[n] = ref = torch_eps(model, x, n)
        out = np.asarray(f(params, xh, jnp.full((batch,), (n + 1) / 1000.0))).transpose(0, 3, 1, 2)
        errs[n] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert max(errs.values()) < tol, errs
    off = np.asarray(f(params, xh, jnp.full((batch,), (steps[1] + 2) / 1000.0))).transpose(0, 3, 1, 2)
    ref = refs[steps[1]]
    shifted = np.linalg.norm(off - ref) / np.linalg.norm(ref)
    assert shifted > 30 * max(errs.values()), (shifted, errs)   # an off-by-one would show
    return errs


def state_of(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------- layouts
def test_cifar10_layout_safetensors_folder(tmp_path):
    model = torch_unet(CIFAR10)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors")
    fields, params = convert_unet2d(str(tmp_path))
    assert fields["ch"] == 32 and tuple(fields["ch_mult"]) == (1, 2, 2, 2)
    assert tuple(fields["attn_resolutions"]) == (16,) and fields["num_res_blocks"] == 2
    assert fields["time_scale"] == 1000.0 and fields["time_offset"] == 1.0
    assert fields["downsample_padding"] == "same" and fields["head_dim"] is None
    assert_matches(model, fields, params)


def test_cifar10_layout_bin_with_legacy_attention_names(tmp_path):
    """A .bin (torch.save) folder whose attention tensors carry the names of older diffusers files
    (query / key / value / proj_attn), read without PyTorch (weights.torch_pickle)."""
    model = torch_unet(CIFAR10, seed=3)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in model.state_dict().items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in k or f".attentions.1.{new}." in k or \
                    f".attentions.2.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v.clone()
    assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
    torch.save(sd, str(tmp_path / "diffusion_pytorch_model.bin"))
    (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
    fields, params = convert_unet2d(str(tmp_path))
    assert_matches(model, fields, params, steps=(0, 10, 999))


def test_celebahq_lsun_layout_save_pretrained_bin(tmp_path):
    model = torch_unet(CELEBAHQ, seed=1)
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.bin")
    fields, params = convert_unet2d(str(tmp_path))
    assert len(fields["ch_mult"]) == 6 and tuple(fields["attn_resolutions"]) == (4,)
    assert fields["downsample_padding"] == "symmetric" and fields["time_flip_sin_cos"]
    assert fields["time_freq_shift"] == 0.0 and fields["head_dim"] == 8
    assert_matches(model, fields, params)


def test_no_mid_attention_pipeline_folder(tmp_path):
    """add_attention=False (no attention anywhere) from a pipeline folder's unet/ subfolder."""
    cfg = {**CIFAR10, "down_block_types": ("DownBlock2D",) * 4, "up_block_types": ("UpBlock2D",) * 4,
           "add_attention": False, "block_out_channels": (16, 32, 32, 32)}
    model = torch_unet(cfg, seed=2)
    model.save_pretrained(str(tmp_path / "unet"))
    fields, params = convert_unet2d(str(tmp_path))
    assert not fields["mid_attn"] and "mid_attn" not in params and fields["attn_resolutions"] == ()
    assert_matches(model, fields, params, steps=(0, 10, 999))


def test_full_ddpm_cifar10_network():
    """google/ddpm-cifar10-32's exact layout: 35,746,307 parameters, as Ho et al.'s network."""
    model = torch_unet(FULL_CIFAR10, seed=4)
    fields, params = convert_unet2d((dict(model.config), state_of(model)))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    assert n_params == sum(p.numel() for p in model.parameters()) == 35_746_307
    assert_matches(model, fields, params, steps=(0, 10, 999))


# ---------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def tiny():
    cfg = {**CIFAR10, "block_out_channels": (8, 16), "norm_num_groups": 4,
           "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
           "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "sample_size": 8}
    model = torch_unet(cfg)
    return dict(model.config), state_of(model)


def test_stray_tensor_is_named(tiny):
    config, state = tiny
    with pytest.raises(WeightsError, match=r"'mid_block\.extra\.weight'"):
        convert_unet2d((config, {**state, "mid_block.extra.weight": np.zeros(3, np.float32)}))


def test_missing_tensor_is_named(tiny):
    config, state = tiny
    state = {k: v for k, v in state.items() if k != "up_blocks.0.attentions.2.to_k.bias"}
    with pytest.raises(WeightsError, match=r"up_blocks\.0\.attentions\.2\.to_k\.bias"):
        convert_unet2d((config, state))


def test_wrong_shape_is_named(tiny):
    config, state = tiny
    state = {**state, "conv_out.bias": np.zeros(4, np.float32)}
    with pytest.raises(WeightsError, match=r"conv_out/bias"):
        convert_unet2d((config, state))


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
    ("up_block_types", ("UpBlock2D", "UpBlock2D")),          # attention not mirrored
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"),
    ("downsample_padding", 2),
    ("out_channels", 6),
    ("act_fn", "gelu"),
    ("block_out_channels", (8, 12)),
    ("_class_name", "UNet2DConditionModel"),
])
def test_bad_layout_names_the_config_key(tiny, key, value):
    config = {**tiny[0], key: value}
    with pytest.raises(WeightsError, match=key):
        unet2d_fields(config)


def test_folder_errors(tmp_path):
    with pytest.raises(WeightsError, match="config.json"):
        convert_unet2d(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(CIFAR10)))
    with pytest.raises(WeightsError, match="no weights file"):
        convert_unet2d(str(tmp_path))
