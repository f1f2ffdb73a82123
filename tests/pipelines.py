"""Real diffusers pipelines from tiny random components, built as diffusers' own pipeline tests build them.

No downloads: the tokenizers are word-level over a few words (`tokenizers`, wrapped as transformers'
fast tokenizers), the text encoders tiny T5 and CLIP configs. A generation takes a fraction of a second.
"""

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

WORDS = "a red green blue cat dog circle square moves left right".split()
TEXT_LEN = 16
TEXT_DIM = 32


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LEN)


def t5() -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval()


def clip() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return CLIPTextModel(config).eval()


def wan() -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanPipeline(tokenizer=word_tokenizer(), text_encoder=t5(), transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def flux_components() -> dict:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip(), tokenizer=word_tokenizer(),
                text_encoder_2=t5(), tokenizer_2=word_tokenizer(), transformer=transformer)


def flux() -> FluxPipeline:
    return FluxPipeline(**flux_components())


def flux_img2img() -> FluxImg2ImgPipeline:
    return FluxImg2ImgPipeline(**flux_components())


def run_wan(pipe: WanPipeline, steps: int = 4, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe("a red cat moves left", negative_prompt="", height=16, width=16, num_frames=5, num_inference_steps=steps,
                guidance_scale=2.0, generator=torch.Generator().manual_seed(seed), output_type="pt",
                max_sequence_length=TEXT_LEN, **kwargs).frames


def run_flux(pipe, steps: int = 4, seed: int = 0, **kwargs) -> torch.Tensor:
    """True CFG: a conditional and an unconditional call per step, in cache_context("cond") and ("uncond")."""
    return pipe("a red cat", negative_prompt="a blue dog", true_cfg_scale=2.0, guidance_scale=1.0, height=16, width=16,
                num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt",
                max_sequence_length=TEXT_LEN, **kwargs).images


@torch.no_grad()
def bare_loop(transformer: WanTransformer3DModel, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """A sampling loop of one's own: no pipeline, no cache_context; a conditional then an unconditional call per step."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=generator)
    cond, uncond = torch.randn(2, 1, TEXT_LEN, TEXT_DIM, generator=generator)
    for t in torch.linspace(1000, 1000 / steps, steps):
        timestep = t.reshape(1)
        out_cond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        out_uncond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
        x = x - (out_uncond + 2.0 * (out_cond - out_uncond)) / steps
    return x


def pixart() -> PixArtSigmaPipeline:
    """Both CFG branches in one batched call, as PixArt's pipelines make them; a multistep DPM-Solver."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=16, caption_channels=TEXT_DIM, sample_size=8, norm_type="ada_norm_single",
        use_additional_conditions=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1)
    return PixArtSigmaPipeline(tokenizer=word_tokenizer(), text_encoder=t5(), vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def run_pixart(pipe: PixArtSigmaPipeline, steps: int = 4, seed: int = 0) -> torch.Tensor:
    return pipe("a red cat", negative_prompt="", num_inference_steps=steps, guidance_scale=2.0, height=16, width=16,
                generator=torch.Generator().manual_seed(seed), output_type="pt", max_sequence_length=TEXT_LEN,
                use_resolution_binning=False, clean_caption=False).images
