//! A trained layer on disk: safetensors with `theta` `(K, C, w, w)` f32 (PyTorch's conv2d weight
//! layout), `counts` `(K)` f32 (the `B'` of the last update), and metadata holding the config and
//! the log-likelihood history as JSON.
//!
//! Files are written atomically (a temporary file in the same directory, then a rename), so an
//! interrupted write never leaves a half-written model behind.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::data::Whitening;
use crate::error::{CalmError, Result};
use crate::geometry::{Geometry, LayerConfig};
use crate::prior::Prior;

/// One epoch of the run, as printed and as written to `--metrics`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The epoch, from 1.
    pub epoch: usize,
    /// `LL` accumulated under the `theta` used during this epoch.
    pub loglik: f64,
    /// `LL / N`.
    pub loglik_per_image: f64,
    /// `S = sum_k B[k]`, which should equal the number of images.
    pub count_sum: f64,
    /// Wall-clock seconds of the epoch.
    pub seconds: f64,
    /// SPEC's FLOP count of the epoch over its seconds.
    pub gflops: f64,
    /// Kernels `--revive` re-seeded after this epoch (omitted when none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revived: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One epoch as the model file keeps it: what the data and the weights determine, nothing about
/// the machine's speed, so the same run gives the same file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The epoch, from 1.
    pub epoch: usize,
    /// `LL` under the `theta` used during this epoch.
    pub loglik: f64,
    /// `S = sum_k B[k]`.
    pub count_sum: f64,
    /// Kernels `--revive` re-seeded after this epoch (omitted when none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revived: usize,
}

impl From<&EpochRecord> for HistoryEntry {
    fn from(r: &EpochRecord) -> Self {
        Self {
            epoch: r.epoch,
            loglik: r.loglik,
            count_sum: r.count_sum,
            revived: r.revived,
        }
    }
}

/// How a model's features are meant to be computed: `features` and `eval` use it unless told
/// otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureRecipe {
    /// Pooling regions per axis.
    pub grid: usize,
    /// The encoding of `L` pooled over each region.
    pub encoding: crate::Encoding,
    /// Standardise each feature (zero mean, unit variance over the probe's training set)
    /// before the linear probe.
    pub standardize: bool,
}

impl FeatureRecipe {
    /// The pooling this recipe names (its grid and encoding).
    pub fn pooling(&self) -> crate::Pooling {
        crate::Pooling {
            grid: self.grid,
            encoding: self.encoding,
        }
    }
}

impl std::fmt::Display for FeatureRecipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {}x{} regions",
            self.encoding, self.grid, self.grid
        )?;
        if self.standardize {
            f.write_str(", standardised")?;
        }
        Ok(())
    }
}

/// Everything about how a model was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Kernels `K`, width `w` and padding `p`.
    pub layer: LayerConfig,
    /// Channels `C` of the training images.
    pub channels: usize,
    /// Height `H` of the training images.
    pub height: usize,
    /// Width `W` of the training images.
    pub width: usize,
    /// Seed of the initial weights, of revival and of the whitening filter's patches.
    pub seed: u64,
    /// Images per batch of the fit.
    pub batch: usize,
    /// Epochs asked for (the history may hold fewer, or more with revival's settling epochs).
    pub epochs_requested: usize,
    /// Preprocessing applied to the data before training ("none", "scale", "zca-image").
    pub preprocess: String,
    /// The engine or adapter that trained it ([`crate::Engine::describe`]).
    pub engine: String,
    /// Training images `N`.
    pub images: usize,
    /// The training data's names (file paths, or `embedded:digits-train`).
    pub data: Vec<String>,
    /// Every completed epoch, in order.
    pub history: Vec<HistoryEntry>,
    /// Why training stopped early, if it did.
    pub stopped: Option<String>,
    /// Choices beyond SPEC's protocol (initialisation, revival, stopping rule); absent in files
    /// of the paper's protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<serde_json::Value>,
    /// How the model's features are meant to be computed (`train --preset recommended`: the
    /// triangle encoding on 4 x 4 regions, standardised); absent: SPEC's image-wide log-sum-exp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<FeatureRecipe>,
    /// The calm-gpu version that wrote the file.
    pub calm_gpu_version: String,
}

