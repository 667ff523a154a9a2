"""2-rectified flow (Liu, Gong, Liu 2023) on the embedded digits (issue 14): --mode=reflow.

    python -m diffusion_jax --config=configs/flow_digits.py --workdir=runs/flow_digits      # 1-RF
    python -m diffusion_jax --config=configs/reflow_digits.py --workdir=runs/reflow_digits \\
        --mode=reflow --config.reflow.teacher=runs/flow_digits                            # 2-RF

The network, process (the linear path) and data are configs/flow_digits.py's (the teacher's; checked
at start). The teacher's ODE (Heun, 16 steps = 31 evaluations, EMA weights) couples 2 048 noises with
its samples once (workdir/reflow/pairs.npz); the student starts from the teacher's EMA weights and
is fine-tuned on the pairs with the reflow loss (objective 'reflow': uniform t, target z - x) for
1 000 steps at a constant 2e-4 (the paper fine-tunes 2-RF from 1-RF). Then both flows are compared on
256 fresh noises: straightness S (64 Euler steps) and, for 1, 2 and 4 Euler steps, the classifier-
feature distance to the test split and the MSE to the teacher's ODE solution from the same noise
(workdir/reflow/reflow.json, grid.png). The report samples with 2 Euler steps (+ the final x0 step).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "diffusion_jax_config_flow_digits", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "flow_digits.py"))
_flow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flow)


def get_config():
    config = _flow.get_config()
    config.objective.name = "reflow"
    kw = config.objective.kwargs
    for k in list(kw.keys()):
        if k not in ("time_sampling", "reduce", "logit_mean", "logit_std", "mode_scale"):
            del kw[k]
    kw.time_sampling = "uniform"

    rc = config.reflow
    rc.teacher = ""                    # --config.reflow.teacher=<the flow run's workdir>
    rc.num_pairs = 2048
    rc.sampler = "heun"
    rc.num_steps = 16
    rc.straightness_steps = 64
    rc.eval_steps = (1, 2, 4)
    rc.num_eval = 256

    optim = config.optim
    optim.learning_rate = 2e-4
    optim.warmup_steps = 0
    optim.schedule = "constant"
    config.ema.decays = (0.999,)
    config.ema.warmup = True

    train = config.train
    train.num_steps = 1000
    train.sample_every = 500
    train.checkpoint_every = 250

    sample = config.sample
    sample.sampler = "euler"
    sample.num_steps = 2
    config.report.probe = False
    return config
