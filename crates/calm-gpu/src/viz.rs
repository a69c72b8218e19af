//! Pictures, as PNG: the learned kernels as a grid (like the paper's figures of learned
//! features) and the log likelihood per image against the epoch as a line chart.
//!
//! Everything here draws into an in-memory [`image::RgbImage`]; [`save_png`] writes one to disk
//! atomically and [`png_bytes`] encodes one in memory. Text in the chart is drawn with an
//! embedded, ASCII-subset copy of DejaVu Sans (`assets/fonts/DejaVuSans-subset.ttf`, Bitstream
//! Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`), so no system font library or font file is
//! needed at run time.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::{ImageFormat, Rgb, RgbImage};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Errors from drawing or writing a picture. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum VizError {
    /// A file or directory could not be created, written or renamed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The destination path names no file (it is empty, `/`, or ends in `..`).
    #[error("{} does not name a file to write", path.display())]
    NoFileName {
        /// The path given.
        path: PathBuf,
    },
    /// The PNG encoder refused the image (for example, a zero-sized one).
    #[error("PNG encoding failed: {0}")]
    Encode(#[from] image::ImageError),
    /// `loglik_plot` was given no points.
    #[error("no log likelihood values to plot")]
    NoPoints,
    /// `loglik_plot` was given a NaN or infinite value.
    #[error("log likelihood at epoch {epoch} is not finite ({value})")]
    NotFinite {
        /// The point's epoch.
        epoch: usize,
        /// The value found.
        value: f64,
    },
    /// `loglik_plot` was asked for a picture too small to hold a chart.
    #[error(
        "plot size {width}x{height} is too small (at least {MIN_PLOT_WIDTH}x{MIN_PLOT_HEIGHT} pixels)"
    )]
    TooSmall {
        /// The width asked for, in pixels.
        width: u32,
        /// The height asked for, in pixels.
        height: u32,
    },
    /// plotters failed while drawing.
    #[error("drawing the plot failed: {0}")]
    Plot(String),
}

/// Colour of the border around and between kernels in [`kernel_grid`] (dark grey).
pub const BORDER: Rgb<u8> = Rgb([64, 64, 64]);

/// Grey level of a constant kernel (and of NaN weights) in [`kernel_grid`].
pub const MID_GREY: u8 = 128;

/// Smallest width [`loglik_plot`] accepts.
pub const MIN_PLOT_WIDTH: u32 = 200;
/// Smallest height [`loglik_plot`] accepts.
pub const MIN_PLOT_HEIGHT: u32 = 150;

/// A scale factor that draws a `w`x`w` kernel about 100 pixels wide: `max(1, 100 / w)`
/// (5 for a 20x20 kernel, 20 for 5x5; 1 for `w` = 0 or `w` >= 51).
pub fn default_scale(w: usize) -> usize {
    (100 / w.max(1)).max(1)
}

/// The longest side [`fit_scale`] lets a kernel grid have: larger pictures are beyond most
/// viewers and take gigabytes to draw (1,000 kernels of 20x20 at scale 64, 8 to a row, were
/// 10,249 x 160,126 pixels and 4.9 GB).
pub const MAX_GRID_SIDE: u64 = 16_384;

/// Why no scale fits: the picture at scale 1, and the `per_row` values that would fit (none
/// when `min > max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridTooLarge {
    /// Width in pixels of the picture at scale 1.
    pub width: u64,
    /// Height in pixels of the picture at scale 1.
    pub height: u64,
    /// The fewest kernels per row whose picture fits at scale 1.
    pub min_per_row: u64,
    /// The most kernels per row whose picture fits at scale 1.
    pub max_per_row: u64,
}

