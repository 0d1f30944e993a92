"""fp32 master weights for low-precision parameters, around any optimizer.

Why: a bf16 weight has 8 significant bits, so an update smaller than about 1/256 of the
weight rounds away. At RL learning rates (1e-6 on weights of ~0.02) one AdamW step applied
under 3% of the intended change when it updated bf16 weights directly. Keeping an fp32 copy
of each bf16/fp16 parameter and letting the optimizer update that copy keeps every update;
the model still computes in low precision from the rounded copy.

:class:`MasterWeightsOptimizer` is a real ``torch.optim.Optimizer`` over the model's own
parameters (so step hooks, schedulers and ``zero_grad`` behave as usual). It owns an inner
optimizer built over the fp32 masters; a step casts the parameters' gradients to fp32, runs
the inner step and writes the rounded result back with ``copy_`` into the parameters' own
memory. Parameters that alias memory another process reads (``shared_vllm``) therefore stay
views and the other process sees the update. fp32 parameters are passed to the inner
optimizer as they are.

Cost: 4 bytes per low-precision parameter for the master (on the parameter's device), plus
a transient fp32 gradient (4 bytes per parameter) during ``step``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)

InnerBuilder = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def needs_master(p: torch.Tensor) -> bool:
    """Whether ``p`` is a low-precision float whose updates would round away."""
    return p.dtype in LOW_PRECISION


def _fp32_copy(p: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 tensor on ``p``'s device holding ``p``'s values."""
    master = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    master.copy_(p.detach())
    return master


class MasterWeightsOptimizer(torch.optim.Optimizer):
    """Runs an inner optimizer on fp32 masters and writes rounded values into the parameters.

    ``param_groups`` hold the model's parameters; their hyper-parameters (``lr`` above all,
    which schedulers write) are copied into the inner optimizer's groups before every inner
    step, and after ``load_state_dict``. ``state_dict()`` is the inner optimizer's, indexed
    like the parameters, with each wrapped parameter's fp32 master under the key ``master``
    (the key :class:`~example_trainer.offload_adamw.CPUOffloadAdamW` uses too); a checkpoint
    without masters initialises them from the parameters.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 build_inner: InnerBuilder) -> None:
        groups = _as_groups(params)
        self._masters: dict[torch.Tensor, torch.Tensor] = {}
        inner_groups = [self._inner_group(g) for g in groups]
        self.inner = build_inner(inner_groups)
        if len(self.inner.param_groups) != len(groups):
            raise RuntimeError("the inner optimizer changed the parameter groups it was given")
        self._building = True
        super().__init__([{**ig, "params": g["params"]}
                          for g, ig in zip(groups, self.inner.param_groups)],
                         dict(self.inner.defaults))
        self._building = False

    # -- parameters -----------------------------------------------------------------------

    def _inner_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """``group`` with each low-precision parameter replaced by a new fp32 master."""
        inner_params = []
        for p in group["params"]:
            if needs_master(p):
                if p in self._masters:
                    raise ValueError("a parameter appears in more than one parameter group")
                self._masters[p] = _fp32_copy(p)
                inner_params.append(self._masters[p])
            else:
                inner_params.append(p)
        return {**group, "params": inner_params}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group here and its masters to the inner optimizer."""
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        group = _as_groups([param_group])[0]
        self.inner.add_param_group(self._inner_group(group))
        super().add_param_group({**self.inner.param_groups[-1], "params": group["params"]})

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, master) for every wrapped parameter, in parameter order."""
        return [(p, self._masters[p]) for g in self.param_groups for p in g["params"]
                if p in self._masters]

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of parameter ``p`` (``p`` itself when it is not low precision)."""
        return self._masters.get(p, p)

    def master_bytes(self) -> dict[str, int]:
        """Bytes of fp32 masters per device type (4 per wrapped parameter)."""
        out: dict[str, int] = {}
        for m in self._masters.values():
            out[m.device.type] = out.get(m.device.type, 0) + m.numel() * m.element_size()
        return out

    def _sync_hyperparameters(self) -> None:
        """Copy every group setting but ``params`` (lr, betas, ...) into the inner groups."""
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            for key, value in group.items():
                if key != "params":
                    inner[key] = value

    # -- step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """fp32 grads to the masters, one inner step, rounded masters back into the params."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        stepped = []
        for p, master in self._pairs():
            if p.grad is None:
                master.grad = None
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MasterWeightsOptimizer does not support sparse gradients")
            master.grad = p.grad.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            stepped.append((p, master))
        try:
            self.inner.step()
        finally:
            for _, master in stepped:
                master.grad = None  # the fp32 grads are transient: 4 B/param only in a step
        for p, master in stepped:
            p.copy_(master)  # in place: views stay views, shared memory sees the update
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model parameters' grads (the masters' are only set inside ``step``)."""
        super().zero_grad(set_to_none=set_to_none)
        for master in self._masters.values():
            master.grad = None

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state with each wrapped parameter's fp32 master added."""
        self._sync_hyperparameters()
        inner = self.inner.state_dict()
        index = {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        state = {key: dict(value) for key, value in inner["state"].items()}
        for p, master in self._pairs():
            state.setdefault(index[p], {})["master"] = master
        groups = [{**saved, **{k: v for k, v in group.items() if k != "params"}}
                  for saved, group in zip(inner["param_groups"], self.param_groups)]
        return {**inner, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore inner state, masters and group settings.

        A parameter without a saved master (a checkpoint of an optimizer without masters)
        gets one from its current value; a saved master for an fp32 parameter is copied
        into the parameter, since the master is the unrounded truth.
        """
        saved_masters: dict[Any, torch.Tensor] = {}
        inner_state: dict[Any, dict[str, Any]] = {}
        for key, value in state_dict["state"].items():
            value = dict(value)
            if "master" in value:
                saved_masters[key] = value.pop("master")
            if value:
                inner_state[key] = value
        self.inner.load_state_dict({**state_dict, "state": inner_state})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        with torch.no_grad():
            for pid, p in zip(saved_ids, params):
                saved = saved_masters.get(pid)
                if p in self._masters:
                    self._masters[p].copy_(p if saved is None else saved)
                elif saved is not None:
                    p.copy_(saved)
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            group.update({k: v for k, v in inner.items() if k != "params"})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._masters)} fp32 masters, {self.inner!r})"


def _as_groups(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for group in items:
        ps = group["params"]
        groups.append({**group, "params": [ps] if isinstance(ps, torch.Tensor) else list(ps)})
    return groups
