"""Reflow on a 2-D Gaussian mixture (Liu et al. 2023): straightness S and the one-step sample error of the
first rectified flow (the exact mixture velocity; and a small MLP trained by flow matching with the same
budget) and of the 2-rectified flow (the same MLP trained by `objectives.reflow_loss` on ODE pairs
(x, z) of the exact first flow drawn with `sampling.reflow.draw_pairs`).

    python bench/reflow.py [--out bench/results/reflow.json] [--quick]

Columns: straightness S = E (1/T) int ||(z - x)/T - u||^2 dt (100 Euler steps, summed over the 2 dims);
one_step_sw2: sliced W2 of the one-step Euler samples to true data samples; one_step_to_own_ode: rms
distance of the one-step sample to the same flow's 100-step endpoint; ode_sw2: sliced W2 of that endpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import jax

from diffusion_jax.demos import reflow_demo


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/reflow.json")
    ap.add_argument("--quick", action="store_true", help="smaller run (smoke test)")
    ap.add_argument("--train_steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    kw = dict(num_pairs=2048, num_eval=1000, train_steps=300, hidden=64) if args.quick else \
        dict(train_steps=args.train_steps)
    result = reflow_demo.run(seed=args.seed, **kw)
    reflow_demo.print_table(result)
    result["meta"] |= {"jax": jax.__version__, "device": str(jax.devices()[0]), "platform": platform.platform()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['meta']['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
