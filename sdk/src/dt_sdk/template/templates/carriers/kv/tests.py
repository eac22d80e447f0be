def test_scale_changes_the_cache(tiny_pipeline):
    """An example of a template-specific test, using the kit's `tiny_pipeline` fixture."""
    pipe = TemplatePipeline(tiny_pipeline("{{ cookiecutter._backbones[0] }}"))
    (low,) = pipe.encode({"template": TEMPLATE, "scale": 0.5})
    (high,) = pipe.encode({"template": TEMPLATE, "scale": 1.5})
    assert not caches_equal(low, high)
