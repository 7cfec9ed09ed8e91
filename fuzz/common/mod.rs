//! Helpers shared by the fuzz targets: the fake engine of tests/common, a tiny NIfTI-1 writer, gzip.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::sync::Arc;

use deepgrow_server::deepgrow::PipelineConfig;
use deepgrow_server::engine::{Engine, EngineError};
use deepgrow_server::models::{Model, ModelInfo};
use ndarray::{s, Array2, Array4};

/// Logits = positive guidance - 0.5 (copied from tests/common/mod.rs): the mask is the foreground clicks' blobs.
pub struct GuidanceEngine {
    pub size: [usize; 2],
}

impl Engine for GuidanceEngine {
    fn input_size(&self) -> [usize; 2] {
        self.size
    }

    fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError> {
        Ok(input.slice(s![0, 1, .., ..]).mapv(|v| v - 0.5))
    }
}

/// The small pipeline the fuzz targets use: 64 x 64 network input and crop, otherwise the Clara values.
pub fn small_pipeline() -> PipelineConfig {
    PipelineConfig {
        model_size: [64, 64],
        crop_size: [64, 64],
        ..PipelineConfig::clara_deepgrow_2d()
    }
}

pub fn fake_model(name: &str) -> Arc<Model> {
    let pipeline = small_pipeline();
    Arc::new(Model {
        info: ModelInfo {
            name: name.into(),
            labels: vec!["spleen".into()],
            description: "fake deepgrow model for fuzzing".into(),
            version: "1".into(),
            model_type: "deepgrow".into(),
            deepgrow: Some("2D".into()),
        },
        engine: Arc::new(GuidanceEngine {
            size: pipeline.model_size,
        }),
        pipeline,
    })
}

/// Header fields of a single-file NIfTI-1 (`.nii`), written byte by byte (independent of the decoder).
#[derive(Debug, Clone)]
pub struct NiftiSpec {
    pub big_endian: bool,
    pub sizeof_hdr: i32,
    pub dim: [i16; 8],
    pub datatype: i16,
    pub bitpix: i16,
    pub pixdim: [f32; 8],
    pub vox_offset: f32,
    pub scl_slope: f32,
    pub scl_inter: f32,
    pub qform_code: i16,
    pub sform_code: i16,
    pub quatern: [f32; 6],
    pub srow: [[f32; 4]; 3],
    pub magic: [u8; 4],
}

impl NiftiSpec {
    /// A valid little-endian uint8 volume of the given shape with an axis-aligned sform.
    pub fn simple(shape: [i16; 3]) -> Self {
        NiftiSpec {
            big_endian: false,
            sizeof_hdr: 348,
            dim: [3, shape[0], shape[1], shape[2], 1, 1, 1, 1],
            datatype: 2,
            bitpix: 8,
            pixdim: [1.0, 0.8, 0.8, 2.5, 1.0, 1.0, 1.0, 1.0],
            vox_offset: 352.0,
            scl_slope: 0.0,
            scl_inter: 0.0,
            qform_code: 0,
            sform_code: 2,
            quatern: [0.0; 6],
            srow: [
                [-0.8, 0.0, 0.0, 10.0],
                [0.0, 0.8, 0.0, -20.0],
                [0.0, 0.0, 2.5, 30.0],
            ],
            magic: *b"n+1\0",
        }
    }

    /// The 352-byte header + extension flag (zero), then `data`.
    pub fn write(&self, data: &[u8]) -> Vec<u8> {
        let be = self.big_endian;
        let mut h = vec![0u8; 352];
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        macro_rules! b {
            ($v:expr) => {
                if be {
                    $v.to_be_bytes()
                } else {
                    $v.to_le_bytes()
                }
            };
        }
        put(0, &b!(self.sizeof_hdr));
        for (n, d) in self.dim.iter().enumerate() {
            put(40 + 2 * n, &b!(*d));
        }
        put(70, &b!(self.datatype));
        put(72, &b!(self.bitpix));
        for (n, p) in self.pixdim.iter().enumerate() {
            put(76 + 4 * n, &b!(*p));
        }
        put(108, &b!(self.vox_offset));
        put(112, &b!(self.scl_slope));
        put(116, &b!(self.scl_inter));
        put(252, &b!(self.qform_code));
        put(254, &b!(self.sform_code));
        for (n, q) in self.quatern.iter().enumerate() {
            put(256 + 4 * n, &b!(*q));
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                put(280 + 16 * r + 4 * c, &b!(*v));
            }
        }
        put(344, &self.magic);
        h.extend_from_slice(data);
        h
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("writing to a Vec");
    encoder.finish().expect("writing to a Vec")
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("our own gzip output decompresses");
    out
}

// `cut_files`, in a file of its own so that tests/dicom_series.rs replays the fuzz findings with it.
#[path = "cut.rs"]
mod cut;
pub use cut::cut_files;
