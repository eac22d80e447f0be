"""The backbone's own training objective, one class per backbone adapter name.

An objective turns one data row into the tensors the denoiser takes (stage 1, no gradient) and
computes the loss of a batch from them, given noise and timesteps drawn by the caller. Add a family
by subclassing :class:`Objective` and registering it in :data:`OBJECTIVES` under its adapter name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .config import TrainError


class Objective:
    family: ClassVar[str]

    def __init__(self, pipe: Any, adapter: Any, call_kwargs: dict[str, Any]):
        self.pipe, self.adapter, self.call_kwargs = pipe, adapter, call_kwargs

    def encode_image(self, image: Any, size: int | None) -> dict[str, torch.Tensor]:
        """One PIL image -> tensors with a leading batch dim of 1 (``x0`` and whatever goes with it)."""
        raise NotImplementedError

    def encode_caption(self, caption: str) -> dict[str, torch.Tensor]:
        """One caption -> tensors with a leading batch dim of 1 (``text`` and whatever goes with it)."""
        raise NotImplementedError

    def draw(self, x0: torch.Tensor, generator: torch.Generator, schedule: str) -> dict[str, torch.Tensor]:
        """The random part of a step (noise, timesteps), on the CPU from ``generator``."""
        raise NotImplementedError

    def loss(self, denoiser: torch.nn.Module, batch: dict[str, torch.Tensor], draw: dict[str, torch.Tensor]):
        raise NotImplementedError


def sample_timesteps(n: int, generator: torch.Generator, schedule: str) -> torch.Tensor:
    """``t`` in (0, 1): logit-normal(0, 1) (SD3's and diffusers' flow-matching default) or uniform."""
    if schedule == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        t = torch.sigmoid(torch.randn(n, generator=generator))
    return t.clamp(1e-4, 1.0)


class Flux2FlowMatching(Objective):
    """FLUX.2 rectified flow, exactly what ``Flux2KleinPipeline.__call__`` integrates.

    Latents are the pipeline's ``_encode_vae_image`` (VAE mode, 2x2 patchified, normalised with the
    VAE's batch-norm statistics), packed to tokens with ``_prepare_latent_ids`` positions; captions
    go through ``encode_prompt`` with the base model's ``max_sequence_length`` and
    ``text_encoder_out_layers``. ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, and the
    transformer gets ``t`` itself: the pipeline passes ``scheduler timestep / 1000 = sigma``.
    """

    family = "flux2"

    def encode_image(self, image: Any, size: int | None) -> dict[str, torch.Tensor]:
        from diffusion_templates.imaging import preprocess_image, to_image_tensor

        pixels = to_image_tensor(image)
        multiple = self.adapter.size_multiple()
        height, width = (size, size) if size else pixels.shape[-2:]
        height, width = int(height) // multiple * multiple, int(width) // multiple * multiple
        if not height or not width:
            raise TrainError(f"image of size {tuple(pixels.shape[-2:])} is smaller than {multiple} pixels")
        pixels = preprocess_image(self.pipe, self.adapter, pixels, height, width)
        vae = self.pipe.vae
        grid = self.adapter.encode_image(pixels.to(vae.device, vae.dtype), None)  # (1, 4C, h, w)
        return {
            "x0": self.pipe._pack_latents(grid),  # (1, h*w, 4C)
            "img_ids": self.pipe._prepare_latent_ids(grid).to(grid.device),
        }

    def encode_caption(self, caption: str) -> dict[str, torch.Tensor]:
        from diffusion_templates.imaging import call_argument

        layers = call_argument(self.pipe, self.call_kwargs, "text_encoder_out_layers")
        length = call_argument(self.pipe, self.call_kwargs, "max_sequence_length")
        try:
            text, text_ids = self.pipe.encode_prompt(
                prompt=[caption],
                device=self.pipe._execution_device,
                max_sequence_length=length,
                text_encoder_out_layers=layers,
            )
        except (IndexError, ValueError, RuntimeError) as exc:
            # Typically a small text encoder with fewer layers than the pipeline's default picks.
            raise TrainError(
                f"encoding the caption {caption!r} with the base model failed ({type(exc).__name__}: {exc}) "
                f"using text_encoder_out_layers={tuple(layers)}, max_sequence_length={length}; pass the "
                "base model's own settings with --call-kwargs (TrainConfig.call_kwargs), e.g. "
                '\'{"text_encoder_out_layers": [1, 2], "max_sequence_length": 32}\''
            ) from exc
        return {"text": text, "txt_ids": text_ids}

    def draw(self, x0: torch.Tensor, generator: torch.Generator, schedule: str) -> dict[str, torch.Tensor]:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        return {"noise": noise, "t": sample_timesteps(x0.shape[0], generator, schedule)}

    def loss(self, denoiser: torch.nn.Module, batch: dict[str, torch.Tensor], draw: dict[str, torch.Tensor]):
        dtype, device = denoiser.dtype, denoiser.device
        x0 = batch["x0"].to(device, torch.float32)
        noise, t = draw["noise"].to(device), draw["t"].to(device)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = denoiser(
            hidden_states=xt.to(dtype),
            encoder_hidden_states=batch["text"].to(device, dtype),
            timestep=t.to(dtype),
            img_ids=batch["img_ids"].to(device),
            txt_ids=batch["txt_ids"].to(device),
            guidance=None,
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), noise - x0)


OBJECTIVES: dict[str, type[Objective]] = {"flux2": Flux2FlowMatching}


def objective_for(pipe: Any, adapter: Any, call_kwargs: dict[str, Any]) -> Objective:
    cls = OBJECTIVES.get(adapter.name)
    if cls is None:
        raise TrainError(
            f"training on backbone {adapter.name!r} is not supported yet; supported: {sorted(OBJECTIVES)} "
            "(add a dt_sdk.train.objectives.Objective for it)"
        )
    return cls(pipe, adapter, call_kwargs)
