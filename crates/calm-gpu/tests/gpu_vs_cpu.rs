//! Every GPU kernel against its CPU twin (`cpu::reference`) on random problems.

mod common;

use std::sync::Arc;

use calm_gpu::cpu::reference;
use calm_gpu::gpu::kernels::{Tiles, Variant};
use calm_gpu::gpu::{GpuContext, GpuEngine, GpuOptions};
use calm_gpu::{Engine, Geometry, LayerConfig};
use common::*;
use proptest::prelude::*;

/// f32 kernels against an f64 reference: sums of a few hundred products lose ~1e-6 relative;
/// exp() of log posteriors near -20..0 amplifies L's absolute error ~1e-5 into B and T.
const TOL: f64 = 2e-4;

#[allow(clippy::too_many_arguments)]
fn check_variant(
    variant: Variant,
    tiles: Option<Tiles>,
    seed: u64,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    kw: usize,
    pad: usize,
    batch: usize,
) {
    let Some(ctx) = gpu() else { return };
    check_on(
        &ctx, variant, tiles, seed, n, c, h, w, k, kw, pad, batch, None,
    );
}

/// [`check_variant`] on a given device, the patches contrast-normalised by `eps` where given
/// (`Geometry::patch_norm`; the f64 twin normalises them the other way round, from each
/// patch's moments).
#[allow(clippy::too_many_arguments)]
fn check_on(
    ctx: &Arc<GpuContext>,
    variant: Variant,
    tiles: Option<Tiles>,
    seed: u64,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    kw: usize,
    pad: usize,
    batch: usize,
    eps: Option<f32>,
) {
    let g = Geometry::new(
        LayerConfig {
            kernels: k,
            width: kw,
            pad,
        },
        c,
        h,
        w,
    )
    .unwrap()
    .with_patch_norm(eps);
    let data = random_images(seed, n, c, h, w);
    // Scaled so that posteriors spread over several kernels (N(0,1) weights put all mass on one).
    let theta = random_theta(seed + 1, g.k * g.r(), 0.1);
    let built = GpuEngine::new(
        Arc::clone(ctx),
        g,
        Arc::new(data.clone()),
        &theta,
        GpuOptions {
            batch,
            variant: Some(variant),
            tiles,
            ..Default::default()
        },
    );
    let mut eng = match built {
        // Shapes beyond this adapter's thread or workgroup-memory limits (WebGPU's portable
        // 256 threads and 16 KiB, on some Metal and GL adapters) are skipped with a message
        // there; CI's lavapipe allows them all, and CALM_REQUIRE_GPU=1 makes a skip a failure.
        Err(e @ calm_gpu::CalmError::Gpu(_))
            if e.to_string().contains(" allows ")
                && std::env::var("CALM_REQUIRE_GPU").as_deref() != Ok("1") =>
        {
            eprintln!("skipping tiles {tiles:?} on {}: {e}", ctx.info.name);
            return;
        }
        r => r.unwrap(),
    };
    let stats = eng.epoch(&mut |_| {}).unwrap();
    let st = eng.read_state().unwrap();

    let x = data.images.as_slice().unwrap();
    let (ref_stats, ref_up) = reference::epoch(&g, x, n, &theta, batch);
    // L of the last batch.
    let last = {
        let m = n % eng.max_batch();
        if m == 0 { eng.max_batch() } else { m }
    };
    let per = c * h * w;
    let xpad = g.pad_images(&x[(n - last) * per..], last);
    let mut l_ref = reference::estep(&g, &xpad, last, &theta);
    if let Some(mom) = reference::patch_moments(&g, &xpad, last) {
        // The engine leaves L shifted by log(1 / s_u) for its M-step (norm_shift.wgsl).
        let p = g.positions();
        for (i, v) in l_ref.iter_mut().enumerate() {
            *v -= mom[i / (k * p) * p + i % p].1.ln();
        }
    }
    let shape = format!(
        "{variant:?} {} n={n} c={c} {h}x{w} k={k} w={kw} p={pad} batch={batch} patch_norm={eps:?}",
        eng.tiles()
    );
    let e = rel_err(&st.l_last, &l_ref);
    assert!(e < 1e-5, "estep {shape}: {e}");
    let all_l = reference::estep(&g, &g.pad_images(x, n), n, &theta);
    let lp = reference::logp(&g, &all_l, n);
    let e = rel_err(&st.logp_all, &lp);
    assert!(e < 1e-5, "logsumexp {shape}: {e}");
    let t_gpu: Vec<f32> = (0..k)
        .flat_map(|kk| st.t[kk * (g.r() + 1)..kk * (g.r() + 1) + g.r()].to_vec())
        .collect();
    let b_gpu: Vec<f32> = (0..k).map(|kk| st.t[kk * (g.r() + 1) + g.r()]).collect();
    let e = rel_err(&t_gpu, &ref_stats.t);
    assert!(e < TOL, "mstep T {shape}: {e}");
    let e = rel_err(&b_gpu, &ref_stats.b);
    assert!(e < TOL, "mstep B {shape}: {e}");
    let e = rel_err(&st.theta_next, &ref_up.theta);
    assert!(e < TOL, "update theta {shape}: {e}");
    let e = rel_err(&st.counts_next, &ref_up.counts);
    assert!(e < TOL, "update counts {shape}: {e}");
    assert!(
        (stats.loglik - ref_stats.ll).abs() <= 1e-5 * ref_stats.ll.abs().max(1.0),
        "LL {shape}: {} vs {}",
        stats.loglik,
        ref_stats.ll
    );
    assert!(
        (stats.count_sum - n as f64).abs() < 1e-3 * n as f64,
        "S {shape}: {}",
        stats.count_sum
    );
    assert!(stats.finite);
    eprintln!(
        "{shape}: LL gpu {} ref {} on {}",
        stats.loglik,
        ref_stats.ll,
        ctx.describe()
    );
}

