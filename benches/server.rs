//! What a click costs around the pure pipeline: NIfTI decode and mask encode of a 512 x 512 x 200 int16 CT
//! (.nii and .nii.gz), one run of the bundled 512 x 512 model through tract, and a whole click over HTTP
//! on loopback through each API (AIAA and MONAI Label), with a session and with the upload.
//!
//! The CT is the small real fixture (`tests/fixtures/ct`, TotalSegmentator example, int16) tiled to
//! 512 x 512 x 200, so the gzip stream has real CT texture.
//!
//! Run: `cargo bench --bench server` (a few minutes; `cargo bench --bench server -- decode` for one group).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use deepgrow_server::config::Config;
use deepgrow_server::engine::{Engine, Kernels, TractEngine};
use deepgrow_server::nifti_io::{self, DecodeLimits, MaskDtype, VoxelData};
use ndarray::{Array2, Array4};
use std::hint::black_box;

const SHAPE: [usize; 3] = [512, 512, 200];
const LIMITS: DecodeLimits = DecodeLimits {
    max_decompressed_bytes: 4 << 30,
};

fn manifest(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The fixture CT tiled to `SHAPE`: returns the uncompressed file and its gzip.
fn tiled_ct() -> (Vec<u8>, Vec<u8>) {
    tiled_ct_to([SHAPE[0], SHAPE[1], SHAPE[2]])
}

/// The fixture CT tiled to `shape`.
fn tiled_ct_to(shape: [usize; 3]) -> (Vec<u8>, Vec<u8>) {
    let gz = std::fs::read(manifest("tests/fixtures/ct/totalseg_example_ct_sm.nii.gz"))
        .expect("CT fixture");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&gz[..]), &mut raw)
        .expect("gunzip fixture");
    let source = nifti_io::decode(&raw, LIMITS).expect("fixture decodes");
    let [ni, nj, nk] = source.geometry.shape;
    let VoxelData::I16(values) = &source.data else {
        panic!("the fixture is int16");
    };
    // Keep the fixture's header (and any extension) up to vox_offset; only the dims change.
    let vox_offset = f32::from_le_bytes(raw[108..112].try_into().unwrap()) as usize;
    let mut file = raw[..vox_offset].to_vec();
    for (n, d) in shape.iter().enumerate() {
        file[42 + 2 * n..44 + 2 * n].copy_from_slice(&(*d as i16).to_le_bytes());
    }
    file.reserve(shape.iter().product::<usize>() * 2);
    for k in 0..shape[2] {
        for j in 0..shape[1] {
            for i in 0..shape[0] {
                let v = values[i % ni + ni * (j % nj + nj * (k % nk))];
                file.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&file).unwrap();
    let gz = encoder.finish().unwrap();
    (file, gz)
}

fn codec(c: &mut Criterion) {
    let (raw, gz) = tiled_ct();
    let voxel_bytes = (SHAPE.iter().product::<usize>() * 2) as u64;
    let mut group = c.benchmark_group("decode_512x512x200_int16");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(voxel_bytes));
    group.bench_function(".nii", |b| {
        b.iter(|| nifti_io::decode(black_box(&raw), LIMITS).unwrap())
    });
    group.bench_function(".nii.gz", |b| {
        b.iter(|| nifti_io::decode(black_box(&gz), LIMITS).unwrap())
    });
    group.finish();

    // What an upload click reads: the file up to the end of the clicked slice (here the middle one).
    let mut group = c.benchmark_group("slice_100_of_512x512x200_int16");
    group.sample_size(10);
    for (name, file) in [(".nii", &raw), (".nii.gz", &gz)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                nifti_io::open(nifti_io::FileBytes::Memory(black_box(file)), LIMITS)
                    .unwrap()
                    .read_slice(100)
                    .unwrap()
            })
        });
    }
    group.finish();

    let volume = nifti_io::decode(&raw, LIMITS).unwrap();
    let mask = Array2::from_shape_fn((SHAPE[0], SHAPE[1]), |(i, j)| {
        u8::from((i as i64 - 256).pow(2) + (j as i64 - 240).pow(2) < 60 * 60)
    });
    let mut group = c.benchmark_group("encode_mask_512x512x200");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(SHAPE.iter().product::<usize>() as u64));
    for (name, compress) in [(".nii", false), (".nii.gz", true)] {
        group.bench_function(BenchmarkId::new("uint8", name), |b| {
            b.iter(|| {
                nifti_io::encode_mask_nifti(
                    &volume.geometry,
                    100,
                    mask.view(),
                    MaskDtype::U8,
                    compress,
                )
            })
        });
    }
    group.bench_function(BenchmarkId::new("uint16", ".nrrd gzip"), |b| {
        b.iter(|| {
            nifti_io::encode_mask_nrrd(&volume.geometry, 100, mask.view(), MaskDtype::U16, true)
        })
    });
    group.finish();
}

