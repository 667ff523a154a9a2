"""Alternating updates of parameter groups (GANs, LSGM's VAE / prior) and per-group optimisers.

    loss_fn = PhasedLoss((Phase("disc", ("discriminator",), d_loss),
                          Phase("gen", ("generator",), g_loss)), report="gen")
    tx, schedule = make_group_optimizer({"generator": OptimizerConfig(1.6e-4, b1=0.5, b2=0.9),
                                         "discriminator": OptimizerConfig(1.25e-4, b1=0.5, b2=0.9)})
    step = make_train_step(loss_fn, tx, schedule)

One train step runs the phases in order, as a PyTorch loop of `opt_d.step(); opt_g.step()` does:

    for i, phase in enumerate(phases):
        g = d phase.loss_fn(params, batch, fold_in(rng, i)[, model_state]) / d params[phase.groups]
        params[group] <- params[group] + tx_group.update(g[group])       for group in phase.groups

so phase i sees the parameters that phases < i updated in this step (the generator's loss is
computed against the updated discriminator). The gradient is taken only with respect to the
phase's groups (no wasted backward pass through the others). A stateful loss gets the current
`model_state` in every phase and returns the new one in aux['model_state'].

`make_group_optimizer` gives each top-level parameter group its own optax chain (clip + AdamW of its
`OptimizerConfig`); groups it does not name are frozen (zero update, no optimiser state). Used with
a plain loss it updates every named group from the same gradient, like `optax.multi_transform`.
The optimiser state is {group: state}; it is sharded like the parameters (the logical names of the
boxed parameters carry over), checkpointed like any other.

Calling a PhasedLoss, `loss_fn(params, batch, rng[, model_state])`, evaluates every phase at the
same parameters without updates and returns (the `report` phase's loss, {'<phase>/<key>': ...}):
evaluation code that calls a loss works unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

__all__ = ["Phase", "PhasedLoss", "GroupOptimizer", "make_group_optimizer"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One update of a train step: `loss_fn(params, batch, rng[, model_state]) -> (loss, aux)`
    differentiated w.r.t. params[g] for g in `groups` only; metrics prefixed '<name>/'."""
    name: str
    groups: tuple
    loss_fn: Callable

    def __post_init__(self):
        groups = (self.groups,) if isinstance(self.groups, str) else tuple(self.groups)
        if not groups:
            raise ValueError(f"phase {self.name!r} updates no parameter group")
        if not self.name or "/" in self.name:
            raise ValueError(f"phase name {self.name!r} must be non-empty and contain no '/'")
        object.__setattr__(self, "groups", groups)


class PhasedLoss:
    """A sequence of `Phase`s run in order by the train step (see the module docstring)."""

    def __init__(self, phases: Sequence[Phase], *, report: str | None = None):
        self.phases = tuple(phases)
        if not self.phases:
            raise ValueError("PhasedLoss needs at least one phase")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be distinct, got {names}")
        self.report = names[-1] if report is None else report
        if self.report not in names:
            raise ValueError(f"report={report!r} is not a phase ({names})")

    @property
    def groups(self) -> tuple:
        out = []
        for p in self.phases:
            out += [g for g in p.groups if g not in out]
        return tuple(out)

    def check_params(self, params) -> None:
        if not isinstance(params, Mapping):
            raise ValueError(f"a PhasedLoss updates top-level parameter groups, but the params are a "
                             f"{type(params).__name__}, not a dict")
        for p in self.phases:
            missing = [g for g in p.groups if g not in params]
            if missing:
                raise ValueError(f"phase {p.name!r} updates parameter groups {missing}, which the "
                                 f"params do not have (top-level groups: {sorted(params)})")

    def __call__(self, params, batch, rng, *model_state):
        """Every phase's loss at `params` (no updates): (report loss, {'<phase>/<k>': ...})."""
        self.check_params(params)
        out, loss = {}, None
        for i, p in enumerate(self.phases):
            l, aux = p.loss_fn(params, batch, jax.random.fold_in(rng, i), *model_state)
            if model_state and isinstance(aux, Mapping) and "model_state" in aux:
                aux = dict(aux)
                new = aux.pop("model_state")
                if i == len(self.phases) - 1:
                    out["model_state"] = new
            out[f"{p.name}/loss"] = l
            if isinstance(aux, Mapping):
                out.update({f"{p.name}/{k}": v for k, v in aux.items()})
            if p.name == self.report:
                loss = l
        return loss, out


class GroupOptimizer(optax.GradientTransformation):
    """An optax transformation over a dict of parameter groups: `txs[group]` per named group,
    the others frozen. `init(params) -> {group: state}`; `update` applies every group at once."""

    def __new__(cls, txs: Mapping[str, optax.GradientTransformation]):
        txs = dict(txs)

        def init(params):
            _check_groups(txs, params)
            return {g: tx.init(params[g]) for g, tx in txs.items()}

        def update(grads, state, params=None):
            _check_groups(txs, grads)
            updates = {k: jax.tree_util.tree_map(lambda x: x * 0, v) for k, v in grads.items()}
            new_state = {}
            for g, tx in txs.items():
                updates[g], new_state[g] = tx.update(grads[g], state[g],
                                                     None if params is None else params[g])
            return updates, new_state

        self = super().__new__(cls, init, update)
        self.txs = txs
        return self

    def update_group(self, group: str, grads, state, params):
        """(updates, new state) of one group: `txs[group].update(grads, state[group], params)`."""
        return self.txs[group].update(grads, state[group], params)


def _check_groups(txs, params) -> None:
    if not isinstance(params, Mapping):
        raise ValueError(f"a per-group optimiser needs a dict of parameter groups, got "
                         f"{type(params).__name__}")
    missing = [g for g in txs if g not in params]
    if missing:
        raise ValueError(f"optimiser groups {missing} are not top-level parameter groups "
                         f"(have {sorted(params)})")


def make_group_optimizer(configs: Mapping[str, Any]) -> tuple[GroupOptimizer, optax.Schedule]:
    """(GroupOptimizer, schedule of the first group) from {group: OptimizerConfig or its dict}.
    Gradient accumulation is not supported per group (grad_accum_steps must be 1)."""
    from diffusion_jax.training.state import OptimizerConfig, make_optimizer
    if not configs:
        raise ValueError("make_group_optimizer needs at least one parameter group")
    txs, schedules = {}, []
    for g, cfg in configs.items():
        if not isinstance(cfg, OptimizerConfig):
            cfg = OptimizerConfig.from_dict(cfg)
        if cfg.grad_accum_steps != 1:
            raise ValueError(f"optimiser group {g!r}: grad_accum_steps={cfg.grad_accum_steps}; "
                             f"per-group optimisers do not accumulate gradients (use 1)")
        txs[g], schedule = make_optimizer(cfg)
        schedules.append(schedule)
    return GroupOptimizer(txs), schedules[0]
