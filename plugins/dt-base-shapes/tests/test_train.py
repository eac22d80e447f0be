"""A smoke version of training: a few steps of a very small config run, save a loadable folder, and learn."""

from __future__ import annotations

import json

import torch
from diffusers import Flux2KleinPipeline

from dt_base_shapes.models import make_transformer
from dt_base_shapes.train import P, TrainConfig, flow_matching_loss, sample_t, train

SMOKE = TrainConfig(
    n_images=16,
    vae_steps=25,
    vae_full_steps=5,
    vae_batch=8,
    steps=40,
    batch=8,
    lr=3e-3,
    warmup=5,
    vae_overrides={"block_out_channels": (4, 8, 8), "norm_num_groups": 2},
    transformer_overrides={"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1},
    log_every=0,
)


def test_smoke_training_reduces_the_losses_and_saves_a_pipeline(tmp_path):
    record = train(tmp_path / "model", SMOKE, log=lambda _: None)
    vae_losses = record["vae_losses"]
    assert vae_losses[-1] < vae_losses[0]
    saved = json.loads((tmp_path / "model" / "training.json").read_text())
    assert saved["config"]["steps"] == SMOKE.steps

    pipe = Flux2KleinPipeline.from_pretrained(tmp_path / "model")
    # the flow-matching loss on a fixed batch: the trained (EMA) transformer beats its initialisation
    latents = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    from dt_base_shapes.data import ShapesDataset
    from dt_base_shapes.train import encode_latents, normalize_latents, prompt_embeds, to_tensor

    images, captions = ShapesDataset(SMOKE.n_images, seed=SMOKE.seed).arrays()
    latents = normalize_latents(pipe.vae, encode_latents(pipe.vae, to_tensor(images[:8])))
    x0 = P._pack_latents(latents)
    text = prompt_embeds(pipe.text_encoder, pipe.tokenizer, captions[:8])
    gen = torch.Generator().manual_seed(1)
    noise, t = torch.randn(x0.shape, generator=gen), sample_t(8, gen)
    img_ids, txt_ids = P._prepare_latent_ids(latents), P._prepare_text_ids(text)
    init = make_transformer(SMOKE.seed, **SMOKE.transformer_overrides).eval()
    with torch.no_grad():
        before = flow_matching_loss(init, x0, text, t, noise, img_ids, txt_ids)
        after = flow_matching_loss(pipe.transformer, x0, text, t, noise, img_ids, txt_ids)
    assert after < 0.8 * before
