"""The optimizer of a training, and its state as named tensors plus JSON.

The split form is what a checkpoint stores (safetensors and state.json) and what one
training process sends the others when they resume together (`biounet.distributed`).
"""

from __future__ import annotations

import torch

from biounet.configs import TrainConfig


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum (the paper's 0.99), over `model`'s parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer's state as named tensors and a JSON-able rest.

    Returns
    -------
    tensors : dict of str to Tensor
        ``"{parameter index}.{key}"``: the moments (and, for Adam, the step counts).
    meta : dict
        ``param_groups`` and the non-tensor entries of each parameter's state.
    """
    tensors, scalars = {}, {}
    opt_state = optimizer.state_dict()
    for idx, entries in opt_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def load_optimizer_parts(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Set `optimizer`'s state from what `optimizer_parts` returned."""
    opt_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[key] = value
    for idx, entries in meta["scalars"].items():
        opt_state["state"].setdefault(int(idx), {}).update(entries)
    optimizer.load_state_dict(opt_state)
