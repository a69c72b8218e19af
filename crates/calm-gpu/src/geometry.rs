//! Shapes of one CALM layer applied to a dataset, with the SPEC's names.

use serde::{Deserialize, Serialize};

/// The layer's hyper-parameters: `K` kernels of `w x w`, zero padding `p`, stride 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerConfig {
    /// Kernels `K`.
    pub kernels: usize,
    /// Kernel width `w` (square kernels).
    pub width: usize,
    /// Zero padding `p` on every side.
    pub pad: usize,
}

/// Everything derived from a layer and an image shape `C x H x W`, and how the layer sees a
/// patch ([`Geometry::patch_norm`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Channels `C`.
    pub c: usize,
    /// Image height `H` before padding.
    pub h: usize,
    /// Image width `W` before padding.
    pub w: usize,
    /// Kernels `K`.
    pub k: usize,
    /// Kernel width `w` (square kernels).
    pub kw: usize,
    /// Zero padding `p`.
    pub pad: usize,
    /// Padded image height `H + 2p`.
    pub hp: usize,
    /// Padded image width `W + 2p`.
    pub wp: usize,
    /// Patch positions vertically, `Ho = H + 2p - w + 1`.
    pub ho: usize,
    /// Patch positions horizontally, `Wo = W + 2p - w + 1`.
    pub wo: usize,
    /// `Some(eps)`: every patch the layer sees (E-step, M-step, features, initial patches,
    /// k-means) is first contrast-normalised, `(x - mean(x)) / sqrt(var(x) + eps)` over its `R`
    /// values ([`normalize_patch`]; Coates, Lee & Ng, AISTATS 2011). `None` (SPEC): raw patches.
    pub patch_norm: Option<f32>,
}

/// Contrast-normalises one patch in place: `(x - mean) / sqrt(var + eps)`, mean and variance
/// over its values (f32 sums in order, the same bits on every engine that calls this).
pub fn normalize_patch(eps: f32, patch: &mut [f32]) {
    let n = patch.len() as f32;
    let mean = patch.iter().sum::<f32>() / n;
    let var = patch.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
    let scale = 1.0 / (var + eps).sqrt();
    for x in patch.iter_mut() {
        *x = (*x - mean) * scale;
    }
}

/// Why a layer cannot be applied to images of a shape, or pooled on a grid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    /// `K` is 0.
    #[error("kernels must be at least 1 (got 0)")]
    NoKernels,
    /// `w` is 0.
    #[error("width must be at least 1 (got 0)")]
    ZeroWidth,
    /// The images have no channels (`C = 0`).
    #[error("images have 0 channels; at least 1 is needed")]
    NoChannels,
    /// A pooling grid of 0 regions, more than 8, or more than the positions per axis.
    #[error(
        "a pooling grid of {grid}x{grid} does not fit {ho}x{wo} positions (at most 8, and at most the positions per axis)"
    )]
    PoolGrid {
        /// Regions per axis asked for.
        grid: usize,
        /// Positions vertically, `Ho`.
        ho: usize,
        /// Positions horizontally, `Wo`.
        wo: usize,
    },
    /// The kernel is larger than the padded image: `w > H + 2p` or `w > W + 2p`.
    #[error(
        "kernel width {kw} does not fit images of {h}x{w} with padding {pad}: need w <= H + 2p and w <= W + 2p"
    )]
    KernelTooLarge {
        /// Kernel width `w`.
        kw: usize,
        /// Image height `H`.
        h: usize,
        /// Image width `W`.
        w: usize,
        /// Padding `p`.
        pad: usize,
    },
    /// One of the layer's arrays would hold more than [`MAX_ELEMENTS`] values.
    #[error(
        "the layer is too large: {what} would hold {n} values (at most {MAX_ELEMENTS}, which also bounds the GPU's 32-bit indices)"
    )]
    TooLarge {
        /// Which array.
        what: &'static str,
        /// Values it would hold (saturated at `u128::MAX`).
        n: u128,
    },
}

/// The most values any one of a layer's arrays may hold (weights, one padded image, one
/// image's feature map; the CPU engine's patch matrices are held to the machine's memory by
/// `cpu::fast::check_host_memory`): 2^31, so that indices fit the shaders' 32-bit
/// integers with room for offsets, and an impossible shape is an error, not an abort when the
/// allocation fails.
pub const MAX_ELEMENTS: u128 = 1 << 31;

