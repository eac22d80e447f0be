def test_mask_reaches_the_cache(tiny_pipeline):
    """An example of a template-specific test, using the kit's `tiny_pipeline` fixture."""
    pipe = TemplatePipeline(tiny_pipeline("{{ cookiecutter._backbones[0] }}"))
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    centre, left = torch.zeros(64, 64), torch.zeros(64, 64)
    centre[16:48, 16:48] = 1.0
    left[:, :32] = 1.0
    (a,) = pipe.encode({"template": TEMPLATE, "image": image, "mask": centre})
    (b,) = pipe.encode({"template": TEMPLATE, "image": image, "mask": left})
    assert not caches_equal(a, b)
    assert a.mask.shape == (1, 1, 64, 64) and a.image.shape == (1, 3, 64, 64)
