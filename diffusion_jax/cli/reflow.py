"""`--mode=reflow`: 2-rectified flow (Liu, Gong, Liu 2023) from a trained flow run.

    python -m diffusion_jax --config=configs/flow_digits.py --workdir=runs/flow_digits   # 1-RF
    python -m diffusion_jax --config=configs/reflow_digits.py --workdir=runs/reflow_digits \\
        --config.reflow.teacher=runs/flow_digits                                          # 2-RF

1. pairs: reflow.num_pairs noises z ~ N(0, I) and the teacher's ODE solutions x = ODE(z)
   (`sampling.reflow.draw_pairs`: reflow.sampler, reflow.num_steps; the teacher's EMA weights),
   drawn once and kept in workdir/reflow/pairs.npz (a resumed run reuses them);
2. training: the student starts from the teacher's EMA weights and minimises the reflow loss
   E ||v(t x_z + (1 - t) x, t) - (z - x)||^2 on the pairs (`objectives.reflow_loss`; objective
   'reflow'), with the config's optimiser, schedule, checkpoints and report, as --mode=train;
3. comparison on reflow.num_eval fresh noises (workdir/reflow/reflow.json, grid.png): the
   straightness S of teacher and student (`sampling.reflow.straightness`, reflow.straightness_steps
   Euler steps; 0 iff every path is straight), and for k in reflow.eval_steps Euler steps the
   classifier-feature distance of the samples to the test split and their mean squared distance to
   the teacher's ODE solution from the same noise.

The student's network, process and data must be the teacher's (checked: the first field that differs
is named). Resuming is exact like --mode=train (the pairs' order is part of the checkpoint).
"""
from __future__ import annotations

import json
import os
import time

from diffusion_jax import config as cv
from diffusion_jax.cli.experiment import CLIError, saved_config, say

__all__ = ["PairsLoader", "run_reflow"]

_MUST_MATCH = ("model", "process", "data.name", "data.image_size")


class PairsLoader:
    """Batches {'x': data ends, 'noise': their noises} of fixed pairs, reshuffled each epoch from
    `seed` (no example repeats within an epoch; the tail that does not fill a batch waits for the
    next epoch's order), with get_state / set_state (JSON) for exact resumption."""

    def __init__(self, x, noise, *, batch_size: int, seed: int = 0):
        import numpy as np
        self.x, self.noise = np.asarray(x, np.float32), np.asarray(noise, np.float32)
        if self.x.shape != self.noise.shape:
            raise ValueError(f"pairs: x {self.x.shape} and noise {self.noise.shape} differ")
        if int(batch_size) > len(self.x):
            raise CLIError(f"config.data.batch_size={batch_size} exceeds reflow.num_pairs="
                           f"{len(self.x)}")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.epoch, self.pos = 0, 0

    def _order(self):
        import numpy as np
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.batch_size > len(self.x):
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._order()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return {"x": self.x[idx], "noise": self.noise[idx]}

    def get_state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def _get(c, dotted):
    for k in dotted.split("."):
        c = c[k]
    return c


def _check_student(config, teacher) -> None:
    """ConfigError naming the first field where the student's network / process / data differ."""
    def flat(d, prefix):
        if hasattr(d, "items"):
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}.{k}"))
            return out
        return {prefix: d}
    for part in _MUST_MATCH:
        a, b = flat(_get(config, part), f"config.{part}"), flat(_get(teacher, part), f"config.{part}")
        for k in sorted(set(a) | set(b)):
            if k.endswith("init_from"):
                continue
            va, vb = a.get(k), b.get(k)
            if (tuple(va) if isinstance(va, (list, tuple)) else va) != \
                    (tuple(vb) if isinstance(vb, (list, tuple)) else vb):
                raise cv.ConfigError(f"{k}={va!r}, but the teacher (config.reflow.teacher) has {vb!r}: "
                                     f"the student must be the teacher's network on its data")
    if config.model.num_classes is not None:
        raise cv.ConfigError("--mode=reflow: class-conditional flows are not supported "
                             "(config.model.num_classes must be None)")


