"""Sampler benchmark on closed-form mixtures: accuracy vs NFE, convergence order, and loop overhead.

    python bench/samplers.py [--out bench/results/samplers.json] [--quick] [--processes vp,flow]
        [--no_optimized]

For every sampler (and every spacing, for the deterministic ones) at 5, 10, 20 and 50 NFE, driven by
the EXACT epsilon of a 2-D ring mixture and a 16-D random mixture under the VP process:
  * rmse_ode: RMS distance to a high-accuracy probability-flow ODE solution from the same x_T
    (deterministic samplers only),
  * sw2: sliced Wasserstein-2 distance to true samples of p(x_{t_min}) (all samplers),
the same on the linear flow-matching path (`processes.Flow()`, x_t = (1 - t) x0 + t eps, data at t = 0),
next to VP (process 'flow': every sampler through the same interface, the flow velocity being the
probability-flow drift of the exact eps), with a side-by-side table of the error to the exact solution
vs NFE per sampler on both paths (each sampler's default spacing),
and, for the multistep solvers and DDIM, the same on a grid fitted to each (sampler, NFE, problem) by
`optimize_time_grid` (spacing 'optimized'): fitted on separate calibration draws of x_T, scored on the
held-out x_T of every other row,
then the observed order of each deterministic solver (slope of log error vs log NFE between the two
largest NFEs; the order target is judged on a 16-D Gaussian, whose exact flow map is the reference), and the time per NFE of the jitted `lax.scan` sampler next to the same sampler run as a
plain Python loop calling a jitted one-step function.
Then the CLD section (`bench/samplers_cld.py`, skipped with --no_cld): SSCS vs Euler-Maruyama (and the
phase-space PF-ODE) vs NFE with the exact score of critically-damped Langevin diffusion, in the JSON
under 'cld'.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from diffusion_jax import processes
from diffusion_jax.reference import metrics, mixtures
from diffusion_jax.sampling import (SAMPLERS, SPACINGS, optimize_time_grid, sample, steps_for_nfe,
                                    time_grid)
from diffusion_jax.sampling.ode import reference_solution

NFES = (5, 10, 20, 50)
OPTIMIZED = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc")  # samplers also run on a fitted grid
SAMPLER_OPTIONS = {}
THEORETICAL_ORDER = {"euler": 1, "ddim": 1, "midpoint": 2, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3}
PROCESSES = {"vp": "vp", "flow": "flow"}   # row label -> processes.get_process name


def accuracy(problems, process, num_samples, nfes, seed=0, fit_iters=200, label="vp", optimized=True):
    rows = []
    key = jax.random.PRNGKey(seed)
    for pi, (pname, gm) in enumerate(problems.items()):
        eps_fn = mixtures.eps_fn(gm, process)
        kp, kt, ks, kc = jax.random.split(jax.random.fold_in(key, pi), 4)
        x_T = process.prior_sample(kp, (num_samples, gm.dim))
        x_cal = process.prior_sample(kc, (num_samples, gm.dim))  # calibration draws for fitted grids
        truth = mixtures.sample(mixtures.marginal(gm, process, process.t_min), kt, num_samples)[0]

        def flow(x):
            if gm.num_components == 1:  # exact closed-form flow map
                return mixtures.gaussian_flow(gm, process, x, process.t_max, process.t_min)
            return reference_solution(eps_fn, process, x, process.t_max, process.t_min)

        ref, ref_cal = flow(x_T), flow(x_cal)
        floor = float(metrics.sliced_wasserstein(
            mixtures.sample(mixtures.marginal(gm, process, process.t_min), jax.random.fold_in(kt, 1), num_samples)[0],
            truth, ks))
        for name, spec in SAMPLERS.items():
            if name == "adaptive":
                continue
            spacings = SPACINGS if spec.deterministic_ode else (spec.default_spacing,)
            spacings += ("optimized",) if name in OPTIMIZED and optimized else ()
            for spacing in spacings:
                for nfe in nfes:
                    steps = steps_for_nfe(name, nfe)
                    grid = {}
                    if spacing == "optimized":
                        fit = optimize_time_grid(name, eps_fn, process, x_cal, x_ref=ref_cal, num_steps=steps,
                                                 iters=fit_iters, **SAMPLER_OPTIONS.get(name, {}))
                        grid = {"ts": fit.ts}
                    else:
                        grid = {"num_steps": steps, "spacing": spacing}
                    out = sample(name, eps_fn, process, kp, x_T.shape, x_init=x_T, **grid,
                                 **SAMPLER_OPTIONS.get(name, {}))
                    x = out.x
                    row = {"process": label, "problem": pname, "sampler": name, "spacing": spacing, "target_nfe": nfe,
                           "nfe": int(out.nfe), "sw2": float(metrics.sliced_wasserstein(x, truth, ks)),
                           "sw2_floor": floor}
                    if spacing == "optimized":
                        row["grid"] = [float(t) for t in grid["ts"]]
                    if spec.deterministic_ode:
                        row["rmse_ode"] = float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, -1))))
                    rows.append(row)
    return rows


def observed_orders(rows, nfes):
    """Slope of -log(rmse_ode) vs log(NFE) between the two largest NFEs, per (problem, sampler, spacing)."""
    out = []
    lo, hi = nfes[-2], nfes[-1]
    for r_hi in rows:
        if "rmse_ode" not in r_hi or r_hi["target_nfe"] != hi:
            continue
        keys = ("process", "problem", "sampler", "spacing")
        r_lo = next(r for r in rows if r["target_nfe"] == lo and all(r[k] == r_hi[k] for k in keys))
        order = math.log(r_lo["rmse_ode"] / r_hi["rmse_ode"]) / math.log(r_hi["nfe"] / r_lo["nfe"])
        out.append({k: r_hi[k] for k in keys} | {"order": order, "nfe_range": [r_lo["nfe"], r_hi["nfe"]]})
    return out


def _time(fn, repeats=5):
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def loop_overhead(process, num_steps=100, batch=64):
    """Time per NFE: the jitted scan sampler vs a Python loop over a jitted one-step call (same math:
    a one-step grid ts[i:i+2] of the same sampler), for the single-step samplers."""
    gm = mixtures.ring_mixture()
    eps_fn = mixtures.eps_fn(gm, process)
    x_T = process.prior_sample(jax.random.PRNGKey(0), (batch, 2))
    key = jax.random.PRNGKey(1)
    rows = []
    for name in ("ddim", "euler", "heun", "ancestral", "euler_maruyama"):
        fn = SAMPLERS[name].fn
        ts = time_grid(process, num_steps, SAMPLERS[name].default_spacing)
        whole = jax.jit(lambda x, ts, key: fn(eps_fn, process, x, ts, key=key).x)
        step = jax.jit(lambda x, t2, key: fn(eps_fn, process, x, t2, key=key).x)
        nfe = int(fn(eps_fn, process, x_T, ts, key=key).nfe)

        def python_loop():
            x = x_T
            for i in range(num_steps):
                x = step(x, ts[i:i + 2], jax.random.fold_in(key, i))
            return x.block_until_ready()

        t_scan = _time(lambda: whole(x_T, ts, key).block_until_ready())
        t_loop = _time(python_loop)
        rows.append({"sampler": name, "nfe": nfe, "us_per_nfe_scan": 1e6 * t_scan / nfe,
                     "us_per_nfe_python_loop": 1e6 * t_loop / nfe, "speedup": t_loop / t_scan})
    return rows


def targets(rows, orders, overhead):
    """The benchmark's targets, evaluated on the measured rows."""
    res = {}
    rows = [r for r in rows if r["process"] == "vp"]
    orders = [o for o in orders if o["process"] == "vp"]
    for pname in sorted({r["problem"] for r in rows} - {"gauss16d"}):
        at10 = [r for r in rows if r["problem"] == pname and r["target_nfe"] == 10 and "rmse_ode" in r]
        ddim = next(r for r in at10 if r["sampler"] == "ddim" and r["spacing"] == "uniform")
        best = min(at10, key=lambda r: r["rmse_ode"])
        fixed = min((r for r in at10 if r["spacing"] != "optimized"), key=lambda r: r["rmse_ode"])
        res[f"{pname}: best@10 vs ddim-uniform@10"] = {
            "best": f"{best['sampler']}/{best['spacing']}", "ratio": ddim["rmse_ode"] / best["rmse_ode"],
            "best_fixed_spacing": f"{fixed['sampler']}/{fixed['spacing']}",
            "ratio_fixed_spacing": ddim["rmse_ode"] / fixed["rmse_ode"],
            "pass": ddim["rmse_ode"] / best["rmse_ode"] >= 3.0}
    for o in orders:
        if o["sampler"] in ("dpmpp_2m", "dpmpp_3m", "unipc") and o["spacing"] == "logsnr" and o["problem"] == "gauss16d":
            p = THEORETICAL_ORDER[o["sampler"]]
            res[f"{o['problem']}: order of {o['sampler']}"] = {"measured": o["order"], "theory": p,
                                                              "pass": o["order"] >= p - 0.5}
    res["scan vs python loop (min speedup)"] = {"speedup": min(r["speedup"] for r in overhead),
                                               "pass": min(r["speedup"] for r in overhead) >= 5.0}
    return res