/// The three implementations of the GEMM kernels, whichever the adapter would pick, and the staged
/// kernels with tuning options (by seed): lane-strided register blocks of 8 along the A tile
/// (`Tiles::e_strided`), the steps written out (`Tiles::e_unroll`), double-buffered tiles
/// (`Tiles::e_double`), posteriors computed while loading (`Tiles::m_fused`), the E-step's
/// results written through workgroup memory (`Tiles::e_coalesced`), the A tiles loaded a float
/// per thread (`Tiles::e_gather`, `m_gather`), and combinations.
#[allow(clippy::too_many_arguments)]
fn check(
    seed: u64,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    kw: usize,
    pad: usize,
    batch: usize,
) {
    for v in [Variant::Staged, Variant::Direct, Variant::Uniform] {
        check_variant(v, None, seed, n, c, h, w, k, kw, pad, batch);
    }
    let shape = [
        "e=8x8x16@32sc,m=8x8x16@8s",
        "e=8x4x8@16sug,m=4x8x8@16sug",
        "e=8x4x16@16udc,m=4x4x16@16dp",
        "e=8x8x8@32sudg,m=4x8x8@16sdg",
    ][seed as usize % 4];
    let tiles = Tiles::parse(shape).unwrap();
    check_variant(
        Variant::Staged,
        Some(tiles),
        seed,
        n,
        c,
        h,
        w,
        k,
        kw,
        pad,
        batch,
    );
}

#[test]
fn single_channel_padded() {
    check(1, 10, 1, 12, 12, 5, 5, 2, 4);
}

#[test]
fn three_channels_unpadded_non_square() {
    check(2, 7, 3, 9, 13, 6, 4, 0, 7);
}

#[test]
fn odd_sizes_k_not_power_of_two() {
    check(3, 11, 2, 11, 7, 13, 3, 1, 3);
}

#[test]
fn mnist_like_shape() {
    check(4, 9, 1, 28, 28, 64, 20, 2, 5);
}

/// The uniform-buffer kernels over many windows. K 200: rows of 200 floats, 80 to a 64 KiB
/// window, and four blocks of 52 kernels (the last one partial); R = 2 * 8 * 8 = 128 steps, two
/// E-step windows. 60 images of 12 x 12 with w 8, p 2: P = 81, 25 images to a chunk; in one
/// batch 4,860 positions, 61 M-step windows shared out over 3 partial sums; in two batches of 30,
/// 31 windows over 2 partial sums each (a window sent to the wrong sum leaves the first batch's
/// value in the other one). Then 1 x 3 threads' blocks, and a single window each (K 16, R 9).
#[test]
fn uniform_kernels_over_many_windows() {
    check_variant(Variant::Uniform, None, 11, 60, 2, 12, 12, 200, 8, 2, 60);
    check_variant(Variant::Uniform, None, 12, 60, 2, 12, 12, 200, 8, 2, 30);
    check_variant(
        Variant::Uniform,
        Tiles::parse("u=1x3").ok(),
        13,
        60,
        2,
        12,
        12,
        200,
        8,
        2,
        60,
    );
    check_variant(Variant::Uniform, None, 14, 7, 1, 9, 9, 16, 3, 1, 3);
}