/// A trained layer as its file holds it: the metadata, `theta`, the counts, and the optional
/// prior and whitening filter.
#[derive(Clone, Debug)]
pub struct Model {
    /// How the model was made.
    pub meta: ModelMeta,
    /// `(K, C, w, w)` flattened.
    pub theta: Vec<f32>,
    /// `B'` of the last update, `(K)`.
    pub counts: Vec<f32>,
    /// Learned mixing weights and variance (`train --learn-weights/--learn-variance`), kept as
    /// the tensors `log_weight` `(K)` (`log(K pi_k)`) and `inv_variance` `(1)`; `None` for
    /// SPEC's uniform weights and unit variance.
    pub prior: Option<Prior>,
    /// The patch-whitening filter the training images went through (`train --whiten W`), kept
    /// as the tensor `whiten` `(C, C, W, W)` and applied again to any data the model encodes.
    pub whiten: Option<Whitening>,
    /// More metadata entries (checkpoints keep the run's arguments here).
    pub extra: BTreeMap<String, String>,
}

/// Images per batch of [`Model::features`]: bounds memory only.
pub const FEATURE_BATCH: usize = 1000;

fn model_err(path: &Path, msg: impl std::fmt::Display) -> CalmError {
    CalmError::Model(format!("{}: {msg}", path.display()))
}

/// The metadata keys the model file writes itself; [`Model::extra`] may not use them.
pub const RESERVED_KEYS: [&str; 5] = ["format", "calm_gpu", "loglik", "config", "net"];

impl Model {
    /// The weights `(K, C, w, w)`, PyTorch's conv2d weight layout.
    pub fn theta(&self) -> ndarray::Array4<f32> {
        let l = self.meta.layer;
        ndarray::Array4::from_shape_vec(
            (l.kernels, self.meta.channels, l.width, l.width),
            self.theta.clone(),
        )
        .expect("a loaded or trained model's theta is (K, C, w, w)")
    }

    /// The layer on images of `(c, h, w)`: features work on any image size of the model's
    /// channel count.
    pub fn geometry_for(&self, c: usize, h: usize, w: usize) -> Result<Geometry> {
        if c != self.meta.channels {
            return Err(CalmError::Invalid(format!(
                "the model was trained on {}-channel images but the data has {c} channels",
                self.meta.channels
            )));
        }
        Ok(Geometry::new(self.meta.layer, c, h, w)?.with_patch_norm(self.patch_norm()))
    }

    /// The `eps` of the model's contrast normalisation of patches (`options.patch_norm`,
    /// [`Geometry::patch_norm`]), `None` for raw patches (SPEC).
    pub fn patch_norm(&self) -> Option<f32> {
        patch_norm_of(&self.meta)
    }

    /// `source` through the model's patch-whitening filter, if it has one.
    pub fn whitened(
        &self,
        source: std::sync::Arc<dyn crate::data::ImageSource>,
    ) -> Result<std::sync::Arc<dyn crate::data::ImageSource>> {
        Ok(match &self.whiten {
            Some(wh) => std::sync::Arc::new(crate::data::Whitened::new(
                source,
                std::sync::Arc::new(wh.clone()),
            )?),
            None => source,
        })
    }

    /// Features of `source` (preprocessed as the training data was) on `device`: the images go
    /// through the model's whitening filter, then `L` under the model's prior is encoded and
    /// pooled as `pooling` says ([`crate::run::features`]), `(N, K * grid^2)`. `progress` gets
    /// the images done.
    pub fn features(
        &self,
        device: crate::Device,
        gpu: &crate::GpuConfig,
        source: std::sync::Arc<dyn crate::data::ImageSource>,
        pooling: crate::Pooling,
        cancel: &crate::CancelToken,
        progress: &mut dyn FnMut(usize),
    ) -> Result<ndarray::Array2<f32>> {
        let (c, h, w) = source.shape();
        let g = self.geometry_for(c, h, w)?;
        let source = self.whitened(source)?;
        crate::run::features(
            device,
            g,
            source,
            &self.theta,
            &self.prior_or_uniform(),
            FEATURE_BATCH,
            pooling,
            gpu,
            cancel,
            progress,
        )
    }

