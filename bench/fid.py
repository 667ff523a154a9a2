"""FID feature extraction: the library's Flax Inception-v3 against pytorch-fid on the same images.

    python bench/fid.py [--num-images 64] [--batch-size 16] [--image-size 32]
        [--weights pt_inception-2015-12-05-6726825d.pth] [--out bench/results/fid.json]

Each implementation runs in its own subprocess (so its peak memory is its own) on the same
uint8 images (N, S, S, 3), resized to 299x299 inside the network call as pytorch-fid does:

    flax       diffusion_jax.evaluation.inception.InceptionFeatureExtractor (jit, one compile per
               batch shape; the first batch, compile included, is timed separately)
    pytorch    pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True),
               eval mode, torch.no_grad, on the default device (CUDA when present)

Measured: images / s over the batches after the first (warm), the first batch's seconds, the
process's peak resident memory (getrusage ru_maxrss), the accelerator's peak memory when there is
one (jax memory_stats peak_bytes_in_use / torch.cuda.max_memory_allocated), and the largest
relative difference between the two pool3 features. Without --weights, random weights (a
randomly initialised pytorch-fid network, BN statistics set from a batch) are written to a
temporary .pth: the speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _images(n, size, seed=0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def _worker_flax(args) -> dict:
    import jax
    import numpy as np
    from diffusion_jax.evaluation.inception import InceptionFeatureExtractor
    imgs = _images(args.num_images, args.image_size)
    ex = InceptionFeatureExtractor.from_file(args.weights, batch_size=args.batch_size,
                                             progress=False)
    b = args.batch_size
    t0 = time.perf_counter()
    first = ex.extract(imgs[:b])["pool3"]
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    rest = ex.extract(imgs[b:])["pool3"]
    t_rest = time.perf_counter() - t0
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    np.save(args.features, np.concatenate([first, rest]))
    return {"impl": "flax", "device": str(dev.platform), "first_batch_s": t_first,
            "images_per_s": (len(imgs) - b) / t_rest, "peak_rss_mib": _peak_rss_mib(),
            "device_peak_mib": (stats["peak_bytes_in_use"] / 2 ** 20
                                if "peak_bytes_in_use" in stats else None)}


def _worker_torch(args) -> dict:
    import numpy as np
    import torch
    from pytorch_fid import inception as pfi
    sys.path.insert(0, os.path.join(ROOT, "diffusion_jax"))
    from diffusion_jax.weights.torch_pickle import load_state_dict
    sd = {k: torch.from_numpy(v) for k, v in load_state_dict(args.weights).items()}
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval().to(dev)
    imgs = _images(args.num_images, args.image_size)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    b = args.batch_size
    feats = []

    def run(lo, hi):
        with torch.no_grad():
            for i in range(lo, hi, b):
                feats.append(net(x[i:i + b].to(dev))[0][:, :, 0, 0].cpu().numpy())
        if dev == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    run(0, b)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(b, len(imgs))
    t_rest = time.perf_counter() - t0
    np.save(args.features, np.concatenate(feats))
    return {"impl": "pytorch-fid", "device": dev, "first_batch_s": t_first,
            "images_per_s": (len(imgs) - b) / t_rest, "peak_rss_mib": _peak_rss_mib(),
            "device_peak_mib": (torch.cuda.max_memory_allocated() / 2 ** 20
                                if dev == "cuda" else None),
            "torch_threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--weights", default=None, help="pt_inception-2015-12-05-6726825d.pth; "
                   "default: random weights in a temporary file")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fid.json"))
    p.add_argument("--worker", choices=("flax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--features", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.num_images < 2 * args.batch_size:
        p.error("--num-images must be at least two batches (the first is the warm-up)")
    if args.worker:
        out = (_worker_flax if args.worker == "flax" else _worker_torch)(args)
        print("RESULT " + json.dumps(out))
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from _fid_common import write_random_weights
            weights = os.path.join(tmp, "pt_inception-2015-12-05-6726825d.pth")
            write_random_weights(weights)
        rows, feats = [], {}
        for impl in ("flax", "torch"):
            fpath = os.path.join(tmp, f"{impl}.npy")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl,
                   "--weights", weights, "--features", fpath, "--num-images",
                   str(args.num_images), "--batch-size", str(args.batch_size),
                   "--image-size", str(args.image_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[0][len("RESULT "):]))
            import numpy as np
            feats[impl] = np.load(fpath)
    diff = float(np.abs(feats["flax"] - feats["torch"]).max() / np.abs(feats["torch"]).max())
    ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    print(f"{args.num_images} images {args.image_size}x{args.image_size} -> 299x299, batch "
          f"{args.batch_size}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'impl':<12} {'device':<7} {'images/s':>9} {'first batch s':>14} {'peak RSS MiB':>13}"
          f" {'device peak MiB':>16}")
    for r in rows:
        dp = "—" if r["device_peak_mib"] is None else f"{r['device_peak_mib']:.0f}"
        print(f"{r['impl']:<12} {r['device']:<7} {r['images_per_s']:>9.1f} "
              f"{r['first_batch_s']:>14.2f} {r['peak_rss_mib']:>13.0f} {dp:>16}")
    print(f"flax / pytorch-fid throughput: {ratio:.2f}x; pool3 max |diff| / max |f|: {diff:.2e}")
    result = {"num_images": args.num_images, "image_size": args.image_size,
              "batch_size": args.batch_size, "cpus": os.cpu_count(),
              "weights": "random" if args.weights is None else os.path.basename(args.weights),
              "rows": rows, "throughput_ratio_flax_over_torch": ratio,
              "pool3_max_rel_diff": diff}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
