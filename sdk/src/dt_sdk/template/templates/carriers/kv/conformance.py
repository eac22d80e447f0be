    valid_inputs = [{"scale": 1.0, "tokens": 4}, {"scale": 0.0, "tokens": 1}, {"scale": 2.0}]
    invalid_inputs = [
        {"scale": 2.5},  # above the upper bound
        {"scale": -0.1},  # below the lower bound
        {"scale": "bright"},  # not a number
        {"tokens": 0},  # at least one token
        {"tokens": 1.5},  # not an integer
        {"strength": 1.0},  # not a field
    ]