def _teacher(config, workdir):
    from diffusion_jax.cli.pretrained import load_run
    from diffusion_jax.models import sampling_params
    spec = config.reflow.teacher
    if not spec:
        raise cv.ConfigError("config.reflow.teacher: the workdir of the trained flow to rectify "
                             "(e.g. --config.reflow.teacher=runs/flow_digits)")
    tdir = os.path.abspath(os.path.expanduser(spec))
    if tdir == workdir:
        raise cv.ConfigError(f"config.reflow.teacher={spec!r} is this run's own workdir; the student "
                             f"trains in a new one")
    tconf = saved_config(tdir)
    if tconf.objective.name not in ("flow", "reflow") or tconf.process.name != "flow":
        raise cv.ConfigError(f"config.reflow.teacher={spec!r} is a {tconf.process.name!r} process "
                             f"trained with objective {tconf.objective.name!r}; reflow needs a flow "
                             f"(process 'flow', objective 'flow' or 'reflow')")
    _check_student(config, tconf)
    exp, step, state = load_run(tconf, tdir)
    return exp, step, sampling_params(exp, state), tdir


def _draw_pairs(config, exp, params, path, log):
    """workdir/reflow/pairs.npz: (x, noise) of reflow.num_pairs teacher ODE solves (cached)."""
    import jax
    import numpy as np
    from diffusion_jax.cli.experiment import make_eps_fn
    from diffusion_jax.sampling.reflow import draw_pairs
    rc = config.reflow
    n = int(rc.num_pairs)
    if os.path.exists(path):
        with np.load(path) as f:
            if len(f["x"]) == n and tuple(f["x"].shape[1:]) == tuple(exp.image_shape):
                log(f"reflow: reusing {n} pairs from {path}")
                return f["x"], f["noise"]
        log(f"reflow: {path} does not hold {n} pairs of {exp.image_shape}; drawing them again")
    eps_fn = make_eps_fn(exp)
    bs = min(int(config.sample.batch_size), n)

    def draw(params, key):            # `sampling.sample` compiles once (eps_fn static)
        return draw_pairs(eps_fn, exp.process, key, (bs, *exp.image_shape), sampler=rc.sampler,
                          num_steps=int(rc.num_steps), cond={"params": params, "model_cond": None})

    t0 = time.perf_counter()
    xs, zs = [], []
    key = jax.random.PRNGKey(int(config.train.seed) + 7)
    for i in range(0, n, bs):
        x, z = draw(params, jax.random.fold_in(key, i))
        xs.append(np.asarray(x, np.float32))
        zs.append(np.asarray(z, np.float32))
    x, z = np.concatenate(xs)[:n], np.concatenate(zs)[:n]
    if not (np.isfinite(x).all() and np.isfinite(z).all()):
        raise CLIError("reflow: the teacher's ODE gave non-finite samples; check the teacher run")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=x, noise=z)
    os.replace(tmp, path)
    log(f"reflow: drew {n} pairs with {rc.sampler} x {rc.num_steps} in "
        f"{time.perf_counter() - t0:.0f}s -> {path}")
    return x, z


def compare_flows(config, flows: dict, process, test_x, *, classifier=None, log=say) -> dict:
    """For each {name: (eps_fn, params)}: straightness S and, per k in reflow.eval_steps, the
    k-step Euler samples' classifier-feature distance to `test_x` and their MSE to the FIRST
    flow's ODE solution (reflow.sampler x reflow.num_steps) from the same noises."""
    import jax
    import numpy as np
    from diffusion_jax.evaluation import frechet_distance
    from diffusion_jax.sampling import sample
    from diffusion_jax.sampling.reflow import straightness
    rc = config.reflow
    n = int(rc.num_eval)
    shape = tuple(np.shape(test_x)[1:])
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(int(config.sample.seed) + 11), (n, *shape)),
                   np.float32)
    test_feats = None if classifier is None else classifier.features(test_x)
    out, ref, grids = {}, None, {}
    for name, (eps_fn, params) in flows.items():
        cond = {"params": params, "model_cond": None}

        def run(params, z, sampler, steps, eps_fn=eps_fn):      # `sample` jits itself
            return sample(sampler, eps_fn, process, jax.random.PRNGKey(0), z.shape, num_steps=steps,
                          cond={"params": params, "model_cond": None}, x_init=z,
                          denoise_final=False).x

        s = jax.jit(lambda p, z: straightness(eps_fn, process, z, cond={"params": p, "model_cond": None},
                                              num_steps=int(rc.straightness_steps)).value)(params, z)
        row = {"straightness": float(np.mean(np.asarray(s))), "few_step": {}}
        ode = np.asarray(run(params, z, rc.sampler, int(rc.num_steps)))
        if ref is None:
            ref = ode
        grids[f"{name}: ODE ({rc.sampler} x {rc.num_steps})"] = ode
        for k in tuple(rc.eval_steps):
            x = np.asarray(run(params, z, "euler", int(k)))
            entry = {"mse_to_teacher_ode": float(np.mean((x - ref) ** 2))}
            if test_feats is not None:
                entry["feature_distance"] = frechet_distance(classifier.features(np.clip(x, -1, 1)),
                                                             test_feats)
            row["few_step"][int(k)] = entry
            grids[f"{name}: Euler x {k}"] = x
        if test_feats is not None:
            row["feature_distance_ode"] = frechet_distance(classifier.features(np.clip(ode, -1, 1)),
                                                           test_feats)
        out[name] = row
        log(f"reflow: {name}: S = {row['straightness']:.4g}; " + "; ".join(
            f"{k} Euler step(s): MSE to the teacher's ODE {e['mse_to_teacher_ode']:.4g}"
            + (f", FD {e['feature_distance']:.4g}" if "feature_distance" in e else "")
            for k, e in row["few_step"].items()))
    return {"flows": out, "grids": grids}


