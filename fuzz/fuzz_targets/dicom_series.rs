//! Arbitrary bytes -> a DICOM upload (one file, or up to four cut from the input; a file may be a zip) ->
//! `image::open` -> the clicked slice and the whole volume. Nothing panics, nothing allocates past the limit,
//! and whatever is accepted is a consistent volume.
#![no_main]

use bytes::Bytes;
use deepgrow_server::image::{self, OpenImage, Upload};
use deepgrow_server::nifti_io::DecodeLimits;
use libfuzzer_sys::fuzz_target;

#[path = "../common/mod.rs"]
mod common;

const LIMITS: DecodeLimits = DecodeLimits {
    max_decompressed_bytes: 64 << 20,
};

fn files(data: &[u8]) -> Vec<(String, Bytes)> {
    common::cut_files(data)
        .into_iter()
        .enumerate()
        .map(|(n, file)| (format!("f{n}.dcm"), Bytes::copy_from_slice(file)))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(opened) = image::open(Upload::Dicom(files(data)), LIMITS) else {
        return;
    };
    let OpenImage::Dicom(_) = &opened else {
        panic!("a DICOM upload opened as something else");
    };
    let geometry = opened.geometry().clone();
    let [h, w, d] = geometry.shape;
    assert!(h > 0 && w > 0 && d > 0, "{:?}", geometry.shape);
    assert!(opened.volume_bytes() <= LIMITS.max_decompressed_bytes);
    assert!(geometry.affine.iter().flatten().all(|v| v.is_finite()), "{:?}", geometry.affine);
    let presented = geometry.as_presented();
    assert!(presented.affine.iter().flatten().all(|v| v.is_finite()));
    let Ok(volume) = opened.read_volume() else {
        return;
    };
    assert_eq!(volume.data.len(), h * w * d);
    let slice = volume.slice_f32(d - 1);
    assert_eq!(slice.dim(), (h, w));
});
