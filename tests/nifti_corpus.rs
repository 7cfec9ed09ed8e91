//! The NIfTI corpus (tests/fixtures/nifti_corpus, provenance in its SOURCES.md) against nibabel's reading of it.
//!
//! `tests/fixtures/nifti_corpus/expected.json` is written by `tools/corpus_stats.py` (nibabel 5.4.2): for every
//! file, ACCEPT (a single-file NIfTI-1 3D scalar volume) with golden statistics of the volume as MONAI's loader
//! reads it (`np.asanyarray(img.dataobj).astype(np.float32)`), or REJECT with the reasons. Accepted files must
//! decode to the same shape, affine and float32 values; rejected files must give an error naming a reason, and
//! no file, whole or cut short, may make the decoder panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use deepgrow_server::nifti_io::{decode, DecodeLimits, NiftiError, Volume};
use serde_json::Value;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti_corpus")
}

fn limits() -> DecodeLimits {
    DecodeLimits {
        max_decompressed_bytes: 1 << 30,
    }
}

fn expected() -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(corpus_dir().join("expected.json"))
        .expect("expected.json (run tools/corpus_stats.py)");
    let doc: Value = serde_json::from_str(&text).expect("expected.json is JSON");
    let entries = doc["entries"].as_object().expect("entries").clone();
    assert!(
        entries.len() >= 55,
        "expected.json lists {} entries",
        entries.len()
    );
    entries.into_iter().collect()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes), &mut out)
        .expect("a corpus gzip stream");
    out
}

/// The file's bytes, with the entry's header patch (if any) applied in the file's byte order.
fn file_bytes(entry: &Value) -> Vec<u8> {
    let file = entry["file"].as_str().expect("file");
    let bytes = std::fs::read(corpus_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let Some(patch) = entry.get("patch").and_then(Value::as_array) else {
        return bytes;
    };
    assert!(
        !entry["gzip"].as_bool().unwrap(),
        "patches apply to uncompressed files"
    );
    let mut bytes = bytes;
    let big = i32::from_le_bytes(bytes[0..4].try_into().unwrap()) != 348;
    for field in patch {
        let at = field["offset"].as_u64().unwrap() as usize;
        let raw: Vec<u8> = match field["type"].as_str().unwrap() {
            "i16" => {
                let v = field["value"].as_i64().unwrap() as i16;
                if big {
                    v.to_be_bytes().to_vec()
                } else {
                    v.to_le_bytes().to_vec()
                }
            }
            "f32" => {
                let v = field["value"].as_f64().unwrap() as f32;
                if big {
                    v.to_be_bytes().to_vec()
                } else {
                    v.to_le_bytes().to_vec()
                }
            }
            other => panic!("patch type {other}"),
        };
        bytes[at..at + raw.len()].copy_from_slice(&raw);
    }
    bytes
}

/// Decodes under `catch_unwind`: a panic is a test failure of its own, reported with `what`.
fn decode_no_panic(bytes: &[u8], what: &str) -> Result<Volume, NiftiError> {
    catch_unwind(AssertUnwindSafe(|| decode(bytes, limits())))
        .unwrap_or_else(|_| panic!("decode panicked on {what}"))
}

/// Words the error message must contain (any one of them, case-insensitive) for a rejection reason.
fn keywords(reason: &str, magic: Option<&str>) -> &'static [&'static str] {
    match (reason, magic) {
        ("pair", Some("ni1")) => &["header-only"],
        ("pair", _) => &["header-only", "not a nifti-1"],
        ("nifti2", _) => &["nifti-2"],
        ("not_nifti", _) => &["not a nifti-1"],
        ("malformed", _) => &["invalid", "truncated", "gzip", "not a nifti-1"],
        ("2d", _) => &["3d volume"],
        ("series", _) => &["4d", "series"],
        ("rgb", _) => &["rgb"],
        ("complex", _) => &["complex"],
        (other, _) => panic!("unknown reason {other} in expected.json"),
    }
}

fn f32_bits(v: &Value) -> u32 {
    v.as_u64().expect("f32 bits") as u32
}

