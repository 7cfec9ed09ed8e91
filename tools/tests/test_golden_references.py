"""check_model.py --write-golden-references: the bit packing and stride helpers (no model run, no Rust binary)."""

import gzip

import numpy as np
import pytest

import check_model as cm


def test_pack_mask_bits_lsb_first_and_padding():
    # 3 x 5 = 15 pixels -> 2 bytes, the 16th bit zero
    m = np.zeros((3, 5), dtype=bool)
    m[0, 0] = True   # n = 0  -> byte 0 bit 0
    m[0, 3] = True   # n = 3  -> byte 0 bit 3
    m[1, 2] = True   # n = 7  -> byte 0 bit 7
    m[2, 4] = True   # n = 14 -> byte 1 bit 6
    data = cm.pack_mask_bits(m)
    assert data == bytes([0b1000_1001, 0b0100_0000])
    n = np.arange(15)
    bits = (np.frombuffer(data, np.uint8)[n // 8] >> (n % 8)) & 1
    assert np.array_equal(bits.astype(bool), m.ravel())


@pytest.mark.parametrize("h, w", [(1, 1), (7, 9), (64, 64), (96, 64)])
def test_pack_unpack_round_trip(h, w):
    m = np.random.default_rng(h * 100 + w).random((h, w)) < 0.4
    data = cm.pack_mask_bits(m)
    assert len(data) == (h * w + 7) // 8
    assert np.array_equal(cm.unpack_mask_bits(data, h, w), m)
    assert gzip.compress(data, mtime=0) == gzip.compress(data, mtime=0)
    with pytest.raises(ValueError):
        cm.unpack_mask_bits(data + b"\0", h, w)


def test_stride_f32_shape_order_and_rounding():
    y = np.arange(10 * 7, dtype=np.float64).reshape(10, 7) + 1 / 3
    got = np.frombuffer(cm.stride_f32(y), dtype="<f4")
    assert got.size == 3 * 2  # ceil(10 / 4) x ceil(7 / 4)
    want = [y[i, j] for i in (0, 4, 8) for j in (0, 4)]
    assert np.array_equal(got, np.array(want, dtype=np.float32))


def test_golden_cases_shapes():
    cases = cm.golden_cases()
    assert len(cases) == 16
    for _, x in cases:
        assert x.dtype == np.float32 and x.shape[:2] == (1, 3)
        assert x.shape[2] % 16 == 0 and x.shape[3] % 16 == 0


def test_written_references_match_the_bundled_model():
    import json

    import deepgrow_model as dm

    s = json.loads((cm.GOLDEN_F64_DIR / "summary.json").read_text())
    assert s["model_sha256"] == dm.sha256_file(dm.MODEL_DIR / "model.onnx"), \
        "model.onnx changed: rerun check_model.py --write-golden-references"
    assert sorted(s["cases"]) == [name for name, _ in cm.golden_cases()]
    for name, r in s["cases"].items():
        h, w = r["shape"]
        bits = gzip.decompress((cm.GOLDEN_F64_DIR / f"{name}.mask.bits.gz").read_bytes())
        assert int(cm.unpack_mask_bits(bits, h, w).sum()) == r["mask_px"]
        size = (cm.GOLDEN_F64_DIR / f"{name}.logits_stride4.f32").stat().st_size
        assert size == ((h + 3) // 4) * ((w + 3) // 4) * 4
