//! The whole click path against the MONAI golden cases: our NIfTI decoder must give nibabel's slice and affine,
//! `annotate` must hand the engine MONAI's exact network input, and the mask it writes (from MONAI's logits)
//! must equal MONAI's restored mask on slice k and be zero elsewhere.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use deepgrow_server::admission::Inline;
use deepgrow_server::annotate::{annotate, ImageSource, MaskFormat, OutputOptions};
use deepgrow_server::deepgrow::{Clicks, PipelineConfig};
use deepgrow_server::engine::{Engine, EngineError};
use deepgrow_server::models::{Model, ModelInfo};
use deepgrow_server::nifti_io::{decode, DecodeLimits, MaskDtype, VoxelData};
use ndarray::{Array2, Array4};
use serde_json::Value;

fn golden_cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    cases
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn f32s(path: &Path) -> Vec<f32> {
    gunzip(path)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn shape(case: &Value, file: &str) -> Vec<usize> {
    serde_json::from_value(case["files"][file].clone()).unwrap()
}

/// Hands back MONAI's logits, after checking that the input it was given is MONAI's network input, bit for bit.
struct ReplayEngine {
    expected_input: Array4<f32>,
    logits: Array2<f32>,
    input_matched: AtomicBool,
}

impl Engine for ReplayEngine {
    fn input_size(&self) -> [usize; 2] {
        [self.logits.nrows(), self.logits.ncols()]
    }

    fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError> {
        let same = input.shape() == self.expected_input.shape()
            && input
                .iter()
                .zip(self.expected_input.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
        self.input_matched.store(same, Ordering::SeqCst);
        Ok(self.logits.clone())
    }
}

/// The linear part exactly; the translation to 1e-9 mm (the reference's metadata carries it through float64
/// arithmetic, one ulp away from the header's float32 value, and the pipeline never reads it).
fn assert_same_affine(got: &[[f64; 4]; 4], want: &[[f64; 4]; 4], name: &str) {
    for row in 0..4 {
        for col in 0..3 {
            assert_eq!(
                got[row][col], want[row][col],
                "{name}: affine[{row}][{col}]"
            );
        }
        assert!(
            (got[row][3] - want[row][3]).abs() < 1e-9,
            "{name}: affine[{row}][3]"
        );
    }
}

fn points(value: &Value) -> Vec<[f64; 3]> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

#[test]
fn golden_cases_end_to_end_through_annotate() {
    let cases = golden_cases();
    assert!(cases.len() >= 10, "golden cases missing");
    for dir in cases {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("input.nii.gz")).unwrap();
        let volume = decode(
            &bytes,
            DecodeLimits {
                max_decompressed_bytes: 1 << 30,
            },
        )
        .unwrap();

        // Decoder parity with nibabel: shape, affine and the chosen slice's float32 values, exactly.
        let want_shape: [usize; 3] =
            serde_json::from_value(case["volume"]["shape"].clone()).unwrap();
        assert_eq!(volume.geometry.shape, want_shape, "{name}: shape");
        let want_affine: [[f64; 4]; 4] = serde_json::from_value(case["affine"].clone()).unwrap();
        assert_same_affine(&volume.geometry.affine, &want_affine, &name);
        let k = case["expected"]["slice"].as_u64().unwrap() as usize;
        let slice = volume.slice_f32(k);
        let want_slice = f32s(&dir.join("slice_input.f32.gz"));
        let got: Vec<u32> = slice.iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = want_slice.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{name}: decoded slice differs from nibabel's");

        // annotate(): MONAI's network input in, MONAI's logits out, MONAI's mask written on slice k.
        let input_shape = shape(&case, "network_input.f32.gz");
        let expected_input = Array4::from_shape_vec(
            (
                input_shape[0],
                input_shape[1],
                input_shape[2],
                input_shape[3],
            ),
            f32s(&dir.join("network_input.f32.gz")),
        )
        .unwrap();
        let logit_shape = shape(&case, "logits.f32.gz");
        let logits = Array2::from_shape_vec(
            (logit_shape[0], logit_shape[1]),
            f32s(&dir.join("logits.f32.gz")),
        )
        .unwrap();
        let engine = Arc::new(ReplayEngine {
            expected_input,
            logits,
            input_matched: AtomicBool::new(false),
        });
        let pipeline: PipelineConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let model = Model {
            info: ModelInfo {
                name: "golden".into(),
                labels: vec![],
                description: String::new(),
                version: "1".into(),
                model_type: "deepgrow".into(),
                deepgrow: Some("2D".into()),
            },
            pipeline,
            engine: engine.clone(),
        };
        let clicks = Clicks {
            foreground: points(&case["clicks"]["foreground"]),
            background: points(&case["clicks"]["background"]),
            slice: case["clicks"]["slice"].as_i64(),
        };
        let output = OutputOptions {
            format: Some(MaskFormat::Nifti),
            dtype: MaskDtype::U8,
        };
        let annotation = annotate(
            &model,
            ImageSource::Session(Arc::new(volume)),
            &clicks,
            output,
            DecodeLimits {
                max_decompressed_bytes: 1 << 30,
            },
            &Inline,
        )
        .unwrap();
        assert!(
            engine.input_matched.load(Ordering::SeqCst),
            "{name}: network input differs from MONAI's"
        );
        assert_eq!(annotation.params.slice, k, "{name}: slice");

        let mask = decode(
            &annotation.file.to_vec(),
            DecodeLimits {
                max_decompressed_bytes: 1 << 30,
            },
        )
        .unwrap();
        assert_eq!(mask.geometry.shape, want_shape, "{name}: mask shape");
        assert_same_affine(&mask.geometry.affine, &want_affine, &name);
        let VoxelData::U8(values) = mask.data else {
            panic!("{name}: mask must be uint8")
        };
        let [h, w, d] = want_shape;
        let want_mask = gunzip(&dir.join("mask.u8.gz")); // (H, W) row-major [i][j]
        for kk in 0..d {
            for j in 0..w {
                for i in 0..h {
                    let got = values[kk * h * w + j * h + i];
                    let want = if kk == k { want_mask[i * w + j] } else { 0 };
                    assert_eq!(got, want, "{name}: mask voxel ({i}, {j}, {kk})");
                }
            }
        }
    }
}