/// Which kernels an engine runs: the adapter's choice (uniform-buffer kernels on CPU adapters)
/// for K 64; the staged ones by default where a 64 KiB window holds under 64 rows (K 256); an
/// error when the uniform-buffer kernels are asked for and the offset table cannot fit one
/// (R = 3 * 74 * 74 = 16,428 > 16,384).
#[test]
fn uniform_kernels_only_where_their_windows_fit() {
    let Some(ctx) = gpu() else { return };
    let engine = |k: usize, kw: usize, c: usize, hw: usize, variant: Option<Variant>| {
        let g = Geometry::new(
            LayerConfig {
                kernels: k,
                width: kw,
                pad: 0,
            },
            c,
            hw,
            hw,
        )
        .unwrap();
        let data = Arc::new(random_images(21, 2, c, hw, hw));
        let theta = random_theta(22, g.k * g.r(), 0.1);
        let opts = GpuOptions {
            variant,
            ..Default::default()
        };
        GpuEngine::new(Arc::clone(&ctx), g, data, &theta, opts)
    };
    let auto = Variant::builtin(&ctx.info);
    assert_eq!(engine(64, 5, 1, 12, None).unwrap().variant(), auto);
    assert_eq!(
        engine(256, 5, 1, 12, None).unwrap().variant(),
        Variant::Staged
    );
    let small = engine(256, 5, 1, 12, Some(Variant::Uniform)).unwrap();
    assert_eq!(small.variant(), Variant::Uniform);
    let err = engine(4, 74, 3, 76, Some(Variant::Uniform)).err().unwrap();
    assert!(err.to_string().contains("uniform-buffer kernels"), "{err}");
}

/// The tensor-core kernels: where the adapter has what they need (a real GPU with cooperative
/// matrices), every kernel of an engine that runs them against the twins, `validate`'s checks
/// (the E-step against its CPU twin `cpu::coop` and the f64 reference, the rest of the epoch on
/// it); elsewhere (lavapipe, llvmpipe), asking for them is refused with the reason.
#[test]
fn tensor_core_kernels_where_the_adapter_has_them() {
    let config = calm_gpu::GpuConfig {
        cooperative_matrices: true,
        ..Default::default()
    };
    let Some(ctx) = gpu_with(&config) else { return };
    println!("{}: {}", ctx.info.name, ctx.describe_coop());
    let base = GpuOptions {
        variant: Some(Variant::Coop),
        ..Default::default()
    };
    if ctx.coop.is_none() {
        let err = calm_gpu::validate::run_case(&ctx, 1, calm_gpu::validate::cases()[0], &base)
            .expect_err("the tensor-core kernels ran on an adapter without cooperative matrices");
        let msg = err.to_string();
        assert!(
            msg.contains("tensor-core kernels") && !msg.contains('\n'),
            "{msg}"
        );
        return;
    }
    let rows = calm_gpu::validate::run_with(&ctx, &base).unwrap();
    assert!(rows.iter().any(|r| r.kernel == "estep coop twin"));
    for r in &rows {
        assert!(
            r.pass(),
            "{} {}: {:e} > {:e}",
            r.kernel,
            r.shape,
            r.error,
            r.tolerance
        );
    }
}

/// 9 images of 2 x 13 x 11, K 7, w 4, p 1: odd sizes, padding, several regions per grid.
fn small_case() -> (usize, Geometry) {
    let g = Geometry::new(
        LayerConfig {
            kernels: 7,
            width: 4,
            pad: 1,
        },
        2,
        13,
        11,
    )
    .unwrap();
    (9, g)
}