def flow_vs_vp(rows, nfes):
    """rmse_ode of each deterministic sampler (its default spacing) on the linear flow path and on VP."""
    out = []
    procs = [p for p in PROCESSES if any(r["process"] == p for r in rows)]
    for pname in sorted({r["problem"] for r in rows}):
        for name, spec in SAMPLERS.items():
            if not spec.deterministic_ode or name == "adaptive":
                continue
            for n in nfes:
                cell = {"problem": pname, "sampler": name, "spacing": spec.default_spacing, "target_nfe": n}
                for p in procs:
                    r = next((r for r in rows if r["process"] == p and r["problem"] == pname and r["sampler"] == name
                              and r["spacing"] == spec.default_spacing and r["target_nfe"] == n), None)
                    cell[f"rmse_{p}"] = None if r is None else r["rmse_ode"]
                out.append(cell)
    return out


def print_flow_vs_vp(table, nfes):
    procs = [k[len("rmse_"):] for k in table[0] if k.startswith("rmse_")] if table else []
    print(f"\n## error to the exact ODE solution vs NFE, each sampler's default spacing: "
          + " | ".join(procs))
    for pname in sorted({c["problem"] for c in table}):
        print(f"\n### {pname}")
        print(f"{'sampler':<12}{'spacing':<10}" + "".join(f"{'NFE~' + str(n):>24}" for n in nfes))
        for name in dict.fromkeys(c["sampler"] for c in table if c["problem"] == pname):
            cells = [c for c in table if c["problem"] == pname and c["sampler"] == name]
            txt = [" | ".join("-" if c[f"rmse_{p}"] is None else f"{c[f'rmse_{p}']:.2e}" for p in procs)
                   for c in cells]
            print(f"{name:<12}{cells[0]['spacing']:<10}" + "".join(f"{t:>24}" for t in txt))


