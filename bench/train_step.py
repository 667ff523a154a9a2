"""Train-step benchmark: images/s, compile time and MFU of the UNet train step, next to PyTorch.

    python bench/train_step.py [--out bench/results/train_step.json] [--quick]
        [--models small,cifar10] [--precision float32|bfloat16] [--batch N] [--steps N]
        [--torch | --no-torch]

Models (the configurations' own networks, built from the config files, not re-declared here):
    small    configs/default.py       UNet ch 32, ch_mult (1, 2), 1 res block, attn at 8; 16x16x1
    cifar10  configs/ddpm_cifar10.py  UNet ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attn at 16,
                                      dropout 0.1; 32x32x3 (35,746,307 parameters)

JAX side: exactly the library's training assembly (as in `diffusion_jax/cli.py`): the config's UNet
(`networks.UNet`, `make_apply_fn`), its process (`processes.get_process`), the eps objective
(`objectives.epsilon_loss`), `training.OptimizerConfig` / `make_optimizer` (AdamW + clipping),
`make_init_fn` (with the config's EMA decays), `init_train_state` on `make_mesh`, `make_train_step`
and the AOT `compile_train_step` (sharded, state-donating). The batch is a fixed random batch already
placed on the device, so the timing is the step alone (no data loading).

Timing: compile seconds (`CompiledTrainStep.compile_seconds`, lower + compile), then warm-up steps,
then `repeats` x `steps` timed steps ending in `block_until_ready`; images/s = batch * steps /
seconds, the median over the repeats.

PyTorch side (bench-only; torch is NOT a dependency of the package: imported here only, and the
column is skipped with a note if it is missing): a compact eager PyTorch UNet of the same
architecture (DDPM ResBlocks with GroupNorm(min(C // 4, 32)) eps 1e-6, SiLU, additive time
embedding, single-head self-attention at the same resolutions incl. after every up-path ResBlock,
3x3 conv down/up sampling, same ch / ch_mult / num_res_blocks / dropout), asserted to have a
parameter count within 2% of the JAX model's (it is equal). Its step does the same work as the JAX
step: random t and noise, x_t = alpha x0 + sigma eps, eps-MSE, backward, global-norm clipping, AdamW,
EMA update(s). The noise schedule is a cosine one for both models (the schedule costs nothing next to
the network). bfloat16 uses `torch.autocast`. `torch.set_num_threads(os.cpu_count())`.

MFU: model FLOPs per step = `compiled.cost_analysis()['flops']` of the AOT-compiled JAX step (XLA's
count of the whole step: forward, backward, optimiser), divided by step time and by the device's
peak (PEAK_FLOPS; dense tensor-core peak for the precision). Only on GPU; on CPU it is n/a.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as cv
from diffusion_jax import training as T
from diffusion_jax.networks import UNet, init_params, make_apply_fn
from diffusion_jax.objectives import epsilon_loss
from diffusion_jax.processes import get_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> config file; image (H, W, C) = (data.image_size, data.image_size, CHANNELS[data.name])
MODELS = {"small": "configs/default.py", "cifar10": "configs/ddpm_cifar10.py"}
CHANNELS = {"digits/16": 1, "cifar10": 3}      # grey-scale digits, RGB CIFAR-10

# Dense peak FLOP/s by (device-kind substring, precision); first match wins (order matters).
# bfloat16: tensor-core bf16 dense; float32: TF32 tensor-core dense (XLA's default for f32 dots
# on Ampere / Hopper).
PEAK_FLOPS = [
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("H200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
]

# Default (batch, warm-up, steps, repeats) per model on CPU (2 shared cores: the CIFAR-10 UNet is
# ~19 GFLOP per image per train step) and on accelerators (the configs' own batch sizes).
CPU_DEFAULTS = {"small": (32, 3, 10, 3), "cifar10": (8, 2, 2, 3)}
QUICK_DEFAULTS = {"small": (16, 1, 3, 1), "cifar10": (4, 1, 1, 1)}


def peak_flops(device, precision: str):
    if device.platform != "gpu":
        return None
    kind = getattr(device, "device_kind", "")
    for sub, table in PEAK_FLOPS:
        if sub.lower() in kind.lower():
            return table[precision]
    return None


def load_config(name: str):
    config = cv.load_file(os.path.join(REPO, MODELS[name]))
    return cv.validate(config, lock=False)


def image_shape_of(config):
    s = int(config.data.image_size)
    return (s, s, CHANNELS.get(config.data.name, 3))


def cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


# ----------------------------------------------------------------------------------------------
# JAX: the library's assembly (cli._build / cli._train)
# ----------------------------------------------------------------------------------------------

def jax_bench(config, image_shape, batch: int, warmup: int, steps: int, repeats: int,
              precision: str) -> dict:
    m = config.model
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in
              ((k, m[k]) for k in cv.MODEL_FIELDS[m.type])}
    dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
    module = UNet(**fields, dtype=dtype)
    apply_fn = make_apply_fn(module)
    process = get_process(config.process.name, **cv.kwargs_dict(config.process.kwargs))
    okw = cv.kwargs_dict(config.objective.kwargs)
    loss_fn = epsilon_loss(process, apply_fn, train=True, **okw)
    h, w, c = image_shape

    def init_params_fn(key):
        x0 = jnp.zeros((1, h, w, c), jnp.float32)
        return module.init(key, x0, jnp.zeros((1,), jnp.float32), None)["params"]

    o = config.optim
    opt_cfg = T.OptimizerConfig(
        learning_rate=o.learning_rate, b1=o.betas[0], b2=o.betas[1], eps=o.eps,
        weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, schedule=o.schedule,
        total_steps=(config.train.num_steps // o.grad_accum if o.schedule == "cosine" else None),
        end_lr_factor=o.end_lr_factor, grad_clip_norm=o.grad_clip or None,
        grad_accum_steps=o.grad_accum)
    tx, schedule = T.make_optimizer(opt_cfg)
    init_fn = T.make_init_fn(init_params_fn, tx, tuple(config.ema.decays))
    mesh = T.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    rules = (tuple(tuple(r) for r in config.mesh.logical_axis_rules)
             if config.mesh.logical_axis_rules else T.DEFAULT_LOGICAL_AXIS_RULES)
    T.check_batch_divisible(batch, mesh, "--batch")
    init = T.init_train_state(init_fn, mesh, np.asarray(jax.random.PRNGKey(0)), rules)
    state = init.state
    num_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.params)))
    # Cross-check against the networks' own initialiser (same module, same shapes).
    check = jax.eval_shape(lambda k: init_params(module, k, (1, h, w, c)), jax.random.PRNGKey(0))
    assert num_params == sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(check))

    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (batch, h, w, c), jnp.float32,
                                      -1.0, 1.0))
    host_batch = {"x": x}
    spec = T.batch_spec_of(host_batch)
    train_step = T.make_train_step(loss_fn, tx, schedule, grad_accum_steps=opt_cfg.grad_accum_steps,
                                   ema_warmup=bool(config.ema.warmup))
    step = T.compile_train_step(train_step, init.abstract, spec, mesh)
    dev_batch = T.shard_batch(host_batch, mesh)       # on device once: time the step alone
    flops = cost_flops(step.compiled)

    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step(state, dev_batch)
    jax.block_until_ready((state, metrics))
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, dev_batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise RuntimeError(f"JAX train step produced a non-finite loss {loss}")
    sec_per_step = statistics.median(times) / steps
    del state
    return {
        "params": num_params, "compile_s": step.compile_seconds, "lower_s": step.lower_seconds,
        "init_compile_s": init.compile_seconds, "warmup_s": warmup_s,
        "repeat_s": times, "step_s": sec_per_step, "images_per_s": batch / sec_per_step,
        "flops_per_step": flops, "last_loss": loss, "mesh": dict(mesh.shape),
        "ema_decays": list(config.ema.decays), "grad_clip": o.grad_clip, "dropout": m.dropout,
    }


# ----------------------------------------------------------------------------------------------
# PyTorch: a compact DDPM UNet of the same architecture (bench-only)
# ----------------------------------------------------------------------------------------------

def build_torch_unet(torch, cfg_model, in_ch: int, resolution: int):
    nn = torch.nn
    F = torch.nn.functional

    def gn(ch):
        return nn.GroupNorm(max(min(ch // 4, 32), 1), ch, eps=1e-6)

    class ResBlock(nn.Module):
        def __init__(self, cin, cout, temb_dim, dropout):
            super().__init__()
            self.norm1, self.conv1 = gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
            self.temb_proj = nn.Linear(temb_dim, cout)
            self.norm2, self.drop = gn(cout), nn.Dropout(dropout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
            self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

        def forward(self, x, temb):
            h = self.conv1(F.silu(self.norm1(x)))
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
            h = self.conv2(self.drop(F.silu(self.norm2(h))))
            return self.skip(x) + h

    class AttnBlock(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.norm = gn(ch)
            self.q, self.k, self.v, self.out = (nn.Linear(ch, ch) for _ in range(4))

        def forward(self, x):
            b, c, hh, ww = x.shape
            h = self.norm(x).flatten(2).transpose(1, 2)             # (B, HW, C)
            o = F.scaled_dot_product_attention(self.q(h)[:, None], self.k(h)[:, None],
                                               self.v(h)[:, None])[:, 0]
            return x + self.out(o).transpose(1, 2).reshape(b, c, hh, ww)

    class UNetT(nn.Module):
        def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution,
                     time_scale):
            super().__init__()
            self.ch, self.time_scale = ch, time_scale
            td = 4 * ch
            self.temb0, self.temb1 = nn.Linear(ch, td), nn.Linear(td, td)
            self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
            self.down = nn.ModuleList()
            skips, cur, res = [ch], ch, resolution
            for l, mult in enumerate(ch_mult):
                for _ in range(num_res_blocks):
                    blk = nn.ModuleList([ResBlock(cur, ch * mult, td, dropout)])
                    cur = ch * mult
                    if res in attn_resolutions:
                        blk.append(AttnBlock(cur))
                    self.down.append(blk)
                    skips.append(cur)
                if l != len(ch_mult) - 1:
                    self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                    skips.append(cur)
                    res //= 2
            self.mid = nn.ModuleList([ResBlock(cur, cur, td, dropout), AttnBlock(cur),
                                      ResBlock(cur, cur, td, dropout)])
            self.up = nn.ModuleList()
            for l in reversed(range(len(ch_mult))):
                for _ in range(num_res_blocks + 1):
                    blk = nn.ModuleList([ResBlock(cur + skips.pop(), ch * ch_mult[l], td, dropout)])
                    cur = ch * ch_mult[l]
                    if res in attn_resolutions:
                        blk.append(AttnBlock(cur))
                    self.up.append(blk)
                if l != 0:
                    self.up.append(nn.Conv2d(cur, cur, 3, padding=1))   # after nearest x2
                    res *= 2
            assert not skips
            self.norm_out, self.conv_out = gn(cur), nn.Conv2d(cur, in_ch, 3, padding=1)

        def temb(self, t):
            half = self.ch // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device,
                                                                 dtype=torch.float32)
                              / max(half - 1, 1))
            args = (self.time_scale * t)[:, None] * freqs[None]
            emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
            return self.temb1(F.silu(self.temb0(emb)))

        def forward(self, x, t):
            temb = self.temb(t)
            h = self.conv_in(x)
            hs = [h]
            for blk in self.down:
                if isinstance(blk, nn.Conv2d):
                    h = blk(h)
                else:
                    h = blk[0](h, temb)
                    for a in blk[1:]:
                        h = a(h)
                hs.append(h)
            h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
            for blk in self.up:
                if isinstance(blk, nn.Conv2d):
                    h = blk(F.interpolate(h, scale_factor=2, mode="nearest"))
                else:
                    h = blk[0](torch.cat([h, hs.pop()], dim=1), temb)
                    for a in blk[1:]:
                        h = a(h)
            return self.conv_out(F.silu(self.norm_out(h)))

    m = cfg_model
    return UNetT(int(m.ch), tuple(m.ch_mult), int(m.num_res_blocks), tuple(m.attn_resolutions),
                 float(m.dropout), int(resolution), float(m.time_scale))


def torch_bench(torch, config, image_shape, batch: int, warmup: int, steps: int, repeats: int,
                precision: str, jax_params: int, device: str) -> dict:
    h, w, c = image_shape
    m = config.model
    model = build_torch_unet(torch, m, c, h).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    rel = abs(n_params - jax_params) / jax_params
    assert rel <= 0.02, f"torch UNet has {n_params} parameters vs JAX {jax_params} ({rel:.1%})"
    o = config.optim
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": float(o.weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    okw = dict(lr=float(o.learning_rate), betas=tuple(o.betas), eps=float(o.eps))
    try:      # fused AdamW (one kernel over all tensors; CPU support since torch 2.4)
        opt, opt_impl = torch.optim.AdamW(groups, fused=True, **okw), "fused"
    except (RuntimeError, TypeError, ValueError):
        opt, opt_impl = torch.optim.AdamW(groups, foreach=True, **okw), "foreach"
    emas = [[p.detach().clone() for p in params] for _ in config.ema.decays]
    gen = torch.Generator(device="cpu").manual_seed(1)
    x0 = (torch.rand((batch, c, h, w), generator=gen) * 2 - 1).to(device)
    use_bf16 = precision == "bfloat16"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    clip = float(o.grad_clip or 0.0)

    def one_step():
        t = torch.rand((batch,), device=device)
        eps = torch.randn_like(x0)
        a = torch.cos(0.5 * math.pi * t)[:, None, None, None]
        s = torch.sin(0.5 * math.pi * t)[:, None, None, None]
        xt = a * x0 + s * eps
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(xt, t)
        loss = torch.mean((out.float() - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        with torch.no_grad():
            for d, ema in zip(config.ema.decays, emas):
                torch._foreach_lerp_(ema, params, 1.0 - float(d))
        return loss

    def sync():
        if dev_type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = one_step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = one_step()
        sync()
        times.append(time.perf_counter() - t0)
    loss = float(loss.item())
    if not math.isfinite(loss):
        raise RuntimeError(f"torch train step produced a non-finite loss {loss}")
    sec_per_step = statistics.median(times) / steps
    return {"params": n_params, "warmup_s": warmup_s, "repeat_s": times, "step_s": sec_per_step,
            "images_per_s": batch / sec_per_step, "last_loss": loss, "device": device,
            "optimizer": f"AdamW ({opt_impl})", "mode": "eager"}


# ----------------------------------------------------------------------------------------------

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "train_step.json"))
    p.add_argument("--models", default="small,cifar10")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch for every model (default: per model, see CPU_DEFAULTS; "
                        "the configs' batch sizes on accelerators)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--torch", dest="torch", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true", help="tiny batches and 1 repeat (smoke test)")
    args = p.parse_args(argv)

    models = [s.strip() for s in args.models.split(",") if s.strip()]
    for name in models:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; known: {sorted(MODELS)}")
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    ncpu = os.cpu_count() or 1

    torch = None
    torch_note = None
    if args.torch:
        try:
            import torch  # pylint: disable=import-outside-toplevel,redefined-outer-name
            torch.set_num_threads(ncpu)
        except ImportError:
            torch_note = ("torch is not installed: PyTorch column skipped (bench-only comparison; "
                          "pip install torch to enable)")
    else:
        torch_note = "PyTorch column disabled (--no-torch)"
    torch_device = "cpu"
    if torch is not None and device.platform == "gpu":
        if torch.cuda.is_available():
            torch_device = "cuda"
        else:
            torch = None
            torch_note = "torch has no CUDA here: PyTorch column skipped (would not be same device)"

    rows = []
    for name in models:
        config = load_config(name)
        image_shape = image_shape_of(config)
        if args.quick:
            batch, warmup, steps, repeats = QUICK_DEFAULTS[name]
        elif on_cpu:
            batch, warmup, steps, repeats = CPU_DEFAULTS[name]
        else:
            batch, warmup, steps, repeats = int(config.data.batch_size), 5, 20, 3
        batch = args.batch or batch
        steps = args.steps or steps
        warmup = args.warmup if args.warmup is not None else warmup
        repeats = args.repeats or repeats
        print(f"[{name}] JAX train step: batch {batch}, {args.precision}, "
              f"{warmup} warm-up + {repeats} x {steps} steps ...", flush=True)
        j = jax_bench(config, image_shape, batch, warmup, steps, repeats, args.precision)
        peak = peak_flops(device, args.precision)
        achieved = j["flops_per_step"] / j["step_s"] if j["flops_per_step"] else None
        mfu = achieved / peak if (achieved and peak) else None
        row = {"model": name, "config": MODELS[name], "image_shape": list(image_shape),
               "batch": batch, "precision": args.precision, "warmup_steps": warmup,
               "timed_steps": steps, "repeats": repeats, "jax": j,
               "achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "mfu": mfu,
               "torch": None}
        print(f"[{name}] JAX: {j['images_per_s']:.1f} img/s, compile {j['compile_s']:.1f}s",
              flush=True)
        if torch is not None:
            print(f"[{name}] PyTorch train step ...", flush=True)
            tr = torch_bench(torch, config, image_shape, batch, warmup, steps, repeats,
                             args.precision, j["params"], torch_device)
            row["torch"] = tr
            print(f"[{name}] PyTorch: {tr['images_per_s']:.1f} img/s", flush=True)
        rows.append(row)

    # Table.
    hdr = (f"{'model':8} {'params':>11} {'batch':>5} {'prec':>8} {'compile s':>9} "
           f"{'JAX img/s':>10} {'torch img/s':>11} {'JAX/torch':>9} {'GFLOP/step':>10} "
           f"{'TFLOP/s':>8} {'MFU':>6}")
    lines = [f"device: {device.platform} ({getattr(device, 'device_kind', '?')}), "
             f"{jax.device_count()} device(s); jax {jax.__version__}; "
             f"cpu threads {ncpu}" + (f"; torch {torch.__version__} ({torch_device}, "
                                      f"{torch.get_num_threads()} threads)" if torch else ""),
             hdr, "-" * len(hdr)]
    for r in rows:
        j, tr = r["jax"], r["torch"]
        ratio = j["images_per_s"] / tr["images_per_s"] if tr else None
        lines.append(
            f"{r['model']:8} {j['params']:>11,} {r['batch']:>5} {r['precision']:>8} "
            f"{j['compile_s']:>9.1f} {j['images_per_s']:>10.1f} "
            f"{fmt(tr and tr['images_per_s'], '.1f'):>11} {fmt(ratio, '.2f'):>9} "
            f"{fmt(j['flops_per_step'] and j['flops_per_step'] / 1e9, '.1f'):>10} "
            f"{fmt(r['achieved_flops_per_s'] and r['achieved_flops_per_s'] / 1e12, '.3f'):>8} "
            f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f') + ('%' if r['mfu'] else ''):>6}")
        r["jax_over_torch"] = ratio
    if on_cpu:
        lines.append("MFU: n/a on CPU (needs a GPU with a known peak; see PEAK_FLOPS)")
    elif any(r["peak_flops_per_s"] is None for r in rows):
        lines.append(f"MFU: n/a (no peak FLOP/s known for {getattr(device, 'device_kind', '?')})")
    if torch_note:
        lines.append(f"note: {torch_note}")
    table = "\n".join(lines)
    print()
    print(table)

    result = {
        "benchmark": "train_step",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"platform": device.platform, "kind": getattr(device, "device_kind", None),
                   "count": jax.device_count()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "torch": torch.__version__ if torch else None},
        "threads": {"cpu_count": ncpu,
                    "torch_num_threads": torch.get_num_threads() if torch else None,
                    "torch_interop_threads": torch.get_num_interop_threads() if torch else None,
                    "jax": "XLA CPU uses all cores (Eigen thread pool)",
                    "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "options": vars(args),
        "torch_note": torch_note,
        "method": ("images/s = batch * steps / seconds, median over repeats, after warm-up; "
                   "compile_s = lower + XLA compile of the AOT train step; flops_per_step = "
                   "compiled.cost_analysis()['flops']; MFU = flops_per_step / step_s / peak "
                   "(GPU only). Torch step: same architecture, eps-MSE, clip, AdamW, EMA, eager."),
        "targets": {"jax_not_slower_than_torch_on_cpu":
                    None if not (on_cpu and all(r["torch"] for r in rows)) else
                    all(r["jax_over_torch"] >= 1.0 for r in rows),
                    "mfu_cifar10_bf16_h100_ge_40pct": "n/a (not on an H100 in bfloat16)"
                    if not (device.platform == "gpu" and args.precision == "bfloat16")
                    else {r["model"]: r["mfu"] for r in rows}},
        "rows": rows,
        "table": table,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
