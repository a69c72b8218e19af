//! Tests for the pictures: kernel grids, PNG output and the log-likelihood chart.

use calm_gpu::viz::{
    BORDER, MID_GREY, VizError, default_scale, kernel_grid, kernel_grid_size, loglik_plot,
    png_bytes, save_png,
};
use image::Rgb;

/// The documented size: `cols * (w * scale + 1) + 1` by `rows * (w * scale + 1) + 1`,
/// with `cols = min(K, per_row)` and `rows = ceil(K / per_row)`.
fn expected_size(k: usize, w: usize, per_row: usize, scale: usize) -> (u32, u32) {
    let cols = k.min(per_row);
    let rows = k.div_ceil(per_row);
    let tile = w * scale;
    (
        (cols * (tile + 1) + 1) as u32,
        (rows * (tile + 1) + 1) as u32,
    )
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
        .collect()
}

#[test]
fn default_scale_makes_kernels_about_100_px() {
    assert_eq!(default_scale(20), 5);
    assert_eq!(default_scale(5), 20);
    assert_eq!(default_scale(28), 3);
    assert_eq!(default_scale(200), 1);
    assert_eq!(default_scale(0), 100);
}

#[test]
fn grid_size_64_kernels_20x20_8_per_row() {
    let (k, c, w, per_row) = (64, 1, 20, 8);
    let scale = default_scale(w);
    let img = kernel_grid(&ramp(k * c * w * w), k, c, w, per_row, scale);
    // 8 columns and 8 rows of 100-px tiles with 9 one-pixel borders.
    assert_eq!(img.dimensions(), (809, 809));
    assert_eq!(img.dimensions(), expected_size(k, w, per_row, scale));
    assert_eq!(kernel_grid_size(k, w, per_row, scale), (809, 809));
}

#[test]
fn grid_size_10_rgb_kernels_5x5() {
    let (k, c, w, per_row, scale) = (10, 3, 5, 4, 3);
    let img = kernel_grid(&ramp(k * c * w * w), k, c, w, per_row, scale);
    // 4 columns, 3 rows (4 + 4 + 2) of 15-px tiles.
    assert_eq!(img.dimensions(), (4 * 16 + 1, 3 * 16 + 1));
    assert_eq!(img.dimensions(), expected_size(k, w, per_row, scale));

    // Fewer kernels than per_row: the grid is only as wide as the kernels.
    let img = kernel_grid(&ramp(10 * 3 * 25), 10, 3, 5, 8, default_scale(5));
    assert_eq!(img.dimensions(), (8 * 101 + 1, 2 * 101 + 1));
    let img = kernel_grid(&ramp(3 * 25), 3, 1, 5, 8, 2);
    assert_eq!(img.dimensions(), (3 * 11 + 1, 11 + 1));
}

#[test]
fn grayscale_kernel_maps_min_to_black_and_max_to_white() {
    // One 2x2 kernel, scale 3: tile pixels at 1..=6.
    let theta = [-2.0f32, 0.0, 1.0, 2.0];
    let img = kernel_grid(&theta, 1, 1, 2, 8, 3);
    assert_eq!(img.dimensions(), (8, 8));
    let at = |x: u32, y: u32| *img.get_pixel(x, y);
    // Border all round.
    for i in 0..8 {
        for p in [at(i, 0), at(i, 7), at(0, i), at(7, i)] {
            assert_eq!(p, BORDER);
        }
    }
    // Each weight fills a 3x3 block.
    for dy in 0..3 {
        for dx in 0..3 {
            assert_eq!(at(1 + dx, 1 + dy), Rgb([0, 0, 0]), "min is black");
            assert_eq!(
                at(4 + dx, 1 + dy),
                Rgb([128, 128, 128]),
                "midpoint is (0-(-2))/4*255"
            );
            assert_eq!(at(1 + dx, 4 + dy), Rgb([191, 191, 191]), "3/4 of the way");
            assert_eq!(at(4 + dx, 4 + dy), Rgb([255, 255, 255]), "max is white");
        }
    }
}

