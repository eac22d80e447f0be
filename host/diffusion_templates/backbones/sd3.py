"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): StableDiffusion3Pipeline and variants.

Layers: ``joint_<i>`` for ``transformer_blocks[i].attn`` (joint text+image attention) and
``joint_<i>_attn2`` for the extra image self-attention of SD3.5 dual-attention blocks. The
processors call ``F.scaled_dot_product_attention`` directly (no RoPE). CFG is batched: the
denoiser sees ``[uncond, cond]`` in one call. With ``skip_guidance_layers`` the pipeline makes one more
call per step, on the conditional inputs only, with ``skip_layers`` set: its rows are conditional.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..context import BatchLayout
from .base import AttentionLayer, BackboneAdapter, legacy_attention


class SD3Adapter(BackboneAdapter):
    name = "sd3"
    denoiser_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline", "StableDiffusion3ControlNetPipeline")
    cfg_style = "batched"
    carriers = frozenset({"kv", "lora", "embedding", "latent_mask", "init_latents", "guidance", "residual"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        layers = {}
        for i, block in enumerate(denoiser.transformer_blocks):
            layers[f"joint_{i}"] = legacy_attention(f"joint_{i}", f"transformer_blocks.{i}.attn", block.attn)
            if getattr(block, "attn2", None) is not None:
                name = f"joint_{i}_attn2"
                layers[name] = legacy_attention(name, f"transformer_blocks.{i}.attn2", block.attn2)
        return layers

    def batch_layout(
        self, batch: int, images: int | None, context: str | None, inputs: Mapping[str, Any]
    ) -> BatchLayout:
        """Batched ``[uncond, cond]``; the skip-layer guidance call (StableDiffusion3Pipeline with
        ``skip_guidance_layers``: ``skip_layers`` passed, one row per image, the conditional prompt
        embeddings) is a conditional prediction with layers left out."""
        if inputs.get("skip_layers") is not None and context is None:
            return BatchLayout.single("cond", batch, purpose="skip_layers")
        return super().batch_layout(batch, images, context, inputs)

    # -- prompt embeddings (carrier "embedding") ------------------------------------------------------
    cfg_requirement = "guidance_scale > 1"
    cfg_equal_lengths = True  # batched CFG: both halves of one batch

    def unsupported_reason(self, carrier: str) -> str | None:
        """Why ``carrier`` cannot drive this pipeline instance (None when it can)."""
        name = type(self.pipe).__name__
        if carrier in ("latent_mask", "init_latents") and name != "StableDiffusion3Pipeline":
            return (
                f"{carrier} drives StableDiffusion3Pipeline (text-to-image); {name} prepares its own "
                "starting latents"
            )
        return None

    def text_embedding_dims(self) -> tuple[int, int | None]:
        config = self.pipe.transformer.config
        return config.joint_attention_dim, config.pooled_projection_dim

    def cfg_active(self, kwargs) -> bool:
        from ..imaging import call_argument

        return call_argument(self.pipe, kwargs, "guidance_scale") > 1

    def encode_prompt_embeddings(self, kwargs, cfg: bool) -> dict:
        from ..imaging import call_argument

        pipe = self.pipe
        names = (
            *("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3"),
            *("prompt_embeds", "negative_prompt_embeds"),
            *("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        )
        cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
            **{name: kwargs.get(name) for name in names},
            do_classifier_free_guidance=cfg,
            device=pipe._execution_device,
            clip_skip=kwargs.get("clip_skip"),
            num_images_per_prompt=1,
            max_sequence_length=call_argument(pipe, kwargs, "max_sequence_length"),
            lora_scale=(kwargs.get("joint_attention_kwargs") or {}).get("scale"),
        )
        return {
            "cond": {"tokens": cond, "pooled": pooled, "mask": None},
            "uncond": {"tokens": uncond, "pooled": negative_pooled, "mask": None} if cfg else None,
        }

    def prompt_embedding_kwargs(self, kwargs, embeds: dict) -> dict:
        out = {k: v for k, v in kwargs.items() if k not in ("prompt", "prompt_2", "prompt_3")}
        out.update(prompt_embeds=embeds["cond"]["tokens"], pooled_prompt_embeds=embeds["cond"]["pooled"])
        if embeds.get("uncond") is not None:
            for key in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
                out.pop(key, None)
            out.update(
                negative_prompt_embeds=embeds["uncond"]["tokens"],
                negative_pooled_prompt_embeds=embeds["uncond"]["pooled"],
            )
        return out

    # -- images and latents (carriers "latent_mask", "init_latents"; see imaging.py) -----------------
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        return int(height) // self.pipe.vae_scale_factor, int(width) // self.pipe.vae_scale_factor

    def image_processor(self):
        return self.pipe.image_processor

    def mask_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        # StableDiffusion3InpaintPipeline's mask processor.
        return VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor,
            vae_latent_channels=self.pipe.vae.config.latent_channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def encode_image(self, image, generator):
        """(B, C, H/8, W/8): sampled with ``generator``, ``(x - shift_factor) * scaling_factor``."""
        from diffusers import StableDiffusion3InpaintPipeline

        return StableDiffusion3InpaintPipeline._encode_vae_image(self.pipe, image=image, generator=generator)

    def image_latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.pipe.transformer.config.in_channels, *self.latent_grid(height, width))

    def pack_latents(self, latents):
        return latents

    def call_latents(self, latents, scheduler=None):
        return latents

    def noise_from_call(self, latents, height: int, width: int):
        return latents

    def mask_latents(self, mask, height: int, width: int):
        """StableDiffusion3InpaintPipeline.prepare_mask_latents: nearest resize to the latent grid."""
        import torch.nn.functional as F

        return F.interpolate(mask, size=self.latent_grid(height, width))

    def add_noise(self, scheduler, sample, noise, timestep):
        return scheduler.scale_noise(sample, timestep, noise)

    def img2img_schedule(self, kwargs, strength: float, height: int, width: int, batch: int):
        """StableDiffusion3Img2ImgPipeline's schedule: the scheduler's default sigmas (or the call's),
        ``mu`` only with dynamic shifting, from t_start on.

        The img2img pipeline lets the scheduler compute its default sigmas in float64 before shifting;
        passed as ``sigmas`` they are cast to float32 first, so timesteps may differ in the last bit.
        """
        import numpy as np
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        from ..imaging import call_argument, flow_img2img_schedule

        pipe = self.pipe
        scheduler = pipe.scheduler
        steps = call_argument(pipe, kwargs, "num_inference_steps")
        mu = kwargs.get("mu")
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
            mu = calculate_shift(
                (int(height) // factor) * (int(width) // factor),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        default = np.linspace(
            scheduler._sigma_to_t(scheduler.sigma_max), scheduler._sigma_to_t(scheduler.sigma_min), steps
        ) / scheduler.config.num_train_timesteps
        return flow_img2img_schedule(
            pipe, kwargs, strength, family=self.name, default_sigmas=default, mu=mu, batch=batch
        )

    # -- latent space for the latent -> RGB map and the guidance carrier (latent_rgb.py) -------------
    def unpack_latents(self, latents, height: int, width: int):
        """SD3 steps on the latent grid (B, C, h, w) itself (the transformer patchifies internally)."""
        return latents

    def repack_latents(self, grid, height: int, width: int):
        return grid

    def encode_images(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> ``(z - shift_factor) * scaling_factor`` (B, C, H/8, W/8), as
        :meth:`encode_image` but with the posterior's mode (deterministic) instead of a sample."""
        vae = self.pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    # -- ControlNet residuals (carrier "residual"; see carriers/residual.py) --------------------------
    controlnet_classes = ("SD3ControlNetModel",)
    residual_options = frozenset()

    def residual_slots(self) -> dict:
        from ..carriers.residual import ResidualSlots

        return {"joint": ResidualSlots(len(self.denoiser.transformer_blocks))}

    def residual_index(self, group: str, block: int, count: int, repeat: bool) -> int:
        """SD3Transformer2DModel: ``int(block / (blocks / count))`` (blocks with context_pre_only skip it)."""
        return int(block / (len(self.denoiser.transformer_blocks) / count))

    def residual_shape(self, group: str, index: int, height, width) -> tuple:
        config = self.denoiser.config
        tokens = None
        if height is not None:
            cell = self.pipe.vae_scale_factor * config.patch_size
            tokens = (int(height) // cell) * (int(width) // cell)
        return (tokens, self.denoiser.inner_dim)

    def residual_kwargs(self, residuals: dict, repeat: bool) -> dict:
        return {"block_controlnet_hidden_states": residuals.get("joint")}

    def existing_residuals(self, inputs: dict):
        found = inputs.get("block_controlnet_hidden_states")
        return None if found is None else ({"joint": list(found)}, False)

    def check_controlnet(self, controlnet, entry) -> dict[str, int]:
        from ..errors import CacheError

        ours, theirs = self.denoiser.config, controlnet.config
        keys = ["num_attention_heads", "attention_head_dim", "pooled_projection_dim", "in_channels"]
        keys.append("patch_size")
        wrong = [f"{k} {theirs[k]} (transformer: {ours[k]})" for k in keys if theirs[k] != ours[k]]
        if theirs.joint_attention_dim not in (None, ours.joint_attention_dim):
            wrong.append(
                f"joint_attention_dim {theirs.joint_attention_dim} (transformer: {ours.joint_attention_dim})"
            )
        if wrong:
            raise CacheError("the ControlNet does not fit this SD3 transformer: " + ", ".join(wrong))
        return {"joint": theirs.num_layers}

    def control_shape(self, controlnet, height: int, width: int) -> tuple[int, ...]:
        config = controlnet.config
        factor = self.pipe.vae_scale_factor
        channels = config.in_channels + config.extra_conditioning_channels
        return (channels, int(height) // factor, int(width) // factor)

    def preprocess_control_image(self, image, *, height: int, width: int):
        """StableDiffusion3ControlNetPipeline.prepare_image's image processor step: [-1, 1], float32."""
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.pipe.vae_scale_factor).preprocess(
            image, height=height, width=width
        )

    def prepare_control_image(
        self, image, *, controlnet, height: int, width: int, generator=None, batch_size: int = 1,
        do_classifier_free_guidance: bool = False, guess_mode: bool = False,
    ):
        """StableDiffusion3ControlNetPipeline: preprocess, repeat, with CFG doubled *before* the VAE
        sample (so each CFG half gets its own sample), ``(x - shift) * scale`` (no shift for
        ControlNets with ``force_zeros_for_pooled_projection``). diffusers samples with the global RNG
        (``generator=None``); pass a generator for a reproducible cache."""
        import torch

        pipe = self.pipe
        with torch.no_grad():
            if not isinstance(image, torch.Tensor):
                image = self.preprocess_control_image(image, height=height, width=width)
            image = image.repeat_interleave(batch_size if image.shape[0] == 1 else 1, dim=0)
            image = image.to(device=self.device, dtype=self.dtype)
            if do_classifier_free_guidance and not guess_mode:
                image = torch.cat([image] * 2)
            shift = 0 if controlnet.config.force_zeros_for_pooled_projection else pipe.vae.config.shift_factor
            latents = pipe.vae.encode(image).latent_dist.sample(generator)
            return (latents - shift) * pipe.vae.config.scaling_factor

    def controlnet_residuals(self, controlnet, control, scale: float, inputs: dict, entry, layout=None):
        """One StableDiffusion3ControlNetPipeline ControlNet call, on the (CFG-doubled) transformer inputs."""
        import torch

        from ..carriers.residual import fit_batch

        hidden = inputs["hidden_states"]
        pooled = inputs["pooled_projections"]
        if controlnet.config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)
        text = inputs["encoder_hidden_states"] if controlnet.config.joint_attention_dim is not None else None
        if controlnet.pos_embed is None:  # SD3.5 large ControlNets share the transformer's patch embedding
            hidden = self.denoiser.pos_embed(hidden)
        (samples,) = controlnet(
            hidden_states=hidden,
            timestep=inputs["timestep"],
            encoder_hidden_states=text,
            pooled_projections=pooled,
            joint_attention_kwargs=inputs.get("joint_attention_kwargs"),
            controlnet_cond=fit_batch(control, inputs["hidden_states"].shape[0]),
            conditioning_scale=scale,
            return_dict=False,
        )
        return {"joint": list(samples)}, False
