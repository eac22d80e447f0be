"""FLUX.2 (``Flux2Transformer2DModel``): Flux2KleinPipeline, Flux2Pipeline.

Layer names follow DiffSynth-Studio's FLUX.2 ``kv_cache`` keys: ``double_<i>`` for the
dual-stream blocks, ``single_<i>`` for the single-stream blocks. CFG (klein base) runs the branches
one after the other under ``transformer.cache_context("cond"/"uncond")``.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, blocks_attention


class Flux2Adapter(BackboneAdapter):
    name = "flux2"
    denoiser_classes = ("Flux2Transformer2DModel",)
    pipeline_classes = ("Flux2KleinPipeline", "Flux2Pipeline")
    cfg_style = "sequential"
    carriers = frozenset({"kv", "lora", "embedding", "latent_mask", "init_latents", "guidance"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        return {
            **blocks_attention(denoiser, "transformer_blocks", "double"),
            **blocks_attention(denoiser, "single_transformer_blocks", "single"),
        }

    # -- prompt embeddings (carrier "embedding") ------------------------------------------------------
    cfg_requirement = "guidance_scale > 1 on a non-distilled (base) FLUX.2 klein"

    def unsupported_reason(self, carrier: str) -> str | None:
        """Why ``carrier`` cannot drive this pipeline instance (None when it can)."""
        if carrier in ("embedding", "latent_mask", "init_latents") and (
            type(self.pipe).__name__ != "Flux2KleinPipeline"
        ):
            return (
                f"{carrier} drives Flux2KleinPipeline; {type(self.pipe).__name__} (FLUX.2 [dev], Mistral "
                "text encoder) has no tiny test pipeline here, so it is not claimed"
            )
        return None

    def text_embedding_dims(self) -> tuple[int, int | None]:
        return self.pipe.transformer.config.joint_attention_dim, None

    def cfg_active(self, kwargs) -> bool:
        from ..imaging import call_argument

        return call_argument(self.pipe, kwargs, "guidance_scale") > 1 and not self.pipe.config.is_distilled

    def encode_prompt_embeddings(self, kwargs, cfg: bool) -> dict:
        from ..imaging import call_argument

        pipe = self.pipe
        common = dict(
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=call_argument(pipe, kwargs, "max_sequence_length"),
            text_encoder_out_layers=call_argument(pipe, kwargs, "text_encoder_out_layers"),
        )
        prompt = kwargs.get("prompt")
        cond, _ = pipe.encode_prompt(prompt=prompt, prompt_embeds=kwargs.get("prompt_embeds"), **common)
        uncond = None
        if cfg:  # Flux2KleinPipeline's negative: "" per prompt, or negative_prompt_embeds
            negative = [""] * len(prompt) if isinstance(prompt, list) else ""
            uncond, _ = pipe.encode_prompt(
                prompt=negative, prompt_embeds=kwargs.get("negative_prompt_embeds"), **common
            )
            uncond = {"tokens": uncond, "pooled": None, "mask": None}
        return {"cond": {"tokens": cond, "pooled": None, "mask": None}, "uncond": uncond}

    def prompt_embedding_kwargs(self, kwargs, embeds: dict) -> dict:
        out = {k: v for k, v in kwargs.items() if k != "prompt"}
        out["prompt_embeds"] = embeds["cond"]["tokens"]
        if embeds.get("uncond") is not None:
            out["negative_prompt_embeds"] = embeds["uncond"]["tokens"]
        return out

    # -- images and latents (carriers "latent_mask", "init_latents"; see imaging.py) -----------------
    # diffusers has no FLUX.2 img2img pipeline; Flux2KleinInpaintPipeline (which also conditions on the
    # image as reference tokens) defines the latents: VAE mode, 2x2 patchified, batch-norm normalised.
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor * 2
        return 2 * (int(height) // factor), 2 * (int(width) // factor)

    def image_processor(self):
        return self.pipe.image_processor

    def mask_processor(self):
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        # Flux2KleinInpaintPipeline's mask processor.
        return Flux2ImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor * 2,
            vae_latent_channels=self.pipe.vae.config.latent_channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_rgb=False,
            do_convert_grayscale=True,
        )

    def encode_image(self, image, generator):
        """(B, 4C, H/16, W/16): VAE mode (no random draw), patchified, ``(x - bn_mean) / bn_std``."""
        return self.pipe._encode_vae_image(image=image, generator=generator)

    def image_latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        rows, cols = self.latent_grid(height, width)
        return (batch, self.pipe.transformer.config.in_channels, rows // 2, cols // 2)

    def pack_latents(self, latents):
        return self.pipe._pack_latents(latents)

    def call_latents(self, latents, scheduler=None):
        return latents  # Flux2KleinPipeline packs the (B, 4C, h, w) latents it is given

    def noise_from_call(self, latents, height: int, width: int):
        return latents

    def mask_latents(self, mask, height: int, width: int):
        """Flux2KleinInpaintPipeline.prepare_mask_latents: bilinear to the packed grid, (B, seq, 1)."""
        import torch.nn.functional as F

        factor = self.pipe.vae_scale_factor * 2
        mask = F.interpolate(mask, size=(int(height) // factor, int(width) // factor), mode="bilinear")
        return self.pipe._pack_latents(mask)

    def add_noise(self, scheduler, sample, noise, timestep):
        return scheduler.scale_noise(sample, timestep, noise)

    def img2img_schedule(self, kwargs, strength: float, height: int, width: int, batch: int):
        """As Flux2KleinInpaintPipeline: linspace sigmas, ``mu`` from the full step count, from t_start on."""
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        from ..errors import UnsupportedError
        from ..imaging import call_argument, flow_img2img_schedule

        if self.pipe.scheduler.config.get("use_flow_sigmas"):
            raise UnsupportedError(
                "flux2: the scheduler sets use_flow_sigmas, so Flux2KleinPipeline ignores the truncated "
                "sigmas init_latents passes"
            )
        steps = call_argument(self.pipe, kwargs, "num_inference_steps")
        factor = self.pipe.vae_scale_factor * 2
        mu = compute_empirical_mu((int(height) // factor) * (int(width) // factor), steps)
        return flow_img2img_schedule(
            self.pipe,
            kwargs,
            strength,
            family=self.name,
            default_sigmas=np.linspace(1.0, 1 / steps, steps),
            mu=mu,
            batch=batch,
        )

    # -- latent space for the latent -> RGB map and the guidance carrier (latent_rgb.py) -------------
    def unpack_latents(self, latents, height: int, width: int):
        """Loop-form latents (B, h*w, 4C) -> the patchified, batch-normed grid (B, 4C, h, w), h = H/16.

        The inverse of the pipeline's static ``_pack_latents`` (a plain reshape). Tokens after the
        image's own (reference-image tokens of editing calls) are ignored.
        """
        factor = self.pipe.vae_scale_factor * 2
        rows, cols = int(height) // factor, int(width) // factor
        batch, _, channels = latents.shape
        return latents[:, : rows * cols].permute(0, 2, 1).reshape(batch, channels, rows, cols)

    def repack_latents(self, grid, height: int, width: int):
        """Inverse of :meth:`unpack_latents`, with the pipeline's own ``_pack_latents``."""
        return self.pipe._pack_latents(grid)

    def encode_images(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> the grid of :meth:`unpack_latents`, through the pipeline's own
        ``_encode_vae_image`` (VAE mode, 2x2 patchify, batch-norm statistics)."""
        vae = self.pipe.vae
        return self.pipe._encode_vae_image(images.to(vae.device, vae.dtype), generator=None)

    # -- ControlNet residuals (carrier "residual"): not supported ------------------------------------
    # Merged with any reasons declared above in this class body.
    unsupported_reasons = {
        **locals().get("unsupported_reasons", {}),
        "residual": (
            "diffusers' Flux2Transformer2DModel takes no ControlNet residuals and there is no FLUX.2 "
            "ControlNet or ControlNet pipeline to prove residuals against"
        ),
    }
