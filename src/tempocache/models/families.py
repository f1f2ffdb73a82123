"""Where a diffusers transformer keeps its blocks, how its blocks pass their state along, and which of
their modules are attention and modulation.

A block's *state* is what flows from one block to the next: `hidden_states` and, in
dual-stream models (MMDiT), `encoder_hidden_states`. Known families are a table, to
which `register_family` adds users' own models; any other transformer gets a generic
search for its block lists, and a clear error when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calls import call_argument, forward_parameters

State = tuple  # (hidden_states,) or (hidden_states, encoder_hidden_states); an entry may be None
OutputOrder = tuple[int, int] | None  # where a block's output puts (hidden_states, encoder_hidden_states); None: one tensor


@dataclass(frozen=True)
class Family:
    name: str
    block_lists: tuple[str, ...]  # attributes holding nn.ModuleLists of blocks, in execution order
    output_order: dict[str, OutputOrder]  # per block class name; a class not listed has its layout inferred
    # submodules of a block (by attribute name) that carry the timestep's modulation, kept exact by quantization
    modulation: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
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
    "QwenImageTransformer2DModel": Family(
        "qwen_image", ("transformer_blocks",), {"QwenImageTransformerBlock": (1, 0)}, modulation=("img_mod", "txt_mod"),
    ),
}


def register_family(model: type | str, block_lists: tuple[str, ...] | list[str], output_order: dict[str, OutputOrder] | None = None,
                    name: str | None = None, modulation: tuple[str, ...] = ()) -> Family:
    """Teach tempocache a transformer class: the attributes holding its blocks (nn.ModuleLists, in execution
    order), where each block class's output puts (hidden_states, encoder_hidden_states) (None: it returns the
    hidden states alone; a class left out has its layout inferred at its first call), and the submodules of a
    block that carry the timestep's modulation. Replaces an earlier registration of the same class."""
    key = model if isinstance(model, str) else model.__name__
    if isinstance(block_lists, str) or not block_lists or not all(isinstance(b, str) for b in block_lists):
        raise ValueError(f"block_lists must name the attributes holding the blocks, e.g. ('blocks',); got {block_lists!r}")
    for block, order in (output_order or {}).items():
        if order is not None and sorted(order) != [0, 1]:
            raise ValueError(f"output_order[{block!r}] must be None or (hidden index, encoder index), a permutation of (0, 1); got {order!r}")
    family = Family(name or key, tuple(block_lists), dict(output_order or {}), tuple(modulation))
    FAMILIES[key] = family
    return family


class BlockCall:
    """Reads a block's state from its call arguments and writes a state back in its output layout."""

    def __init__(self, block: nn.Module, output_order: OutputOrder | str):
        self.names = forward_parameters(block)
        self.output_order = output_order  # "infer" until the first call shows it (generic fallback)
        self.returns_encoder = output_order is not None
        self.temb_name = next((n for n in ("temb", "timestep", "emb") if n in self.names), None)

    def argument(self, name: str, args: tuple, kwargs: dict):
        return call_argument(self.names, name, args, kwargs)

    def state_in(self, args: tuple, kwargs: dict) -> State:
        named = "hidden_states" in self.names or "hidden_states" in kwargs
        hidden = self.argument("hidden_states", args, kwargs) if named else args[0]
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
        if (len(output) == 2 and encoder is not None and hidden.shape != encoder.shape
                and hidden.shape in shapes and encoder.shape in shapes):
            i = shapes.index(hidden.shape)
            self.output_order, self.returns_encoder = (i, 1 - i), True
            return
        raise TypeError(f"cannot tell which outputs of {type(output).__name__} blocks are the hidden states; "
                        "register the model with tempocache.register_family(...)")


@dataclass(frozen=True)
class Blocks:
    """A transformer's blocks in execution order, a BlockCall for each, and its family's name."""

    family: str
    modules: list[nn.Module]
    calls: list[BlockCall]
    modulation: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.modules)


def find_blocks(transformer: nn.Module) -> Blocks:
    family = FAMILIES.get(type(transformer).__name__)
    if family is not None:
        missing = [name for name in family.block_lists if not isinstance(getattr(transformer, name, None), nn.ModuleList)]
        if missing:
            raise TypeError(f"{type(transformer).__name__} is registered with block lists {family.block_lists}, but "
                            f"has no nn.ModuleList at {missing}")
        blocks = [b for name in family.block_lists for b in getattr(transformer, name)]
        calls = [BlockCall(b, family.output_order.get(type(b).__name__, "infer")) for b in blocks]
        return Blocks(family.name, blocks, calls, family.modulation)
    lists = [m for m in transformer.children() if isinstance(m, nn.ModuleList) and _looks_like_blocks(m)]
    if not lists:
        raise TypeError(
            f"{type(transformer).__name__} has no recognisable transformer blocks (no nn.ModuleList of at least two "
            f"identical attention blocks among its children); register it with tempocache.register_family(...). "
            f"Known: {', '.join(FAMILIES)}"
        )
    blocks = [b for blocks in lists for b in blocks]
    return Blocks("generic", blocks, [BlockCall(b, "infer") for b in blocks])


def _looks_like_blocks(modules: nn.ModuleList) -> bool:
    if len(modules) < 2 or len({type(m) for m in modules}) != 1:
        return False
    has_attention = any("attn" in name.lower() or "attention" in name.lower() for name, _ in modules[0].named_children())
    return has_attention and "hidden_states" in forward_parameters(modules[0])


def attention_modules(blocks: Blocks) -> list[nn.Module]:
    """diffusers attention modules (those with a `processor`) inside the blocks."""
    return [m for block in blocks.modules for m in block.modules() if hasattr(m, "processor")]


def modulation_modules(blocks: Blocks) -> set[int]:
    """ids of the modules inside the blocks that carry the timestep's modulation: diffusers' normalization modules
    (adaLN and its kin, `diffusers.models.normalization`) and the family's declared modulation submodules, with
    everything inside them."""
    found = set()
    for block in blocks.modules:
        roots = [m for m in block.modules() if type(m).__module__ == "diffusers.models.normalization"]
        roots += [getattr(block, name) for name in blocks.modulation if isinstance(getattr(block, name, None), nn.Module)]
        found |= {id(m) for root in roots for m in root.modules()}
    return found
