"""--mode=fid: the config section, the missing-weights error, and `evaluate_images` (the function
the mode calls after sampling) on 8 images with a random-weights .pth and a folder dataset."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from _fid_common import write_random_weights
from diffusion_jax import cli
from diffusion_jax import config as cv
from diffusion_jax.cli.experiment import CLIError
from diffusion_jax.cli.quality import evaluate_images, quality_rows
from diffusion_jax.evaluation import sample_quality as sq
from diffusion_jax.evaluation.inception import FID_WEIGHTS_FILE, InceptionFeatureExtractor

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "default.py")


def test_quality_config_and_missing_weights(tmp_path):
    c = cv.validate(cv.load_file(DEFAULT))
    assert c.quality.metrics == ("fid", "is") and c.quality.resize == "reference"
    with pytest.raises(cv.ConfigError, match=r"config\.quality\.metrics: unknown metrics \['xx'\]"):
        cli.main(["p", f"--config={DEFAULT}", f"--workdir={tmp_path}", "--mode=fid",
                  "--config.quality.metrics=('fid','xx')"])
    with pytest.raises(cv.ConfigError, match=r"config\.quality\.resize"):
        cli.main(["p", f"--config={DEFAULT}", f"--workdir={tmp_path}", "--mode=fid",
                  "--config.quality.resize=bicubic"])
    with pytest.raises(CLIError, match=rf"\({FID_WEIGHTS_FILE}\) not given: set "
                                       r"config\.quality\.inception_weights.*releases/download"):
        cli.main(["p", f"--config={DEFAULT}", f"--workdir={tmp_path}", "--mode=fid"])


def test_evaluate_images_against_a_dataset_split(tmp_path):
    weights = tmp_path / FID_WEIGHTS_FILE
    write_random_weights(weights, seed=1)
    rng = np.random.default_rng(0)
    folder = tmp_path / "ref"
    folder.mkdir()
    ref_imgs = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    for i, im in enumerate(ref_imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    samples = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    c = cv.load_file(DEFAULT)
    c.data.name = f"folder:{folder}"
    c.quality.inception_weights = str(weights)
    c.quality.metrics = ("is", "kid", "prc")
    c.quality.batch_size, c.quality.is_splits = 4, 2
    c.quality.kid_subsets, c.quality.kid_subset_size = 3, 4
    cv.validate(c)
    workdir = str(tmp_path / "run")
    res = evaluate_images(c, samples, workdir, progress=False)
    ex = InceptionFeatureExtractor.from_file(str(weights), batch_size=4, progress=False)
    fs, fr = ex.extract(samples), ex.extract(ref_imgs)
    assert res["is_mean"] == pytest.approx(sq.inception_score(fs["logits_unbiased"], 2)[0],
                                           rel=1e-6)
    assert res["kid_mean"] == pytest.approx(sq.kernel_inception_distance(
        fs["pool3"], fr["pool3"], subsets=3, subset_size=4)[0], rel=1e-5)
    prc = sq.precision_recall(fs["pool3"], fr["pool3"], k=3)
    assert (res["precision"], res["recall"]) == (prc["precision"], prc["recall"])
    (cache,) = glob.glob(os.path.join(workdir, "quality",
                                      "reference_folder-*_train_reference_8.npz"))
    ref = sq.load_statistics(cache)
    np.testing.assert_allclose(ref.mu, fr["pool3"].astype(np.float64).mean(0), rtol=1e-5,
                               atol=1e-7)
    # a statistics-only reference cannot give KID: the error names the metric and the file
    sq.save_statistics(str(tmp_path / "stats.npz"), ref.mu, ref.sigma)
    c.unlock()
    c.quality.reference_stats = str(tmp_path / "stats.npz")
    c.quality.metrics = ("is", "kid")
    with pytest.raises(CLIError, match=r"\['kid'\] need the reference features.*stats\.npz"):
        evaluate_images(c, samples, workdir, progress=False, extractor=ex)
    # the report's rows
    os.makedirs(os.path.join(workdir, "quality"), exist_ok=True)
    with open(os.path.join(workdir, "quality", "quality_step5_ddim_10.json"), "w") as f:
        json.dump({"step": 5, "sampler": "ddim", "num_steps": 10, "fid": 3.5, **res}, f)
    rows = quality_rows(workdir)
    assert rows[0]["FID"] == 3.5 and rows[0]["IS"] == res["is_mean"]