    /// The layer on images of the training images' shape.
    pub fn geometry(&self) -> Result<Geometry> {
        Ok(Geometry::new(
            self.meta.layer,
            self.meta.channels,
            self.meta.height,
            self.meta.width,
        )?
        .with_patch_norm(self.patch_norm()))
    }

    /// The mixing weights and variance the layer's `L` uses (uniform, unit: SPEC's).
    pub fn prior_or_uniform(&self) -> Prior {
        self.prior
            .clone()
            .unwrap_or_else(|| Prior::uniform(self.meta.layer.kernels))
    }

    /// The safetensors bytes: an 8-byte little-endian header length, the JSON header, the data.
    /// Written here rather than through `safetensors::serialize`, whose metadata comes from a
    /// `HashMap` and so changes order from run to run; this header's keys are sorted, so the same
    /// model always gives the same file. Loading goes through the `safetensors` crate.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        safetensors_bytes(self.metadata()?, &self.tensors("")?)
    }

    /// The file's metadata entries for this model: its extra entries, the format, the config
    /// and the LL history.
    pub(crate) fn metadata(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let json = |v: &dyn erased::Json| v.json();
        // serde_json's map keeps keys sorted.
        let mut md = serde_json::Map::new();
        for (k, v) in &self.extra {
            if RESERVED_KEYS.contains(&k.as_str()) {
                return Err(CalmError::Model(format!(
                    "extra metadata key `{k}` is the model file's own; choose another name"
                )));
            }
            md.insert(k.clone(), v.clone().into());
        }
        md.insert("format".into(), "calm-gpu".into());
        md.insert("calm_gpu".into(), json(&self.meta).into());
        md.insert(
            "loglik".into(),
            json(
                &self
                    .meta
                    .history
                    .iter()
                    .map(|r| r.loglik)
                    .collect::<Vec<_>>(),
            )
            .into(),
        );
        md.insert("config".into(), json(&self.meta.layer).into());
        Ok(md)
    }

    /// The layer's tensors named `prefix` + `theta`, `counts`, ..., checked against its config,
    /// in the order the file holds them.
    pub(crate) fn tensors(&self, prefix: &str) -> Result<Vec<Tensor>> {
        let l = self.meta.layer;
        let want = l.kernels * self.meta.channels * l.width * l.width;
        if self.theta.len() != want || self.counts.len() != l.kernels {
            return Err(CalmError::Model(format!(
                "theta holds {} values and counts {}, but the config needs {want} and {}",
                self.theta.len(),
                self.counts.len(),
                l.kernels
            )));
        }
        let name = |n: &str| format!("{prefix}{n}");
        let mut t = vec![
            Tensor::new(name("counts"), vec![l.kernels], self.counts.clone()),
            Tensor::new(
                name("theta"),
                vec![l.kernels, self.meta.channels, l.width, l.width],
                self.theta.clone(),
            ),
        ];
        if let Some(p) = &self.prior {
            p.check(l.kernels).map_err(CalmError::Model)?;
            t.push(Tensor::new(name("inv_variance"), vec![1], vec![p.inv_var]));
            t.push(Tensor::new(
                name("log_weight"),
                vec![l.kernels],
                p.log_weight.clone(),
            ));
        }
        if let Some(wh) = &self.whiten {
            wh.check().map_err(CalmError::Model)?;
            if wh.channels != self.meta.channels {
                return Err(CalmError::Model(format!(
                    "whitening filter for {} channels, model of {}",
                    wh.channels, self.meta.channels
                )));
            }
            t.push(Tensor::new(
                name("whiten"),
                vec![wh.channels, wh.channels, wh.width, wh.width],
                wh.filter.clone(),
            ));
        }
        Ok(t)
    }

    /// Writes the model atomically; refuses to replace an existing file unless `force`.
    pub fn save(&self, path: &Path, force: bool) -> Result<()> {
        write_atomic(path, &self.to_bytes()?, force)
    }

    /// Reads a model written by [`Model::save`] (or a checkpoint), checking every tensor's shape
    /// and that the weights and counts are finite.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| CalmError::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// [`Model::load`] on bytes already read; `path` names the file in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| model_err(path, format!("not a safetensors model ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| model_err(path, e))?;
        let md = header.metadata().clone().unwrap_or_default();
        let meta: ModelMeta = md
            .get("calm_gpu")
            .ok_or_else(|| model_err(path, "no calm-gpu metadata (was it written by calm-gpu?)"))
            .and_then(|s| {
                serde_json::from_str(s)
                    .map_err(|e| model_err(path, format!("bad calm-gpu metadata: {e}")))
            })?;
        let layer = read_layer(path, &st, meta, "")?;
        let extra = md
            .into_iter()
            .filter(|(k, _)| !RESERVED_KEYS.contains(&k.as_str()))
            .collect();
        Ok(Self { extra, ..layer })
    }
}

