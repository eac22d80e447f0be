    valid_inputs = [{"scale": 1.0}, {"scale": 0.0}, {"scale": 2.0}]
    invalid_inputs = [
        {"scale": 2.5},  # above the upper bound
        {"scale": -0.1},  # below the lower bound
        {"scale": "bright"},  # not a number
        {"strength": 1.0},  # not a field
    ]
