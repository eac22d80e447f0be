    valid_inputs = [{"target": 0.7, "strength": 1.0}, {"target": 0.0, "strength": 0.5}, {"target": 1.0}]
    invalid_inputs = [
        {"target": 1.5},  # above the upper bound
        {"target": -0.1},  # below the lower bound
        {"target": "bright"},  # not a number
        {"strength": 2.5},  # above the upper bound
        {"scale": -1.0},  # below the lower bound
        {"colour": 1.0},  # not a field
    ]