/// The largest scale, at most `scale`, at which [`kernel_grid`]'s picture of `k` kernels of
/// `w`x`w`, `per_row` to a row, keeps both sides within [`MAX_GRID_SIDE`]; an error when not
/// even scale 1 does.
pub fn fit_scale(k: usize, w: usize, per_row: usize, scale: usize) -> Result<usize, GridTooLarge> {
    let (k, w) = (k as u64, w.max(1) as u64);
    let per_row = per_row.max(1) as u64;
    let cells = k.min(per_row).max(k.div_ceil(per_row));
    // cells * (w * s + 1) + 1 <= MAX  <=>  s <= ((MAX - 1) / cells - 1) / w.
    let fits = ((MAX_GRID_SIDE - 1) / cells.max(1)).saturating_sub(1) / w;
    if fits == 0 {
        // Scale 1 fits when both ceil(k / per_row) and min(k, per_row) are at most this.
        let most = (MAX_GRID_SIDE - 1) / (w + 1);
        let side = |n: u64| n.saturating_mul(w + 1).saturating_add(1);
        return Err(GridTooLarge {
            width: side(k.min(per_row)),
            height: side(k.div_ceil(per_row)),
            min_per_row: k.div_ceil(most.max(1)),
            max_per_row: most,
        });
    }
    Ok(scale
        .max(1)
        .min(usize::try_from(fits).unwrap_or(usize::MAX)))
}

/// Width and height in pixels of the picture [`kernel_grid`] draws; see there for the formula.
pub fn kernel_grid_size(k: usize, w: usize, per_row: usize, scale: usize) -> (u32, u32) {
    let per_row = per_row.max(1);
    let scale = scale.max(1);
    let cols = k.min(per_row);
    let rows = k.div_ceil(per_row);
    let tile = w * scale;
    let width = cols * (tile + 1) + 1;
    let height = rows * (tile + 1) + 1;
    (
        u32::try_from(width).expect("kernel grid too wide"),
        u32::try_from(height).expect("kernel grid too tall"),
    )
}