def print_tables(rows, orders, overhead, checks, nfes):
    for proc, pname in sorted({(r["process"], r["problem"]) for r in rows}):
        floor = next(r["sw2_floor"] for r in rows if r["problem"] == pname and r["process"] == proc)
        print(f"\n## {proc} / {pname}: rmse to reference ODE solution | sliced W2 to true samples (floor {floor:.3f})")
        print(f"{'sampler':<15}{'spacing':<10}" + "".join(f"{'NFE~' + str(n):>20}" for n in nfes))
        keys = []
        for r in rows:
            if r["process"] == proc and r["problem"] == pname and (r["sampler"], r["spacing"]) not in keys:
                keys.append((r["sampler"], r["spacing"]))
        for s, sp in keys:
            cells = []
            for n in nfes:
                r = next(r for r in rows if r["process"] == proc and r["problem"] == pname and r["sampler"] == s
                         and r["spacing"] == sp and r["target_nfe"] == n)
                cells.append((f"{r['rmse_ode']:.2e} | " if "rmse_ode" in r else "       - | ") + f"{r['sw2']:.3f}")
            print(f"{s:<15}{sp:<10}" + "".join(f"{c:>20}" for c in cells))
    print("\n## observed order (NFE range) of deterministic solvers, logsnr spacing")
    for o in orders:
        if o["spacing"] == "logsnr":
            print(f"{o['process']:<6}{o['problem']:<10}{o['sampler']:<12} {o['order']:5.2f}  {o['nfe_range']}")
    print("\n## time per NFE (us): jitted scan vs Python loop of jitted steps")
    for r in overhead:
        print(f"{r['sampler']:<16}{r['us_per_nfe_scan']:10.1f}{r['us_per_nfe_python_loop']:12.1f}   x{r['speedup']:.1f}")
    print("\n## targets")
    for k, v in checks.items():
        print(f"{'PASS' if v['pass'] else 'FAIL'}  {k}: " + ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items() if a != "pass"))