#[test]
fn each_kernel_is_normalised_on_its_own() {
    // Two 2x2 kernels side by side: kernel 0 in [0, 1], kernel 1 in [100, 300].
    let theta = [0.0f32, 1.0, 0.0, 1.0, 100.0, 300.0, 300.0, 100.0];
    let img = kernel_grid(&theta, 2, 1, 2, 8, 1);
    assert_eq!(img.dimensions(), (7, 4));
    assert_eq!(*img.get_pixel(1, 1), Rgb([0, 0, 0]));
    assert_eq!(*img.get_pixel(2, 1), Rgb([255, 255, 255]));
    assert_eq!(*img.get_pixel(3, 1), BORDER, "border between kernels");
    assert_eq!(*img.get_pixel(4, 1), Rgb([0, 0, 0]));
    assert_eq!(*img.get_pixel(5, 1), Rgb([255, 255, 255]));
    assert_eq!(*img.get_pixel(4, 2), Rgb([255, 255, 255]));
    assert_eq!(*img.get_pixel(5, 2), Rgb([0, 0, 0]));
}

#[test]
fn rgb_kernel_uses_channels_as_red_green_blue() {
    // One 2x2 kernel with 3 channels, normalised over all channels together.
    // Channel 0 (R) = 10 everywhere (the max), channel 1 (G) = 0 (the min), channel 2 (B) = 5.
    let mut theta = vec![10.0f32; 4];
    theta.extend([0.0f32; 4]);
    theta.extend([5.0f32; 4]);
    // Make one pixel differ in blue only.
    theta[8 + 3] = 10.0;
    let img = kernel_grid(&theta, 1, 3, 2, 8, 1);
    assert_eq!(img.dimensions(), (4, 4));
    assert_eq!(*img.get_pixel(1, 1), Rgb([255, 0, 128]));
    assert_eq!(*img.get_pixel(2, 1), Rgb([255, 0, 128]));
    assert_eq!(*img.get_pixel(1, 2), Rgb([255, 0, 128]));
    assert_eq!(*img.get_pixel(2, 2), Rgb([255, 0, 255]));
}

#[test]
fn other_channel_counts_show_channel_0_in_grayscale() {
    // C = 2: channel 0 is a ramp, channel 1 holds huge values that must not affect the picture.
    let theta = [0.0f32, 1.0, 2.0, 3.0, 1e6, -1e6, 1e6, -1e6];
    let img = kernel_grid(&theta, 1, 2, 2, 8, 1);
    assert_eq!(*img.get_pixel(1, 1), Rgb([0, 0, 0]));
    assert_eq!(*img.get_pixel(2, 1), Rgb([85, 85, 85]));
    assert_eq!(*img.get_pixel(1, 2), Rgb([170, 170, 170]));
    assert_eq!(*img.get_pixel(2, 2), Rgb([255, 255, 255]));
}

#[test]
fn constant_kernel_is_mid_grey() {
    let (k, w) = (3, 4);
    let mut theta = ramp(k * w * w);
    theta[w * w..2 * w * w].fill(-7.25);
    let img = kernel_grid(&theta, k, 1, w, 8, 2);
    let tile = w as u32 * 2;
    let x0 = 1 + (tile + 1);
    for y in 1..=tile {
        for x in x0..x0 + tile {
            assert_eq!(*img.get_pixel(x, y), Rgb([MID_GREY; 3]));
        }
    }
    // RGB constant too, and all-zero weights (no division by zero, no NaN).
    let img = kernel_grid(&[0.0f32; 3 * 9], 1, 3, 3, 8, 1);
    assert_eq!(*img.get_pixel(2, 2), Rgb([MID_GREY; 3]));
}

#[test]
fn empty_cells_of_the_last_row_are_border_coloured() {
    let img = kernel_grid(&ramp(3 * 4), 3, 1, 2, 2, 1);
    assert_eq!(img.dimensions(), (2 * 3 + 1, 2 * 3 + 1));
    for y in 4..6 {
        for x in 4..6 {
            assert_eq!(*img.get_pixel(x, y), BORDER);
        }
    }
}

