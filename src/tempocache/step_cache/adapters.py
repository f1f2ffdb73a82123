"""Where a diffusers transformer keeps its blocks, and how its blocks pass their state along.

A block's *state* is what flows from one block to the next: `hidden_states` and, in
dual-stream models (MMDiT), `encoder_hidden_states`. Known families are a table; any
other transformer gets a generic search for its block lists, and a clear error when
there are none.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

State = tuple  # (hidden_states,) or (hidden_states, encoder_hidden_states); an entry may be None


@dataclass(frozen=True)
class Family:
    name: str
    block_lists: tuple[str, ...]  # attributes holding nn.ModuleLists of blocks, in execution order
    # Where each block's output puts (hidden_states, encoder_hidden_states); None for a block returning one tensor.
    output_order: dict[str, tuple[int, int] | None]


FAMILIES = {
    "WanTransformer3DModel": Family("wan", ("blocks",), {"WanTransformerBlock": None}),
    "FluxTransformer2DModel": Family(
        "flux", ("transformer_blocks", "single_transformer_blocks"),
        {"FluxTransformerBlock": (1, 0), "FluxSingleTransformerBlock": (1, 0)},
    ),
    "PixArtTransformer2DModel": Family("pixart", ("transformer_blocks",), {"BasicTransformerBlock": None}),
    "DiTTransformer2DModel": Family("dit", ("transformer_blocks",), {"BasicTransformerBlock": None}),
    "CogVideoXTransformer3DModel": Family("cogvideox", ("transformer_blocks",), {"CogVideoXBlock": (0, 1)}),
    "HunyuanVideoTransformer3DModel": Family(
        "hunyuan_video", ("transformer_blocks", "single_transformer_blocks"),
        {"HunyuanVideoTransformerBlock": (0, 1), "HunyuanVideoSingleTransformerBlock": (0, 1)},
    ),
    "LTXVideoTransformer3DModel": Family("ltx", ("transformer_blocks",), {"LTXVideoTransformerBlock": None}),
    "SD3Transformer2DModel": Family("sd3", ("transformer_blocks",), {"JointTransformerBlock": (1, 0)}),
    "SanaTransformer2DModel": Family("sana", ("transformer_blocks",), {"SanaTransformerBlock": None}),
    "QwenImageTransformer2DModel": Family("qwen_image", ("transformer_blocks",), {"QwenImageTransformerBlock": (1, 0)}),
}


class BlockCall:
    """Reads a block's state from its call arguments and writes a state back in its output layout."""

    def __init__(self, block: nn.Module, output_order: tuple[int, int] | None | str):
        self.names = list(inspect.signature(type(block).forward).parameters)[1:]
        self.output_order = output_order  # "infer" until the first call shows it (generic fallback)
        self.returns_encoder = output_order is not None
        self.temb_name = next((n for n in ("temb", "timestep", "emb") if n in self.names), None)

    def argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        index = self.names.index(name) if name in self.names else len(args)
        return args[index] if index < len(args) else None

    def state_in(self, args: tuple, kwargs: dict) -> State:
        hidden = self.argument("hidden_states", args, kwargs) if "hidden_states" in self.names or "hidden_states" in kwargs else args[0]
        if self.returns_encoder:
            return hidden, self.argument("encoder_hidden_states", args, kwargs)
        return (hidden,)

    def temb(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return self.argument(self.temb_name, args, kwargs) if self.temb_name else None

    def state_out(self, output, args: tuple, kwargs: dict) -> State:
        if self.output_order == "infer":
            self._infer_layout(output, args, kwargs)
        if self.output_order is None:
            return (output,)
        return output[self.output_order[0]], output[self.output_order[1]]

    def pack(self, state: State):
        if self.output_order is None:
            return state[0]
        packed = [None, None]
        packed[self.output_order[0]], packed[self.output_order[1]] = state
        return tuple(packed)

    def _infer_layout(self, output, args: tuple, kwargs: dict) -> None:
        if isinstance(output, torch.Tensor):
            self.output_order, self.returns_encoder = None, False
            return
        hidden = self.state_in(args, kwargs)[0]
        encoder = self.argument("encoder_hidden_states", args, kwargs)
        shapes = [getattr(o, "shape", None) for o in output]
        if len(output) == 2 and encoder is not None and hidden.shape != encoder.shape and hidden.shape in shapes and encoder.shape in shapes:
            i = shapes.index(hidden.shape)
            self.output_order, self.returns_encoder = (i, 1 - i), True
            return
        raise TypeError(f"cannot tell which outputs of {type(output).__name__} blocks are the hidden states; "
                        "add the model to tempocache.step_cache.adapters.FAMILIES")


def find_blocks(transformer: nn.Module) -> tuple[str, list[nn.Module], list[BlockCall]]:
    """(family name, blocks in execution order, a BlockCall per block) for a diffusers transformer."""
    family = FAMILIES.get(type(transformer).__name__)
    if family is not None:
        blocks = [b for name in family.block_lists for b in getattr(transformer, name)]
        calls = [BlockCall(b, family.output_order.get(type(b).__name__, "infer")) for b in blocks]
        return family.name, blocks, calls
    lists = [m for m in transformer.children() if isinstance(m, nn.ModuleList) and _looks_like_blocks(m)]
    if not lists:
        raise TypeError(
            f"{type(transformer).__name__} has no recognisable transformer blocks (no nn.ModuleList of at least two "
            f"identical attention blocks among its children); tempocache knows: {', '.join(FAMILIES)}"
        )
    blocks = [b for blocks in lists for b in blocks]
    return "generic", blocks, [BlockCall(b, "infer") for b in blocks]


def _looks_like_blocks(modules: nn.ModuleList) -> bool:
    kinds = {type(m) for m in modules}
    has_attention = any("attn" in name.lower() or "attention" in name.lower() for name, _ in modules[0].named_children()) if len(modules) else False
    return len(modules) >= 2 and len(kinds) == 1 and has_attention and "hidden_states" in inspect.signature(type(modules[0]).forward).parameters


def timestep_of(transformer: nn.Module, args: tuple, kwargs: dict) -> float | None:
    """The (first) timestep value a transformer was called with, or None if it takes none."""
    if "timestep" in kwargs:
        t = kwargs["timestep"]
    else:
        names = list(inspect.signature(type(transformer).forward).parameters)[1:]
        if "timestep" not in names or names.index("timestep") >= len(args):
            return None
        t = args[names.index("timestep")]
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def hidden_states_of(transformer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def output_tensor(output) -> torch.Tensor:
    """A transformer call's sample: the first element of a tuple (return_dict=False), else `.sample`."""
    return output[0] if isinstance(output, tuple) else output.sample
