//! The fast kernels against the unmodified graph: the bundled model's logits from `Kernels::Fast` must equal
//! tract's own (`Kernels::Tract`) within 1e-4 on real CT inputs (network input built by the server's own
//! pipeline from the held-out CT) and on the parity fixture input, at the model's 512 × 512 and at 256 × 256
//! (the size of NVIDIA's Clara model); the masks (logit ≥ 0) may differ only where |logit| is below that bound.

use std::path::Path;

use deepgrow_server::deepgrow::{self, Clicks};
use deepgrow_server::engine::{fast, Engine, Kernels, TractEngine};
use deepgrow_server::models::read_model_config;
use deepgrow_server::nifti_io::{decode, DecodeLimits};
use ndarray::{Array2, Array4};

const MAX_DIFF: f32 = 1e-4;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_path() -> std::path::PathBuf {
    root().join("models/deepgrow_2d/model.onnx")
}

/// Network inputs from the real CT fixture through the server's pipeline: a liver click and a kidney click.
fn ct_inputs() -> Vec<Array4<f32>> {
    let bytes =
        std::fs::read(root().join("tests/fixtures/ct/totalseg_example_ct_sm.nii.gz")).unwrap();
    let volume = decode(
        &bytes,
        DecodeLimits {
            max_decompressed_bytes: 1 << 30,
        },
    )
    .unwrap();
    let config = read_model_config(&root().join("models/deepgrow_2d"))
        .unwrap()
        .unwrap();
    let spacing = deepgrow::in_plane_spacing(&volume.geometry.affine).unwrap();
    [[[60.0, 45.0, 12.0]], [[40.0, 60.0, 8.0]]]
        .iter()
        .map(|fg| {
            let clicks = Clicks {
                foreground: fg.to_vec(),
                background: vec![[90.0, 20.0, fg[0][2]]],
                slice: None,
            };
            let guidance = deepgrow::choose_slice(&clicks, volume.geometry.shape).unwrap();
            let slice = volume.slice_f32(guidance.slice);
            deepgrow::preprocess(slice.view(), spacing, &guidance, &config.pipeline)
                .unwrap()
                .input
        })
        .collect()
}

fn fixture_input(size: usize) -> Array4<f32> {
    Array4::from_shape_fn((1, 3, size, size), |(_, c, h, w)| {
        ((h * 7 + w * 13 + c * 101) % 256) as f32 / 128.0 - 1.0
    })
}

fn compare(reference: &Array2<f32>, fast: &Array2<f32>, what: &str) {
    assert_eq!(reference.dim(), fast.dim());
    let mut max = 0f32;
    let mut mask_flips = 0;
    for (r, f) in reference.iter().zip(fast) {
        max = max.max((r - f).abs());
        if (*r >= 0.0) != (*f >= 0.0) {
            mask_flips += 1;
            assert!(r.abs() < MAX_DIFF, "{what}: mask differs at logit {r}");
        }
    }
    assert!(max <= MAX_DIFF, "{what}: max |fast - tract| = {max:e}");
    eprintln!("{what}: max |fast - tract| = {max:.2e}, {mask_flips} mask pixels differ");
}

#[test]
fn fast_kernels_match_tract_on_the_bundled_model() {
    let tract = TractEngine::load(&model_path(), [512, 512], 2, Kernels::Tract).unwrap();
    let fast = TractEngine::load(&model_path(), [512, 512], 2, Kernels::Fast).unwrap();
    assert_eq!(
        fast.kernels(),
        Kernels::Fast,
        "the bundled model must run on the fast kernels"
    );
    let mut inputs = ct_inputs();
    inputs.push(fixture_input(512));
    for (n, input) in inputs.into_iter().enumerate() {
        let want = tract.infer(input.clone()).unwrap();
        let got = fast.infer(input).unwrap();
        compare(&want, &got, &format!("input {n}"));
    }
}

#[test]
fn fast_kernels_match_tract_at_256_and_on_one_thread() {
    let tract = TractEngine::load(&model_path(), [256, 256], 1, Kernels::Tract).unwrap();
    let fast = TractEngine::load(&model_path(), [256, 256], 1, Kernels::Fast).unwrap();
    let input = fixture_input(256);
    compare(
        &tract.infer(input.clone()).unwrap(),
        &fast.infer(input).unwrap(),
        "256 x 256, 1 thread",
    );
}

#[test]
fn the_rewrite_takes_every_layer_of_the_basic_unet() {
    let mut proto = {
        use tract_onnx::prelude::Framework;
        tract_onnx::onnx()
            .proto_model_for_path(model_path())
            .unwrap()
    };
    let report = fast::rewrite(&mut proto, fast::winograd::Tile::F2);
    assert_eq!(
        report,
        fast::Report {
            conv3x3: 18,
            pointwise: 1,
            max_pool: 4,
            upsample: 4,
            fused_concats: 4,
            fused_norms: 18,
            // into NHWC after the input, back to NCHW before the output
            transposes: 2,
        }
    );
    let ops: Vec<&str> = proto
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type.as_str())
        .collect();
    for gone in [
        "Conv",
        "InstanceNormalization",
        "LeakyRelu",
        "Concat",
        "MaxPool",
        "ConvTranspose",
    ] {
        assert!(!ops.contains(&gone), "{gone} left in the rewritten graph");
    }
}
