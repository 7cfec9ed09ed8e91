//! DICOM series decode throughput: a 512 x 512 x 200 CT series made from slice 10 of the real fixture series
//! (re-positioned 2 mm apart, pixel data untouched), uncompressed (explicit VR little endian) and JPEG 2000
//! lossless, read from memory into the int16 HU volume a session keeps (`image::open` + `read_volume`).
//! Throughput is MB/s of HU output (200 x 512 x 512 x 2 bytes).
//!
//! `DEEPGROW_DICOM_BENCH_DIR=DIR` reads `DIR/explicit_le/*.dcm` and `DIR/j2k_lossless/*.dcm` instead (the files
//! `tools/compare_dicom.py --write-only --out DIR` writes, to time pydicom on the very same bytes).
//! Frames are decoded on rayon's pool: `RAYON_NUM_THREADS=1` times one core.
//!
//! Run: `cargo bench --bench dicom`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deepgrow_server::image::{self, Upload};
use deepgrow_server::nifti_io::DecodeLimits;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;

const SLICES: usize = 200;
const LIMITS: DecodeLimits = DecodeLimits {
    max_decompressed_bytes: 4 << 30,
};

fn manifest(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// `SLICES` copies of one instance, 2 mm apart, each its own SOP instance of one series.
fn tiled(source: &str) -> Vec<(String, Bytes)> {
    let bytes = std::fs::read(manifest(source)).expect("fixture");
    (0..SLICES)
        .map(|k| {
            let mut object = OpenFileOptions::new().from_reader(&bytes[..]).unwrap();
            let position = object
                .element(tags::IMAGE_POSITION_PATIENT)
                .unwrap()
                .to_multi_float64()
                .unwrap();
            let text = format!(
                "{}\\{}\\{}",
                position[0],
                position[1],
                position[2] + 2.0 * k as f64
            );
            object.put(DataElement::new(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                PrimitiveValue::from(text),
            ));
            let uid = format!("2.25.{}", 1_000_000 + k);
            object.put(DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(uid.clone()),
            ));
            object.meta_mut().media_storage_sop_instance_uid = uid;
            let mut out = Vec::new();
            object.write_all(&mut out).unwrap();
            (format!("slice_{k:03}.dcm"), Bytes::from(out))
        })
        .collect()
}

fn from_dir(dir: &Path) -> Vec<(String, Bytes)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                Bytes::from(std::fs::read(&p).unwrap()),
            )
        })
        .collect()
}

fn series_decode(c: &mut Criterion) {
    let external = std::env::var_os("DEEPGROW_DICOM_BENCH_DIR").map(PathBuf::from);
    let series = [
        (
            "explicit_le",
            "tests/fixtures/dicom/transfer_syntaxes/slice10_explicit_le.dcm",
        ),
        (
            "j2k_lossless",
            "tests/fixtures/dicom/ct_series_j2k/slice_10.dcm",
        ),
    ];
    let mut group = c.benchmark_group(format!("dicom_series_512x512x{SLICES}"));
    group.sample_size(10);
    for (name, source) in series {
        let files = match &external {
            Some(dir) => from_dir(&dir.join(if name == "explicit_le" {
                "explicit_le"
            } else {
                "j2k_lossless"
            })),
            None => tiled(source),
        };
        let input: usize = files.iter().map(|(_, b)| b.len()).sum();
        let volume = image::open(Upload::Dicom(files.clone()), LIMITS)
            .unwrap()
            .read_volume()
            .unwrap();
        let [h, w, d] = volume.geometry.shape;
        eprintln!("{name}: {d} slices of {h} x {w}, {input} bytes in");
        group.throughput(Throughput::Bytes((h * w * d * 2) as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                image::open(Upload::Dicom(files.clone()), LIMITS)
                    .unwrap()
                    .read_volume()
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, series_decode);
criterion_main!(benches);
