//! The DICOM series reader on the real 20-slice JPEG 2000 CT series (tests/fixtures/dicom): the same HU at the
//! same world points as its NIfTI conversion, every transfer syntax of one of its slices, an Enhanced CT
//! multi-frame instance, a zip of the series, and each kind of broken series refused with its reason.

mod common;

use bytes::Bytes;
use common::*;
use deepgrow_server::dicom::{open_series, DicomError, DicomFile};
use deepgrow_server::image::{self, Upload};
use deepgrow_server::nifti_io::{self, Volume, VoxelData};
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;

const SERIES: &str = "tests/fixtures/dicom/ct_series_j2k";

fn series_files() -> Vec<(String, Vec<u8>)> {
    (0..20)
        .map(|k| {
            let name = format!("slice_{k:02}.dcm");
            let bytes = read_fixture(&format!("{SERIES}/{name}"));
            (name, bytes)
        })
        .collect()
}

fn open(files: &[(String, Vec<u8>)]) -> Result<deepgrow_server::dicom::Series, DicomError> {
    let files: Vec<DicomFile<'_>> = files
        .iter()
        .map(|(name, bytes)| DicomFile { name, bytes })
        .collect();
    open_series(&files, LIMITS)
}

fn read(files: &[(String, Vec<u8>)]) -> Result<Volume, DicomError> {
    open(files)?.read_volume()
}

fn i16_voxels(volume: &Volume) -> &[i16] {
    match &volume.data {
        VoxelData::I16(values) => values,
        other => panic!("int16 HU, got {}", other.datatype_name()),
    }
}

/// `affine · [i, j, k, 1]`.
fn world(affine: &[[f64; 4]; 4], index: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|r| {
        affine[r][0] * index[0] + affine[r][1] * index[1] + affine[r][2] * index[2] + affine[r][3]
    })
}

/// Slice `k` of the series volume (512 x 512, i = column fastest).
fn plane(volume: &Volume, k: usize) -> Vec<i16> {
    let [h, w, _] = volume.geometry.shape;
    i16_voxels(volume)[k * h * w..(k + 1) * h * w].to_vec()
}

fn reencode(bytes: &[u8], edit: impl FnOnce(&mut dicom_object::DefaultDicomObject)) -> Vec<u8> {
    let mut object = OpenFileOptions::new().from_reader(bytes).unwrap();
    edit(&mut object);
    let mut out = Vec::new();
    object.write_all(&mut out).unwrap();
    out
}

fn set_position(object: &mut dicom_object::DefaultDicomObject, position: [f64; 3]) {
    let text = format!("{}\\{}\\{}", position[0], position[1], position[2]);
    object.put(DataElement::new(
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        PrimitiveValue::from(text),
    ));
}

fn position(bytes: &[u8]) -> [f64; 3] {
    let object = OpenFileOptions::new().from_reader(bytes).unwrap();
    let values = object
        .element(tags::IMAGE_POSITION_PATIENT)
        .unwrap()
        .to_multi_float64()
        .unwrap();
    [values[0], values[1], values[2]]
}

#[test]
fn the_series_is_its_nifti_conversion() {
    let volume = read(&series_files()).expect("the series reads");
    assert_eq!(volume.geometry.shape, [512, 512, 20]);
    let nifti = nifti_io::decode(
        &read_fixture("tests/fixtures/dicom/totalseg_example_ct_dicom_slice10.nii.gz"),
        LIMITS,
    )
    .unwrap();
    assert_eq!(nifti.geometry.shape, [512, 512, 1]);
    let VoxelData::I16(expected) = &nifti.data else {
        panic!("the NIfTI slice is int16")
    };
    // Stored as its NIfTI conversion is (rows reversed from the images, see `Geometry::rows_reversed`): the
    // same HU at the same index and world point.
    assert!(volume.geometry.rows_reversed);
    assert_eq!(&plane(&volume, 10), expected);
    for [i, j] in [[0, 0], [511, 0], [100, 311], [511, 511]] {
        let a = world(&volume.geometry.affine, [i as f64, j as f64, 10.0]);
        let b = world(&nifti.geometry.affine, [i as f64, j as f64, 0.0]);
        for axis in 0..3 {
            assert!(
                (a[axis] - b[axis]).abs() < 1e-3,
                "world point of [{i}, {j}, 10]: {a:?} vs {b:?}"
            );
        }
    }
    // What clients see is the images' own order (ITK's and OHIF's): row r of slice_10 at j = r, and the
    // first pixel of the first slice at the first slice's ImagePositionPatient (in RAS).
    let presented = volume.geometry.as_presented();
    assert!(!presented.rows_reversed);
    let first = position(&read_fixture(&format!("{SERIES}/slice_00.dcm")));
    let origin = world(&presented.affine, [0.0, 0.0, 0.0]);
    let ras = [-first[0], -first[1], first[2]];
    for axis in 0..3 {
        assert!(
            (origin[axis] - ras[axis]).abs() < 1e-3,
            "{origin:?} vs {ras:?}"
        );
    }
    let a = presented.affine;
    assert!(
        a[1][1] < 0.0,
        "rows run toward posterior (RAS -y), as the images' rows do"
    );
    // 2 mm steps along +z (k in position order), 0.977 mm pixels
    assert!((a[2][2] - 2.0).abs() < 1e-9 && (a[0][0].abs() - 0.9765625).abs() < 1e-9);
    // Masks written for the series carry that geometry: its NIfTI header reads back to the same affine.
    let mask = nifti_io::encode_mask_nifti(
        &presented,
        10,
        ndarray::Array2::zeros((512, 512)).view(),
        nifti_io::MaskDtype::U8,
        false,
    );
    let bytes: Vec<u8> = mask.0.iter().flat_map(|c| c.to_vec()).collect();
    let reread = nifti_io::decode(&bytes, LIMITS).unwrap();
    for r in 0..3 {
        for c in 0..4 {
            assert!(
                (reread.geometry.affine[r][c] - a[r][c]).abs() < 1e-3,
                "{:?} vs {a:?}",
                reread.geometry.affine
            );
        }
    }
}