fn check_accepted(name: &str, entry: &Value, volume: &Volume, problems: &mut Vec<String>) {
    macro_rules! fail {
        ($field:expr, $ours:expr, $nibabel:expr $(,)?) => {
            problems.push(format!(
                "{name}: {}: decoder {}, nibabel {}",
                $field, $ours, $nibabel
            ))
        };
    }
    let shape: Vec<usize> = entry["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    if volume.geometry.shape.as_slice() != shape.as_slice() {
        fail!(
            "shape",
            format!("{:?}", volume.geometry.shape),
            format!("{shape:?}"),
        );
        return;
    }
    for (r, row) in entry["affine_f64_bits"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (c, bits) in row.as_array().unwrap().iter().enumerate() {
            let nibabel = f64::from_bits(bits.as_u64().unwrap());
            let ours = volume.geometry.affine[r][c];
            let ok = if c == 3 {
                (ours - nibabel).abs() <= 1e-9
            } else {
                ours.to_bits() == nibabel.to_bits() || (ours == 0.0 && nibabel == 0.0)
            };
            if !ok {
                fail!(
                    &format!("affine[{r}][{c}]"),
                    format!("{ours:?}"),
                    format!("{nibabel:?}"),
                );
            }
        }
    }

    let [_, _, d] = volume.geometry.shape;
    let (mut sum, mut nans) = (0.0f64, 0u64);
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    let mut slices = Vec::with_capacity(d);
    for k in 0..d {
        let slice = volume.slice_f32(k);
        for &v in slice.iter() {
            if v.is_nan() {
                nans += 1;
            } else {
                sum += v as f64;
                min = min.min(v);
                max = max.max(v);
            }
        }
        slices.push(slice);
    }
    let close = |ours: f64, nibabel: f64| (ours - nibabel).abs() <= 1e-6 * nibabel.abs().max(1.0);
    let nibabel_sum = entry["nansum_f64"].as_f64().unwrap();
    if !close(sum, nibabel_sum) {
        fail!("volume sum", format!("{sum}"), format!("{nibabel_sum}"));
    }
    if nans != entry["nan_count"].as_u64().unwrap() {
        fail!(
            "NaN count",
            nans.to_string(),
            entry["nan_count"].to_string(),
        );
    }
    for (field, ours) in [("min_f32_bits", min), ("max_f32_bits", max)] {
        if let Some(bits) = entry[field].as_u64() {
            if ours.to_bits() != bits as u32 {
                fail!(
                    field,
                    format!("{ours:?}"),
                    format!("{:?}", f32::from_bits(bits as u32)),
                );
            }
        }
    }

    if let Some(all) = entry["all_f32_bits"].as_array() {
        // Every voxel, in file order (i fastest, then j, then k).
        let [h, w, _] = volume.geometry.shape;
        let mut differ = Vec::new();
        for (n, bits) in all.iter().enumerate() {
            let (i, j, k) = (n % h, (n / h) % w, n / (h * w));
            let got = slices[k][[i, j]];
            if got.to_bits() != f32_bits(bits) {
                differ.push(format!(
                    "[{i}, {j}, {k}] decoder {got:?} vs nibabel {:?}",
                    f32::from_bits(f32_bits(bits))
                ));
            }
        }
        if !differ.is_empty() {
            problems.push(format!(
                "{name}: {} of {} voxels differ in float32 bits, e.g. {}",
                differ.len(),
                all.len(),
                differ[0]
            ));
        }
    }

    for golden in entry["slices"].as_array().unwrap() {
        let k = golden["k"].as_u64().unwrap() as usize;
        let slice = &slices[k];
        let ours: f64 = slice
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| v as f64)
            .sum();
        let nibabel = golden["nansum_f64"].as_f64().unwrap();
        if !close(ours, nibabel) {
            fail!(
                &format!("slice {k} sum"),
                format!("{ours}"),
                format!("{nibabel}"),
            );
        }
        let ours_nans = slice.iter().filter(|v| v.is_nan()).count() as u64;
        if ours_nans != golden["nan_count"].as_u64().unwrap() {
            fail!(
                &format!("slice {k} NaN count"),
                ours_nans.to_string(),
                golden["nan_count"].to_string(),
            );
        }
        for sample in golden["samples"].as_array().unwrap() {
            let (i, j) = (
                sample["i"].as_u64().unwrap() as usize,
                sample["j"].as_u64().unwrap() as usize,
            );
            let want = f32_bits(&sample["f32_bits"]);
            let got = slice[[i, j]];
            if got.to_bits() != want {
                fail!(
                    &format!("voxel [{i}, {j}, {k}]"),
                    format!("{got:?} (bits {:#010x})", got.to_bits()),
                    format!("{:?} (bits {want:#010x})", f32::from_bits(want)),
                );
            }
        }
    }
}

