def test_text_and_mode_change_the_cache(tiny_pipeline):
    """An example of a template-specific test, using the kit's `tiny_pipeline` fixture."""
    tiny = {"max_sequence_length": 32, "text_encoder_out_layers": [1, 2]}
    pipe = TemplatePipeline(tiny_pipeline("{{ cookiecutter._backbones[0] }}"))
    (glow,) = pipe.encode({"template": TEMPLATE, "text": "a golden glow", **tiny})
    (rain,) = pipe.encode({"template": TEMPLATE, "text": "heavy rain", **tiny})
    (added,) = pipe.encode({"template": TEMPLATE, "text": "a golden glow", "mode": "add", **tiny})
    assert not caches_equal(glow, rain)
    assert glow.tokens is not None and glow.delta is None
    assert added.delta is not None and added.delta.shape[1] == 1 and added.tokens is None
