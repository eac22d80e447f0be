    # The tiny test pipelines encode text with 2 text-encoder layers and 32 tokens (FLUX.2 reads
    # text_encoder_out_layers, the others ignore it); real pipelines need neither.
    TINY = {"max_sequence_length": 32, "text_encoder_out_layers": [1, 2]}
    valid_inputs = [
        {"text": "a golden glow", "mode": "append", **TINY},
        {"text": "a golden glow", "mode": "add", "scale": 0.5, **TINY},
        {"text": "blue", "scale": 2.0},
    ]
    invalid_inputs = [
        {"text": ""},  # empty
        {"text": 3},  # not a string
        {"mode": "replace"},  # not a mode
        {"scale": 2.5},  # above the upper bound
        {"scale": -0.1},  # below the lower bound
        {"text_encoder_out_layers": []},  # at least one layer
        {"strength": 1.0},  # not a field
    ]
