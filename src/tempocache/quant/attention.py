"""FP8 self-attention (`W8A8(attention=True)`): Q K^T and P V on FP8 tensor cores through cuDNN's FP8 flash
attention (Hopper and newer, `pip install nvidia-cudnn-frontend`), the same numerics simulated on the CPU.

At Wan2.1-1.3B's 480p x 81 frames (32,760 tokens) attention is over half of a step and the block linears a
fifth, so 8-bit linears alone barely move a step. The numerics, per call, with one scale per tensor (what
cuDNN takes):

    s_x = amax|x| / 448,   q8 = e4m3(q / s_q),   k8 = e4m3((k - mean over tokens of k) / s_k),   v8 = e4m3(v / s_v)
    S = q8 k8^T s_q s_k scale,   p = exp(S - row max of S),   O = e4m3(448 p) v8 (s_v / 448) / row sum of p
    out = e4m3(O / s_v) s_v

Subtracting K's mean over the tokens adds one constant to each query's logits, which softmax ignores, and
narrows K's range (SageAttention, Zhang et al., 2025). On Hopper cuDNN writes O in FP8 (16-bit outputs need
Blackwell); O mixes V's rows with weights summing to one, so 1 / s_v is a safe output scale. cuDNN keeps a
running row max (online softmax), so it rounds some P values against a smaller max than the final one: it
agrees with `simulated_attention` to within the rounding of P (3.8% relative on an H200, `quant_speed.json`).
The scales are per tensor, over the whole batch: a sample's result depends slightly on the others in its batch.

What runs in FP8: `F.scaled_dot_product_attention` calls inside the transformer blocks' attention modules
that are self-attention (as many keys as queries: Wan's attn1, FLUX's joint attention; or more keys than
queries in a module that says it is no cross-attention, `is_cross_attention` False: a streaming chunk's
queries over the cached frames' keys and its own, `tempocache.kv`) without a mask, dropout, causal flag or
grouped heads. Cross-attention to a short prompt is left exact: quantizing its
queries costs more than its tiny product saves. The calls are caught by a TorchFunctionMode entered around
each attention module's forward, so any attention processor on diffusers' native backend is covered
without changing its code.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..models import Hook
from .numerics import compiled

FP8, FP8_MAX = torch.float8_e4m3fn, 448.0
QUERY_CHUNK = 1024  # queries per simulated block: bounds the float32 logits held at once
# cuDNN's FP8 attention is about 10% faster on whole tiles of 128 tokens (H100, 32,760 tokens: 8.0 ms, padded to
# 32,768 and masked: 7.15 ms), so the kernel's inputs are padded with zero tokens that its padding mask excludes.
TILE = 128


def _per_tensor(x: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    scaled = (x.float() / scale).transpose(1, 2)  # (batch, tokens, heads, dim): diffusers' layout, and the kernel's
    if tokens > scaled.shape[1]:
        scaled = F.pad(scaled, (0, 0, 0, 0, 0, tokens - scaled.shape[1]))
    return scaled.to(FP8).transpose(1, 2), scale.reshape(1, 1, 1, 1)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_tokens: int = 0,
                 kv_tokens: int = 0) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8, s_q, s_k, s_v) of the module's docstring from (batch, heads, tokens, head dim) tensors of any
    strides; the 8-bit ones padded with zero tokens up to `q_tokens` (q8) and `kv_tokens` (k8, v8), if more."""
    k = k.float() - k.float().mean(dim=-2, keepdim=True)
    (q8, s_q), (k8, s_k), (v8, s_v) = (_per_tensor(x, n) for x, n in ((q, q_tokens), (k, kv_tokens), (v, kv_tokens)))
    return q8, k8, v8, s_q, s_k, s_v