/// Draws the `k` kernels of `theta` as a grid, like the paper's figures of learned features.
///
/// `theta` has the PyTorch conv-weight layout `(K, C, w, w)`, row-major, so kernel `i`, channel
/// `ch`, row `y`, column `x` is `theta[((i * c + ch) * w + y) * w + x]`.
///
/// * Colour: `c == 1` is drawn in grayscale; `c == 3` in colour, channel 0 as red, 1 as green and
///   2 as blue; any other `c` shows channel 0 only, in grayscale (the other channels are not
///   drawn).
/// * Each kernel is min-max normalised on its own, over every value that is drawn (all channels
///   together for `c == 1` and `c == 3`, channel 0 for other `c`): its minimum becomes 0 (black),
///   its maximum 255 (white), linearly in between, rounded to nearest. A constant kernel is drawn
///   mid-grey ([`MID_GREY`]). Non-finite weights are left out of the minimum and maximum; NaN is
///   drawn mid-grey, `+inf` as 255 and `-inf` as 0.
/// * Layout: kernels go left to right, `per_row` to a row, then top to bottom (kernel `i` at
///   column `i % per_row`, row `i / per_row`). Each weight becomes a `scale`x`scale` block
///   (nearest neighbour). A 1-pixel dark grey border ([`BORDER`]) runs around the grid and between
///   kernels; cells of the last row without a kernel are filled with the border colour.
/// * Size: with `cols = min(k, per_row)`, `rows = ceil(k / per_row)` and `tile = w * scale`,
///   the picture is `cols * (tile + 1) + 1` pixels wide and `rows * (tile + 1) + 1` high
///   ([`kernel_grid_size`]); kernel `i`'s top-left pixel is at
///   `(1 + (i % per_row) * (tile + 1), 1 + (i / per_row) * (tile + 1))`.
///   For example, K = 64, w = 20, per_row = 8, scale = 5 gives 809 x 809.
///
/// `per_row` and `scale` of 0 are taken as 1. `k == 0` gives a single border pixel.
///
/// # Panics
/// If `theta.len() != k * c * w * w`, or `c` or `w` is 0.
pub fn kernel_grid(
    theta: &[f32],
    k: usize,
    c: usize,
    w: usize,
    per_row: usize,
    scale: usize,
) -> RgbImage {
    assert!(
        c > 0 && w > 0,
        "kernel_grid: c ({c}) and w ({w}) must be positive"
    );
    assert_eq!(
        theta.len(),
        k * c * w * w,
        "kernel_grid: theta has {} values, expected K*C*w*w = {k}*{c}*{w}*{w}",
        theta.len()
    );
    let per_row = per_row.max(1);
    let scale = scale.max(1);
    let (width, height) = kernel_grid_size(k, w, per_row, scale);
    let mut img = RgbImage::from_pixel(width, height, BORDER);
    let tile = w * scale;
    let plane = w * w;
    // Channels drawn, and for each of R, G, B which of them it shows.
    let (shown, rgb_src): (usize, [usize; 3]) = if c == 3 {
        (3, [0, 1, 2])
    } else {
        (1, [0, 0, 0])
    };

    for i in 0..k {
        let kernel = &theta[i * c * plane..(i + 1) * c * plane];
        let drawn = &kernel[..shown * plane];
        let (lo, hi) = drawn
            .iter()
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v as f64), hi.max(v as f64))
            });
        let range = hi - lo;
        let level = |v: f32| -> u8 {
            if v.is_nan() {
                MID_GREY
            } else if v == f32::INFINITY {
                255
            } else if v == f32::NEG_INFINITY {
                0
            } else if !(range > 0.0 && range.is_finite()) {
                MID_GREY
            } else {
                (((v as f64 - lo) / range) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            }
        };
        let x0 = 1 + (i % per_row) * (tile + 1);
        let y0 = 1 + (i / per_row) * (tile + 1);
        for y in 0..w {
            for x in 0..w {
                let px = Rgb(rgb_src.map(|ch| level(kernel[ch * plane + y * w + x])));
                for dy in 0..scale {
                    for dx in 0..scale {
                        img.put_pixel(
                            (x0 + x * scale + dx) as u32,
                            (y0 + y * scale + dy) as u32,
                            px,
                        );
                    }
                }
            }
        }
    }
    img
}

/// Encodes `img` as PNG in memory.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>, VizError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Writes `img` as a PNG file at `path`, atomically: the PNG is written to a hidden temporary
/// file in the same directory, flushed to disk, then renamed over `path`, so `path` is either
/// left as it was or holds the whole new picture, never part of one. Missing parent directories
/// are created. On any error the temporary file is removed.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), VizError> {
    let bytes = png_bytes(img)?;
    if path.file_name().is_none() {
        return Err(VizError::NoFileName {
            path: path.to_path_buf(),
        });
    }
    crate::atomic::replace(path, &bytes).map_err(|(path, source)| VizError::Io { path, source })
}

static FONT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/fonts/DejaVuSans-subset.ttf"
));
const FONT_FAMILY: &str = "calm-gpu-sans";

fn register_embedded_font() -> Result<(), VizError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(|| register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok()) {
        Ok(())
    } else {
        Err(VizError::Plot(
            "the embedded font could not be loaded".into(),
        ))
    }
}

/// Picks a "nice" tick step (1, 2 or 5 times a power of ten) so that `span` holds at most about
/// `max_ticks` ticks.
fn nice_step(span: f64, max_ticks: usize) -> f64 {
    let raw = span / max_ticks.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// Multiples of `step` within `[lo, hi]` (none for a degenerate step; at most 50).
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    if !(step > 0.0 && step.is_finite() && lo.is_finite() && hi.is_finite()) {
        return Vec::new();
    }
    let first = (lo / step).ceil();
    let last = (hi / step).floor();
    if !(first.is_finite() && last.is_finite()) || last - first > 50.0 {
        return Vec::new();
    }
    (first as i64..=last as i64)
        .map(|i| i as f64 * step)
        .collect()
}

