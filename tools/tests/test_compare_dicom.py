"""tools/compare_dicom.py on 3 slices, 1 round: the series builder, the decoders' HU volumes, the JSON summary."""

import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

import compare_dicom as cd  # noqa: E402

N = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    return out, cd.write_series(out, N)


def test_builder_writes_two_series(built):
    out, info = built
    assert set(info) == {"explicit_le", "j2k_lossless"}
    for name, (src_path, tsyntax) in cd.SERIES.items():
        src = pydicom.dcmread(src_path)
        paths = cd.series_paths(out / name, N)
        dss = [pydicom.dcmread(p) for p in paths]
        assert info[name]["files"] == N and info[name]["input_bytes"] == sum(p.stat().st_size for p in paths)
        assert len({ds.SOPInstanceUID for ds in dss}) == N
        assert len({ds.SeriesInstanceUID for ds in dss}) == 1
        for k, ds in enumerate(dss):
            assert str(ds.file_meta.TransferSyntaxUID) == tsyntax
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID != src.SOPInstanceUID
            assert ds.InstanceNumber == k + 1
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            sx, sy, sz = (float(v) for v in src.ImagePositionPatient)
            assert (x, y) == (sx, sy) and z == pytest.approx(sz + 2.0 * k)
            assert ds.PixelData == src.PixelData  # the same bytes (the J2K codestream untouched)


@pytest.mark.parametrize("series", ["explicit_le", "j2k_lossless"])
def test_pydicom_decoder_hu_volume(built, series):
    if series == "j2k_lossless":
        pytest.importorskip("openjpeg")
        pytest.importorskip("pylibjpeg")
    out, info = built
    # shuffled file order: the volume must still come out sorted by z
    paths = [str(p) for p in cd.series_paths(out / series, N)][::-1]
    blobs = [open(p, "rb").read() for p in paths]
    vol, zs = cd.read_series("pydicom", series, blobs, paths)
    assert vol.shape == (N, 512, 512) and vol.dtype == np.int16
    ref = cd.reference_hu()
    assert cd.check_volume(vol, zs, N, info[series]["z0"], ref) is None
    assert int(vol.min()) == -1024


def test_main_json_summary(tmp_path, capsys):
    js = tmp_path / "s.json"
    assert cd.main(["--slices", str(N), "--rounds", "1", "--jobs", "1", "--decoders", "pydicom",
                    "--json", str(js)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(js.read_text())
    assert report["hu_output_bytes"] == N * 512 * 512 * 2
    got = {(r["series"], r["decoder"]) for r in report["results"]}
    assert ("explicit_le", "pydicom") in got
    for r in report["results"]:
        assert r["jobs"] == 1 and r["min_s"] <= r["median_s"] and len(r["times_s"]) == 1 and r["mb_s_best"] > 0
    assert set(report["correctness"]) == {"explicit_le", "j2k_lossless"}
    assert {"model", "avx2", "avx512f", "amx"} <= set(report["cpu"])
    assert report["versions"]["pydicom"] == pydicom.__version__


def test_chunks_and_cpu_info():
    assert cd.chunks(5, 2) == [(0, 3), (3, 5)]
    assert cd.chunks(1, 2) == [(0, 1)]
    info = cd.cpu_info("model name\t: Test CPU\nflags\t\t: fpu avx2 amx_tile\nmodel name\t: other\n")
    assert info["model"] == "Test CPU" and info["avx2"] and not info["avx512f"] and info["amx"]


def test_to_hu_rescale():
    stored = np.array([[0, 1024, 2469]], dtype=np.uint16)
    assert cd.to_hu(stored, 1.0, -1024.0).tolist() == [[-1024, 0, 1445]]
    assert cd.to_hu(stored, 0.5, -1024.0).tolist() == [[-1024, -512, 210]]