#[test]
fn accepted_files_decode_to_nibabel_values() {
    let mut problems = Vec::new();
    let mut accepted = 0;
    for (name, entry) in expected() {
        if entry["action"] != "ACCEPT" {
            continue;
        }
        accepted += 1;
        let bytes = file_bytes(&entry);
        match decode_no_panic(&bytes, &name) {
            Ok(volume) => {
                assert_eq!(
                    volume.was_compressed,
                    entry["gzip"].as_bool().unwrap(),
                    "{name}"
                );
                check_accepted(&name, &entry, &volume, &mut problems);
            }
            Err(e) => problems.push(format!("{name}: rejected a file nibabel reads: {e}")),
        }
    }
    assert!(accepted >= 20, "only {accepted} accepted entries");
    assert!(
        problems.is_empty(),
        "{} mismatch(es) with nibabel:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// A shared session store keeps a volume as `Volume::to_nifti`: every accepted file, big-endian, scaled and
/// extended ones included, must come back from it equal (header, voxels, scaling).
#[test]
fn every_accepted_volume_survives_its_stored_form() {
    let mut checked = 0;
    for (name, entry) in expected() {
        if entry["action"] != "ACCEPT" {
            continue;
        }
        let volume = decode(&file_bytes(&entry), limits()).unwrap();
        let stored = volume.to_nifti();
        let mut back = decode(&stored, limits()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!back.was_compressed, "{name}: the stored form is raw");
        back.was_compressed = volume.was_compressed;
        assert_eq!(back.geometry.shape, volume.geometry.shape, "{name}");
        assert_eq!(back.geometry.affine, volume.geometry.affine, "{name}");
        assert_eq!(back.scaling, volume.scaling, "{name}");
        // bit for bit (NaN voxels included), header and voxels
        assert!(
            back.to_nifti() == stored,
            "{name}: the stored form does not read back to itself"
        );
        assert_eq!(back.data.byte_size(), volume.data.byte_size(), "{name}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} accepted entries");
}

#[test]
fn rejected_files_fail_with_a_reason() {
    let mut problems = Vec::new();
    let mut rejected = 0;
    for (name, entry) in expected() {
        if entry["action"] != "REJECT" {
            continue;
        }
        rejected += 1;
        let bytes = file_bytes(&entry);
        let magic = entry["magic"].as_str();
        let reasons: Vec<&str> = entry["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        match decode_no_panic(&bytes, &name) {
            Ok(volume) => problems.push(format!(
                "{name}: accepted ({:?}) but must be rejected as {reasons:?}",
                volume.geometry.shape
            )),
            Err(e) => {
                let message = e.to_string().to_lowercase();
                let mut words: Vec<&str> = reasons
                    .iter()
                    .flat_map(|r| keywords(r, magic).iter().copied())
                    .collect();
                words.dedup();
                if !words.iter().any(|w| message.contains(w)) {
                    problems.push(format!(
                        "{name}: error \"{e}\" names none of {words:?} (reasons {reasons:?})"
                    ));
                }
            }
        }
    }
    assert!(rejected >= 25, "only {rejected} rejected entries");
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Cut points: inside and at the edges of the header, the extension flag, the middle and the last byte.
fn cut_points(len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = [
        0,
        1,
        4,
        100,
        347,
        348,
        351,
        352,
        len / 2,
        len.saturating_sub(1),
    ]
    .into_iter()
    .filter(|&c| c < len)
    .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

#[test]
fn truncated_files_never_panic_and_are_rejected() {
    let mut problems = Vec::new();
    for (name, entry) in expected() {
        let bytes = file_bytes(&entry);
        let accepted = entry["action"] == "ACCEPT";
        let gzip = entry["gzip"].as_bool().unwrap();
        // The stored bytes, cut: a cut gzip stream, or a cut header / voxel block, must be an error.
        for cut in cut_points(bytes.len()) {
            let what = format!("{name} cut at {cut} of {} bytes", bytes.len());
            match decode_no_panic(&bytes[..cut], &what) {
                Ok(_)
                    if !accepted || gzip || cut < entry["data_end"].as_u64().unwrap() as usize =>
                {
                    problems.push(format!("{what}: accepted"))
                }
                Ok(_) => {}
                Err(e) => {
                    let message = e.to_string().to_lowercase();
                    if accepted
                        && !["truncated", "gzip", "not a nifti-1"]
                            .iter()
                            .any(|w| message.contains(w))
                    {
                        problems.push(format!(
                            "{what}: error \"{e}\" does not say it is cut short"
                        ));
                    }
                }
            }
        }
        // Accepted .nii.gz files: the decompressed stream, cut, must be rejected as truncated too.
        if accepted && gzip {
            let raw = gunzip(&bytes);
            let data_end = entry["data_end"].as_u64().unwrap() as usize;
            let mut cuts = cut_points(raw.len());
            cuts.push(data_end - 1);
            for cut in cuts {
                let what = format!("{name} (gunzipped) cut at {cut} of {} bytes", raw.len());
                match decode_no_panic(&raw[..cut], &what) {
                    Ok(_) if cut < data_end => problems.push(format!("{what}: accepted")),
                    Ok(_) => {}
                    Err(e) if cut >= data_end => {
                        problems.push(format!("{what}: rejected although complete: {e}"))
                    }
                    Err(_) => {}
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Inputs the fuzzers found problems with (`fuzz/regressions/nifti_decode/`): each is refused, without a panic.
#[test]
fn fuzzer_findings_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/nifti_decode");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/regressions/nifti_decode") {
        let path = entry.unwrap().path();
        let name = path.display().to_string();
        let result = decode_no_panic(&std::fs::read(&path).unwrap(), &name);
        assert!(
            result.is_err(),
            "{name} decoded: {:?}",
            result.map(|v| v.geometry.shape)
        );
        checked += 1;
    }
    assert!(checked > 0, "no regression inputs in {}", dir.display());
}
