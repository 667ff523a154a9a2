"""Sample-quality metrics that need no downloaded weights.

FID needs Inception weights from the internet; here the feature network is a small classifier
trained in a few seconds on the embedded data itself (its penultimate layer plays Inception's
role), and the distances are the usual ones on those features:

    where            what
    classifier.py    FeatureClassifier (small CNN), train_feature_classifier, features / accuracy
    distances.py     frechet_distance (FID's formula), kernel_distance (KID: unbiased MMD^2 with
                     the cubic polynomial kernel), both on (N, D) feature arrays
    inception.py     the FID Inception-v3 (pytorch-fid's) in Flax, from the published .pth
                     (weights given by path), InceptionFeatureExtractor (jitted, sharded)
    sample_quality.py  FID / IS / KID / precision-recall as pytorch-fid and torch-fidelity
                     compute them; streamed statistics; reference .npz files (mu, sigma)

    net = train_feature_classifier(train_images, train_labels, num_classes=10)
    fd = frechet_distance(net.features(test_images), net.features(samples))
    kd = kernel_distance(net.features(test_images), net.features(samples))
    acc = net.accuracy(test_images, test_labels)       # how much to trust the features
"""
from diffusion_jax.evaluation.classifier import (FeatureClassifier, TrainedClassifier,
                                                 train_feature_classifier)
from diffusion_jax.evaluation.distances import frechet_distance, kernel_distance

__all__ = ["FeatureClassifier", "TrainedClassifier", "train_feature_classifier",
           "frechet_distance", "kernel_distance"]