fn inference(c: &mut Criterion) {
    let threads = num_cpus::get();
    let engine = TractEngine::load(
        &manifest("models/deepgrow_2d/model.onnx"),
        [512, 512],
        threads,
        Kernels::Fast,
    )
    .expect("bundled model loads");
    // A normalised-CT-like first channel and two click maps.
    let input = Array4::from_shape_fn((1, 3, 512, 512), |(_, c, y, x)| {
        let r2 = (y as f32 - 256.0).powi(2) + (x as f32 - 240.0).powi(2);
        match c {
            0 => ((y * 7 + x * 13) % 61) as f32 / 61.0 - 0.5,
            1 => (-r2 / 8.0).exp(),
            _ => 0.0,
        }
    });
    let mut group = c.benchmark_group("inference");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function(format!("tract_512x512_{threads}_threads"), |b| {
        b.iter(|| engine.infer(input.clone()).unwrap())
    });
    group.finish();
}

/// The release server (bundled model) on a free port, on its own runtime thread.
fn start_server() -> SocketAddr {
    let config = Config::parse_from([
        "deepgrow-server",
        "--models-dir",
        manifest("models").to_str().unwrap(),
    ]);
    let registry = deepgrow_server::load_models(&config).expect("models load");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let state = deepgrow_server::build_state(&config, registry).expect("state");
            deepgrow_server::serve(listener, state, &config, std::future::pending())
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

/// One click through each API and image source, on a 512 x 512 CT of 20 and of 200 slices. Both APIs get the
/// same params (Slicer's MONAI Label click: uint8 NRRD), so they differ only in their HTTP layer.
fn http_click(c: &mut Criterion) {
    let addr = start_server();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    for depth in [20, 200] {
        let (_, gz) = tiled_ct_to([512, 512, depth]);
        let k = depth / 2;
        let params = format!(
            r#"{{"label": "liver", "foreground": [[300, 250, {k}]], "background": [[100, 100, {k}]], "slice": {k}, "result_extension": ".nrrd", "result_dtype": "uint8"}}"#
        );
        let form = |file_field: Option<&str>| {
            let form = reqwest::multipart::Form::new().text("params", params.clone());
            match file_field {
                Some(field) => form.part(
                    field.to_owned(),
                    reqwest::multipart::Part::bytes(gz.to_vec()).file_name("ct.nii.gz"),
                ),
                None => form,
            }
        };
        let session: String = runtime.block_on(async {
            let reply: serde_json::Value = client
                .put(format!("{base}/session/"))
                .multipart(reqwest::multipart::Form::new().part(
                    "files",
                    reqwest::multipart::Part::bytes(gz.to_vec()).file_name("ct.nii.gz"),
                ))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            reply["session_id"].as_str().unwrap().to_owned()
        });
        let click = |url: String, file_field: Option<&str>| {
            runtime.block_on(async {
                let reply = client
                    .post(url)
                    .multipart(form(file_field))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(reply.status(), 200);
                reply.bytes().await.unwrap()
            })
        };
        let mut group = c.benchmark_group(format!("http_click_512x512x{depth}"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(20));
        let aiaa = format!("{base}/v1/deepgrow?model=deepgrow_2d");
        let monai = format!("{base}/infer/deepgrow_2d");
        group.bench_function("aiaa_session", |b| {
            b.iter(|| click(format!("{aiaa}&session_id={session}"), None))
        });
        group.bench_function("monai_label_session", |b| {
            b.iter(|| click(format!("{monai}?image=ct&session_id={session}"), None))
        });
        group.bench_function("aiaa_upload", |b| {
            b.iter(|| click(aiaa.clone(), Some("datapoint")))
        });
        group.bench_function("monai_label_file", |b| {
            b.iter(|| click(monai.clone(), Some("file")))
        });
        group.finish();
    }
}

criterion_group!(benches, codec, inference, http_click);
fn main() {
    // As the server does (see the function): a click's timing depends on it.
    deepgrow_server::tune_malloc();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
