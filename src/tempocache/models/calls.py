"""What a transformer call carries: its timestep, its hidden states, its output sample."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn


def forward_parameters(module: nn.Module) -> list[str]:
    """The names of a module's forward arguments, `self` left out."""
    return list(inspect.signature(type(module).forward).parameters)[1:]


def call_argument(names: list[str], name: str, args: tuple, kwargs: dict):
    """Argument `name` of a call (`args`, `kwargs`) to a forward taking `names`, or None if the call gave none."""
    if name in kwargs:
        return kwargs[name]
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


def timestep_of(transformer: nn.Module, args: tuple, kwargs: dict) -> float | None:
    """The (first) timestep value a transformer was called with, or None if it takes none."""
    t = call_argument(forward_parameters(transformer), "timestep", args, kwargs)
    if t is None:
        return None
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def hidden_states_of(transformer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def conditioning_key(transformer: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What tells apart the CFG branches of calls a loop does not name: the tensor arguments other than the sample and
    the timestep (which both branches share), as their names, shapes and two sums."""
    names = forward_parameters(transformer)
    given = {**dict(zip(names, args)), **kwargs}
    tensors = [(n, v) for n, v in given.items() if isinstance(v, torch.Tensor) and n not in ("hidden_states", "timestep")]
    if not tensors:
        return ()
    sums = torch.stack([s for _, v in tensors for s in (v.float().sum(), v.float().abs().sum())]).tolist()
    return (*((n, tuple(v.shape)) for n, v in tensors), *sums)


def output_tensor(output) -> torch.Tensor:
    """A transformer call's sample: the first element of a tuple (return_dict=False), else `.sample`."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_output_tensor(output, sample: torch.Tensor):
    """`output` with its sample replaced, in the same form (tuple or output dataclass)."""
    return (sample, *output[1:]) if isinstance(output, tuple) else dataclasses.replace(output, sample=sample)
