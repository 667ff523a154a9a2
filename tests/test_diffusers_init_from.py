"""`config.model.init_from=diffusers:<folder>` through the command line: the network's fields come
from the folder, the eps function the CLI builds equals the PyTorch model's output, `--mode=sample`
from a workdir without a checkpoint gives the samples of the same sampler driven by the PyTorch
model, training starts from the converted weights (params and EMA), and a config that disagrees
with the folder fails naming the field."""
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

from diffusion_jax import cli  # noqa: E402
from diffusion_jax import config as cv  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "ddpm_cifar10_diffusers.py")
# The DDPM CIFAR-10 layout at digits/16's shape (16x16x1), tiny channels.
TINY = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
            norm_num_groups=8, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
            freq_shift=1)
SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
             "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon",
             "variance_type": "fixed_small", "clip_sample": True}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(folder, model): a pipeline-style folder (unet/ + scheduler/) of a random UNet2DModel with
    every GroupNorm scale and bias randomised."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = UNet2DModel(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith(".weight") else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(str(root / "unet"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return str(root), model


def argv(workdir, data_dir, folder, *extra, variant="ddim"):
    return ["diffusion_jax", f"--config={CONFIG}:{variant}", f"--workdir={workdir}",
            f"--config.model.init_from=diffusers:{folder}", "--config.data.name=digits/16",
            "--config.data.image_size=16", f"--config.data.data_dir={data_dir}",
            "--config.data.batch_size=8", "--config.data.random_flip=False",
            "--config.sample.num_steps=3", "--config.sample.num_samples=8",
            "--config.sample.batch_size=8", "--config.report.enabled=False", "--noprogress",
            "--config.mesh.shape=(1,1,1)", *extra]


def torch_eps(model, x_nhwc, t):
    """diffusers' output (NHWC) at the DDPM grid's t, i.e. timestep n = 1000 t - 1."""
    x = torch.from_numpy(np.array(x_nhwc, np.float32).transpose(0, 3, 1, 2).copy())
    n = torch.from_numpy(np.asarray(t, np.float32) * 1000.0 - 1.0)
    with torch.no_grad():
        return model(x, n).sample.numpy().transpose(0, 2, 3, 1)


def load_config(args):
    fv_args = [a for a in args if a.startswith("--config")]
    from absl import flags
    fv = flags.FlagValues()
    cli.define_flags(fv, ["prog", *fv_args])
    fv(["prog", *fv_args])
    return fv.config


def test_cli_eps_equals_diffusers_and_sample_mode(hub, tmp_path, compile_cache):
    folder, model = hub
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    args = argv(workdir, data_dir, folder)

    # The fields come from the folder; the CLI's eps function (params from init_from) = PyTorch's.
    from diffusion_jax.cli.experiment import build_experiment, make_eps_fn, restore_checkpoint
    from diffusion_jax.cli.pretrained import resolve_init_from
    config = cv.validate(load_config(args))
    resolve_init_from(config, workdir)
    m = config.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (16, (1, 2), 1, (8,))
    assert (m.norm_groups, m.time_scale, m.time_offset, m.dropout) == (8, 1000.0, 1.0, 0.1)
    exp = build_experiment(config, (16, 16, 1))
    step, state = restore_checkpoint(exp, workdir, None)
    assert step == 0
    eps_fn = jax.jit(make_eps_fn(exp))
    x = np.random.RandomState(0).standard_normal((8, 16, 16, 1)).astype(np.float32)
    for n in (0, 10, 500, 999):
        t = np.full((8,), (n + 1) / 1000.0, np.float32)
        ref = torch_eps(model, x, t)
        for params in (state.params, state.ema[next(iter(state.ema))]):
            out = np.asarray(eps_fn(jnp.asarray(x), jnp.asarray(t), {"params": params,
                                                                     "model_cond": None}))
            assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5, n

    # --mode=sample with no checkpoint: DDIM (3 steps + x0_hat) on the converted weights equals
    # the library's DDIM driven by the PyTorch model itself.
    out = cli.main([*args, "--mode=sample"])
    assert out["step"] == 0 and not os.path.exists(os.path.join(workdir, "checkpoints"))
    with np.load(out["npz"]) as z:
        x_cli = z["x"]
    from diffusion_jax.processes import DiscreteDDPM
    from diffusion_jax.sampling import sample

    def eps_torch(x, t, cond):
        shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return jax.pure_callback(lambda a, b: torch_eps(model, a, b).astype(np.float32), shape,
                                 x, jnp.broadcast_to(t, (x.shape[0],)).astype(jnp.float32))

    ref = sample("ddim", eps_torch, DiscreteDDPM(), jax.random.fold_in(jax.random.PRNGKey(0), 0),
                 (8, 16, 16, 1), num_steps=3, spacing="uniform", denoise_final=True, eta=0.0)
    ref = np.asarray(ref.x)
    assert x_cli.shape == (8, 16, 16, 1) and np.std(ref) > 0.1
    # (an untrained network's x0_hat reaches |x| ~ 250 (alpha(1) = 0.0064): relative measures)
    err = np.abs(x_cli - ref)
    assert np.linalg.norm(x_cli - ref) / np.linalg.norm(ref) < 1e-5
    assert err.max() < 1e-5 * np.abs(ref).max(), (err.max(), np.abs(ref).max())