/// The label of tick `v` on an axis with tick spacing `step` whose values reach `max_abs`:
/// plain decimals with as many places as the step needs, or scientific notation for very large
/// or very small numbers; never "-0".
fn tick_label(v: f64, step: f64, max_abs: f64) -> String {
    let step_exp = step.log10().floor();
    let s = if step >= 1e-5 && max_abs < 1e7 {
        let decimals = (-step_exp).max(0.0) as usize;
        format!("{v:.decimals$}")
    } else {
        // Enough significant digits to tell neighbouring ticks apart.
        let mag_exp = max_abs.log10().floor();
        let digits = (mag_exp - step_exp).clamp(0.0, 12.0) as usize;
        format!("{v:.digits$e}")
    };
    let unsigned = s.trim_start_matches('-');
    let mantissa = unsigned.split('e').next().unwrap_or("");
    if mantissa.chars().all(|c| c == '0' || c == '.') {
        if step >= 1e-5 && max_abs < 1e7 {
            unsigned.to_string()
        } else {
            "0".to_string()
        }
    } else {
        s
    }
}

/// A linear f64 axis whose tick marks and grid lines are exactly `ticks`.
struct TickAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = self.hi - self.lo;
        let t = if span.is_finite() {
            (v - self.lo) / span
        } else {
            // A range wider than f64::MAX: halve everything to stay finite.
            (v * 0.5 - self.lo * 0.5) / (self.hi * 0.5 - self.lo * 0.5)
        };
        let t = if t.is_finite() { t } else { 0.5 };
        // Keep pixels near the plot so plotters' i32 arithmetic cannot overflow.
        let px = limit.0 as f64 + t.clamp(-4.0, 5.0) * (limit.1 - limit.0) as f64;
        px.round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new() // no light grid lines
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Draws the log likelihood per image (`points` as `(epoch, LL per image)`) against the epoch:
/// a line with markers on a white background, axes with tick labels (epochs as integers) and
/// `title` above, `width` x `height` pixels.
///
/// One point is drawn as a lone marker; if all values are equal the y axis still spans a range
/// around them. Points are drawn in the order given (sort them by epoch first).
///
/// # Errors
/// [`VizError::NoPoints`] for an empty `points`, [`VizError::NotFinite`] if any value is NaN or
/// infinite, [`VizError::TooSmall`] below [`MIN_PLOT_WIDTH`] x [`MIN_PLOT_HEIGHT`].
pub fn loglik_plot(
    points: &[(usize, f64)],
    title: &str,
    width: u32,
    height: u32,
) -> Result<RgbImage, VizError> {
    if width < MIN_PLOT_WIDTH || height < MIN_PLOT_HEIGHT {
        return Err(VizError::TooSmall { width, height });
    }
    if points.is_empty() {
        return Err(VizError::NoPoints);
    }
    if let Some(&(epoch, value)) = points.iter().find(|(_, v)| !v.is_finite()) {
        return Err(VizError::NotFinite { epoch, value });
    }
    register_embedded_font()?;
    let plot_err = |e: &dyn std::fmt::Display| VizError::Plot(e.to_string());

    // x: the epochs, padded so end markers are not cut off; ticks on whole epochs only.
    let e_min = points.iter().map(|p| p.0).min().unwrap_or(0) as f64;
    let e_max = points.iter().map(|p| p.0).max().unwrap_or(0) as f64;
    let e_span = e_max - e_min;
    let x_pad = (e_span * 0.04).max(0.5);
    let (x_lo, x_hi) = (e_min - x_pad, e_max + x_pad);
    let x_step = nice_step(e_span.max(1.0), 10).max(1.0).round();
    let x_ticks: Vec<f64> = ticks(x_lo.max(0.0), x_hi, x_step);

    // y: the values with a margin; a range around the value when they are all equal.
    let v_min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let v_max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let v_span = v_max - v_min;
    let scale = v_min.abs().max(v_max.abs());
    // Below ~1e-9 of the magnitude, differences are rounding noise: show a flat line instead.
    let y_pad = if v_span > scale * 1e-9 && v_span > f64::MIN_POSITIVE {
        v_span * 0.08
    } else if scale > 0.0 {
        scale * 0.01
    } else {
        1.0
    };
    let (y_lo, y_hi) = ((v_min - y_pad).max(f64::MIN), (v_max + y_pad).min(f64::MAX));
    let y_step = nice_step(y_hi - y_lo, 8);
    let y_ticks = ticks(y_lo, y_hi, y_step);
    let y_max_abs = y_lo.abs().max(y_hi.abs());

    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;

        let h = height as f64;
        let title_size = (h / 18.0).clamp(14.0, 30.0);
        let label_size = (h / 34.0).clamp(11.0, 18.0);
        let desc_size = (h / 30.0).clamp(12.0, 20.0);
        let font = |size: f64| (FONT_FAMILY, size).into_font();
        let text_grey = RGBColor(40, 40, 40);

        let y_label_chars = y_ticks
            .iter()
            .map(|v| tick_label(*v, y_step, y_max_abs).len())
            .max()
            .unwrap_or(4);
        let y_label_width = (y_label_chars as f64 * label_size * 0.62).min(width as f64 * 0.3);
        let x_key = TickAxis {
            lo: x_lo,
            hi: x_hi,
            ticks: x_ticks,
        };
        let y_key = TickAxis {
            lo: y_lo,
            hi: y_hi,
            ticks: y_ticks,
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, font(title_size).color(&text_grey))
            .margin_top((h * 0.02) as u32 + 4)
            .margin_right((width as f64 * 0.04) as u32 + 8)
            .margin_left(8)
            .margin_bottom(6)
            .x_label_area_size((label_size * 1.6 + desc_size * 1.6) as u32)
            .y_label_area_size((y_label_width + desc_size * 1.8 + 10.0) as u32)
            .build_cartesian_2d(x_key, y_key)
            .map_err(|e| plot_err(&e))?;

        let x_fmt = |v: &f64| format!("{}", v.round() as i64);
        let y_fmt = |v: &f64| tick_label(*v, y_step, y_max_abs);
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(if height >= 300 {
                "log likelihood per image"
            } else {
                "LL per image"
            })
            .axis_desc_style(font(desc_size).color(&text_grey))
            .label_style(font(label_size).color(&text_grey))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(TRANSPARENT)
            .axis_style(RGBColor(90, 90, 90))
            .draw()
            .map_err(|e| plot_err(&e))?;

        let line_colour = RGBColor(31, 119, 180);
        let n = points.len();
        // An even width: plotters offsets wide lines by width / 2 in whole pixels, and an odd
        // width makes flat stretches wobble by a pixel.
        let stroke = 2;
        let xy = || points.iter().map(|&(e, v)| (e as f64, v));
        chart
            .draw_series(LineSeries::new(xy(), line_colour.stroke_width(stroke)))
            .map_err(|e| plot_err(&e))?;
        // Markers while they stay apart; a long history is drawn as a plain line.
        let plot_px = chart.plotting_area().dim_in_pixel().0 as f64;
        let spacing = plot_px / n.max(1) as f64;
        if n == 1 || spacing >= 6.0 {
            let r = (spacing / 4.0).clamp(2.5, 5.0) as i32;
            chart
                .draw_series(xy().map(|p| Circle::new(p, r, line_colour.filled())))
                .map_err(|e| plot_err(&e))?;
            if r >= 4 {
                chart
                    .draw_series(xy().map(|p| Circle::new(p, r - 2, WHITE.filled())))
                    .map_err(|e| plot_err(&e))?;
            }
        }
        root.present().map_err(|e| plot_err(&e))?;
    }
    RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| VizError::Plot("plot buffer has the wrong size".into()))
}