/// Pooled features, both encodings, on 1x1, 2x2 and 3x3 grids, of raw and of contrast-normalised
/// patches (`Geometry::patch_norm`): the GPU kernels and the CPU engine against the f64 twins
/// (`reference::features_grid`, `reference::features_triangle`, which normalise the other way
/// round, from each patch's moments). Triangle distances come from `||x_u||^2 - 2 L` in f32 on
/// both engines: TOL, as the posterior.
#[test]
fn pooled_features_both_encodings_match_the_twins() {
    use calm_gpu::features::Encoding;
    let (n, raw) = small_case();
    let (c, h, w) = (raw.c, raw.h, raw.w);
    let data = Arc::new(random_images(71, n, c, h, w));
    let theta = random_theta(72, raw.k * raw.r(), 0.3);
    let x = data.images.as_slice().unwrap();
    let ctx = gpu();
    for g in [raw, raw.with_patch_norm(Some(0.05))] {
        let xpad = g.pad_images(x, n);
        let l = reference::estep(&g, &xpad, n, &theta);
        let norms = reference::patch_norms(&g, &xpad, n);
        for encoding in [Encoding::Lse, Encoding::Triangle] {
            for grid in [1, 2, 3] {
                let name = format!("{encoding} grid {grid} patch_norm {:?}", g.patch_norm);
                let want = match encoding {
                    Encoding::Lse => reference::features_grid(&g, &l, n, grid),
                    Encoding::Triangle => reference::features_triangle(&g, &l, &norms, n, grid),
                };
                let cpu = calm_gpu::cpu::fast::features(
                    &g,
                    data.as_ref(),
                    &theta,
                    &g.bias_f32(&theta),
                    4,
                    calm_gpu::features::Pooling { grid, encoding },
                    &Default::default(),
                    &mut |_| {},
                )
                .unwrap();
                let e = rel_err(cpu.as_slice().unwrap(), &want);
                assert!(e < TOL, "cpu {name}: {e}");
                if let Some(ctx) = &ctx {
                    let mut eng = GpuEngine::new(
                        ctx.clone(),
                        g,
                        data.clone(),
                        &theta,
                        GpuOptions {
                            batch: 4,
                            grid,
                            encoding,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    let f = eng.features(&mut |_| {}).unwrap();
                    let e = rel_err(f.as_slice().unwrap(), &want);
                    assert!(e < TOL, "gpu {name}: {e}");
                }
            }
        }
    }
}

/// Contrast-normalised patches through every implementation of the GEMM kernels, the staged
/// M-step with its posteriors computed while loading (`p`, which reads the shifted `L` where
/// the others read `G`) among them: the three `norm_*` passes around them against the f64 twin
/// ([`check_on`]), padded and unpadded, one and three channels, batches that do not divide N.
/// Then two epochs against the twin's two: the second needs the kernels' sums of the updated
/// weights.
#[test]
fn normalised_patches_match_the_twin() {
    let Some(ctx) = gpu() else { return };
    for (seed, eps, [n, c, h, w, k, kw, pad, batch]) in [
        (31, 0.01, [9, 1, 12, 12, 6, 5, 2, 4]),
        (32, 0.1, [7, 3, 9, 11, 5, 4, 0, 3]),
    ] {
        for (variant, tiles) in [
            (Variant::Staged, None),
            (Variant::Staged, Some("m=4x4x16@16p")),
            (Variant::Direct, None),
            (Variant::Uniform, None),
        ] {
            let tiles = tiles.map(|t| Tiles::parse(t).unwrap());
            check_on(
                &ctx,
                variant,
                tiles,
                seed,
                n,
                c,
                h,
                w,
                k,
                kw,
                pad,
                batch,
                Some(eps),
            );
        }
    }
    let (n, raw) = small_case();
    let g = raw.with_patch_norm(Some(0.01));
    let data = Arc::new(random_images(33, n, g.c, g.h, g.w));
    let x = data.images.as_slice().unwrap();
    let theta = random_theta(34, g.k * g.r(), 0.3);
    let (_, up) = reference::epoch(&g, x, n, &theta, 4);
    let theta2: Vec<f32> = up.theta.iter().map(|&v| v as f32).collect();
    let (want2, up2) = reference::epoch(&g, x, n, &theta2, 4);
    let opts = GpuOptions {
        batch: 4,
        ..Default::default()
    };
    let mut eng = GpuEngine::new(ctx, g, data.clone(), &theta, opts).unwrap();
    eng.epoch(&mut |_| {}).unwrap();
    let st = eng.epoch(&mut |_| {}).unwrap();
    assert!(st.finite);
    assert!(
        (st.loglik - want2.ll).abs() <= 1e-4 * want2.ll.abs(),
        "second epoch LL {} vs {}",
        st.loglik,
        want2.ll
    );
    let e = rel_err(&eng.theta().unwrap(), &up2.theta);
    assert!(e < TOL, "second epoch theta: {e}");
}

/// Mixing weights and a variance (`Prior`): two epochs and the log-sum-exp features of the CPU
/// engine and the GPU against the f64 twin (`reference::epoch_with_prior`, `apply_prior`); the
/// second epoch checks that the prior still holds for the updated `theta`. The inverse variance
/// of 4 makes `L` four times larger, as a learned variance does; TOL as above.
#[test]
fn prior_weights_and_variance_match_the_twin() {
    use calm_gpu::features::{Encoding, Pooling};
    use calm_gpu::prior::Prior;
    let (n, g) = small_case();
    let (c, h, w) = (g.c, g.h, g.w);
    let data = Arc::new(random_images(81, n, c, h, w));
    let theta = random_theta(82, g.k * g.r(), 0.1);
    let prior = Prior {
        inv_var: 4.0,
        log_weight: random_theta(83, g.k, 0.7),
    };
    let x = data.images.as_slice().unwrap();
    let (want, up) = reference::epoch_with_prior(&g, x, n, &theta, &prior, 4);
    let theta2: Vec<f32> = up.theta.iter().map(|&v| v as f32).collect();
    let (want2, _) = reference::epoch_with_prior(&g, x, n, &theta2, &prior, 4);
    let xpad = g.pad_images(x, n);
    let mut l = reference::estep(&g, &xpad, n, &theta);
    reference::apply_prior(&g, &mut l, n, &prior);
    let want_f = reference::features_grid(&g, &l, n, 2);
    let pooling = Pooling {
        grid: 2,
        encoding: Encoding::Lse,
    };
    let check = |name: &str, eng: &mut dyn Engine, f: &[f32]| {
        let e = rel_err(f, &want_f);
        assert!(e < TOL, "{name} features: {e}");
        eng.set_prior(&prior).unwrap();
        let st = eng.epoch(&mut |_| {}).unwrap();
        assert!(st.finite);
        assert!(
            (st.loglik - want.ll).abs() <= 1e-5 * want.ll.abs(),
            "{name} LL {} vs {}",
            st.loglik,
            want.ll
        );
        let e = rel_err(&eng.theta().unwrap(), &up.theta);
        assert!(e < TOL, "{name} theta: {e}");
        let e = rel_err(&eng.counts().unwrap(), &up.counts);
        assert!(e < TOL, "{name} counts: {e}");
        assert_eq!(
            eng.prior(),
            prior,
            "{name}: the prior stays set across the update"
        );
        let st = eng.epoch(&mut |_| {}).unwrap();
        assert!(
            (st.loglik - want2.ll).abs() <= 1e-4 * want2.ll.abs(),
            "{name} second epoch LL {} vs {}",
            st.loglik,
            want2.ll
        );
    };
    let (t, b) = prior.effective(&g, &theta);
    let f = calm_gpu::cpu::fast::features(
        &g,
        data.as_ref(),
        &t,
        &b,
        4,
        pooling,
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
    let mut cpu = calm_gpu::cpu::CpuEngine::new(g, data.clone(), theta.clone(), 4);
    check("cpu", &mut cpu, f.as_slice().unwrap());
    if let Some(ctx) = gpu() {
        let mut eng = GpuEngine::new(
            ctx,
            g,
            data.clone(),
            &theta,
            GpuOptions {
                batch: 4,
                grid: 2,
                encoding: Encoding::Lse,
                ..Default::default()
            },
        )
        .unwrap();
        eng.set_prior(&prior).unwrap();
        let f = eng.features(&mut |_| {}).unwrap();
        check("gpu", &mut eng, f.as_slice().unwrap());
    }
}

/// The staged kernels with workgroups of other than 256 threads (`@WXxWY` in `CALM_TILES`), so
/// that a tile's width can divide R: 80-column M-step tiles for the MNIST shape (R = 400, five
/// tiles, none partial), 400- and 480-thread workgroups, WX not a power of two, several kernel
/// tiles (K 200 over M-step tiles of 192 kernels) and fewer B summands than threads (BK 8 x 48
/// vec4s < 480 threads), each with B summed by column tile 0 rather than a column of ones; the
/// first and the last with the posteriors computed while loading (`p`), the M-step's G tile then
/// read from L (the last over several kernel tiles). Then images of P = 1,156 positions, one to
/// an M-step chunk, so that a batch of 3 has 3 partial sums (`wid.z` up to 2), with and without
/// `p`.
#[test]
fn staged_kernels_with_any_thread_count() {
    let t = |s: &str| Some(Tiles::parse(s).unwrap());
    check_variant(
        Variant::Staged,
        t("e=8x8x16@20x16,m=4x4x16@20x16p"),
        21,
        9,
        1,
        28,
        28,
        64,
        20,
        2,
        5,
    );
    check_variant(
        Variant::Staged,
        t("e=4x4x8@24x12sg,m=4x8x8@25x16sug"),
        22,
        11,
        2,
        11,
        7,
        13,
        3,
        1,
        3,
    );
    check_variant(
        Variant::Staged,
        t("e=8x4x8@12x20u,m=8x4x8@20x24dp"),
        23,
        12,
        2,
        12,
        12,
        200,
        8,
        2,
        7,
    );
    // The E-step's results through workgroup memory (`c`) in uneven rounds: 12 kernels per
    // thread, 3 thread rows and BK 16 hold 5 kernels a round (5, 5, 2), over 6 kernel tiles of
    // 36 for K 200 (the last partial); the A tiles transposed (`g`), the E-step's 512 vec4s
    // shared out over 96 threads and the M-step's 192 over 288 (the last shares partial), the
    // M-step with the posteriors computed while loading.
    check_variant(
        Variant::Staged,
        t("e=4x12x16@32x3gc,m=4x4x8@24x12gp"),
        25,
        12,
        2,
        12,
        12,
        200,
        8,
        2,
        7,
    );
    for shape in [
        "e=8x8x16@32c,m=4x4x16@20x16",
        "e=8x8x16@32s,m=4x4x16@20x16p",
        "e=8x8x16@32,m=4x4x16@16p",
        "e=8x8x16@32s,m=8x8x16@50x8sp",
    ] {
        check_variant(Variant::Staged, t(shape), 24, 7, 1, 34, 34, 8, 3, 1, 3);
    }
}

/// The first shapes of tune's MNIST list (`gpu::tune::SHAPES_SMALL_K`) on the MNIST layer: the
/// ones a lent GPU times first, with the transposed A tiles (`g`) over several M-step column
/// tiles (R = 400) and the E-step's stores through workgroup memory (`c`).
#[test]
fn first_tune_shapes_on_the_mnist_layer() {
    for shape in &calm_gpu::gpu::tune::SHAPES_SMALL_K[..3] {
        check_variant(
            Variant::Staged,
            Some(Tiles::parse(shape).unwrap()),
            26,
            9,
            1,
            28,
            28,
            64,
            20,
            2,
            5,
        );
    }
}

/// With the posteriors computed while loading (`p`), the staged engine holds no G buffer: its
/// device memory is smaller by exactly one batch of G (`B x P x KP` floats, less the 16-byte
/// stand-in), and the epoch's statistics are the same as with G (to rounding).
#[test]
fn fused_posteriors_hold_no_g_buffer() {
    let Some(ctx) = gpu() else { return };
    let g = Geometry::new(
        LayerConfig {
            kernels: 13,
            width: 5,
            pad: 1,
        },
        2,
        12,
        10,
    )
    .unwrap();
    let data = random_images(31, 9, 2, 12, 10);
    let theta = random_theta(32, g.k * g.r(), 0.1);
    let engine = |tiles: &str| {
        GpuEngine::new(
            Arc::clone(&ctx),
            g,
            Arc::new(data.clone()),
            &theta,
            GpuOptions {
                batch: 4,
                variant: Some(Variant::Staged),
                tiles: Tiles::parse(tiles).ok(),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (mut with_g, mut fused) = (engine("m=4x4x16@16"), engine("m=4x4x16@16p"));
    let g_bytes = (with_g.max_batch() * g.positions() * g.kpad() * 4) as u64;
    assert_eq!(with_g.device_bytes() - fused.device_bytes(), g_bytes - 16);
    let (a, b) = (
        with_g.epoch(&mut |_| {}).unwrap(),
        fused.epoch(&mut |_| {}).unwrap(),
    );
    let (sa, sb) = (with_g.read_state().unwrap(), fused.read_state().unwrap());
    let ta: Vec<f64> = sa.t.iter().map(|&v| v as f64).collect();
    let e = rel_err(&sb.t, &ta);
    assert!(e < 1e-5, "T with and without G: {e}");
    assert!((a.loglik - b.loglik).abs() <= 1e-6 * a.loglik.abs().max(1.0));
}

/// Engines on one device share their compiled pipelines (`GpuContext::pipeline`): a second
/// engine with the same tiles compiles nothing and computes the same bits as the first; other
/// tiles compile their own GEMM kernels, and those still match the CPU reference.
#[test]
fn engines_share_compiled_pipelines() {
    let Some(ctx) = gpu() else { return };
    let (n, g) = small_case();
    let data = Arc::new(random_images(41, n, g.c, g.h, g.w));
    let theta = random_theta(42, g.k * g.r(), 0.1);
    let engine = |tiles: &str| {
        GpuEngine::new(
            Arc::clone(&ctx),
            g,
            data.clone(),
            &theta,
            GpuOptions {
                batch: 3,
                variant: Some(Variant::Staged),
                tiles: Some(Tiles::parse(tiles).unwrap()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let before = ctx.pipelines_built();
    let mut first = engine("e=4x4x8@8,m=4x4x8@8");
    let built = ctx.pipelines_built() - before;
    assert_eq!(built, 10, "one engine builds its ten kernels");
    let mut second = engine("e=4x4x8@8,m=4x4x8@8");
    assert_eq!(
        ctx.pipelines_built() - before,
        built,
        "the same tiles compile nothing"
    );
    let (a, b) = (
        first.epoch(&mut |_| {}).unwrap(),
        second.epoch(&mut |_| {}).unwrap(),
    );
    assert_eq!(a.loglik.to_bits(), b.loglik.to_bits());
    assert_eq!(first.theta().unwrap(), second.theta().unwrap());
    let mut other = engine("e=8x4x8@8,m=4x8x8@8");
    let added = ctx.pipelines_built() - before - built;
    assert!(
        (1..=10).contains(&added),
        "other tiles compile their own kernels ({added})"
    );
    other.epoch(&mut |_| {}).unwrap();
    let x = data.images.as_slice().unwrap();
    let (_, up) = reference::epoch(&g, x, n, &theta, 3);
    let e = rel_err(&other.theta().unwrap(), &up.theta);
    assert!(e < TOL, "theta with the other tiles: {e}");
}

/// One part of a `CALM_TILES` string: `RMxRNxBK@WXxWY` and a subset of the flags.
fn tile_part(name: &'static str, flags: &'static str) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![4u32, 8]),
        prop::sample::select(vec![4u32, 8]),
        prop::sample::select(vec![1u32, 2, 3, 4, 8, 16]),
        prop::sample::select(vec![4u32, 8, 16, 32]),
        prop::sample::select(vec![2u32, 4, 8, 16, 32]),
        prop::sample::subsequence(flags.chars().collect::<Vec<_>>(), 0..=flags.len()),
    )
        .prop_map(move |(a, b, bk, wx, wy, f)| {
            let f: String = f.into_iter().collect();
            format!("{name}={a}x{b}x{bk}@{wx}x{wy}{f}")
        })
}

/// A problem no hand-written case chose: 1-7 images of 1-3 channels and 2-12 pixels a side,
/// padding 0-3, any window that fits, 1-20 kernels, any batch; run by the staged kernels with
/// random tiles and options, or the uniform-buffer kernels with random blocks, or the direct
/// ones. Everything the hand-written cases compare (L, logp, T, B, theta, counts, LL, S) is
/// compared here, with the same tolerances.
fn problem() -> impl Strategy<Value = (u64, [usize; 8])> {
    (1usize..=7, 1usize..=3, 2usize..=12, 2usize..=12, 0usize..=3)
        .prop_flat_map(|(n, c, h, w, pad)| {
            (
                any::<u64>(),
                Just((n, c, h, w, pad)),
                1usize..=(h.min(w) + 2 * pad),
                1usize..=20,
                1usize..=n,
            )
        })
        .prop_map(|(seed, (n, c, h, w, pad), kw, k, batch)| {
            (seed % 1_000_000, [n, c, h, w, k, kw, pad, batch])
        })
}

fn kernels() -> impl Strategy<Value = (Variant, String)> {
    prop_oneof![
        3 => (tile_part("e", "sudgc"), tile_part("m", "sudgp"))
            .prop_map(|(e, m)| (Variant::Staged, format!("{e},{m}"))),
        1 => (1u32..=8, 1u32..=8).prop_map(|(a, b)| (Variant::Uniform, format!("u={a}x{b}"))),
        1 => Just((Variant::Direct, String::new())),
    ]
}

proptest! {
    // Each case builds an engine and compiles its GEMM kernels: about a second on lavapipe.
    #![proptest_config(proptest_config(24))]

    #[test]
    fn random_problems_and_tiles_match_the_twin(
        (seed, [n, c, h, w, k, kw, pad, batch]) in problem(),
        (variant, spec) in kernels(),
    ) {
        // `None` where no adapter exists and CALM_REQUIRE_GPU is unset (skipped with a message).
        let Some(ctx) = shared_gpu() else { return Ok(()) };
        let tiles = if spec.is_empty() { None } else { Tiles::parse(&spec).ok() };
        // Tile strings that Tiles::parse refuses, and tiles beyond this adapter's limits, are
        // not problems: they are drawn again (Tiles's own tests check the refusals).
        prop_assume!(spec.is_empty() || tiles.is_some());
        if let Some(t) = tiles.filter(|_| variant == Variant::Staged) {
            let (te, tm) = t.threads();
            let (be, bm) = t.workgroup_bytes();
            prop_assume!(te.max(tm) <= ctx.limits.max_compute_invocations_per_workgroup);
            prop_assume!(be.max(bm) <= ctx.limits.max_compute_workgroup_storage_size);
        }
        // Every third case with contrast-normalised patches.
        let eps = (seed % 3 == 0).then_some(0.1);
        check_on(&ctx, variant, tiles, seed, n, c, h, w, k, kw, pad, batch, eps);
    }
}

/// One device for every case of the property above (a context per case would compile all ten
/// kernels again each time).
fn shared_gpu() -> Option<Arc<GpuContext>> {
    static CTX: std::sync::OnceLock<Option<Arc<GpuContext>>> = std::sync::OnceLock::new();
    CTX.get_or_init(gpu).clone()
}

proptest! {
    // Each case takes about 10 ms on lavapipe.
    #![proptest_config(proptest_config(64))]

    /// Features on generated problems: either encoding, a 1-4 grid that fits the positions, any
    /// batch; the GPU and the CPU engine against the f64 twins, with the fixed case's TOL.
    #[test]
    fn random_problems_features_match_the_twins(
        (seed, [n, c, h, w, k, kw, pad, batch]) in problem(),
        grid in 1usize..=4,
        triangle in any::<bool>(),
    ) {
        features_case(seed, [n, c, h, w, k, kw, pad, batch], grid, triangle)?;
    }
}

/// One case of `random_problems_features_match_the_twins` (outside the macro, where rustfmt
/// reaches).
fn features_case(
    seed: u64,
    [n, c, h, w, k, kw, pad, batch]: [usize; 8],
    grid: usize,
    triangle: bool,
) -> Result<(), TestCaseError> {
    use calm_gpu::features::{Encoding, Pooling};
    let g = Geometry::new(
        LayerConfig {
            kernels: k,
            width: kw,
            pad,
        },
        c,
        h,
        w,
    )
    .unwrap();
    prop_assume!(g.check_pool_grid(grid).is_ok());
    let encoding = if triangle {
        Encoding::Triangle
    } else {
        Encoding::Lse
    };
    let data = Arc::new(random_images(seed, n, c, h, w));
    let theta = random_theta(seed + 1, g.k * g.r(), 0.3);
    let x = data.images.as_slice().unwrap();
    let xpad = g.pad_images(x, n);
    let l = reference::estep(&g, &xpad, n, &theta);
    let want = match encoding {
        Encoding::Lse => reference::features_grid(&g, &l, n, grid),
        Encoding::Triangle => {
            let norms = reference::patch_norms(&g, &xpad, n);
            reference::features_triangle(&g, &l, &norms, n, grid)
        }
    };
    let pooling = Pooling { grid, encoding };
    let bias = g.bias_f32(&theta);
    let cpu = calm_gpu::cpu::fast::features(
        &g,
        data.as_ref(),
        &theta,
        &bias,
        batch,
        pooling,
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
    let shape =
        format!("{encoding} grid {grid} n={n} c={c} {h}x{w} k={k} w={kw} p={pad} batch={batch}");
    let e = rel_err(cpu.as_slice().unwrap(), &want);
    prop_assert!(e < TOL, "cpu {shape}: {e}");
    let Some(ctx) = shared_gpu() else {
        return Ok(());
    };
    let opts = GpuOptions {
        batch,
        grid,
        encoding,
        ..Default::default()
    };
    let mut eng = GpuEngine::new(Arc::clone(&ctx), g, data.clone(), &theta, opts).unwrap();
    let f = eng.features(&mut |_| {}).unwrap();
    let e = rel_err(f.as_slice().unwrap(), &want);
    prop_assert!(e < TOL, "gpu {shape}: {e}");
    Ok(())
}
