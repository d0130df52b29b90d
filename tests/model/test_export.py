"""jobs.export: a SavedModel that plain TensorFlow loads in a fresh process and that scores as catdog does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import run_job_module

IMAGE_SIZE = 32  # tiny_model_run's
# Both signatures get catdog's pixels for the real photos (the in-graph decoder is exact on them), so
# what is left is float rounding that depends on the batch: 1.1e-6 between batches of 1 and 100,
# 0.0 between the SavedModel and catdog on the same batches (docs/serving.md).
TOLERANCE = 1e-5

# What TF Serving or a user's own code does: TensorFlow alone, catdog neither on the path nor imported.
FOREIGN_LOAD = """
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
serve, pixels = loaded.signatures["serving_default"], loaded.signatures["pixels"]
paths = json.load(open(sys.argv[2]))
by_bytes = serve(image_bytes=tf.constant([open(path, "rb").read() for path in paths]))
by_pixels = pixels(pixels=tf.constant(np.load(sys.argv[3])))
leaked = sorted(name for name in sys.modules if name.split(".")[0] == "catdog")
assert not leaked, f"catdog was imported: {leaked}"
np.savez(sys.argv[4], bytes=by_bytes["probabilities"].numpy(), pixels=by_pixels["probabilities"].numpy(),
         label=by_bytes["label"].numpy().astype("S"), classes=by_pixels["classes"].numpy().astype("S"),
         names=loaded.class_names.numpy().astype("S"))
print(json.dumps({name: {"inputs": sorted(f.structured_input_signature[1]), "outputs": sorted(f.structured_outputs)}
                  for name, f in loaded.signatures.items()}))
