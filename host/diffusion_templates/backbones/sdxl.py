"""Stable Diffusion XL (``UNet2DConditionModel``): StableDiffusionXLPipeline and variants.

Layers: every ``attn1`` (self-attention) and ``attn2`` (cross-attention to the text) of the
UNet's transformer blocks, named by their module path with ``_`` for ``.``, e.g.
``down_blocks_1_attentions_0_transformer_blocks_0_attn1``. The processors call
``F.scaled_dot_product_attention`` directly. CFG is batched: ``[uncond, cond]`` in one call.
"""

from __future__ import annotations

from .base import AttentionLayer, BackboneAdapter, legacy_attention


class SDXLAdapter(BackboneAdapter):
    name = "sdxl"
    denoiser_attr = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline")
    cfg_style = "batched"
    carriers = frozenset({"kv", "lora", "embedding", "latent_mask", "init_latents", "guidance", "residual"})
    lora_prefix = "unet"

    @classmethod
    def matches(cls, pipe) -> bool:
        # SD 1.x/2.x pipelines share the UNet class; SDXL is told apart by its second text encoder.
        return super().matches(pipe) and hasattr(pipe, "text_encoder_2")

    def attention_layers_of(self, denoiser) -> dict[str, AttentionLayer]:
        layers = {}
        for path, module in denoiser.named_modules():
            if path.endswith((".attn1", ".attn2")) and ".transformer_blocks." in path:
                name = path.replace(".", "_")
                layers[name] = legacy_attention(name, path, module)
        return layers

    # -- prompt embeddings (carrier "embedding") ------------------------------------------------------
    cfg_requirement = "guidance_scale > 1 (and a UNet without time_cond_proj_dim)"
    cfg_equal_lengths = True  # batched CFG: both halves of one batch
    strength_rounds_down = True  # StableDiffusionXLImg2ImgPipeline runs int(steps * strength) steps

    def unsupported_reason(self, carrier: str) -> str | None:
        """Why ``carrier`` cannot drive this pipeline instance (None when it can)."""
        name = type(self.pipe).__name__
        if carrier in ("latent_mask", "init_latents") and name != "StableDiffusionXLPipeline":
            return (
                f"{carrier} drives StableDiffusionXLPipeline (text-to-image); {name} prepares its own "
                "starting latents"
            )
        return None

    def text_embedding_dims(self) -> tuple[int, int | None]:
        encoder_2 = getattr(self.pipe, "text_encoder_2", None)
        pooled = encoder_2.config.projection_dim if encoder_2 is not None else None
        return self.pipe.unet.config.cross_attention_dim, pooled

    def cfg_active(self, kwargs) -> bool:
        from ..imaging import call_argument

        guidance = call_argument(self.pipe, kwargs, "guidance_scale")
        return guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    def encode_prompt_embeddings(self, kwargs, cfg: bool) -> dict:
        pipe = self.pipe
        names = (
            *("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds"),
            *("negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        )
        cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
            **{name: kwargs.get(name) for name in names},
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            lora_scale=(kwargs.get("cross_attention_kwargs") or {}).get("scale"),
            clip_skip=kwargs.get("clip_skip"),
        )
        return {
            "cond": {"tokens": cond, "pooled": pooled, "mask": None},
            "uncond": {"tokens": uncond, "pooled": negative_pooled, "mask": None} if cfg else None,
        }

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
        return self.pipe.vae_scale_factor

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        return int(height) // self.pipe.vae_scale_factor, int(width) // self.pipe.vae_scale_factor

    def image_processor(self):
        return self.pipe.image_processor

    def mask_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        # StableDiffusionXLInpaintPipeline's mask processor.
        return VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    def encode_image(self, image, generator):
        """(B, 4, H/8, W/8) as StableDiffusionXLImg2ImgPipeline: sampled with ``generator``, then
        ``(x - latents_mean) * scaling_factor / latents_std`` or ``scaling_factor * x``.

        With ``force_upcast`` and a half-precision VAE, diffusers casts the VAE to float32 for the
        encode and back; here a float32 copy of the encoder does it, so no weight is ever written.
        """
        import torch
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img

        vae = self.pipe.vae
        dtype = image.dtype
        if vae.config.force_upcast and vae.dtype in (torch.float16, torch.bfloat16):
            vae = self._float32_encoder(vae)
        source = image.to(vae.dtype)
        if isinstance(generator, list):
            latents = torch.cat(
                [
                    img2img.retrieve_latents(vae.encode(source[i : i + 1]), generator=generator[i])
                    for i in range(source.shape[0])
                ]
            )
        else:
            latents = img2img.retrieve_latents(vae.encode(source), generator=generator)
        latents = latents.to(dtype)
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents)
            return (latents - mean) * config.scaling_factor / std
        return config.scaling_factor * latents

    @staticmethod
    def _float32_encoder(vae):
        """A float32 stand-in for ``vae.encode`` sharing nothing writable with ``vae``: copies of its
        encoder and quant_conv (the decoder is not copied)."""
        import copy

        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        encoder = copy.deepcopy(vae.encoder).float()
        quant_conv = copy.deepcopy(vae.quant_conv).float() if vae.quant_conv is not None else None

        class _Encoder:
            dtype = torch.float32
            config = vae.config

            @staticmethod
            def encode(x):
                moments = encoder(x)
                moments = quant_conv(moments) if quant_conv is not None else moments
                return type("Output", (), {"latent_dist": DiagonalGaussianDistribution(moments)})()

        return _Encoder

    def image_latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.pipe.unet.config.in_channels, *self.latent_grid(height, width))

    def pack_latents(self, latents):
        return latents

    def call_latents(self, latents, scheduler=None):
        # The pipeline multiplies given latents by the scheduler's init_noise_sigma: unit noise goes in
        # as it is, noised image latents divided by the init_noise_sigma of the schedule it will run.
        return latents if scheduler is None else latents / scheduler.init_noise_sigma

    def noise_from_call(self, latents, height: int, width: int):
        return latents

    def mask_latents(self, mask, height: int, width: int):
        """StableDiffusionXLInpaintPipeline.prepare_mask_latents: nearest resize to the latent grid."""
        import torch.nn.functional as F

        return F.interpolate(mask, size=self.latent_grid(height, width))

    def add_noise(self, scheduler, sample, noise, timestep):
        return scheduler.add_noise(sample, noise, timestep)

    def img2img_schedule(self, kwargs, strength: float, height: int, width: int, batch: int):
        """StableDiffusionXLImg2ImgPipeline's schedule (``int(n * strength)`` steps), as ``timesteps``.

        The tail of the full schedule is passed as custom timesteps; that is exact when the scheduler
        derives each sigma from its timestep alone, which is checked (Euler-type "linear" interpolation).
        """
        import copy

        import torch

        from ..errors import UnsupportedError
        from ..imaging import Schedule, call_argument, strength_start

        pipe = self.pipe
        if kwargs.get("sigmas") is not None or kwargs.get("denoising_end") is not None:
            raise UnsupportedError("sdxl: init_latents does not combine with custom sigmas or denoising_end")
        if not hasattr(pipe.scheduler, "add_noise") or not hasattr(pipe.scheduler, "set_begin_index"):
            raise UnsupportedError(
                f"sdxl: init_latents cannot noise latents with {type(pipe.scheduler).__name__}"
            )
        device = pipe._execution_device
        full = copy.deepcopy(pipe.scheduler)
        timesteps = kwargs.get("timesteps")
        if timesteps is not None:
            full.set_timesteps(timesteps=timesteps, device=device)
        else:
            full.set_timesteps(call_argument(pipe, kwargs, "num_inference_steps"), device=device)
        steps = len(full.timesteps) // full.order
        t_start = strength_start(steps, strength, integer=True) * full.order
        tail = full.timesteps[t_start:]
        if len(tail) < 1:
            raise ValueError("no denoising step left")
        private = copy.deepcopy(pipe.scheduler)
        try:
            private.set_timesteps(timesteps=tail.tolist(), device=device)
        except ValueError as exc:
            raise UnsupportedError(f"sdxl: init_latents needs custom timesteps: {exc}") from None
        if not torch.equal(private.sigmas.cpu(), full.sigmas[t_start:].cpu()):
            raise UnsupportedError(
                f"sdxl: {type(pipe.scheduler).__name__} derives sigmas from the whole schedule, so the "
                "img2img tail cannot be passed as timesteps exactly"
            )
        private.set_begin_index(0)
        return Schedule({"timesteps": tail.tolist()}, private, tail[:1].repeat(batch), len(tail))

    # -- latent space for the latent -> RGB map and the guidance carrier (latent_rgb.py) -------------
    def unpack_latents(self, latents, height: int, width: int):
        """SDXL steps on the latent grid (B, C, h, w) itself."""
        return latents

    def repack_latents(self, grid, height: int, width: int):
        return grid

    def encode_images(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8), as :meth:`encode_image` but
        with the posterior's mode (deterministic) instead of a sample."""
        vae = self.pipe.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = latents.new_tensor(mean).view(1, -1, 1, 1)
            std = latents.new_tensor(std).view(1, -1, 1, 1)
            return (latents - mean) * config.scaling_factor / std
        return latents * config.scaling_factor

    # -- ControlNet residuals (carrier "residual"; see carriers/residual.py) --------------------------
    controlnet_classes = ("ControlNetModel",)
    residual_options = frozenset({"guess_mode"})

    def _down_residual_layout(self) -> list[tuple[int, int]]:
        """(channels, downscale) of each UNet down-block output a ControlNet residual is added to."""
        unet = self.denoiser
        layout, scale = [(unet.conv_in.out_channels, 1)], 1
        for block in unet.down_blocks:
            layout += [(resnet.out_channels, scale) for resnet in block.resnets]
            if block.downsamplers:
                scale *= 2
                layout.append((block.downsamplers[0].out_channels, scale))
        return layout

    def residual_slots(self) -> dict:
        from ..carriers.residual import ResidualSlots

        count = len(self._down_residual_layout())
        return {"down": ResidualSlots(count, exact=True, required=True), "mid": ResidualSlots(1, True, True)}

    def residual_index(self, group: str, block: int, count: int, repeat: bool) -> int:
        return block  # UNet2DConditionModel: one residual per down-block output, one for the mid block

    def residual_shape(self, group: str, index: int, height, width) -> tuple:
        layout = self._down_residual_layout()
        if group == "down":
            channels, scale = layout[index]
        else:
            channels, scale = self.denoiser.config.block_out_channels[-1], layout[-1][1]
        if height is None:
            return (channels, None, None)
        latent = self.pipe.vae_scale_factor
        return (channels, -(-(int(height) // latent) // scale), -(-(int(width) // latent) // scale))

    def residual_kwargs(self, residuals: dict, repeat: bool) -> dict:
        return {
            "down_block_additional_residuals": residuals.get("down"),
            "mid_block_additional_residual": residuals["mid"][0] if residuals.get("mid") else None,
        }

    def existing_residuals(self, inputs: dict):
        down, mid = inputs.get("down_block_additional_residuals"), inputs.get("mid_block_additional_residual")
        if down is None or mid is None:
            return None
        return {"down": list(down), "mid": [mid]}, False

    def check_controlnet(self, controlnet, entry) -> dict[str, int]:
        from ..errors import CacheError

        ours, theirs = self.denoiser.config, controlnet.config
        keys = ["in_channels", "cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim"]
        wrong = [f"{k} {theirs[k]} (UNet: {ours[k]})" for k in keys if theirs[k] != ours[k]]
        channels = [block.out_channels for block in controlnet.controlnet_down_blocks]
        expected = [c for c, _ in self._down_residual_layout()]
        if channels != expected:
            wrong.append(f"down residual channels {channels} (UNet: {expected})")
        if wrong:
            raise CacheError("the ControlNet does not fit this SDXL UNet: " + ", ".join(wrong))
        return {"down": len(channels), "mid": 1}

    def control_shape(self, controlnet, height: int, width: int) -> tuple[int, ...]:
        factor = self.pipe.vae_scale_factor
        return (controlnet.config.conditioning_channels, int(height) // factor * factor,
                int(width) // factor * factor)

    def preprocess_control_image(self, image, *, height: int, width: int):
        """StableDiffusionXLControlNetPipeline.prepare_image's image processor step: RGB in [0, 1]."""
        import torch
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        return processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)

    def prepare_control_image(
        self, image, *, controlnet, height: int, width: int, generator=None, batch_size: int = 1,
        do_classifier_free_guidance: bool = False, guess_mode: bool = False,
    ):
        """StableDiffusionXLControlNetPipeline.prepare_image: RGB in [0, 1] at the call's size (no VAE).
        The carrier repeats a batch of 1 over the CFG batch itself, so leave CFG off here."""
        import torch

        if not isinstance(image, torch.Tensor):
            image = self.preprocess_control_image(image, height=height, width=width)
        image = image.repeat_interleave(batch_size if image.shape[0] == 1 else 1, dim=0)
        image = image.to(device=self.device, dtype=controlnet.dtype)
        if do_classifier_free_guidance and not guess_mode:
            image = torch.cat([image] * 2)
        return image

    def controlnet_residuals(self, controlnet, control, scale: float, inputs: dict, entry, layout=None):
        """One StableDiffusionXLControlNetPipeline ControlNet call on the UNet's (CFG-doubled) inputs;
        in guess mode, when the call's ``layout`` splits it between branches, only the conditional
        rows (the other rows get zeros)."""
        import torch

        from ..carriers.residual import fit_batch

        sample, text = inputs["sample"], inputs["encoder_hidden_states"]
        control = fit_batch(control, sample.shape[0])
        added = inputs.get("added_cond_kwargs") or {}
        added = {k: v for k, v in added.items() if k in ("text_embeds", "time_ids")}
        guess = entry.guess_mode or controlnet.config.global_pool_conditions
        rows = layout.rows_of("cond") if guess and layout is not None and layout.whole is None else None
        timestep = inputs["timestep"]
        if rows is not None:
            sample, text, control = sample[rows], text[rows], control[rows]
            added = {k: v[rows] for k, v in added.items()}
            if isinstance(timestep, torch.Tensor) and timestep.ndim and timestep.shape[0] == layout.batch:
                timestep = timestep[rows]
        down, mid = controlnet(
            sample,
            timestep,
            encoder_hidden_states=text,
            controlnet_cond=control,
            conditioning_scale=scale,
            guess_mode=guess,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if rows is not None:
            down = [_in_rows(d, rows, layout.batch) for d in down]
            mid = _in_rows(mid, rows, layout.batch)
        return {"down": list(down), "mid": [mid]}, False


def _in_rows(tensor, rows: slice, batch: int):
    """``tensor`` (the conditional rows) placed at ``rows`` of a zero tensor of ``batch`` rows."""
    import torch

    out = torch.zeros((batch, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    out[rows] = tensor
    return out
