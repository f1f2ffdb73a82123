"""What every accelerator needs to know about a diffusers model: its blocks, attention and modulation modules,
the timestep and output of a call, the transformer inside a pipeline and what tempocache attached to it, the
profiles measured on it, and the diffusers hooks everything is installed with."""

from .attach import QUANT, REGION, STEP_CACHE, STREAM, Attachment, attach, attached, detach, require_attached, transformer_of
from .calls import conditioning_key, hidden_states_of, output_tensor, timestep_of, with_output_tensor
from .families import (
    FAMILIES,
    BlockCall,
    Blocks,
    Family,
    State,
    attention_modules,
    find_blocks,
    modulation_modules,
    register_family,
)
from .hooks import ContextHook, Hook, add_hook, cache_context, claim_cache, release_cache, remove_hook
from .parallel import check_parallel, context_parallel_config, decision_group, refuse_context_parallel, summed
from .profiles import find_profile, fingerprint, register_profile, registered_profiles

__all__ = ["FAMILIES", "QUANT", "REGION", "STEP_CACHE", "STREAM", "Attachment", "BlockCall", "Blocks", "ContextHook", "Family", "Hook",
           "State", "add_hook", "attach", "attached", "attention_modules", "cache_context", "claim_cache",
           "check_parallel", "conditioning_key", "context_parallel_config", "decision_group", "detach", "find_blocks", "find_profile", "fingerprint", "hidden_states_of", "modulation_modules",
           "output_tensor", "register_family", "register_profile", "registered_profiles", "release_cache",
           "refuse_context_parallel", "remove_hook", "require_attached", "summed", "timestep_of", "transformer_of", "with_output_tensor"]