def run_reflow(config, workdir: str, *, progress: bool = True) -> dict:
    """Pairs from the teacher, training of the student on them, the teacher / student comparison."""
    import numpy as np
    from diffusion_jax.cli.autoencoder import load_arrays
    from diffusion_jax.cli.experiment import make_eps_fn, restore_checkpoint
    from diffusion_jax.cli.train import run_train
    from diffusion_jax.models import sampling_params
    from diffusion_jax.reports import image_grid
    if config.objective.name != "reflow":
        raise cv.ConfigError(f"--mode=reflow trains with config.objective.name='reflow', got "
                             f"{config.objective.name!r} (configs/reflow_digits.py sets it)")
    t_exp, t_step, t_params, tdir = _teacher(config, workdir)
    say(f"reflow: teacher {tdir} (step {t_step})")
    out_dir = os.path.join(workdir, "reflow")
    x, z = _draw_pairs(config, t_exp, t_params, os.path.join(out_dir, "pairs.npz"), say)
    loader = PairsLoader(x, z, batch_size=int(config.data.batch_size), seed=int(config.train.seed))
    import jax
    host_params = jax.tree_util.tree_map(np.asarray, jax.device_get(t_params))
    result = run_train(config, workdir, progress=progress, loader=loader, init_params=host_params)
    result["mode"] = "reflow"
    if result.get("preempted"):
        return result

    from diffusion_jax.cli.experiment import build_experiment
    s_exp = build_experiment(config, t_exp.image_shape)
    s_step, s_state = restore_checkpoint(s_exp, workdir, None)
    classifier, test = None, load_arrays(config, config.eval.split)
    train = load_arrays(config, "train")
    if config.reflow.get("num_eval") and "label" in train and config.report.classifier_steps:
        from diffusion_jax.evaluation import train_feature_classifier
        say(f"reflow: training the feature classifier ({config.report.classifier_steps} steps)")
        classifier = train_feature_classifier(train["x"], train["label"],
                                              steps=int(config.report.classifier_steps),
                                              num_classes=int(np.max(train["label"])) + 1, seed=0)
    cmp = compare_flows(config, {"teacher (1-RF)": (make_eps_fn(t_exp), t_params),
                                 "student (2-RF)": (make_eps_fn(s_exp), sampling_params(s_exp, s_state))},
                        s_exp.process, test["x"], classifier=classifier)
    grids = cmp.pop("grids")
    k = min(8, int(config.reflow.num_eval))
    png = image_grid(np.concatenate([g[:k] for g in grids.values()]), os.path.join(out_dir, "grid.png"),
                     ncol=k)
    summary = {"teacher": tdir, "teacher_step": t_step, "student_step": s_step,
               "num_pairs": int(config.reflow.num_pairs), "pair_sampler": config.reflow.sampler,
               "pair_steps": int(config.reflow.num_steps), "grid_rows": list(grids), **cmp}
    with open(os.path.join(out_dir, "reflow.json"), "w") as f:
        json.dump(summary, f, indent=2)
    say(f"reflow: wrote {os.path.join(out_dir, 'reflow.json')} and {png}")
    result["reflow"] = summary
    return result