#[test]
#[should_panic(expected = "theta has")]
fn wrong_theta_length_panics() {
    kernel_grid(&[0.0; 10], 1, 1, 3, 8, 1);
}

#[test]
fn png_round_trip_keeps_size_and_pixels() {
    let img = kernel_grid(&ramp(10 * 3 * 25), 10, 3, 5, 4, 3);
    let bytes = png_bytes(&img).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let back = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    assert_eq!(back.dimensions(), (65, 49));
    assert_eq!(back, img);
}

fn dir_entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn save_png_creates_missing_directories_and_leaves_no_temp_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out").join("pictures");
    let path = dir.join("kernels.png");
    let img = kernel_grid(&ramp(4 * 9), 4, 1, 3, 2, 4);
    save_png(&img, &path).unwrap();
    assert_eq!(dir_entries(&dir), vec!["kernels.png".to_string()]);
    let back = image::open(&path).unwrap().to_rgb8();
    assert_eq!(back, img);

    // Overwriting replaces the file whole, still without leftovers.
    let img2 = kernel_grid(&ramp(9), 1, 1, 3, 2, 2);
    save_png(&img2, &path).unwrap();
    assert_eq!(dir_entries(&dir), vec!["kernels.png".to_string()]);
    assert_eq!(image::open(&path).unwrap().to_rgb8(), img2);
}

#[test]
fn save_png_failure_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    // The destination is an existing non-empty directory: the rename fails.
    let target = tmp.path().join("taken.png");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("x"), b"x").unwrap();
    let img = kernel_grid(&ramp(9), 1, 1, 3, 2, 2);
    let err = save_png(&img, &target).unwrap_err();
    assert!(matches!(err, VizError::Io { .. }), "{err:?}");
    assert!(!err.to_string().contains('\n'));
    assert_eq!(dir_entries(tmp.path()), vec!["taken.png".to_string()]);

    // A path with no file name is refused.
    let err = save_png(&img, std::path::Path::new("/")).unwrap_err();
    assert!(matches!(err, VizError::NoFileName { .. }), "{err:?}");
}

fn distinct_colours(img: &image::RgbImage) -> usize {
    let mut seen: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

fn curve() -> Vec<(usize, f64)> {
    (1..=25)
        .map(|e| (e, -300.0 + 180.0 * (1.0 - (-(e as f64) / 5.0).exp())))
        .collect()
}

#[test]
fn loglik_plot_has_requested_size_and_is_not_blank() {
    let img = loglik_plot(&curve(), "LL per image", 800, 500).unwrap();
    assert_eq!(img.dimensions(), (800, 500));
    assert!(distinct_colours(&img) > 10, "a chart with text and a line");
    // The line colour is there.
    assert!(img.pixels().any(|p| p.0 == [31, 119, 180]));
    let img = loglik_plot(&curve(), "small", 200, 150).unwrap();
    assert_eq!(img.dimensions(), (200, 150));
    assert!(distinct_colours(&img) > 2);
}

#[test]
fn loglik_plot_single_point() {
    let img = loglik_plot(&[(0, -123.5)], "one epoch", 640, 480).unwrap();
    assert_eq!(img.dimensions(), (640, 480));
    assert!(distinct_colours(&img) > 2);
    assert!(
        img.pixels().any(|p| p.0 == [31, 119, 180]),
        "the marker is drawn"
    );
}

#[test]
fn loglik_plot_constant_values() {
    for v in [-50.0, 0.0, 1e-300, 1e12] {
        let pts: Vec<(usize, f64)> = (0..5).map(|e| (e, v)).collect();
        let img = loglik_plot(&pts, "flat", 640, 480).unwrap();
        assert_eq!(img.dimensions(), (640, 480));
        assert!(
            img.pixels().any(|p| p.0 == [31, 119, 180]),
            "the line is drawn for {v}"
        );
    }
}

#[test]
fn loglik_plot_refuses_non_finite_values() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let pts = [(1, -10.0), (2, bad), (3, -9.0)];
        match loglik_plot(&pts, "bad", 640, 480) {
            Err(VizError::NotFinite { epoch, .. }) => assert_eq!(epoch, 2),
            other => panic!("expected NotFinite for {bad}, got {other:?}"),
        }
    }
    let err = loglik_plot(&[(7, f64::NAN)], "bad", 640, 480).unwrap_err();
    assert_eq!(
        err.to_string(),
        "log likelihood at epoch 7 is not finite (NaN)"
    );
}

