"""CLD section of the sampler benchmark: SSCS vs Euler-Maruyama (and the PF-ODE) vs NFE with the exact score.

    python bench/samplers_cld.py [--out bench/results/samplers_cld.json] [--quick]
    (also run by bench/samplers.py, which adds the rows to its JSON under 'cld')

Critically-damped Langevin diffusion with the paper's CIFAR-10 constants (M^-1 = 4, gamma = 0.04, beta = 4;
`processes.CLD()`), data a 2-D ring of 8 Gaussians and a 16-D random 4-component mixture; every sampler is
driven by the EXACT velocity score of the phase-space mixture (`reference.cld_mixtures`), starts from the
prior N(0, I) x N(0, M I) and stops at t_min = 1e-3 (no denoising step). For each sampler, striding
(linear, or the official quadratic) and NFE: the sliced Wasserstein-2 distance of the samples' x, and of
(x, v), to true draws of p_{t_min}, averaged over seeds, next to the Monte-Carlo floor (two true sets).
Samplers: 'em' (reverse-SDE Euler-Maruyama), 'sscs' (symmetric splitting, score at the step midpoint),
'sscs_start' (score at the step start, as the official code), 'ode_heun' (the PF-ODE, Heun: 2 NFE/step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from diffusion_jax.processes import CLD
from diffusion_jax.reference import cld_mixtures, metrics, mixtures
from diffusion_jax.sampling.cld import cld_sample

NFES = (10, 20, 50, 100, 200)
SAMPLERS = {"em": ("em", {}), "sscs": ("sscs", {}), "sscs_start": ("sscs", {"score_time": "start"}),
            "ode_heun": ("ode", {"solver": "heun"})}
STRIDINGS = ("linear", "quadratic")


def _steps(label, nfe):
    return max(1, nfe // 2) if label == "ode_heun" else nfe


def run(quick: bool = False, num_samples: int = 2000, seeds: int = 3):
    """The rows (problem, sampler, striding, nfe, sw2_x, sw2_u, their floors), printed as a table too."""
    process = CLD()
    problems = {"ring2d": mixtures.ring_mixture(), "mix16d": mixtures.random_mixture(seed=0, dim=16)}
    if quick:
        problems, seeds, num_samples = {"ring2d": problems["ring2d"]}, 1, 500
    nfes = (10, 20) if quick else NFES
    rows = []
    for pname, gm in problems.items():
        score = cld_mixtures.score_v_fn(gm, process)
        dim = gm.dim

        @jax.jit
        def floors(seed):
            a = cld_mixtures.sample(gm, process, jax.random.PRNGKey(10_000 + seed), num_samples, process.t_min)
            b = cld_mixtures.sample(gm, process, jax.random.PRNGKey(20_000 + seed), num_samples, process.t_min)
            ks = jax.random.PRNGKey(30_000 + seed)
            return (metrics.sliced_wasserstein(a[0], b[0], ks),
                    metrics.sliced_wasserstein(jnp.concatenate(a, 1), jnp.concatenate(b, 1), ks))

        fl = [tuple(float(q) for q in floors(s)) for s in range(seeds)]
        floor_x, floor_u = (sum(f[i] for f in fl) / seeds for i in (0, 1))
        for striding in STRIDINGS:
            for label, (name, opts) in SAMPLERS.items():
                for nfe in nfes:
                    steps = _steps(label, nfe)

                    @jax.jit
                    def errors(seed):
                        o = cld_sample(name, score, process, jax.random.PRNGKey(seed), (num_samples, dim),
                                       num_steps=steps, striding=striding, **opts)
                        a = cld_mixtures.sample(gm, process, jax.random.PRNGKey(10_000 + seed), num_samples,
                                                process.t_min)
                        ks = jax.random.PRNGKey(30_000 + seed)
                        return (metrics.sliced_wasserstein(o.x, a[0], ks),
                                metrics.sliced_wasserstein(jnp.concatenate([o.x, o.v], 1), jnp.concatenate(a, 1), ks),
                                o.nfe)

                    errs = [errors(s) for s in range(seeds)]
                    sx = [float(e[0]) for e in errs]
                    su = [float(e[1]) for e in errs]
                    rows.append({"problem": pname, "sampler": label, "striding": striding, "target_nfe": nfe,
                                 "nfe": int(errs[0][2]), "sw2_x": sum(sx) / seeds, "sw2_u": sum(su) / seeds,
                                 "sw2_x_seeds": sx, "sw2_u_seeds": su, "floor_x": floor_x, "floor_u": floor_u})
    print_table(rows, nfes)
    return {"rows": rows, "targets": targets(rows), "seeds": seeds, "num_samples": num_samples}


def targets(rows):
    """SSCS below EM at 20 NFE on the linear grid, in x and in phase space, on every problem and seed."""
    res = {}
    for pname in sorted({r["problem"] for r in rows}):
        get = lambda s: next(r for r in rows if r["problem"] == pname and r["sampler"] == s  # noqa: E731
                             and r["striding"] == "linear" and r["target_nfe"] == 20)
        em, ss = get("em"), get("sscs")
        ok = all(a < b for a, b in zip(ss["sw2_x_seeds"], em["sw2_x_seeds"])) and \
            all(a < b for a, b in zip(ss["sw2_u_seeds"], em["sw2_u_seeds"]))
        res[f"{pname}: sscs < em at 20 NFE (linear), x and (x, v), every seed"] = {
            "sscs_x": ss["sw2_x"], "em_x": em["sw2_x"], "sscs_u": ss["sw2_u"], "em_u": em["sw2_u"], "pass": ok}
    return res


def print_table(rows, nfes):
    for pname in sorted({r["problem"] for r in rows}):
        r0 = next(r for r in rows if r["problem"] == pname)
        print(f"\n## CLD / {pname}: sliced W2 to true draws of p(t_min), x | (x, v), mean over seeds "
              f"(floor {r0['floor_x']:.3f} | {r0['floor_u']:.3f})")
        print(f"{'sampler':<12}{'striding':<11}" + "".join(f"{'NFE ' + str(n):>16}" for n in nfes))
        for striding in STRIDINGS:
            for label in SAMPLERS:
                cells = [next(r for r in rows if r["problem"] == pname and r["sampler"] == label
                              and r["striding"] == striding and r["target_nfe"] == n) for n in nfes]
                print(f"{label:<12}{striding:<11}" + "".join(f"{c['sw2_x']:>8.3f} |{c['sw2_u']:6.3f}" for c in cells))
    for k, v in targets(rows).items():
        print(f"{'PASS' if v['pass'] else 'FAIL'}  {k}: "
              + ", ".join(f"{a}={b:.3f}" for a, b in v.items() if a != "pass"))


def main():
    ap = argparse.ArgumentParser(description="CLD samplers: SSCS vs Euler-Maruyama vs NFE with the exact score")
    ap.add_argument("--out", default="bench/results/samplers_cld.json")
    ap.add_argument("--num_samples", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    res = run(args.quick, args.num_samples, args.seeds)
    meta = {"jax": jax.__version__, "device": str(jax.devices()[0]), "platform": platform.platform(),
            "seconds": time.time() - t0, "load_average": os.getloadavg()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, **res}, f, indent=1)
    print(f"\nwrote {args.out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
