//! Criterion benchmarks: the E-step alone and whole epochs, on the CPU engine and on every GPU
//! adapter wgpu finds (MNIST protocol shape, 500 random images; CALM_BENCH_IMAGES changes it).
//! GFLOP/s by SPEC's count is criterion's throughput (elements = FLOPs).
//!
//!   cargo bench --bench epoch

use std::sync::Arc;

use calm_gpu::bench::random_images;
use calm_gpu::cpu::CpuEngine;
use calm_gpu::gpu::{GpuBackend, GpuContext, GpuEngine, GpuOptions};
use calm_gpu::{Engine, Geometry, LayerConfig, em};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn benches(c: &mut Criterion) {
    let n: usize = std::env::var("CALM_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let g = Geometry::new(
        LayerConfig {
            kernels: 64,
            width: 20,
            pad: 2,
        },
        1,
        28,
        28,
    )
    .unwrap();
    let data = Arc::new(random_images(7, n, 1, 28, 28));
    let theta = em::init_theta(&g, 0);
    let mut group = c.benchmark_group(format!("mnist-protocol-{n}"));
    group.sample_size(10);

    group.throughput(Throughput::Elements(g.epoch_flops(n) as u64));
    let mut cpu = CpuEngine::new(g, data.clone(), theta.clone(), 1000);
    group.bench_function("cpu/epoch", |b| b.iter(|| cpu.epoch(&mut |_| {}).unwrap()));

    for backend in [
        GpuBackend::Vulkan,
        GpuBackend::Metal,
        GpuBackend::Dx12,
        GpuBackend::Gl,
    ] {
        let Ok(ctx) = GpuContext::new(backend, false) else {
            continue;
        };
        let name = format!("{backend}:{}", ctx.info.name);
        let mut eng = GpuEngine::new(
            Arc::new(ctx),
            g,
            data.clone(),
            &theta,
            GpuOptions {
                batch: 1000,
                ..Default::default()
            },
        )
        .unwrap();
        eng.epoch(&mut |_| {}).unwrap();
        group.throughput(Throughput::Elements(g.step_flops(n) as u64));
        group.bench_function(format!("{name}/estep"), |b| {
            b.iter(|| eng.time_estep().unwrap())
        });
        group.bench_function(format!("{name}/mstep"), |b| {
            b.iter(|| eng.time_mstep().unwrap())
        });
        group.throughput(Throughput::Elements(g.epoch_flops(n) as u64));
        group.bench_function(format!("{name}/epoch"), |b| {
            b.iter(|| eng.epoch(&mut |_| {}).unwrap())
        });
    }
    group.finish();
}

criterion_group!(epoch, benches);
criterion_main!(epoch);
