//! `calm-gpu validate` (every GPU kernel against the CPU reference) and `calm-gpu devices`.

use std::sync::Arc;

use anyhow::{Result, bail};
use clap::Args;

use super::values;
use calm_gpu::Device;
use calm_gpu::Geometry;
use calm_gpu::gpu::GpuContext;

#[derive(Args)]
pub struct ValidateArgs {
    /// The GPU backend to check (auto takes the best adapter, software ones included)
    #[arg(long, value_parser = values::device(), default_value_t = Device::Auto)]
    pub backend: Device,
}

pub(super) fn validate(a: ValidateArgs) -> Result<()> {
    let Some(b) = a.backend.gpu() else {
        bail!(
            "validate compares a GPU backend with the CPU reference; choose --backend vulkan, metal, dx12, gl or auto"
        );
    };
    let cfg = super::gpu_config()?;
    let ctx = Arc::new(GpuContext::open(b, false, &cfg)?);
    println!("adapter: {}", ctx.describe());
    println!("{}", ctx.describe_coop());
    println!(
        "kernels: {:?} (CALM_KERNELS=staged, direct, uniform or coop chooses)",
        cfg.kernels
            .unwrap_or_else(|| calm_gpu::gpu::kernels::Variant::builtin(&ctx.info))
    );
    // The shapes the tuning file (`calm-gpu tune`) has a choice for run that choice here too.
    for (_, c, h, w, layer, _) in calm_gpu::validate::cases() {
        let g = Geometry::new(layer, c, h, w)?;
        let Some(tune_file) = &cfg.tune_file else {
            break;
        };
        match calm_gpu::gpu::tune::lookup(&ctx, &g, tune_file) {
            calm_gpu::gpu::tune::Lookup::Found(choice, path) => println!(
                "tuned for {}: {choice} ({})",
                calm_gpu::gpu::tune::shape_key(&g),
                path.display()
            ),
            calm_gpu::gpu::tune::Lookup::Stale(path) => println!(
                "{} holds a choice for {} from another build of calm-gpu; ignored",
                path.display(),
                calm_gpu::gpu::tune::shape_key(&g)
            ),
            calm_gpu::gpu::tune::Lookup::Unreadable(path, why) => {
                println!("tuning file {} ignored: {why}", path.display());
                break;
            }
            calm_gpu::gpu::tune::Lookup::None => {}
        }
    }
    let t0 = std::time::Instant::now();
    let base = calm_gpu::gpu::GpuOptions {
        cancel: super::stop_token().clone(),
        ..calm_gpu::gpu::GpuOptions::from_config(&cfg, 1000)
    };
    let mut rows = calm_gpu::validate::run_with(&ctx, &base)?;
    // Where the tensor-core kernels run and were not the ones asked for, they are checked too.
    let coop = calm_gpu::gpu::kernels::Variant::Coop;
    if ctx.coop.is_some() && cfg.kernels != Some(coop) {
        let with_coop = calm_gpu::gpu::GpuOptions {
            variant: Some(coop),
            chosen_by: Some("validate".into()),
            ..base.clone()
        };
        for mut r in calm_gpu::validate::run_with(&ctx, &with_coop)? {
            r.shape = format!("coop {}", r.shape);
            rows.push(r);
        }
    }
    println!(
        "{:<14} {:<34} {:>12} {:>10}  result",
        "kernel", "shape", "max rel err", "tolerance"
    );
    let mut failed = 0;
    for r in &rows {
        println!(
            "{:<14} {:<34} {:>12.3e} {:>10.1e}  {}",
            r.kernel,
            r.shape,
            r.error,
            r.tolerance,
            if r.pass() { "pass" } else { "FAIL" }
        );
        failed += usize::from(!r.pass());
    }
    println!(
        "{} checks, {} failed, {:.1} s",
        rows.len(),
        failed,
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!(
            "{failed} of {} kernel checks failed on {}",
            rows.len(),
            ctx.info.name
        );
    }
    Ok(())
}

pub(super) fn devices() -> Result<()> {
    let list = calm_gpu::gpu::list_adapters_with(&calm_gpu::GpuConfig {
        wgpu_env: true,
        ..Default::default()
    });
    if list.is_empty() {
        println!("no GPU adapters found (the CPU engine, --backend cpu, still works)");
    }
    println!(
        "{:<44} {:<8} {:<14} {:>10}  driver",
        "name", "backend", "type", "memory"
    );
    for (i, mem) in list {
        println!(
            "{:<44} {:<8} {:<14} {:>10}  {} {}",
            i.name,
            format!("{:?}", i.backend),
            format!("{:?}", i.device_type),
            mem.map_or("-".to_string(), |m| format!("{} MiB", m >> 20)),
            i.driver,
            i.driver_info
        );
    }
    Ok(())
}
