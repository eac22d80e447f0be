def test_target_changes_the_cache(tiny_pipeline):
    """An example of a template-specific test, using the kit's `tiny_pipeline` fixture."""
    pipe = TemplatePipeline(tiny_pipeline("{{ cookiecutter._backbones[0] }}"))
    (dark,) = pipe.encode({"template": TEMPLATE, "target": 0.2})
    (bright,) = pipe.encode({"template": TEMPLATE, "target": 0.8})
    assert not caches_equal(dark, bright)
    assert dark.terms[0].kind == "luminance" and abs(dark.terms[0].target[0] - 0.2) < 1e-6