def test_fine_tuning_starts_from_the_converted_weights(hub, tmp_path, compile_cache):
    """One train step at lr 0 (Ho's warm-up starts at 0): the checkpoint's params and EMA are the
    converted weights, and sample mode then reads that checkpoint."""
    folder, model = hub
    workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    args = argv(workdir, data_dir, folder, "--config.train.num_steps=1",
                "--config.train.sample_every=0", "--config.train.log_every=1", variant="")
    out = cli.main(args)
    assert out["step"] == 1
    from diffusion_jax.cli.experiment import build_experiment, restore_checkpoint
    from diffusion_jax.weights.diffusers import convert_unet2d
    from diffusion_jax.cli.pretrained import resolve_init_from
    config = resolve_init_from(cv.validate(load_config(args)), workdir)
    exp = build_experiment(config, (16, 16, 1))
    step, state = restore_checkpoint(exp, workdir, None)
    assert step == 1
    _, want = convert_unet2d(folder)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for tree in state.ema.values():      # d e + (1 - d) p with e = p: p to float32 rounding (1 ulp)
        for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), b, rtol=3e-7, atol=0)


@pytest.mark.parametrize("override,field", [
    ("--config.model.ch=32", "model.ch"),
    ("--config.model.attn_resolutions=(4,)", "model.attn_resolutions"),
    ("--config.process.kwargs.beta_end=0.03", "process.kwargs.beta_end"),
    ("--config.objective.name=v", "objective.name"),
])
def test_config_disagreeing_with_the_folder_is_named(hub, tmp_path, override, field):
    folder, _ = hub
    args = argv(str(tmp_path / "run"), str(tmp_path / "data"), folder, override, "--mode=sample")
    with pytest.raises(cv.ConfigError, match=field.replace(".", r"\.")):
        cli.main(args)


def test_continuous_process_is_refused(hub, tmp_path):
    import ml_collections
    config = load_config(argv(str(tmp_path / "run"), str(tmp_path / "data"), hub[0]))
    config.process.name = "vp"
    config.process.kwargs = ml_collections.ConfigDict()
    with pytest.raises(cv.ConfigError, match=r"process\.name must be 'ddpm'"):
        cli.execute(config, str(tmp_path / "run"), "sample")


def test_bad_init_from(tmp_path):
    base = argv(str(tmp_path / "run"), str(tmp_path / "data"), str(tmp_path / "nowhere"),
                "--mode=sample")
    with pytest.raises(cv.ConfigError, match="does not exist"):
        cli.main(base)
    bad = [a if not a.startswith("--config.model.init_from") else
           "--config.model.init_from=torch:/x" for a in base]
    with pytest.raises(cv.ConfigError, match="init_from"):
        cli.main(bad)
