//! Deepgrow 2D pre- and post-processing on a 512 x 512 CT-sized slice.
//!
//! The slice is passed as the server passes it: a non-contiguous `(H, W)` view (strides `(1, H)`)
//! of a column-major NIfTI-order volume. Two spacings (0.7 mm -> 359 x 359, and 0.9766 mm
//! -> 500 x 500) and two model geometries (model 512 / crop 512, the bundled model; model 256 /
//! crop 256, the NGC model).
//!
//! Run: `cargo bench --bench pipeline`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use deepgrow_server::deepgrow::{
    choose_slice, postprocess, preprocess, Clicks, PipelineConfig, SliceGuidance,
};
use ndarray::{Array2, Array3, Axis, ShapeBuilder};
use std::hint::black_box;

const N: usize = 512;
const DEPTH: usize = 3;

/// A CT-like slice in HU: air, a body ellipse with organs and a bone ring, some texture.
fn volume() -> Array3<f32> {
    Array3::from_shape_fn((N, N, DEPTH).f(), |(i, j, k)| {
        let (y, x) = (
            i as f32 / N as f32 * 2.0 - 1.0,
            j as f32 / N as f32 * 2.0 - 1.0,
        );
        let r = (y / 0.9).powi(2) + (x / 0.8).powi(2);
        let base = if r > 1.0 {
            -1000.0
        } else if (r.sqrt() - 0.85).abs() < 0.04 {
            900.0
        } else if (y + 0.3).powi(2) + (x + 0.2).powi(2) < 0.06 {
            160.0
        } else {
            40.0 + 30.0 * y - 20.0 * x
        };
        base + 25.0 * (7.0 * y + k as f32).sin() * (5.0 * x).cos() + ((i * 31 + j * 17) % 13) as f32
    })
}

fn guidance(shape: [usize; 3]) -> SliceGuidance {
    let clicks = Clicks {
        foreground: vec![[250.0, 260.0, 1.0], [270.0, 300.0, 1.0]],
        background: vec![[150.0, 140.0, 1.0]],
        slice: None,
    };
    choose_slice(&clicks, shape).expect("valid clicks")
}

fn config(size: usize) -> PipelineConfig {
    PipelineConfig {
        model_size: [size, size],
        crop_size: [size, size],
        ..PipelineConfig::clara_deepgrow_2d()
    }
}

fn logits(size: usize) -> Array2<f32> {
    Array2::from_shape_fn((size, size), |(r, c)| {
        let (y, x) = (r as f32 / size as f32 - 0.5, c as f32 / size as f32 - 0.5);
        0.05 - y * y - x * x + 0.01 * (40.0 * y).sin()
    })
}

fn bench(c: &mut Criterion) {
    let vol = volume();
    let g = guidance([N, N, DEPTH]);
    let slice = vol.index_axis(Axis(2), g.slice);
    assert_eq!(slice.strides(), &[1, N as isize]);

    // NIfTI stores float32 spacings: these are the header values widened to f64.
    let spacings = [
        ("0.7mm", f64::from(0.7f32)),
        ("0.9766mm", f64::from(0.976_562_5f32)),
    ];
    let mut group = c.benchmark_group("deepgrow_512x512");
    for size in [512usize, 256] {
        let cfg = config(size);
        let l = logits(size);
        for (name, s) in spacings {
            let id = format!("model{size}_{name}");
            group.bench_with_input(BenchmarkId::new("preprocess", &id), &s, |b, &s| {
                b.iter(|| preprocess(black_box(slice), [s, s], black_box(&g), &cfg).unwrap())
            });
            let pre = preprocess(slice, [s, s], &g, &cfg).unwrap();
            group.bench_with_input(BenchmarkId::new("postprocess", &id), &pre, |b, pre| {
                b.iter(|| postprocess(black_box(l.view()), black_box(&pre.restore)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
