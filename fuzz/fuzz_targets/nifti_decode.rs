//! Arbitrary bytes -> `nifti_io::decode`; on success, slices, mask encoding (NIfTI and NRRD) and a re-decode.
#![no_main]

#[path = "../common/mod.rs"]
mod common;

use deepgrow_server::nifti_io::{
    decode, encode_mask_nifti, encode_mask_nrrd, DecodeLimits, MaskDtype, VoxelData,
};
use libfuzzer_sys::fuzz_target;
use ndarray::Array2;

/// Small enough that no legitimate input can take the fuzzer past -rss_limit_mb.
const LIMITS: DecodeLimits = DecodeLimits {
    max_decompressed_bytes: 64 << 20,
};
/// Masks are encoded only for volumes up to this many voxels (the encoders write the whole volume).
const MAX_ENCODE_VOXELS: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(volume) = decode(data, LIMITS) else {
        return;
    };
    let [h, w, d] = volume.geometry.shape;
    assert!(
        h > 0 && w > 0 && d > 0,
        "decoded an empty shape {:?}",
        volume.geometry.shape
    );
    assert_eq!(
        volume.data.len(),
        h * w * d,
        "voxel count does not match the shape"
    );
    assert!(volume
        .geometry
        .affine
        .iter()
        .flatten()
        .all(|v| v.is_finite()));
    if let Some(s) = volume.scaling {
        assert!(s.slope.is_finite() && s.slope != 0.0 && s.inter.is_finite());
    }

    for k in [0, d / 2, d - 1] {
        let slice = volume.slice_f32(k);
        assert_eq!(slice.dim(), (h, w));
        // The unscaled voxels must come back exactly for the integer types that f32 represents.
        if volume.scaling.is_none() {
            if let VoxelData::U8(values) = &volume.data {
                assert_eq!(
                    slice[[h - 1, w - 1]],
                    values[(k * w + w - 1) * h + h - 1] as f32
                );
            }
        }
    }

    if h * w * d > MAX_ENCODE_VOXELS {
        return;
    }
    let k = d - 1;
    let mut mask = Array2::<u8>::zeros((h, w));
    mask[[h - 1, w - 1]] = 1;
    let selector = data.len() % 4;
    let dtype = if selector & 1 == 0 {
        MaskDtype::U8
    } else {
        MaskDtype::U16
    };
    let compress = selector & 2 != 0;

    let encoded = encode_mask_nifti(&volume.geometry, k, mask.view(), dtype, compress).to_vec();
    let again = decode(&encoded, LIMITS)
        .unwrap_or_else(|e| panic!("the encoded mask does not decode: {e}"));
    assert_eq!(
        again.geometry.shape, volume.geometry.shape,
        "shape does not round-trip"
    );
    assert_eq!(
        again.geometry.affine, volume.geometry.affine,
        "affine does not round-trip"
    );
    assert_eq!(again.was_compressed, compress);
    assert_eq!(again.scaling, None);
    let last = (k * w + w - 1) * h + h - 1;
    let ones = match &again.data {
        VoxelData::U8(v) => {
            assert_eq!(dtype, MaskDtype::U8);
            v.iter()
                .enumerate()
                .filter(|(_, &x)| x != 0)
                .map(|(n, &x)| (n, x as u16))
                .collect::<Vec<_>>()
        }
        VoxelData::U16(v) => {
            assert_eq!(dtype, MaskDtype::U16);
            v.iter()
                .enumerate()
                .filter(|(_, &x)| x != 0)
                .map(|(n, &x)| (n, x))
                .collect::<Vec<_>>()
        }
        other => panic!("mask decoded as {}", other.datatype_name()),
    };
    assert_eq!(ones, vec![(last, 1u16)], "mask voxels do not round-trip");

    let nrrd = encode_mask_nrrd(&volume.geometry, k, mask.view(), dtype, compress).to_vec();
    let split = nrrd
        .windows(2)
        .position(|p| p == b"\n\n")
        .expect("NRRD header ends with a blank line");
    let header = std::str::from_utf8(&nrrd[..split]).expect("NRRD header is text");
    assert!(header.starts_with("NRRD0004\n"));
    assert!(
        header.contains(&format!("\nsizes: {h} {w} {d}\n")),
        "{header}"
    );
    assert_eq!(
        header
            .lines()
            .filter(|l| l.starts_with("space directions:"))
            .count(),
        1
    );
    let payload = &nrrd[split + 2..];
    let voxels = if compress {
        common::gunzip(payload)
    } else {
        payload.to_vec()
    };
    assert_eq!(voxels.len(), h * w * d * dtype.bytes(), "NRRD payload size");
    let at = last * dtype.bytes();
    assert_eq!(voxels[at], 1);
    assert_eq!(voxels.iter().filter(|&&b| b != 0).count(), 1);
});
