//! Per-operator profile of a model as tract runs it (after `into_optimized`), timed in-process around each
//! node's evaluation: where the network's time goes, by op kind and by node.
//!
//! Run: `cargo bench --bench tract_profile -- [model.onnx] [threads] [runs] [size] [fast|fast-f4|tract]`
//! (defaults: the bundled model, 2 threads, 5 timed runs after one warm-up, 512 x 512 input, the server's
//! default fast kernels; `tract` profiles the unmodified graph).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use deepgrow_server::engine::Kernels;
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};

fn main() -> TractResult<()> {
    // As the server does: activations reused from the heap instead of page-faulted in for every layer.
    deepgrow_server::tune_malloc();
    // `cargo bench` passes `--bench`; keep only positional arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let path = args.first().cloned().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/models/deepgrow_2d/model.onnx").to_owned()
    });
    let threads: usize = args.get(1).map_or(Ok(2), |a| a.parse())?;
    let runs: u32 = args.get(2).map_or(Ok(5), |a| a.parse())?;

    let size: usize = args.get(3).map_or(Ok(512), |a| a.parse())?;
    let shape = [1, 3, size, size];
    let kernels = match args.get(4) {
        Some(k) => Kernels::from_str(k, true).map_err(|e| anyhow::anyhow!("kernels: {e}"))?,
        None => Kernels::Fast,
    };
    let mut onnx = tract_onnx::onnx();
    let mut proto = onnx.proto_model_for_path(&path)?;
    if let Some(method) = kernels.conv3x3_method() {
        let report = deepgrow_server::engine::fast::install(&mut onnx, &mut proto, method)?;
        println!("fast kernels: {report:?}");
    }
    let model = onnx
        .model_for_proto_model(&proto)?
        .with_input_fact(0, f32::fact(shape).into())?
        .into_optimized()?;
    let plan = SimplePlan::new(model)?;
    let executor = if threads > 1 {
        Executor::multithread(threads)
    } else {
        Executor::SingleThread
    };
    let input: Tensor = tract_ndarray::Array4::<f32>::from_shape_fn(shape, |(_, c, y, x)| {
        ((c * 31 + y * 7 + x * 13) % 97) as f32 / 97.0 - 0.5
    })
    .into();

    let mut per_node: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut total = Duration::ZERO;
    for run in 0..=runs {
        let mut state = SimpleState::new(&plan)?;
        let mut times: Vec<(usize, Duration)> = Vec::new();
        let start = Instant::now();
        multithread_tract_scope(executor.clone(), || {
            state.run_plan_with_eval(
                tvec!(input.clone().into()),
                |ctx, op_state, node, inputs| {
                    let t = Instant::now();
                    let result = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    times.push((node.id, t.elapsed()));
                    result
                },
            )
        })?;
        // The first run is a warm-up.
        if run > 0 {
            total += start.elapsed();
            for (id, t) in times {
                *per_node.entry(id).or_default() += t;
            }
        }
    }
    let model = plan.model();
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / f64::from(runs);
    let mut per_op: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
    for (&id, &t) in &per_node {
        let entry = per_op
            .entry(model.node(id).op().name().to_string())
            .or_default();
        entry.0 += 1;
        entry.1 += t;
    }
    let total_ms = ms(total);
    println!("{path}: input {shape:?}, {threads} thread(s), mean of {runs} runs: {total_ms:.1} ms per run\n");
    println!("{:<28} {:>6} {:>10} {:>7}", "op", "nodes", "ms", "share");
    let mut ops: Vec<_> = per_op.into_iter().collect();
    ops.sort_by_key(|(_, (_, t))| std::cmp::Reverse(*t));
    for (op, (nodes, t)) in ops {
        println!(
            "{op:<28} {nodes:>6} {:>10.1} {:>6.1}%",
            ms(t),
            100.0 * ms(t) / total_ms
        );
    }
    println!("\nslowest nodes:");
    let mut nodes: Vec<_> = per_node.into_iter().collect();
    nodes.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    for (id, t) in nodes.into_iter().take(20) {
        let node = model.node(id);
        let output = model.outlet_fact(OutletId::new(id, 0))?;
        println!(
            "{:>8.1} ms  {:<24} {:<40} -> {:?}",
            ms(t),
            node.op().name(),
            node.name,
            output.shape
        );
    }
    Ok(())
}