def main():
    ap = argparse.ArgumentParser(description="sampler accuracy / order / overhead benchmark")
    ap.add_argument("--out", default="bench/results/samplers.json")
    ap.add_argument("--num_samples", type=int, default=2000)
    ap.add_argument("--fit_iters", type=int, default=200, help="Adam steps of each fitted grid")
    ap.add_argument("--quick", action="store_true", help="fewer samples and NFEs (smoke run)")
    ap.add_argument("--no_cld", action="store_true", help="skip the CLD section (bench/samplers_cld.py)")
    ap.add_argument("--processes", default="vp,flow", help=f"comma-separated, of {sorted(PROCESSES)}")
    ap.add_argument("--no_optimized", action="store_true", help="skip the fitted-grid rows")
    args = ap.parse_args()
    labels = [p.strip() for p in args.processes.split(",") if p.strip()]
    if not labels or any(p not in PROCESSES for p in labels):
        ap.error(f"--processes: expected a comma-separated subset of {sorted(PROCESSES)}, got {args.processes!r}")
    nfes = (5, 10) if args.quick else NFES
    n = 256 if args.quick else args.num_samples
    problems = {"ring2d": mixtures.ring_mixture(), "mix16d": mixtures.random_mixture(seed=0, dim=16),
                "gauss16d": mixtures.random_mixture(seed=1, dim=16, num_components=1)}
    t0 = time.time()
    rows = []
    for label in labels:
        rows += accuracy(problems, processes.get_process(PROCESSES[label]), n, nfes, label=label,
                         fit_iters=20 if args.quick else args.fit_iters, optimized=not args.no_optimized)
    orders = observed_orders(rows, nfes)
    overhead = loop_overhead(processes.get_process("vp"), num_steps=20 if args.quick else 100)
    checks = targets(rows, orders, overhead) if "vp" in labels else {}
    comparison = flow_vs_vp(rows, nfes)
    print_tables(rows, orders, overhead, checks, nfes)
    print_flow_vs_vp(comparison, nfes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"jax": jax.__version__, "device": str(jax.devices()[0]), "platform": platform.platform(),
            "num_samples": n, "seconds": time.time() - t0, "load_average": os.getloadavg()}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "accuracy": rows, "orders": orders, "overhead": overhead, "targets": checks,
                   "flow_vs_vp": comparison}, f, indent=1)
    if not args.no_cld:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import samplers_cld  # pylint: disable=import-outside-toplevel  (bench/samplers_cld.py)
        cld = samplers_cld.run(quick=args.quick)
        with open(args.out) as f:
            results = json.load(f)
        results["cld"] = cld
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nwrote {args.out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