impl Geometry {
    /// Zero-pads `n` images `(n, C, H, W)` to `(n, C, H + 2p, W + 2p)`, the layout every
    /// engine's E-step reads.
    pub fn pad_images(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (c, h, w, p) = (self.c, self.h, self.w, self.pad);
        let mut out = vec![0f32; n * self.padded_len()];
        for img in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    let src = ((img * c + ch) * h + y) * w;
                    let dst = ((img * c + ch) * self.hp + y + p) * self.wp + p;
                    out[dst..dst + w].copy_from_slice(&x[src..src + w]);
                }
            }
        }
        out
    }

    /// SPEC's `bias[k] = -0.5 * ||theta_k||^2` of weights `theta` `(K, R)`, summed in f64.
    pub fn bias(&self, theta: &[f32]) -> Vec<f64> {
        let r = self.r();
        (0..self.k)
            .map(|k| {
                -0.5 * theta[k * r..(k + 1) * r]
                    .iter()
                    .map(|&t| (t as f64) * (t as f64))
                    .sum::<f64>()
            })
            .collect()
    }

    /// [`Geometry::bias`] rounded to f32 once, as the fast engines use it.
    pub fn bias_f32(&self, theta: &[f32]) -> Vec<f32> {
        self.bias(theta).into_iter().map(|b| b as f32).collect()
    }

    /// Where each of a patch's `R` values lies in a padded image, relative to the patch's
    /// corner: `(c * Hp + i) * Wp + j` for channel c, row i, column j.
    pub fn patch_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.c).flat_map(move |c| {
            (0..self.kw)
                .flat_map(move |i| (0..self.kw).map(move |j| (c * self.hp + i) * self.wp + j))
        })
    }

    /// Where each of the `P` patch positions has its corner in a padded image: `h * Wp + w`.
    pub fn position_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.ho).flat_map(move |h| (0..self.wo).map(move |w| h * self.wp + w))
    }

    /// The shapes of `layer` on images of `C x H x W`; an error when the kernel does not fit the
    /// padded image or an array would hold more than [`MAX_ELEMENTS`] values.
    pub fn new(layer: LayerConfig, c: usize, h: usize, w: usize) -> Result<Self, GeometryError> {
        if layer.kernels == 0 {
            return Err(GeometryError::NoKernels);
        }
        if layer.width == 0 {
            return Err(GeometryError::ZeroWidth);
        }
        if c == 0 {
            return Err(GeometryError::NoChannels);
        }
        let (k, kw, pad) = (
            layer.kernels as u128,
            layer.width as u128,
            layer.pad as u128,
        );
        let (c128, h128, w128) = (c as u128, h as u128, w as u128);
        let (hp128, wp128) = (h128 + 2 * pad, w128 + 2 * pad);
        // Products of values up to 2^64 can pass even u128: saturate.
        let mul = |xs: &[u128]| xs.iter().fold(1u128, |a, &b| a.saturating_mul(b));
        let positions = mul(&[hp128.saturating_sub(kw) + 1, wp128.saturating_sub(kw) + 1]);
        for (what, n) in [
            ("the weights (K x C x w x w)", mul(&[k, c128, kw, kw])),
            (
                "one padded image (C x (H + 2p) x (W + 2p))",
                mul(&[c128, hp128, wp128]),
            ),
            (
                "one image's feature map (K x Ho x Wo)",
                mul(&[k, positions]),
            ),
        ] {
            if n > MAX_ELEMENTS {
                return Err(GeometryError::TooLarge { what, n });
            }
        }
        let hp = h + 2 * layer.pad;
        let wp = w + 2 * layer.pad;
        if layer.width > hp || layer.width > wp {
            return Err(GeometryError::KernelTooLarge {
                kw: layer.width,
                h,
                w,
                pad: layer.pad,
            });
        }
        Ok(Self {
            c,
            h,
            w,
            k: layer.kernels,
            kw: layer.width,
            pad: layer.pad,
            hp,
            wp,
            ho: hp - layer.width + 1,
            wo: wp - layer.width + 1,
            patch_norm: None,
        })
    }

    /// The same geometry with patches contrast-normalised by `eps` ([`Geometry::patch_norm`]).
    pub fn with_patch_norm(mut self, eps: Option<f32>) -> Self {
        self.patch_norm = eps;
        self
    }

    /// [`normalize_patch`] of one patch if the layer normalises patches, else nothing.
    pub fn normalize(&self, patch: &mut [f32]) {
        if let Some(eps) = self.patch_norm {
            normalize_patch(eps, patch);
        }
    }

    /// The layer's hyper-parameters.
    pub fn layer(&self) -> LayerConfig {
        LayerConfig {
            kernels: self.k,
            width: self.kw,
            pad: self.pad,
        }
    }

    /// Length of one kernel, `R = C * w * w` (the GEMMs' reduction length in the E-step).
    pub fn r(&self) -> usize {
        self.c * self.kw * self.kw
    }

    /// Patch positions per image, `Ho * Wo`.
    pub fn positions(&self) -> usize {
        self.ho * self.wo
    }

    /// K rounded up to a multiple of 8: the row length of the GPU's transposed weights and
    /// posteriors (`kpad()` in shaders/params.wgsl).
    pub fn kpad(&self) -> usize {
        self.k.div_ceil(8) * 8
    }

    /// Floats in one padded image, `C * (H + 2p) * (W + 2p)`.
    pub fn padded_len(&self) -> usize {
        self.c * self.hp * self.wp
    }

    /// Checks a pooling grid for features: at most 8 regions per axis, and no more than the
    /// positions per axis (every region holds at least one position).
    pub fn check_pool_grid(&self, grid: usize) -> Result<(), GeometryError> {
        if grid == 0 || grid > 8 || grid > self.ho.min(self.wo) {
            return Err(GeometryError::PoolGrid {
                grid,
                ho: self.ho,
                wo: self.wo,
            });
        }
        Ok(())
    }

    /// SPEC's cost of one step (E or M) over `n` images: `2 N K Ho Wo C w w`.
    pub fn step_flops(&self, n: usize) -> f64 {
        2.0 * n as f64 * self.k as f64 * self.positions() as f64 * self.r() as f64
    }

    /// SPEC's cost of one EM epoch over `n` images (E-step plus M-step).
    pub fn epoch_flops(&self, n: usize) -> f64 {
        2.0 * self.step_flops(n)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        let l = |kernels, width, pad| LayerConfig {
            kernels,
            width,
            pad,
        };
        for (layer, what) in [
            (l(99_999_999_999, 20, 2), "weights"),
            (l(usize::MAX, usize::MAX, 0), "weights"),
            (l(64, 20, 1_000_000), "padded image"),
            (l(64, 3, usize::MAX / 4), "padded image"),
            (l(20_000_000, 3, 2), "feature map"),
        ] {
            match Geometry::new(layer, 1, 28, 28) {
                Err(e @ GeometryError::TooLarge { .. }) => {
                    assert!(e.to_string().contains(what), "{e}")
                }
                other => panic!("{layer:?}: {other:?}"),
            }
        }
        // The protocols' shapes are far inside the bound.
        Geometry::new(l(64, 20, 2), 1, 28, 28).unwrap();
        Geometry::new(l(200, 15, 0), 3, 96, 96).unwrap();
    }

    use super::*;

    #[test]
    fn mnist_protocol_cost_matches_spec() {
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
        assert_eq!((g.ho, g.wo), (13, 13));
        // SPEC: about 0.52 TFLOP per step on 60,000 images.
        let step = g.step_flops(60_000);
        assert!((step / 1e12 - 0.519).abs() < 0.01, "{step}");
    }

    #[test]
    fn stl10_protocol_cost_matches_spec() {
        let g = Geometry::new(
            LayerConfig {
                kernels: 200,
                width: 15,
                pad: 0,
            },
            3,
            96,
            96,
        )
        .unwrap();
        assert_eq!(g.ho, 82);
        let step = g.step_flops(105_000);
        assert!((step / 1.9e14 - 1.0).abs() < 0.02, "{step}");
    }

    #[test]
    fn rejects_impossible_shapes() {
        let l = |k, w, p| LayerConfig {
            kernels: k,
            width: w,
            pad: p,
        };
        assert_eq!(
            Geometry::new(l(0, 3, 0), 1, 8, 8),
            Err(GeometryError::NoKernels)
        );
        assert!(matches!(
            Geometry::new(l(2, 9, 0), 1, 8, 8),
            Err(GeometryError::KernelTooLarge { .. })
        ));
        assert!(Geometry::new(l(2, 12, 2), 1, 8, 8).is_ok());
        assert!(Geometry::new(l(2, 13, 2), 1, 8, 20).is_err());
    }
}
