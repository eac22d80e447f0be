def test_scale_changes_the_cache(tiny_pipeline):
    """An example of a template-specific test, using the kit's `tiny_pipeline` fixture."""
    pipe = TemplatePipeline(tiny_pipeline("{{ (cookiecutter._carrier_backbones.get(cookiecutter.carrier) or cookiecutter._backbones)[0] }}"))
    (low,) = pipe.encode({"template": TEMPLATE, "scale": 0.5, "height": 64, "width": 64})
    (high,) = pipe.encode({"template": TEMPLATE, "scale": 1.5, "height": 64, "width": 64})
    assert not caches_equal(low, high)
    assert all(t.shape[:2] == (1, 16) for t in low.residuals.values())  # 64 x 64 pixels: 4 x 4 tokens
