"""Qwen-Image (``QwenImageTransformer2DModel``): QwenImagePipeline and variants.

Layers: ``double_<i>`` for ``transformer_blocks[i].attn`` (joint text+image attention through
``dispatch_attention_fn``, with a text padding mask). Real CFG (``true_cfg_scale > 1`` with a
negative prompt) runs the branches under ``transformer.cache_context("cond"/"uncond")``.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, legacy_attention


class QwenImageAdapter(BackboneAdapter):
    name = "qwen_image"
    denoiser_classes = ("QwenImageTransformer2DModel",)
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                        "QwenImageControlNetPipeline")
    cfg_style = "sequential"
    carriers = frozenset({"kv", "lora", "embedding", "latent_mask", "init_latents", "guidance", "residual"})

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        return {f"double_{i}": legacy_attention(f"double_{i}", f"transformer_blocks.{i}.attn", block.attn)
                for i, block in enumerate(denoiser.transformer_blocks)}

    # -- prompt embeddings (carrier "embedding") ------------------------------------------------------
    cfg_requirement = "true_cfg_scale > 1 and a negative_prompt (real CFG)"

    def unsupported_reason(self, carrier: str) -> str | None:
        """Why ``carrier`` cannot drive this pipeline instance (None when it can)."""
        name = type(self.pipe).__name__
        if carrier in ("latent_mask", "init_latents") and name != "QwenImagePipeline":
            return (
                f"{carrier} drives QwenImagePipeline (text-to-image); {name} prepares its own starting "
                "latents"
            )
        return None

    def text_embedding_dims(self) -> tuple[int, int | None]:
        return self.pipe.transformer.config.joint_attention_dim, None

    def max_prompt_tokens(self, kwargs) -> int | None:
        """QwenImagePipeline cuts given prompt embeddings to ``max_sequence_length`` tokens."""
        from ..imaging import call_argument

        return call_argument(self.pipe, kwargs, "max_sequence_length")

    def cfg_active(self, kwargs) -> bool:
        from ..imaging import call_argument

        has_negative = (
            kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None
        )
        return (call_argument(self.pipe, kwargs, "true_cfg_scale") or 1.0) > 1 and has_negative

    def encode_prompt_embeddings(self, kwargs, cfg: bool) -> dict:
        from ..imaging import call_argument

        pipe = self.pipe
        common = dict(
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=call_argument(pipe, kwargs, "max_sequence_length"),
        )

        def encode(prefix: str) -> dict:
            tokens, mask = pipe.encode_prompt(
                prompt=kwargs.get(f"{prefix}prompt"),
                prompt_embeds=kwargs.get(f"{prefix}prompt_embeds"),
                prompt_embeds_mask=kwargs.get(f"{prefix}prompt_embeds_mask"),
                **common,
            )
            return {"tokens": tokens, "pooled": None, "mask": mask}

        return {"cond": encode(""), "uncond": encode("negative_") if cfg else None}

    def prompt_embedding_kwargs(self, kwargs, embeds: dict) -> dict:
        import torch

        def with_mask(entry: dict) -> tuple:
            tokens, mask = entry["tokens"], entry["mask"]
            if mask is None:  # encode_prompt drops an all-ones mask; the pipeline warns without one
                mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
            return tokens, mask

        out = {k: v for k, v in kwargs.items() if k != "prompt"}
        out["prompt_embeds"], out["prompt_embeds_mask"] = with_mask(embeds["cond"])
        if embeds.get("uncond") is not None:
            out.pop("negative_prompt", None)
            out["negative_prompt_embeds"], out["negative_prompt_embeds_mask"] = with_mask(embeds["uncond"])
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

        # QwenImageInpaintPipeline's mask processor.
        return VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor * 2,
            vae_latent_channels=self.pipe.vae.config.z_dim,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def encode_image(self, image, generator):
        """(B, 1, C, H/8, W/8): sampled with ``generator``, ``(x - latents_mean) / latents_std``."""
        from diffusers import QwenImageImg2ImgPipeline

        latents = QwenImageImg2ImgPipeline._encode_vae_image(
            self.pipe, image=image.unsqueeze(2), generator=generator
        )
        return latents.transpose(1, 2)

    def image_latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, 1, self.pipe.transformer.config.in_channels // 4, *self.latent_grid(height, width))

    def pack_latents(self, latents):
        batch, _, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def call_latents(self, latents, scheduler=None):
        return self.pack_latents(latents)

    def noise_from_call(self, latents, height: int, width: int):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor).transpose(1, 2)

    def mask_latents(self, mask, height: int, width: int):
        """QwenImageInpaintPipeline.prepare_mask_latents: nearest resize, packed per channel."""
        import torch.nn.functional as F

        rows, cols = self.latent_grid(height, width)
        mask = F.interpolate(mask, size=(rows, cols))
        channels = self.pipe.transformer.config.in_channels // 4
        return self.pipe._pack_latents(mask.repeat(1, channels, 1, 1), mask.shape[0], channels, rows, cols)

    def add_noise(self, scheduler, sample, noise, timestep):
        return scheduler.scale_noise(sample, timestep, noise)

    def img2img_schedule(self, kwargs, strength: float, height: int, width: int, batch: int):
        """QwenImageImg2ImgPipeline's schedule: linspace sigmas shifted by ``mu``, from t_start on."""
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

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
        """Loop-form latents (B, h/2*w/2, 4C) -> the normalised latent grid (B, C, h, w): the pipeline's own
        static ``_unpack_latents`` without the frame axis. Tokens after the image's own are ignored."""
        factor = self.pipe.vae_scale_factor * 2
        tokens = latents[:, : (int(height) // factor) * (int(width) // factor)].contiguous()
        return self.pipe._unpack_latents(tokens, height, width, self.pipe.vae_scale_factor)[:, :, 0]

    def repack_latents(self, grid, height: int, width: int):
        """Inverse of :meth:`unpack_latents` (the pipeline's ``_pack_latents``)."""
        batch, channels, rows, cols = grid.shape
        return self.pipe._pack_latents(grid.contiguous(), batch, channels, rows, cols)

    def encode_images(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> ``(z - latents_mean) / latents_std`` (B, C, H/8, W/8), as
        :meth:`encode_image` but with the posterior's mode (deterministic) and no frame axis."""
        vae = self.pipe.vae
        latents = vae.encode(images[:, :, None].to(vae.device, vae.dtype)).latent_dist.mode()[:, :, 0]
        mean = latents.new_tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = latents.new_tensor(vae.config.latents_std).view(1, -1, 1, 1)
        return (latents - mean) / std

    # -- ControlNet residuals (carrier "residual"; see carriers/residual.py) --------------------------
    controlnet_classes = ("QwenImageControlNetModel",)
    residual_options = frozenset()

    def residual_slots(self) -> dict:
        from ..carriers.residual import ResidualSlots

        return {"double": ResidualSlots(len(self.denoiser.transformer_blocks))}

    def residual_index(self, group: str, block: int, count: int, repeat: bool) -> int:
        """QwenImageTransformer2DModel: ``block // ceil(blocks / count)``."""
        from ..carriers.residual import interval_index

        return interval_index(len(self.denoiser.transformer_blocks), count, block)

    def residual_shape(self, group: str, index: int, height, width) -> tuple:
        tokens = None if height is None else (int(height) // 16) * (int(width) // 16)
        return (tokens, self.denoiser.inner_dim)

    def residual_kwargs(self, residuals: dict, repeat: bool) -> dict:
        return {"controlnet_block_samples": residuals.get("double")}

    def existing_residuals(self, inputs: dict):
        found = inputs.get("controlnet_block_samples")
        return None if found is None else ({"double": list(found)}, False)

    def check_controlnet(self, controlnet, entry) -> dict[str, int]:
        from ..errors import CacheError

        ours, theirs = self.denoiser.config, controlnet.config
        keys = ["num_attention_heads", "attention_head_dim", "joint_attention_dim", "in_channels"]
        keys.append("patch_size")
        wrong = [f"{k} {theirs[k]} (transformer: {ours[k]})" for k in keys if theirs[k] != ours[k]]
        if wrong:
            raise CacheError("the ControlNet does not fit this Qwen-Image transformer: " + ", ".join(wrong))
        return {"double": theirs.num_layers}

    def control_shape(self, controlnet, height: int, width: int) -> tuple[int, ...]:
        config = controlnet.config
        channels = config.in_channels + config.extra_condition_channels
        return ((int(height) // 16) * (int(width) // 16), channels)

    def preprocess_control_image(self, image, *, height: int, width: int):
        """QwenImageControlNetPipeline.prepare_image's image processor step: [-1, 1], float32."""
        from diffusers.image_processor import VaeImageProcessor

        factor = 2 ** len(self.pipe.vae.temperal_downsample) * 2
        return VaeImageProcessor(vae_scale_factor=factor).preprocess(image, height=height, width=width)

    def prepare_control_image(
        self, image, *, controlnet, height: int, width: int, generator=None, batch_size: int = 1,
        do_classifier_free_guidance: bool = False, guess_mode: bool = False,
    ):
        """QwenImageControlNetPipeline: preprocess, VAE-encode as one frame (sampled with
        ``generator``), normalise with latents_mean/std, pack 2x2. Never doubled for CFG."""
        import torch
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet import retrieve_latents

        pipe, vae = self.pipe, self.pipe.vae
        with torch.no_grad():
            if not isinstance(image, torch.Tensor):
                image = self.preprocess_control_image(image, height=height, width=width)
            image = image.repeat_interleave(batch_size if image.shape[0] == 1 else 1, dim=0)
            image = image.to(device=self.device, dtype=vae.dtype)
            if image.ndim == 4:
                image = image.unsqueeze(2)
            shape = (1, vae.config.z_dim, 1, 1, 1)
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(self.device)
            std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(self.device)
            latents = (retrieve_latents(vae.encode(image), generator=generator) - mean) * std
            latents = latents.permute(0, 2, 1, 3, 4)
            packed = pipe._pack_latents(
                latents,
                batch_size=latents.shape[0],
                num_channels_latents=self.denoiser.config.in_channels // 4,
                height=latents.shape[3],
                width=latents.shape[4],
            )
            return packed.to(dtype=self.dtype, device=self.device)

    def controlnet_residuals(self, controlnet, control, scale: float, inputs: dict, entry, layout=None):
        """One QwenImageControlNetPipeline ControlNet call, on the transformer call's own inputs."""
        from ..carriers.residual import fit_batch

        hidden = inputs["hidden_states"]
        samples = controlnet(
            hidden_states=hidden,
            controlnet_cond=fit_batch(control, hidden.shape[0]),
            conditioning_scale=scale,
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_hidden_states_mask=inputs.get("encoder_hidden_states_mask"),
            img_shapes=inputs.get("img_shapes"),
            return_dict=False,
        )
        return ({"double": list(samples)} if samples is not None else {}), False
