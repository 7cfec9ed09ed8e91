//! The fast kernels against the unmodified graph run by tract's own kernels, on real CT inputs (network inputs
//! built by the server's pipeline from the held-out CT, at the model's own input size) and the parity fixture
//! input, at 512 × 512 and at 256 × 256 (the size of NVIDIA's Clara model), with 1 and 2 threads. The two agree
//! within tract's own float32 error (model_parity.rs checks each engine against the exact model), and their masks
//! (logit ≥ 0) may differ only where |logit| is below that bound. The opt-in F(4 × 4, 3 × 3) kernels give masks
//! with Dice ≥ 0.99 against the default ones.

use std::path::Path;

mod common;

use deepgrow_server::deepgrow::{self, Clicks};
use deepgrow_server::engine::{fast, Engine, Kernels, TractEngine};
use deepgrow_server::models::{read_model_config, ModelConfig};
use deepgrow_server::nifti_io::{decode, DecodeLimits};
use ndarray::{Array2, Array4};

/// On CT inputs the two engines agree to about 7e-5.
const MAX_DIFF: f32 = 2e-4;
/// Where the trained network's logits run high (the fixture's striped input; the head CT angiography golden case,
/// logits up to 25), tract's own float32 error reaches 2.2-2.5e-3 against float64, while the fast kernels stay
/// within 1e-4 of it (model_parity.rs checks both inputs against PyTorch float64).
const TRACT_ERROR: f32 = 5e-3;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn model_path() -> std::path::PathBuf {
    root().join("models/deepgrow_2d/model.onnx")
}

/// The bundled model's config.json: its pipeline builds the CT inputs, at its input size.
fn bundled_config() -> ModelConfig {
    read_model_config(&root().join("models/deepgrow_2d"))
        .unwrap()
        .unwrap()
}

