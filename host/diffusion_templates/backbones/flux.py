"""FLUX.1 (``FluxTransformer2DModel``): FluxPipeline and its variants.

Same layer naming as FLUX.2 (``double_<i>``, ``single_<i>``). Real CFG (``true_cfg_scale > 1``
with a negative prompt) runs the branches under ``transformer.cache_context("cond"/"uncond")``.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, blocks_attention


class FluxAdapter(BackboneAdapter):
    name = "flux"
    denoiser_classes = ("FluxTransformer2DModel",)
    pipeline_classes = (
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxControlNetPipeline",
    )
    cfg_style = "sequential"
    carriers = frozenset({"kv", "lora", "embedding", "latent_mask", "init_latents", "guidance", "residual"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        return {
            **blocks_attention(denoiser, "transformer_blocks", "double"),
            **blocks_attention(denoiser, "single_transformer_blocks", "single"),
        }

    # -- prompt embeddings (carrier "embedding") ------------------------------------------------------
    cfg_requirement = "true_cfg_scale > 1 and a negative_prompt (real CFG)"
    cfg_equal_lengths = True  # FluxPipeline rejects prompt/negative embeddings of different shapes

    def unsupported_reason(self, carrier: str) -> str | None:
        """Why ``carrier`` cannot drive this pipeline instance (None when it can)."""
        if carrier in ("latent_mask", "init_latents") and type(self.pipe).__name__ != "FluxPipeline":
            return (
                f"{carrier} drives FluxPipeline (text-to-image); {type(self.pipe).__name__} prepares its "
                "own starting latents"
            )
        return None

    def text_embedding_dims(self) -> tuple[int, int | None]:
        config = self.pipe.transformer.config
        return config.joint_attention_dim, config.pooled_projection_dim

    def cfg_active(self, kwargs) -> bool:
        from ..imaging import call_argument

        has_negative = kwargs.get("negative_prompt") is not None or (
            kwargs.get("negative_prompt_embeds") is not None
            and kwargs.get("negative_pooled_prompt_embeds") is not None
        )
        return (call_argument(self.pipe, kwargs, "true_cfg_scale") or 1.0) > 1 and has_negative

    def encode_prompt_embeddings(self, kwargs, cfg: bool) -> dict:
        from ..imaging import call_argument

        pipe = self.pipe
        common = dict(
            device=pipe._execution_device,
            num_images_per_prompt=1,  # the pipeline repeats given embeddings itself
            max_sequence_length=call_argument(pipe, kwargs, "max_sequence_length"),
            lora_scale=(kwargs.get("joint_attention_kwargs") or {}).get("scale"),
        )

        def encode(prefix: str) -> dict:
            tokens, pooled, _ = pipe.encode_prompt(
                prompt=kwargs.get(f"{prefix}prompt"),
                prompt_2=kwargs.get(f"{prefix}prompt_2"),
                prompt_embeds=kwargs.get(f"{prefix}prompt_embeds"),
                pooled_prompt_embeds=kwargs.get(f"{prefix}pooled_prompt_embeds"),
                **common,
            )
            return {"tokens": tokens, "pooled": pooled, "mask": None}

        return {"cond": encode(""), "uncond": encode("negative_") if cfg else None}

    def prompt_embedding_kwargs(self, kwargs, embeds: dict) -> dict:
        out = {k: v for k, v in kwargs.items() if k not in ("prompt", "prompt_2")}
        out.update(prompt_embeds=embeds["cond"]["tokens"], pooled_prompt_embeds=embeds["cond"]["pooled"])
        if embeds.get("uncond") is not None:
            for key in ("negative_prompt", "negative_prompt_2"):
                out.pop(key, None)
            out.update(
                negative_prompt_embeds=embeds["uncond"]["tokens"],
                negative_pooled_prompt_embeds=embeds["uncond"]["pooled"],
            )
        return out

    # -- images and latents (carriers "latent_mask", "init_latents"; see imaging.py) -----------------
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
        from diffusers.image_processor import VaeImageProcessor

        # FluxInpaintPipeline's mask processor.
        return VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor * 2,
            vae_latent_channels=self.pipe.vae.config.latent_channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def encode_image(self, image, generator):
        """(B, C, H/8, W/8): sampled with ``generator``, ``(x - shift_factor) * scaling_factor``."""
        from diffusers import FluxImg2ImgPipeline

        return FluxImg2ImgPipeline._encode_vae_image(self.pipe, image=image, generator=generator)

    def image_latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.pipe.transformer.config.in_channels // 4, *self.latent_grid(height, width))

    def pack_latents(self, latents):
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def call_latents(self, latents, scheduler=None):
        return self.pack_latents(latents)

    def noise_from_call(self, latents, height: int, width: int):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    def mask_latents(self, mask, height: int, width: int):
        """FluxInpaintPipeline.prepare_mask_latents: nearest resize to the latent grid, packed per channel."""
        import torch.nn.functional as F

        rows, cols = self.latent_grid(height, width)
        mask = F.interpolate(mask, size=(rows, cols))
        channels = self.pipe.transformer.config.in_channels // 4
        return self.pipe._pack_latents(mask.repeat(1, channels, 1, 1), mask.shape[0], channels, rows, cols)

    def add_noise(self, scheduler, sample, noise, timestep):
        return scheduler.scale_noise(sample, timestep, noise)

    def img2img_schedule(self, kwargs, strength: float, height: int, width: int, batch: int):
        """FluxImg2ImgPipeline's schedule: linspace(1, 1/n, n) sigmas shifted by ``mu``, from t_start on."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        from ..imaging import call_argument, flow_img2img_schedule

        steps = call_argument(self.pipe, kwargs, "num_inference_steps")
        config = self.pipe.scheduler.config
        factor = self.pipe.vae_scale_factor
        mu = calculate_shift(
            (int(height) // factor // 2) * (int(width) // factor // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
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
        """Loop-form latents (B, h/2*w/2, 4C) -> the VAE latent grid (B, C, h, w), with the pipeline's own
        static ``_unpack_latents``. Tokens after the image's own are ignored."""
        factor = self.pipe.vae_scale_factor * 2
        tokens = latents[:, : (int(height) // factor) * (int(width) // factor)].contiguous()
        return self.pipe._unpack_latents(tokens, height, width, self.pipe.vae_scale_factor)

    def repack_latents(self, grid, height: int, width: int):
        """Inverse of :meth:`unpack_latents` (the pipeline's ``_pack_latents``)."""
        batch, channels, rows, cols = grid.shape
        return self.pipe._pack_latents(grid.contiguous(), batch, channels, rows, cols)

    def encode_images(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> ``(z - shift_factor) * scaling_factor`` (B, C, H/8, W/8), as
        :meth:`encode_image` but with the posterior's mode (deterministic) instead of a sample."""
        vae = self.pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    # -- ControlNet residuals (carrier "residual"; see carriers/residual.py) --------------------------
    controlnet_classes = ("FluxControlNetModel",)
    residual_options = frozenset({"control_mode"})

    def residual_slots(self) -> dict:
        from ..carriers.residual import ResidualSlots

        denoiser = self.denoiser
        return {
            "double": ResidualSlots(len(denoiser.transformer_blocks)),
            "single": ResidualSlots(len(denoiser.single_transformer_blocks)),
        }

    def residual_index(self, group: str, block: int, count: int, repeat: bool) -> int:
        """FluxTransformer2DModel: ``block // ceil(blocks / count)``; XLabs ControlNets repeat (double)."""
        from ..carriers.residual import interval_index

        if group == "double" and repeat:
            return block % count
        return interval_index(self.residual_slots()[group].blocks, count, block)

    def residual_shape(self, group: str, index: int, height, width) -> tuple:
        tokens = None if height is None else (int(height) // 16) * (int(width) // 16)
        return (tokens, self.denoiser.inner_dim)

    def residual_kwargs(self, residuals: dict, repeat: bool) -> dict:
        return {
            "controlnet_block_samples": residuals.get("double"),
            "controlnet_single_block_samples": residuals.get("single"),
            "controlnet_blocks_repeat": repeat,
        }

    def existing_residuals(self, inputs: dict):
        double, single = inputs.get("controlnet_block_samples"), inputs.get("controlnet_single_block_samples")
        if double is None and single is None:
            return None
        found = {g: list(r) for g, r in (("double", double), ("single", single)) if r is not None}
        return found, bool(inputs.get("controlnet_blocks_repeat", False))

    def check_controlnet(self, controlnet, entry) -> dict[str, int]:
        from ..errors import CacheError

        ours, theirs = self.denoiser.config, controlnet.config
        keys = ["num_attention_heads", "attention_head_dim", "joint_attention_dim", "pooled_projection_dim"]
        if controlnet.input_hint_block is None:
            keys += ["in_channels", "patch_size"]
        wrong = [f"{k} {theirs[k]} (transformer: {ours[k]})" for k in keys if theirs[k] != ours[k]]
        if wrong:
            raise CacheError("the ControlNet does not fit this FLUX.1 transformer: " + ", ".join(wrong))
        if controlnet.union and entry.control_mode is None:
            raise CacheError("a union ControlNet (num_mode set) needs control_mode")
        if not controlnet.union and entry.control_mode is not None:
            raise CacheError("control_mode is set but the ControlNet is not a union ControlNet")
        counts = {"double": theirs.num_layers, "single": theirs.num_single_layers}
        return {group: count for group, count in counts.items() if count}

    def control_shape(self, controlnet, height: int, width: int) -> tuple[int, ...]:
        if controlnet.input_hint_block is not None:  # XLabs: the image itself, 16-pixel multiples
            return (3, int(height) // 16 * 16, int(width) // 16 * 16)
        return ((int(height) // 16) * (int(width) // 16), controlnet.config.in_channels)

    def preprocess_control_image(self, image, *, height: int, width: int):
        """FluxControlNetPipeline.prepare_image's image processor step: pixels in [-1, 1], float32."""
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.pipe.vae_scale_factor * 2).preprocess(
            image, height=height, width=width
        )

    def prepare_control_image(
        self, image, *, controlnet, height: int, width: int, generator=None, batch_size: int = 1,
        do_classifier_free_guidance: bool = False, guess_mode: bool = False,
    ):
        """FluxControlNetPipeline: preprocess; for InstantX ControlNets VAE-encode (sampled with
        ``generator``), ``(x - shift) * scale`` and pack 2x2. CFG never doubles it (sequential CFG)."""
        import torch
        from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents

        pipe = self.pipe
        with torch.no_grad():
            if not isinstance(image, torch.Tensor):
                image = self.preprocess_control_image(image, height=height, width=width)
            image = image.repeat_interleave(batch_size if image.shape[0] == 1 else 1, dim=0)
            image = image.to(device=self.device, dtype=pipe.vae.dtype)
            if controlnet.input_hint_block is not None:
                return image
            latents = retrieve_latents(pipe.vae.encode(image), generator=generator)
            latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            batch, _, rows, cols = latents.shape
            channels = self.denoiser.config.in_channels // 4
            return pipe._pack_latents(latents, batch, channels, rows, cols)

    def controlnet_residuals(self, controlnet, control, scale: float, inputs: dict, entry, layout=None):
        """One FluxControlNetPipeline ControlNet call, on the transformer call's own inputs."""
        import torch

        from ..carriers.residual import fit_batch

        hidden = inputs["hidden_states"]
        guidance = None
        if controlnet.config.guidance_embeds:
            guidance = inputs.get("guidance")
            if guidance is None:  # the transformer has no guidance embedding: the pipeline's scale
                guidance = torch.tensor([self.pipe.guidance_scale], device=hidden.device)
                guidance = guidance.expand(hidden.shape[0])
        control = fit_batch(control, hidden.shape[0])
        mode = None
        if entry.control_mode is not None:
            mode = torch.tensor(entry.control_mode).to(hidden.device, dtype=torch.long)
            mode = mode.view(-1, 1).expand(control.shape[0], 1)
        double, single = controlnet(
            hidden_states=hidden,
            controlnet_cond=control,
            controlnet_mode=mode,
            conditioning_scale=scale,
            timestep=inputs["timestep"],
            guidance=guidance,
            pooled_projections=inputs.get("pooled_projections"),
            encoder_hidden_states=inputs.get("encoder_hidden_states"),
            txt_ids=inputs.get("txt_ids"),
            img_ids=inputs.get("img_ids"),
            joint_attention_kwargs=inputs.get("joint_attention_kwargs"),
            return_dict=False,
        )
        found = {g: list(r) for g, r in (("double", double), ("single", single)) if r is not None}
        return found, controlnet.input_hint_block is not None