"""


def test_help(capsys):
    code = run_job_module("jobs.export", "--help")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "jobs.export" in out and "--overwrite" in out


def test_refuses_an_existing_output_and_a_missing_model(tiny_model_run, tmp_path, capsys):
    output = tmp_path / "serving" / "1"
    output.mkdir(parents=True)
    (output / "notes.txt").write_text("keep me")
    code = run_job_module("jobs.export", "--model", str(tiny_model_run), "--output", str(output))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--overwrite" in err
    assert [p.name for p in output.iterdir()] == ["notes.txt"]

    code = run_job_module("jobs.export", "--model", str(tmp_path / "no-run"), "--output", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no-run" in err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exported(tiny_model_run, tmp_path_factory) -> Path:
    """The test model exported with --overwrite over a folder holding a stale SavedModel and a user's file
    (the job run as `__main__` in this process; the SavedModel is loaded in a fresh one below)."""
    output = tmp_path_factory.mktemp("serving") / "catdog" / "1"
    (output / "variables").mkdir(parents=True)
    (output / "variables" / "variables.index").write_bytes(b"stale")
    (output / "saved_model.pb").write_bytes(b"stale")
    (output / "notes.txt").write_text("keep me")
    assert run_job_module("jobs.export", "--model", str(tiny_model_run), "--output", str(output), "--overwrite") == 0
    return output


def test_overwrite_replaces_only_the_saved_model(exported, tiny_model_run):
    assert (exported / "notes.txt").read_text() == "keep me"
    assert (exported / "saved_model.pb").read_bytes() != b"stale"
    manifest = json.loads((exported / "catdog_export.json").read_text())
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["image_size"] == IMAGE_SIZE
    # Each weight stored once (keras.export.ExportArchive stores every weight twice: keras issue 23553).
    weights = sum(path.stat().st_size for path in (exported / "variables").iterdir())
    assert weights < 1.1 * (tiny_model_run / "model.keras").stat().st_size


def test_in_graph_decoder_matches_catdog_on_generated_images():
    from PIL import Image

    from catdog.io import imaging
    from catdog.model.export import decode_image

    rng = np.random.default_rng(0)
    base = np.clip(np.cumsum(rng.integers(-6, 7, (120, 160, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    variants = {"png": image, "png_gray": image.convert("L"), "png_palette": image.convert("P"),
                "bmp": image, "gif": image, "webp": image, "jpeg_gray": image.convert("L"),
                "jpeg_cmyk": image.convert("CMYK")}
    cases = {}
    for name, variant in variants.items():
        buffer = io.BytesIO()
        variant.save(buffer, name.split("_")[0].upper(), **({"lossless": True} if name == "webp" else {}))
        cases[name] = buffer.getvalue()
    # Random shapes, taller and wider than the target and smaller: Pillow picks its passes' order by shape.
    for height, width in rng.integers(IMAGE_SIZE // 2, IMAGE_SIZE * 6, (12, 2)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
        cases[f"noise {height}x{width}"] = buffer.getvalue()
    for name, data in cases.items():
        for size in (IMAGE_SIZE, 100):
            expected = imaging.decode_image(data, size)[0]
            np.testing.assert_array_equal(decode_image(data, size).numpy(), expected, err_msg=f"{name} at {size}")


def test_in_graph_decoder_gives_catdogs_pixels_for_the_real_photos(real_photos):
    from catdog.io import imaging
    from catdog.model.export import decode_image

    from catdog.model.tensorflow_setup import configure_tensorflow

    configure_tensorflow()
    import tensorflow as tf

    decode = tf.function(lambda data: decode_image(data, IMAGE_SIZE), input_signature=[tf.TensorSpec([], tf.string)],
                         autograph=False)
    for photo in sorted(real_photos.glob("*/*.jpg")):
        data = photo.read_bytes()
        expected = imaging.decode_image(data, IMAGE_SIZE)[0]
        np.testing.assert_array_equal(decode(data).numpy(), expected, err_msg=photo.name)


def test_in_graph_decoder_ignores_exif_orientation():
    """A documented difference (docs/serving.md): catdog turns a photo upright, the SavedModel does not."""
    from PIL import Image

    from catdog.io import imaging
    from catdog.model.export import decode_image

    pixels = np.zeros((60, 90, 3), dtype=np.uint8)
    pixels[:, :30] = 255  # a white band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    rotated, upright = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(rotated, "JPEG", exif=exif, quality=95)
    Image.fromarray(pixels).save(upright, "JPEG", quality=95)
    served = decode_image(rotated.getvalue(), IMAGE_SIZE).numpy()
    np.testing.assert_array_equal(served, imaging.decode_image(upright.getvalue(), IMAGE_SIZE)[0])
    assert not np.array_equal(served, imaging.decode_image(rotated.getvalue(), IMAGE_SIZE)[0])


def test_saved_model_in_a_fresh_process_scores_like_catdog(exported, tiny_model_run, real_photos, tmp_path):
    from catdog.io import imaging
    from catdog.model.inference import load_checked
    from catdog.score.predictor import predict_image

    photos = sorted(str(path) for path in real_photos.glob("*/*.jpg"))
    pixels = np.stack([imaging.decode_image(Path(photo).read_bytes(), IMAGE_SIZE)[0] for photo in photos])
    (tmp_path / "paths.json").write_text(json.dumps(photos))
    np.save(tmp_path / "pixels.npy", pixels)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # The fresh process starts now and loads TensorFlow while catdog's own answers are computed here.
    foreign = subprocess.Popen(
        [sys.executable, "-I", "-c", FOREIGN_LOAD, str(exported), "paths.json", "pixels.npy", "out.npz"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        model, info = load_checked(str(tiny_model_run))  # what predict_image runs, loaded once
        catdog = np.concatenate([np.asarray(model(pixels[i:i + 100].astype(np.float32), training=False))
                                 for i in range(0, len(photos), 100)])
        for k in (0, len(photos) - 1):  # jobs.predict's function, one image at a time (batch sizes round apart)
            predicted = predict_image(str(tiny_model_run), photos[k])["probabilities"]
            np.testing.assert_allclose([predicted[name] for name in info.class_names], catdog[k], atol=TOLERANCE)
        stdout, stderr = foreign.communicate(timeout=300)
    finally:
        if foreign.poll() is None:
            foreign.kill()
            foreign.wait()
    done = subprocess.CompletedProcess(foreign.args, foreign.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    signatures = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = ["classes", "label", "probabilities"]
    assert signatures == {"serving_default": {"inputs": ["image_bytes"], "outputs": outputs},
                          "pixels": {"inputs": ["pixels"], "outputs": outputs}}
    served = np.load(tmp_path / "out.npz")
    assert [name.decode() for name in served["names"]] == ["cats", "dogs"]
    assert (served["classes"] == np.array([b"cats", b"dogs"])).all()
    assert np.ptp(catdog[:, 0]) > 1e-2  # the photos get different answers: the comparison can tell them apart

    for name in ("pixels", "bytes"):
        difference = np.abs(served[name] - catdog).max()
        print(f"\n{name} signature vs catdog on {len(photos)} photos: largest difference {difference:.1e}")
        assert difference < TOLERANCE, name
    labels = np.array(info.class_names)[catdog.argmax(axis=1)]
    assert (served["label"].astype(str) == labels).all()
