    # The tiny test pipelines generate 64 x 64 images.
    valid_inputs = [{"scale": 1.0, "height": 64, "width": 64}, {"scale": 0.0, "height": 64, "width": 64},
                    {"scale": 2.0}]
    invalid_inputs = [
        {"scale": 2.5},  # above the upper bound
        {"scale": -0.1},  # below the lower bound
        {"height": 40},  # not a multiple of 16
        {"width": 0},  # below the lower bound
        {"strength": 1.0},  # not a field
    ]
