    IMAGE = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    MASK = torch.zeros(64, 64)
    MASK[16:48, 16:48] = 1.0  # generate the centre, keep the border
    valid_inputs = [{"image": IMAGE, "mask": MASK}, {"image": IMAGE[None], "mask": MASK > 0.5}]
    invalid_inputs = [
        {"mask": torch.zeros(32, 32)},  # not the size of the image
        {"mask": MASK * 2},  # outside [0, 1]
        {"image": torch.rand(4, 64, 64)},  # not RGB
        {"image": "picture.png"},  # not an image
        {"strength": 1.0},  # not a field
    ]
