"""experiments/params_digest.py: the digest sees every bit, and --compare fails on a change."""

import json

import numpy as np
import params_digest
from safetensors.numpy import save_file


def test_digest_changes_with_one_bit_and_compare_fails(tmp_path):
    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({"w": w}, str(tmp_path / "a" / "model.safetensors"))
    flipped = w.copy()
    flipped.view(np.uint32)[3, 1] ^= 1  # the last mantissa bit of one entry
    save_file({"w": flipped}, str(tmp_path / "b" / "model.safetensors"))
    a, b = params_digest.digest(str(tmp_path / "a")), params_digest.digest(str(tmp_path / "a"))
    assert a == b != params_digest.digest(str(tmp_path / "b"))
    for name, value in (("same", a), ("other", params_digest.digest(str(tmp_path / "b")))):
        (tmp_path / f"{name}.json").write_text(json.dumps({"digests": {"run": value}}))
    ref = str(tmp_path / "same.json")
    assert params_digest.main(["--compare", ref, ref]) == 0
    assert params_digest.main(["--compare", ref, str(tmp_path / "other.json")]) == 1