#[test]
fn the_order_of_the_files_does_not_matter() {
    let mut files = series_files();
    let sorted = read(&files).unwrap();
    files.reverse();
    files.swap(3, 11);
    let shuffled = read(&files).unwrap();
    assert_eq!(i16_voxels(&sorted), i16_voxels(&shuffled));
    assert_eq!(sorted.geometry.affine, shuffled.geometry.affine);
    // a slice alone is the volume's slice
    let series = open(&files).unwrap();
    let slice = series.read_slice(7).unwrap();
    let whole = sorted.slice_f32(7);
    assert_eq!(slice, whole);
}

#[test]
fn every_transfer_syntax_gives_the_same_hu() {
    let reference = plane(&read(&series_files()).unwrap(), 10);
    let lossless = [
        "implicit_le",
        "explicit_le",
        "explicit_be",
        "deflated",
        "rle",
        "jpeg_ls14sv1",
        "jpeg_ls14",
    ];
    let variant = |name: &str| {
        let file = format!("slice10_{name}.dcm");
        let bytes = read_fixture(&format!("tests/fixtures/dicom/transfer_syntaxes/{file}"));
        read(&[(file, bytes)])
    };
    for name in lossless {
        let volume = variant(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(volume.geometry.shape, [512, 512, 1], "{name}");
        assert_eq!(plane(&volume, 0), reference, "{name}: the same HU");
    }
    let lossy = variant("j2k_lossy").unwrap();
    let worst = plane(&lossy, 0)
        .iter()
        .zip(&reference)
        .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
        .max()
        .unwrap();
    assert!(
        worst > 0 && worst <= 25,
        "lossy JPEG 2000 within 25 HU, got {worst}"
    );
    // JPEG-LS has no pure-Rust decoder here: refused by name before any pixel is read.
    match variant("jpegls") {
        Err(DicomError::UnsupportedTransferSyntax { uid, .. }) => {
            assert_eq!(uid, "1.2.840.10008.1.2.4.80")
        }
        other => panic!("JPEG-LS: {:?}", other.map(|_| ())),
    }
    // 12-bit JPEG extended: the decoder refuses the sample precision, and says so.
    let error = variant("jpeg_extended12").unwrap_err().to_string();
    assert!(error.contains("could not be decoded"), "{error}");
}

#[test]
fn an_enhanced_multi_frame_instance_is_sorted_by_position() {
    let bytes = read_fixture("tests/fixtures/dicom/enhanced_ct_3frames.dcm");
    let volume = read(&[("enhanced.dcm".into(), bytes)]).unwrap();
    assert_eq!(volume.geometry.shape, [512, 512, 3]);
    let series = read(&series_files()).unwrap();
    for (k, source) in [9, 10, 11].into_iter().enumerate() {
        assert_eq!(
            plane(&volume, k),
            plane(&series, source),
            "frame at slice {source}"
        );
    }
    let origin = world(&volume.geometry.affine, [0.0, 0.0, 0.0]);
    let expected = world(&series.geometry.affine, [0.0, 0.0, 9.0]);
    for axis in 0..3 {
        assert!((origin[axis] - expected[axis]).abs() < 1e-3);
    }
}

#[test]
fn a_zip_of_the_series_reads_the_same() {
    let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    archive.add_directory("series/", options).unwrap();
    archive.start_file("DICOMDIR", options).unwrap();
    std::io::Write::write_all(&mut archive, b"not an image").unwrap();
    for (name, bytes) in series_files() {
        archive
            .start_file(format!("series/{name}"), options)
            .unwrap();
        std::io::Write::write_all(&mut archive, &bytes).unwrap();
    }
    let zipped = archive.finish().unwrap().into_inner();
    assert_eq!(image::sniff(&zipped), image::Format::Zip);
    let volume = image::open(
        Upload::Dicom(vec![("series.zip".into(), Bytes::from(zipped))]),
        LIMITS,
    )
    .unwrap()
    .read_volume()
    .unwrap();
    assert_eq!(
        i16_voxels(&volume),
        i16_voxels(&read(&series_files()).unwrap())
    );
}

#[test]
fn broken_series_are_refused_with_their_reason() {
    let files = series_files();
    let refused = |files: &[(String, Vec<u8>)]| match open(files).and_then(|s| s.read_volume()) {
        Ok(_) => panic!("accepted"),
        Err(error) => error,
    };

    let mut mixed = files.clone();
    mixed.push((
        "other.dcm".into(),
        read_fixture("tests/fixtures/dicom/other_series_ct_small.dcm"),
    ));
    assert!(matches!(
        refused(&mixed),
        DicomError::SeveralSeries { count: 2, .. }
    ));

    let mut missing = files.clone();
    missing.remove(5);
    let error = refused(&missing);
    assert!(
        matches!(error, DicomError::NonUniformSteps { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("missing slice"));

    let mut duplicate = files.clone();
    duplicate.push(("copy_of_slice_03.dcm".into(), files[3].1.clone()));
    assert!(matches!(
        refused(&duplicate),
        DicomError::DuplicatePosition { .. }
    ));

    // a stack sheared along x by 0.5 mm a slice: a gantry tilt of 14 degrees
    let tilted: Vec<(String, Vec<u8>)> = files
        .iter()
        .enumerate()
        .map(|(k, (name, bytes))| {
            let [x, y, z] = position(bytes);
            (
                name.clone(),
                reencode(bytes, |o| set_position(o, [x + 0.5 * k as f64, y, z])),
            )
        })
        .collect();
    let error = refused(&tilted);
    assert!(
        matches!(error, DicomError::Tilted { degrees } if (degrees - 14.0).abs() < 0.5),
        "{error}"
    );

    // one slice 0.5 mm off its place: not evenly stepped
    let mut uneven = files.clone();
    let [x, y, z] = position(&uneven[7].1);
    uneven[7].1 = reencode(&uneven[7].1, |o| set_position(o, [x, y, z + 0.5]));
    assert!(matches!(
        refused(&uneven),
        DicomError::NonUniformSteps { .. }
    ));

    let mut no_pixels = files.clone();
    no_pixels[2].1 = reencode(&no_pixels[2].1, |o| {
        o.remove_element(tags::PIXEL_DATA);
    });
    assert!(
        matches!(refused(&no_pixels), DicomError::NoPixelData { name } if name == "slice_02.dcm")
    );

    let mut not_dicom = files.clone();
    not_dicom.push(("notes.txt".into(), b"patient notes, not an image".to_vec()));
    assert!(
        matches!(refused(&not_dicom), DicomError::NotDicom { name, .. } if name == "notes.txt")
    );

    let mut truncated = files.clone();
    let half = truncated[4].1.len() / 2;
    truncated[4].1.truncate(half);
    let error = refused(&truncated);
    assert!(error.to_string().contains("slice_04.dcm"), "{error}");

    let colour = vec![(
        "rgb.dcm".into(),
        read_fixture("tests/fixtures/dicom/colour_rgb.dcm"),
    )];
    assert!(matches!(
        refused(&colour),
        DicomError::Colour { samples: 3, .. }
    ));

    assert!(matches!(refused(&[]), DicomError::Empty));

    // what the series would decode to, beyond the limit, is refused before any pixel is decoded
    let small = deepgrow_server::nifti_io::DecodeLimits {
        max_decompressed_bytes: 1 << 20,
    };
    let names: Vec<DicomFile<'_>> = files
        .iter()
        .map(|(name, bytes)| DicomFile { name, bytes })
        .collect();
    assert!(matches!(
        open_series(&names, small),
        Err(DicomError::TooLarge { .. })
    ));
}

#[path = "../fuzz/common/cut.rs"]
mod cut;

/// What the `dicom_series` fuzz target found (fuzz/regressions/dicom_series/: element lengths claiming gigabytes
/// in a few kilobytes, an element header past its item's end), replayed as the target cuts its input into files:
/// never a panic, and a volume only within the target's 64 MiB limit.
#[test]
fn fuzzer_findings_stay_fixed() {
    let limits = nifti_io::DecodeLimits {
        max_decompressed_bytes: 64 << 20,
    };
    let dir = manifest_path("fuzz/regressions/dicom_series");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/regressions/dicom_series") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let files: Vec<(String, Bytes)> = cut::cut_files(&data)
            .into_iter()
            .enumerate()
            .map(|(n, file)| (format!("f{n}.dcm"), Bytes::copy_from_slice(file)))
            .collect();
        let outcome = std::panic::catch_unwind(|| {
            image::open(Upload::Dicom(files), limits).map(|file| {
                assert!(file.volume_bytes() <= 64 << 20);
                file.read_volume().map(|v| v.byte_size())
            })
        });
        assert!(outcome.is_ok(), "{} panicked", path.display());
        replayed += 1;
    }
    assert!(replayed >= 3, "{replayed} inputs in {}", dir.display());
}