#[test]
fn loglik_plot_refuses_empty_input_and_tiny_sizes() {
    assert!(matches!(
        loglik_plot(&[], "t", 640, 480),
        Err(VizError::NoPoints)
    ));
    assert!(matches!(
        loglik_plot(&curve(), "t", 10, 10),
        Err(VizError::TooSmall {
            width: 10,
            height: 10
        })
    ));
}

#[test]
fn loglik_plot_survives_extreme_magnitudes() {
    for pts in [
        vec![(0, 1e-320), (1, 1e-320)],
        vec![(0, -1e308), (1, 1e308)],
        vec![(0, f64::MAX), (1, f64::MAX)],
        vec![(0, -5e-324), (3, 5e-324)],
        vec![(usize::MAX - 1, -1.0), (usize::MAX, -2.0)],
    ] {
        let img = loglik_plot(&pts, "extreme", 400, 300).unwrap();
        assert_eq!(img.dimensions(), (400, 300));
    }
}

/// `fit_scale` keeps a kernel grid within `MAX_GRID_SIDE` a side: the largest scale that fits,
/// never above the one asked for, and where none does, the `--per-row` range that would.
#[test]
fn kernel_grids_fit_a_viewable_picture() {
    use calm_gpu::viz::{GridTooLarge, MAX_GRID_SIDE, fit_scale, kernel_grid_size};
    let fits = |k, w, per_row, s| {
        let (a, b) = kernel_grid_size(k, w, per_row, s);
        a as u64 <= MAX_GRID_SIDE && b as u64 <= MAX_GRID_SIDE
    };
    // 1,000 kernels of 20x20, 8 to a row: scale 64 was 10,249 x 160,126 px; 6 is 969 x 15,126.
    assert_eq!(fit_scale(1000, 20, 8, 64), Ok(6));
    assert!(fits(1000, 20, 8, 6) && !fits(1000, 20, 8, 7));
    // What was asked, where it fits.
    assert_eq!(fit_scale(64, 20, 8, 5), Ok(5));
    assert_eq!(fit_scale(5, 5, 8, 100_000), Ok(655));
    // One to a row is 21,001 px tall even at scale 1; 2 to 780 to a row fit.
    assert_eq!(
        fit_scale(1000, 20, 1, 1),
        Err(GridTooLarge {
            width: 22,
            height: 21_001,
            min_per_row: 2,
            max_per_row: 780
        })
    );
    assert!(fits(1000, 20, 2, 1) && fits(1000, 20, 780, 1) && !fits(1000, 20, 781, 1));
    // Too many kernels for any row length.
    let e = fit_scale(1_000_000_000, 20, 8, 1).unwrap_err();
    assert!(e.min_per_row > e.max_per_row, "{e:?}");
    // Random sizes: the answer fits and the next scale up does not (unless it is the one asked).
    let mut state = 7u64;
    let mut next = |m: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 33) % m + 1
    };
    for _ in 0..10_000 {
        let (k, w, per_row, scale) = (
            next(3000) as usize,
            next(40) as usize,
            next(200) as usize,
            next(300) as usize,
        );
        match fit_scale(k, w, per_row, scale) {
            Ok(s) => {
                assert!(s >= 1 && s <= scale && fits(k, w, per_row, s));
                assert!(
                    s == scale || !fits(k, w, per_row, s + 1),
                    "{k} {w} {per_row} {scale}: {s}"
                );
            }
            Err(e) => {
                assert!(!fits(k, w, per_row, 1));
                if e.min_per_row <= e.max_per_row {
                    assert!(fits(k, w, e.min_per_row as usize, 1));
                    assert!(fits(k, w, e.max_per_row as usize, 1));
                }
            }
        }
    }
}