fn model_size() -> [usize; 2] {
    bundled_config().pipeline.model_size
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
    let config = bundled_config();
    let spacing = deepgrow::in_plane_spacing(&volume.geometry.affine).unwrap();
    // the centres of the liver (slice 24) and the right kidney (slice 8), where the label is largest
    [[82.0, 57.0, 24.0], [81.0, 34.0, 8.0]]
        .iter()
        .map(|&fg| {
            let clicks = Clicks {
                foreground: vec![fg],
                background: vec![[110.0, 5.0, fg[2]]],
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

fn compare(reference: &Array2<f32>, fast: &Array2<f32>, what: &str, tolerance: f32) {
    assert_eq!(reference.dim(), fast.dim());
    let mut max = 0f32;
    let mut mask_flips = 0;
    for (r, f) in reference.iter().zip(fast) {
        max = max.max((r - f).abs());
        if (*r >= 0.0) != (*f >= 0.0) {
            mask_flips += 1;
            assert!(r.abs() < tolerance, "{what}: mask differs at logit {r}");
        }
    }
    assert!(max <= tolerance, "{what}: max |fast - tract| = {max:e}");
    eprintln!("{what}: max |fast - tract| = {max:.2e}, {mask_flips} mask pixels differ");
}

fn dice(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    let (mut both, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        let (p, q) = (*x >= 0.0, *y >= 0.0);
        both += (p && q) as usize;
        na += p as usize;
        nb += q as usize;
    }
    if na + nb == 0 {
        1.0
    } else {
        2.0 * both as f64 / (na + nb) as f64
    }
}

#[test]
fn fast_kernels_match_tract_on_the_bundled_model() {
    let tract = TractEngine::load(&model_path(), model_size(), 2, Kernels::Tract).unwrap();
    let fast = TractEngine::load(&model_path(), model_size(), 2, Kernels::Fast).unwrap();
    assert_eq!(
        fast.kernels(),
        Kernels::Fast,
        "the bundled model must run on the fast kernels"
    );
    for (n, input) in ct_inputs().into_iter().enumerate() {
        let want = tract.infer(input.clone()).unwrap();
        let got = fast.infer(input).unwrap();
        compare(&want, &got, &format!("CT input {n}"), MAX_DIFF);
    }
    let tract = TractEngine::load(&model_path(), [512, 512], 2, Kernels::Tract).unwrap();
    let fast = TractEngine::load(&model_path(), [512, 512], 2, Kernels::Fast).unwrap();
    let input = common::fixture_network_input(512);
    let want = tract.infer(input.clone()).unwrap();
    compare(
        &want,
        &fast.infer(input).unwrap(),
        "fixture input",
        TRACT_ERROR,
    );
}

/// The network inputs MONAI produced for the golden cases (tests/fixtures/golden), with their names.
fn golden_inputs() -> Vec<(String, Array4<f32>)> {
    let mut cases: Vec<String> = std::fs::read_dir(root().join("tests/fixtures/golden"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|c| c.join("network_input.f32.gz").is_file())
        .map(|c| c.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    cases.sort();
    cases
        .into_iter()
        .map(|case| {
            let input = common::golden_network_input(&case);
            (case, input)
        })
        .collect()
}

#[test]
fn opt_in_f4_kernels_give_the_same_masks() {
    let mut inputs: Vec<(String, Array4<f32>)> = ct_inputs()
        .into_iter()
        .enumerate()
        .map(|(n, x)| (format!("CT input {n}"), x))
        .collect();
    inputs.extend(golden_inputs());
    let mut engines = std::collections::HashMap::new();
    let mut compared = 0;
    for (name, input) in inputs {
        let size = [input.shape()[2], input.shape()[3]];
        if size.iter().any(|s| s % 16 != 0) {
            continue; // the bundled export assumes sides divisible by 16 (four 2 x 2 poolings)
        }
        let (fast, f4) = engines.entry(size).or_insert_with(|| {
            (
                TractEngine::load(&model_path(), size, 2, Kernels::Fast).unwrap(),
                TractEngine::load(&model_path(), size, 2, Kernels::FastF4).unwrap(),
            )
        });
        assert_eq!(f4.kernels(), Kernels::FastF4);
        let want = fast.infer(input.clone()).unwrap();
        let got = f4.infer(input).unwrap();
        let max = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let d = dice(&want, &got);
        eprintln!("{name}: F(4x4) vs F(2x2) max |diff| {max:.2e}, mask Dice {d:.5}");
        if want.iter().filter(|v| **v >= 0.0).count() >= 100 {
            assert!(d >= 0.99, "{name}: mask Dice {d}");
            compared += 1;
        }
    }
    assert!(
        compared >= 4,
        "only {compared} inputs gave a mask to compare"
    );
}

/// The bfloat16 kernels on the real abdominal CT inputs (model_parity.rs holds them to the exact model on every
/// golden input): their masks agree with the float32 fast kernels (themselves within 1e-4 of the exact
/// model) at Dice ≥ 0.995, and differ only where |logit| is within the bf16 bound, on 1 and 2 threads.
#[test]
fn bf16_kernels_give_the_masks_of_the_float32_ones_on_real_ct() {
    if fast::bf16::hardware().is_none() {
        eprintln!("skipped: this CPU has neither AMX nor AVX-512-BF16");
        return;
    }
    let fast = TractEngine::load(&model_path(), model_size(), 2, Kernels::Fast).unwrap();
    for threads in [1, 2] {
        let bf16 =
            TractEngine::load(&model_path(), model_size(), threads, Kernels::FastBf16).unwrap();
        assert_eq!(bf16.kernels(), Kernels::FastBf16);
        for (n, input) in ct_inputs().into_iter().enumerate() {
            let want = fast.infer(input.clone()).unwrap();
            let got = bf16.infer(input).unwrap();
            let what = format!("CT input {n}, bf16 on {threads} thread(s)");
            compare(&want, &got, &what, 0.25);
            let d = dice(&want, &got);
            eprintln!("{what}: mask Dice {d:.5}");
            assert!(
                want.iter().filter(|v| **v >= 0.0).count() >= 1000,
                "{what}: no organ"
            );
            assert!(d >= 0.995, "{what}: mask Dice {d}");
        }
    }
}

#[test]
fn fast_kernels_match_tract_at_256_and_on_one_thread() {
    let tract = TractEngine::load(&model_path(), [256, 256], 1, Kernels::Tract).unwrap();
    let fast = TractEngine::load(&model_path(), [256, 256], 1, Kernels::Fast).unwrap();
    // MONAI's network input for the head CT angiography golden case (uint8 with scl_slope), 256 x 256
    let (name, input) = golden_inputs()
        .into_iter()
        .find(|(name, _)| name == "uint8_scl_slope_avm")
        .unwrap();
    assert_eq!(input.shape(), [1, 3, 256, 256]);
    compare(
        &tract.infer(input.clone()).unwrap(),
        &fast.infer(input).unwrap(),
        &format!("{name}, 256 x 256, 1 thread"),
        TRACT_ERROR,
    );
    let input = common::fixture_network_input(256);
    compare(
        &tract.infer(input.clone()).unwrap(),
        &fast.infer(input).unwrap(),
        "fixture input, 256 x 256, 1 thread",
        TRACT_ERROR,
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
    let report = fast::rewrite(
        &mut proto,
        fast::winograd::Method::Winograd(fast::winograd::Tile::F2),
    );
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

/// A graph that mixes fusable layers with ops only tract runs, fast-op tensors read by tract ops, and a graph
/// output produced by a fast op (tests/fixtures/fast_rewrite, `tools/make_rewrite_fixture.py`): the rewrite
/// changes layouts where needed and the result equals tract's.
#[test]
fn the_rewrite_handles_mixed_graphs() {
    let path = root().join("tests/fixtures/fast_rewrite/mixed.onnx");
    let mut proto = {
        use tract_onnx::prelude::Framework;
        tract_onnx::onnx().proto_model_for_path(&path).unwrap()
    };
    let report = fast::rewrite(
        &mut proto,
        fast::winograd::Method::Winograd(fast::winograd::Tile::F2),
    );
    assert_eq!(
        report,
        fast::Report {
            conv3x3: 3,
            pointwise: 1,
            max_pool: 1,
            upsample: 1,
            fused_concats: 1,
            fused_norms: 1,
            // x in; a and y out (graph outputs); r into conv B; u and l into Add; Add's sum into the 1x1 conv
            transposes: 7,
        }
    );
    let tract = TractEngine::load(&path, [16, 16], 2, Kernels::Tract).unwrap();
    let fast = TractEngine::load(&path, [16, 16], 2, Kernels::Fast).unwrap();
    assert_eq!(fast.kernels(), Kernels::Fast);
    let input = Array4::from_shape_fn((1, 3, 16, 16), |(_, c, h, w)| {
        ((h * 5 + w * 3 + c * 7) % 11) as f32 / 5.0 - 1.0
    });
    let want = tract.infer(input.clone()).unwrap();
    let got = fast.infer(input).unwrap();
    let max = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "mixed graph: max |fast - tract| = {max:e}");
    assert!(
        want.iter().any(|v| v.abs() > 0.1),
        "the graph's output is not trivially zero"
    );
}
