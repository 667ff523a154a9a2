"""Published weights: readers of the files the field publishes, and converters to this library's
networks.

    weights.diffusers        diffusers model folders (config.json + safetensors / .bin) ->
                             the library's UNet, AutoencoderKL and DiT configs and params
    weights.torch_pickle     a PyTorch-free reader of `torch.save` files (.pth / .bin)

Every converter either consumes every tensor of the file or fails with an error naming the key;
weights are never left silently at their random initialisation.
"""
