"""A randomly initialised pytorch-fid FID Inception-v3 (nothing downloaded), shared by the FID
tests."""
import torch
from pytorch_fid import inception as pfi


def random_fid_inception(seed: int = 0):
    """pytorch-fid's fid_inception_v3 without the download: random conv / fc weights, random BN
    affine, BN running statistics set from a batch (so activations stay O(1) through the net)."""
    torch.manual_seed(seed)
    m = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    m.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    m.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    m.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    m.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    m.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    m.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    m.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    m.Mixed_7b = pfi.FIDInceptionE_1(1280)
    m.Mixed_7c = pfi.FIDInceptionE_2(2048)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = 1.0
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
        m.fc.bias.normal_()
        m.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    return m.eval()


def write_random_weights(path, seed: int = 0):
    """torch.save of a random model's state dict at `path` (named like the published file);
    returns the state dict."""
    sd = random_fid_inception(seed).state_dict()
    torch.save(sd, path)
    return sd