/// One tensor of a model file: its name, shape and f32 values.
pub(crate) struct Tensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    pub(crate) fn new(name: String, shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { name, shape, data }
    }
}

/// The safetensors file of metadata `md` and `tensors`, their data in the order given.
pub(crate) fn safetensors_bytes(
    md: serde_json::Map<String, serde_json::Value>,
    tensors: &[Tensor],
) -> Result<Vec<u8>> {
    let mut header = serde_json::json!({ "__metadata__": md });
    let mut o = 0;
    for t in tensors {
        let bytes = t.data.len() * 4;
        header[t.name.as_str()] = serde_json::json!({
            "dtype": "F32", "shape": t.shape, "data_offsets": [o, o + bytes]
        });
        o += bytes;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| CalmError::Model(e.to_string()))?;
    // The data starts 8-byte aligned, as the format recommends.
    while (h.len() + 8) % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + o);
    out.extend((h.len() as u64).to_le_bytes());
    out.extend(h);
    for t in tensors {
        out.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
    }
    Ok(out)
}

/// The f32 tensor `name` of `st`, which must have `shape` (`path` names the file in errors).
pub(crate) fn f32_tensor(
    path: &Path,
    st: &SafeTensors,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .map_err(|_| model_err(path, format!("no tensor `{name}`")))?;
    if t.dtype() != Dtype::F32 || t.shape() != shape {
        return Err(model_err(
            path,
            format!(
                "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The layer whose tensors are named `prefix` + `theta`, ... in `st`, checked against `meta`
/// (its metadata; `extra` is left empty).
pub(crate) fn read_layer(
    path: &Path,
    st: &SafeTensors,
    meta: ModelMeta,
    prefix: &str,
) -> Result<Model> {
    let read =
        |name: &str, shape: &[usize]| f32_tensor(path, st, &format!("{prefix}{name}"), shape);
    let l = meta.layer;
    // Metadata that no run could have written (K 0, a kernel wider than the padded image,
    // arrays beyond any engine's reach) marks a damaged file, before any array is read.
    Geometry::new(l, meta.channels, meta.height, meta.width).map_err(|e| {
            model_err(
                path,
                format!(
                    "its metadata describes no possible layer (K {}, w {}, p {} on {}x{}x{} images): {e}",
                    l.kernels, l.width, l.pad, meta.channels, meta.height, meta.width
                ),
            )
        })?;
    if let Some(v) = meta.options.as_ref().and_then(|o| o.get("patch_norm"))
        && !v.as_f64().is_some_and(|e| e > 0.0 && e <= f32::MAX as f64)
    {
        return Err(model_err(
            path,
            format!("its options.patch_norm is {v}, not a positive number"),
        ));
    }
    let theta = read("theta", &[l.kernels, meta.channels, l.width, l.width])?;
    let counts = read("counts", &[l.kernels])?;
    // calm-gpu never writes non-finite weights (the precision limit keeps the last finite
    // theta): such a file is damaged, and its features would all be -inf.
    for (name, v) in [("theta", &theta), ("counts", &counts)] {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(model_err(
                path,
                format!(
                    "tensor `{prefix}{name}` holds {} at index {i}; the file is damaged",
                    v[i]
                ),
            ));
        }
    }
    let prior = match (
        st.tensor(&format!("{prefix}inv_variance")),
        st.tensor(&format!("{prefix}log_weight")),
    ) {
        (Err(_), Err(_)) => None,
        _ => {
            let p = Prior {
                inv_var: read("inv_variance", &[1])?[0],
                log_weight: read("log_weight", &[l.kernels])?,
            };
            p.check(l.kernels).map_err(|e| model_err(path, e))?;
            Some(p)
        }
    };
    let whiten = match st.tensor(&format!("{prefix}whiten")) {
        Err(_) => None,
        Ok(t) => {
            let c = meta.channels;
            let width = t.shape().last().copied().unwrap_or(0);
            let wh = Whitening {
                channels: c,
                width,
                filter: read("whiten", &[c, c, width, width])?,
            };
            wh.check().map_err(|e| model_err(path, e))?;
            Some(wh)
        }
    };
    Ok(Model {
        meta,
        theta,
        counts,
        prior,
        whiten,
        extra: Default::default(),
    })
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, creating
/// missing parent directories ([`crate::atomic::replace`]). An existing file is refused unless
/// `force`.
pub fn write_atomic(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    // A pipe or a device (`/dev/stdout`, `>(jq .)`) is written to, not replaced, and needs no
    // `force`.
    if !force && std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return Err(CalmError::Exists {
            path: path.display().to_string(),
        });
    }
    crate::atomic::replace(path, bytes).map_err(|(p, e)| {
        // atomic::replace's own refusals (the path names no file to write) carry no OS error:
        // the reason alone, not wrapped as an I/O failure.
        if e.kind() == std::io::ErrorKind::InvalidInput && e.raw_os_error().is_none() {
            CalmError::Invalid(format!("{} {e}", p.display()))
        } else {
            CalmError::io(&p, e)
        }
    })
}

/// Weights to start from: a `.npy` f32 array `(K, C, w, w)` or a saved model. Returns the flat
/// weights checked against `g`.
pub fn load_init(path: &Path, g: &Geometry) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|e| CalmError::io(path, e))?;
    let want = [g.k, g.c, g.kw, g.kw];
    let (theta, shape): (Vec<f32>, Vec<usize>) = if bytes.starts_with(b"\x93NUMPY") {
        let arr: ndarray::ArrayD<f32> =
            ndarray_npy::ReadNpyExt::read_npy(std::io::Cursor::new(&bytes))
                .map_err(|e| model_err(path, format!("not a float32 .npy array ({e})")))?;
        let shape = arr.shape().to_vec();
        (arr.as_standard_layout().iter().copied().collect(), shape)
    } else {
        let m = Model::from_bytes(path, &bytes)?;
        let l = m.meta.layer;
        (m.theta, vec![l.kernels, m.meta.channels, l.width, l.width])
    };
    if shape != want {
        return Err(model_err(
            path,
            format!(
                "initial weights have shape {shape:?}, but K, C, w, w of this run are {want:?}"
            ),
        ));
    }
    if theta.iter().any(|v| !v.is_finite()) {
        return Err(model_err(path, "initial weights hold NaN or infinity"));
    }
    Ok(theta)
}

mod erased {
    /// Serialises anything serde can to a JSON string (metadata values are strings).
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

/// How many kernels are in use and how many are distinct: `unused` counts kernels whose count
/// `B'` is below 1; `distinct` is the number of groups left after merging kernels within 1%
/// relative distance of each other (`||a - b|| <= 0.01 max(||a||, ||b||)`), the measure of
/// issue 6's "only 33-41 of the 64 kernels are distinct".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelUse {
    /// Kernels whose count `B'` is below 1.
    pub unused: usize,
    /// Groups of kernels left after merging near-copies ([`near_copy`]).
    pub distinct: usize,
}

/// [`KernelUse`] of weights `theta` `(K, R)` with counts `B'` `(K)`.
pub fn kernel_use(theta: &[f32], counts: &[f32]) -> KernelUse {
    let k = counts.len();
    let r = theta.len() / k.max(1);
    let mut rep: Vec<usize> = Vec::new();
    for i in 0..k {
        let row = |j: usize| &theta[j * r..(j + 1) * r];
        if !rep.iter().any(|&j| near_copy(row(i), row(j))) {
            rep.push(i);
        }
    }
    KernelUse {
        unused: counts.iter().filter(|&&c| c < 1.0).count(),
        distinct: rep.len(),
    }
}

/// Two kernels within 1 % of each other: `||a - b|| <= 0.01 max(||a||, ||b||)` (so two zero
/// kernels are copies too).
pub fn near_copy(a: &[f32], b: &[f32]) -> bool {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let d = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    d <= 0.01 * norm(a).max(norm(b))
}

/// `options.patch_norm` of a model's metadata (checked positive when the file is read).
fn patch_norm_of(meta: &ModelMeta) -> Option<f32> {
    meta.options
        .as_ref()
        .and_then(|o| o.get("patch_norm"))
        .and_then(|v| v.as_f64())
        .map(|e| e as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(prior: Option<Prior>) -> Model {
        let layer = LayerConfig {
            kernels: 3,
            width: 2,
            pad: 0,
        };
        Model {
            meta: ModelMeta {
                layer,
                channels: 1,
                height: 4,
                width: 4,
                seed: 1,
                batch: 2,
                epochs_requested: 1,
                preprocess: "none".into(),
                engine: "test".into(),
                images: 2,
                data: vec![],
                history: vec![],
                stopped: None,
                options: None,
                features: None,
                calm_gpu_version: "0".into(),
            },
            theta: (0..12).map(|i| i as f32).collect(),
            counts: vec![1.0, 0.5, 0.5],
            prior,
            whiten: None,
            extra: Default::default(),
        }
    }

    /// A learned prior survives the file; a file without one loads as SPEC's; a non-finite or
    /// misshapen prior is refused on load and on save.
    #[test]
    fn extra_entries_round_trip_and_cannot_shadow_the_files_own() {
        let mut m = model(None);
        m.extra.insert("run".into(), "{\"a\": 1}".into());
        let back = Model::from_bytes(Path::new("m"), &m.to_bytes().unwrap()).unwrap();
        assert_eq!(back.extra, m.extra);
        for key in RESERVED_KEYS {
            let mut bad = model(None);
            bad.extra.insert(key.into(), "x".into());
            let e = bad.to_bytes().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("the model file's own"), "{e}");
        }
    }

    #[test]
    fn prior_round_trips_and_is_checked() {
        let p = Path::new("m.safetensors");
        let prior = Prior {
            inv_var: 21.5,
            log_weight: vec![-0.25, 0.5, 0.125],
        };
        let m = model(Some(prior.clone()));
        let back = Model::from_bytes(p, &m.to_bytes().unwrap()).unwrap();
        assert_eq!(back.prior, Some(prior.clone()));
        assert_eq!(back.theta, m.theta);
        let plain = Model::from_bytes(p, &model(None).to_bytes().unwrap()).unwrap();
        assert_eq!(plain.prior, None);
        assert!(plain.prior_or_uniform().is_uniform());

        let mut bytes = m.to_bytes().unwrap();
        // inv_variance is the 4 bytes after counts (12) and theta (48) in the data section.
        let data = bytes.len() - (12 + 48 + 4 + 12);
        bytes[data + 60..data + 64].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = Model::from_bytes(p, &bytes).unwrap_err().to_string();
        assert!(err.contains("inverse variance"), "{err}");

        let bad = model(Some(Prior {
            inv_var: 1.0,
            log_weight: vec![0.0; 2],
        }));
        assert!(bad.to_bytes().is_err());
    }

    /// The whitening filter survives the file beside a prior; a filter for other channels is
    /// refused.
    #[test]
    fn whitening_round_trips() {
        let p = Path::new("m.safetensors");
        let mut m = model(Some(Prior {
            inv_var: 2.0,
            log_weight: vec![0.0; 3],
        }));
        let white = Whitening {
            channels: 1,
            width: 3,
            filter: (0..9).map(|i| i as f32 - 4.0).collect(),
        };
        m.whiten = Some(white.clone());
        let back = Model::from_bytes(p, &m.to_bytes().unwrap()).unwrap();
        assert_eq!(back.whiten, Some(white));
        assert_eq!(back.prior, m.prior);
        m.whiten = Some(Whitening {
            channels: 2,
            width: 1,
            filter: vec![1.0; 4],
        });
        assert!(m.to_bytes().is_err());
    }
}