def simulated_attention(q8, k8, v8, s_q, s_k, s_v, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The FP8 attention of the module's docstring in float32, from the 8-bit values: the reference for the kernel."""
    out = torch.empty(q8.shape, dtype=torch.float32, device=q8.device)
    keys, values = k8.float().transpose(-1, -2), v8.float()
    for start in range(0, q8.shape[-2], QUERY_CHUNK):
        logits = (q8[..., start:start + QUERY_CHUNK, :].float() @ keys) * (s_q * s_k * scale)
        p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        o = ((p * FP8_MAX).to(FP8).float() @ values) * (s_v / FP8_MAX) / p.sum(dim=-1, keepdim=True)
        out[..., start:start + QUERY_CHUNK, :] = (o / s_v).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s_v
    return out.to(out_dtype)


def kernel_unavailable(device: torch.device) -> str | None:
    """Why cuDNN's FP8 attention cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return "not a CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; cuDNN's FP8 attention needs 9.0+ (Hopper)"
    if importlib.util.find_spec("cudnn") is None:
        return "the cuDNN frontend is not installed (pip install nvidia-cudnn-frontend)"
    return None


class Declined(Exception):
    """cuDNN has no FP8 attention plan for these shapes."""


class _CudnnAttention:
    """cuDNN FP8 flash-attention graphs, one per (shapes, strides, valid tokens, device); O in FP8, scaled by 1 / s_v."""

    def __init__(self):
        self.graphs: dict[tuple, tuple | str] = {}  # a string: why cuDNN declined
        self.handles: dict[torch.device, object] = {}

    def build(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o8: torch.Tensor, tokens: tuple[int, int],
              scale: float):
        import cudnn

        handle = self.handles.setdefault(q8.device, cudnn.create_handle())
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        fp8 = {name: graph.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=cudnn.data_type.FP8_E4M3)
               for name, x in (("q", q8), ("k", k8), ("v", v8))}
        scalars = {name: graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)
                   for name in ("s_q", "s_k", "s_v", "descale_p", "scale_p", "scale_o")}
        batch = q8.shape[0]
        lengths = {name: graph.tensor(name=name, dim=[batch, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
                   for name in ("q_tokens", "kv_tokens")} if tokens != (q8.shape[-2], k8.shape[-2]) else {}
        o, _, amax_p, amax_o = graph.sdpa_fp8(
            q=fp8["q"], k=fp8["k"], v=fp8["v"], descale_q=scalars["s_q"], descale_k=scalars["s_k"], descale_v=scalars["s_v"],
            descale_s=scalars["descale_p"], scale_s=scalars["scale_p"], scale_o=scalars["scale_o"],
            generate_stats=False, attn_scale=scale, use_causal_mask=False, use_padding_mask=bool(lengths),
            seq_len_q=lengths.get("q_tokens"), seq_len_kv=lengths.get("kv_tokens"))
        o.set_output(True).set_dim(list(o8.shape)).set_stride(list(o8.stride())).set_data_type(cudnn.data_type.FP8_E4M3)
        for amax in (amax_p, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        one = torch.ones(1, 1, 1, 1, device=q8.device)
        constants = {scalars["scale_p"]: one * FP8_MAX, scalars["descale_p"]: one / FP8_MAX,
                     amax_p: torch.empty_like(one), amax_o: torch.empty_like(one),
                     **{lengths[name]: torch.full((batch, 1, 1, 1), n, dtype=torch.int32, device=q8.device)
                        for name, n in zip(("q_tokens", "kv_tokens"), tokens) if lengths}}
        workspace = torch.empty(graph.get_workspace_size(), device=q8.device, dtype=torch.uint8)
        return graph, handle, fp8, scalars, o, constants, workspace

    def __call__(self, q8, k8, v8, s_q, s_k, s_v, tokens: tuple[int, int], scale: float) -> torch.Tensor:
        """O8 of (batch, heads, padded tokens, head dim) q8, k8, v8 whose first tokens[0] queries and tokens[1] keys
        and values are valid."""
        import cudnn

        o8 = torch.empty_like(q8)
        key = (q8.shape, k8.shape, q8.stride(), k8.stride(), v8.stride(), o8.stride(), tokens, q8.device, scale)
        if key not in self.graphs:
            try:
                self.graphs[key] = self.build(q8, k8, v8, o8, tokens, scale)
            except Exception as error:  # the frontend's errors (unsupported shape, no engine) have no common type
                self.graphs[key] = str(error).splitlines()[0][:200]
        if isinstance(self.graphs[key], str):
            raise Declined(self.graphs[key])
        graph, handle, fp8, scalars, o, constants, workspace = self.graphs[key]
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        graph.execute({fp8["q"]: q8, fp8["k"]: k8, fp8["v"]: v8, o: o8, scalars["s_q"]: s_q, scalars["s_k"]: s_k,
                       scalars["s_v"]: s_v, scalars["scale_o"]: 1 / s_v, **constants}, workspace, handle=handle)
        return o8


def _dequantize(o8: torch.Tensor, s_v: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    return (o8[..., :tokens, :].float() * s_v).to(dtype)


class FP8Attention:
    """Self-attention of (batch, heads, tokens, head dim) tensors in FP8: cuDNN on a GPU (its graphs built once per
    shape and kept here), simulated elsewhere."""

    def __init__(self):
        self.cudnn = _CudnnAttention()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if not q.is_cuda:
            return simulated_attention(*quantize_qkv(q, k, v), scale, q.dtype)
        tokens = q.shape[-2], k.shape[-2]
        # fused kernels (torch.compile): in eager mode the passes over q, k and v cost a third of what FP8 saves
        q8, k8, v8, s_q, s_k, s_v = compiled(quantize_qkv)(q, k, v, *(-(-n // TILE) * TILE for n in tokens))
        o8 = self.cudnn(q8, k8, v8, s_q, s_k, s_v, tokens, scale)
        return compiled(_dequantize)(o8, s_v, tokens[0], q.dtype)


def _fp8_call(attention: FP8Attention, more_keys: bool, query, key, value, attn_mask=None, dropout_p=0.0,
              is_causal=False, scale=None, enable_gqa=False):
    """A scaled_dot_product_attention call: (its FP8 output, None) where it qualifies, else (None, why it stays exact).
    `more_keys`: the call is a self-attention module's, where more keys than queries are a cache's."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        return None, "mask, dropout, causal or grouped heads"
    same = query.dim() == 4 and key.shape == value.shape and query.shape[:2] == key.shape[:2] and \
        query.shape[-1] == key.shape[-1]
    if not same or key.shape[-2] < query.shape[-2] or key.shape[-2] > query.shape[-2] and not more_keys:
        return None, "not self-attention"
    if query.shape[-1] % 16:
        return None, f"head dim {query.shape[-1]} not a multiple of 16"
    try:
        return attention(query, key, value, scale), None
    except Declined as why:
        return None, f"cuDNN declined: {why}"


class FP8AttentionMode(TorchFunctionMode):
    """Runs the scaled_dot_product_attention calls made while it is active in FP8 where they qualify; counts them."""

    def __init__(self):
        super().__init__()
        self.attention = FP8Attention()
        self.fp8_calls = 0
        self.exact_calls: Counter[str] = Counter()
        self.more_keys = False  # set per module by FP8AttentionHook: may it attend to more keys than queries?

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out, reason = _fp8_call(self.attention, self.more_keys, *args, **kwargs)
            if out is not None:
                self.fp8_calls += 1
                return out
            self.exact_calls[reason] += 1
        return func(*args, **kwargs)


class FP8AttentionHook(Hook):
    def __init__(self, mode: FP8AttentionMode):
        super().__init__()
        self.mode = mode

    def new_forward(self, module: nn.Module, *args, **kwargs):
        self.mode.more_keys = getattr(module, "is_cross_attention", None) is False
        with self.mode:
            return self.original(*args, **kwargs)
