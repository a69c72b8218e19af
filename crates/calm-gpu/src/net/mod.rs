//! Deep CALM: CALM layers stacked by a [`NetSpec`], fitted greedily layer by layer by EM
//! ([`NetTrainer`]), each layer's input computed from the one below by a link (an encoding of
//! the map, a pooling, a per-channel standardisation; [`ops`]).
//!
//! ```no_run
//! use calm_gpu::net::{NetParams, NetSpec};
//! use calm_gpu::{CalmParams, data};
//! # fn main() -> Result<(), calm_gpu::CalmError> {
//! let digits = data::embedded_digits(data::Split::Train);
//! let spec: NetSpec = "64x5p2 | tri max4s2p1 norm | 128x3p1 | tri avg2".parse()?;
//! let net = NetParams::new(spec, CalmParams::recommended()).fit(std::sync::Arc::new(digits))?;
//! net.save("deep.safetensors".as_ref(), true)?;
//! # Ok(()) }
//! ```
//!
//! The file: layer 1 is stored exactly as a one-layer model (so a one-layer network *is* today's
//! model file); layer `l >= 2` keeps its tensors as `layer{l}.theta`, `layer{l}.counts`, ...; the
//! standardisation after layer `l` as `link{l}.mean` and `link{l}.scale`; the metadata key `net`
//! holds the spec and the metadata of layers 2 and up.

pub mod ops;
pub mod spec;
mod train;

use std::path::Path;
use std::sync::Arc;

use ndarray::Array2;
use safetensors::SafeTensors;

pub(crate) use ops::NormFit;
pub use ops::{ChannelNorm, LinkSource};
pub use spec::{LayerShape, LayerSpec, LinkSpec, MapEncoding, NetSpec, PoolKind, PoolSpec};
pub use train::{NETWORK_FILE, NetEvent, NetOutcome, NetParams, NetTrainer};

use crate::cancel::CancelToken;
use crate::data::ImageSource;
use crate::error::{CalmError, Result};
use crate::gpu::GpuConfig;
use crate::model::{
    Model, ModelMeta, Tensor, f32_tensor, read_layer, safetensors_bytes, write_atomic,
};
use crate::run::Device;

/// Bytes of a layer's input that [`Network`] and [`NetTrainer`] keep in memory instead of
/// recomputing them from the layers below at every read.
pub const INPUT_BUDGET: u64 = 8 << 30;

/// A fitted network: its spec, every layer as a [`Model`], and the standardisation of each link
/// that has `norm`. Layers may be fewer than the spec's while a fit is under way.
#[derive(Clone, Debug)]
pub struct Network {
    /// The layers and links.
    pub spec: NetSpec,
    /// The fitted layers, input first.
    pub layers: Vec<Model>,
    /// `norms[l]`: the standardisation fitted after layer `l` (where its link has `norm` and
    /// the layer is fitted).
    pub norms: Vec<Option<ChannelNorm>>,
}

/// The metadata of a network beyond layer 1's, as the `net` entry keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct NetMeta {
    spec: NetSpec,
    /// Layers 2 and up.
    layers: Vec<ModelMeta>,
}

impl Network {
    /// A one-layer network of `model`.
    pub fn single(model: Model) -> Self {
        Self {
            spec: NetSpec::single(model.meta.layer),
            layers: vec![model],
            norms: Vec::new(),
        }
    }

    /// True for a network of one layer, no head and no `white W` in its spec: the model file
    /// of one layer.
    pub fn is_single(&self) -> bool {
        self.spec == NetSpec::single(self.spec.layers[0].layer)
    }

    /// True when every layer of the spec is fitted.
    pub fn is_complete(&self) -> bool {
        self.layers.len() == self.spec.layers.len()
    }

    /// The first layer (whose training images are the network's).
    pub fn first(&self) -> &Model {
        &self.layers[0]
    }

    /// The input images of layer `l` (from 0) computed from `source` (the network's images, as
    /// preprocessed for layer 1), not yet through layer `l`'s own whitening. Each stage is held
    /// in memory when it fits [`INPUT_BUDGET`] (`progress` gets `(layer, images)` as it is
    /// computed), else recomputed at every read.
    pub fn input_of(
        &self,
        l: usize,
        source: Arc<dyn ImageSource>,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Arc<dyn ImageSource>> {
        let mut x = source;
        for i in 0..l {
            x = self
                .link_stage(i, x, None, cancel, &mut |n| progress(i + 1, n))?
                .0;
        }
        Ok(x)
    }

    /// Layer `l`'s link on `input` (layer `l`'s input, before its whitening), held in memory
    /// when it fits [`INPUT_BUDGET`], standardised by `norms[l]`; or, with `fit` where the link
    /// has `norm`, by a standardisation fitted on these outputs (of every rank of `fit`),
    /// returned beside them. `progress` gets the images done of the link, then of the fit.
    pub(crate) fn link_stage(
        &self,
        l: usize,
        input: Arc<dyn ImageSource>,
        fit: Option<&NormFit<'_>>,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(Arc<dyn ImageSource>, Option<ChannelNorm>)> {
        let link = Arc::new(self.link_source(l, input, None)?);
        let raw = ops::materialize(link, INPUT_BUDGET, cancel, progress)?;
        let norm = match fit.filter(|_| self.spec.links[l].norm) {
            Some(f) => Some(ChannelNorm::fit_sharded(
                raw.as_ref(),
                f.sharding,
                f.comm,
                cancel,
                progress,
            )?),
            None => self.norms.get(l).cloned().flatten(),
        };
        Ok(match norm {
            Some(n) => (Arc::new(ops::Normed::new(raw, n.clone())?), Some(n)),
            None => (raw, None),
        })
    }

    /// Layer `l`'s link applied to `input` (layer `l`'s input, before its whitening).
    pub(crate) fn link_source(
        &self,
        l: usize,
        input: Arc<dyn ImageSource>,
        norm: Option<ChannelNorm>,
    ) -> Result<LinkSource> {
        let m = &self.layers[l];
        let (c, h, w) = input.shape();
        let g = m.geometry_for(c, h, w)?;
        LinkSource::new(
            m.whitened(input)?,
            g,
            &m.theta,
            &m.prior_or_uniform(),
            self.spec.links[l],
            norm,
        )
    }

    /// Features of `source` (preprocessed as the training images were): the head's map
    /// flattened where the spec has a head, else the top layer's features by `pooling` (its
    /// recipe's, say) on its input, `(N, features)`. Layer inputs run on the CPU engine; the top
    /// layer's features on `device`.
    pub fn features(
        &self,
        device: Device,
        gpu: &GpuConfig,
        source: Arc<dyn ImageSource>,
        pooling: crate::Pooling,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>> {
        let top = self.layers.len() - 1;
        let input = self.input_of(top, source, cancel, &mut |_, _| {})?;
        if self.spec.has_head() {
            let head = self.link_source(top, input, self.norms.get(top).cloned().flatten())?;
            return flatten(&head, cancel, progress);
        }
        self.layers[top].features(device, gpu, input, pooling, cancel, progress)
    }

    /// The pooling of the top layer's recipe (SPEC's image-wide log-sum-exp when it has none).
    pub fn pooling(&self) -> crate::Pooling {
        self.layers[self.layers.len() - 1]
            .meta
            .features
            .map(|r| r.pooling())
            .unwrap_or_default()
    }

    /// The file's bytes; a one-layer network without a head gives [`Model::to_bytes`]'s.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if self.is_single() {
            return self.layers[0].to_bytes();
        }
        let mut md = self.layers[0].metadata()?;
        let meta = NetMeta {
            spec: self.spec.clone(),
            layers: self.layers[1..].iter().map(|m| m.meta.clone()).collect(),
        };
        md.insert(
            "net".into(),
            serde_json::to_string(&meta)
                .map_err(|e| CalmError::Model(e.to_string()))?
                .into(),
        );
        let mut tensors = self.layers[0].tensors("")?;
        for (i, m) in self.layers.iter().enumerate().skip(1) {
            tensors.extend(m.tensors(&format!("layer{}.", i + 1))?);
        }
        for (i, n) in self.norms.iter().enumerate() {
            if let Some(n) = n {
                let c = n.mean.len();
                tensors.push(Tensor::new(
                    format!("link{}.mean", i + 1),
                    vec![c],
                    n.mean.clone(),
                ));
                tensors.push(Tensor::new(
                    format!("link{}.scale", i + 1),
                    vec![c],
                    n.scale.clone(),
                ));
            }
        }
        safetensors_bytes(md, &tensors)
    }

    /// Writes the network atomically; refuses to replace an existing file unless `force`.
    pub fn save(&self, path: &Path, force: bool) -> Result<()> {
        write_atomic(path, &self.to_bytes()?, force)
    }

    /// Reads a network (or a one-layer model) written by [`Network::save`] or [`Model::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| CalmError::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// [`Network::load`] on bytes already read; `path` names the file in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let first = Model::from_bytes(path, bytes)?;
        let bad = |e: String| CalmError::Model(format!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let Some(net) = header.metadata().as_ref().and_then(|m| m.get("net")) else {
            return Ok(Self::single(first));
        };
        let meta: NetMeta =
            serde_json::from_str(net).map_err(|e| bad(format!("bad network metadata: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let m0 = &first.meta;
        let shapes = meta
            .spec
            .shapes(m0.channels, m0.height, m0.width)
            .map_err(|e| bad(format!("its network does not fit its images: {e}")))?;
        if meta.layers.len() + 1 > meta.spec.layers.len() || m0.layer != meta.spec.layers[0].layer {
            return Err(bad("its layers do not match its network spec".into()));
        }
        let mut layers = vec![first];
        for (i, lm) in meta.layers.into_iter().enumerate() {
            let g = shapes[i + 1].geometry;
            if lm.layer != meta.spec.layers[i + 1].layer
                || (lm.channels, lm.height, lm.width) != (g.c, g.h, g.w)
            {
                return Err(bad(format!(
                    "layer {}'s metadata does not match its network spec",
                    i + 2
                )));
            }
            layers.push(read_layer(path, &st, lm, &format!("layer{}.", i + 2))?);
        }
        let mut norms = Vec::new();
        for (i, link) in meta.spec.links.iter().enumerate().take(layers.len()) {
            let (mean, scale) = (
                format!("link{}.mean", i + 1),
                format!("link{}.scale", i + 1),
            );
            let c = shapes[i].out.map_or(0, |o| o.0);
            let norm = match (link.norm, st.tensor(&mean), st.tensor(&scale)) {
                (false, Err(_), Err(_)) => None,
                (true, Ok(_), Ok(_)) => {
                    let n = ChannelNorm {
                        mean: f32_tensor(path, &st, &mean, &[c])?,
                        scale: f32_tensor(path, &st, &scale, &[c])?,
                    };
                    n.check(c)
                        .map_err(|e| bad(format!("link {}: {e}", i + 1)))?;
                    Some(n)
                }
                _ => {
                    return Err(bad(format!(
                        "link {}'s standardisation does not match its spec `{link}`",
                        i + 1
                    )));
                }
            };
            norms.push(norm);
        }
        Ok(Self {
            spec: meta.spec,
            layers,
            norms,
        })
    }

    /// One line per layer and link, for `calm-gpu info`.
    pub fn describe(&self) -> Vec<String> {
        let m0 = &self.layers[0].meta;
        let shapes = self
            .spec
            .shapes(m0.channels, m0.height, m0.width)
            .unwrap_or_default();
        let mut out = Vec::new();
        for (i, (l, s)) in self.spec.layers.iter().zip(&shapes).enumerate() {
            let g = s.geometry;
            let fitted = self.layers.get(i).map_or_else(
                || "not fitted yet".to_string(),
                |m| {
                    let u = crate::model::kernel_use(&m.theta, &m.counts);
                    format!(
                        "{} epochs, LL/image {}, {} of {} kernels used",
                        m.meta.history.len(),
                        m.meta.history.last().map_or("-".into(), |h| format!(
                            "{:.4}",
                            h.loglik / m.meta.images.max(1) as f64
                        )),
                        g.k - u.unused,
                        g.k
                    )
                },
            );
            out.push(format!(
                "layer {}: {l} on {}x{}x{} -> {}x{} positions; {fitted}",
                i + 1,
                g.c,
                g.h,
                g.w,
                g.ho,
                g.wo
            ));
            if let (Some(link), Some((c, h, w))) = (self.spec.links.get(i), s.out) {
                let role = if i + 1 == self.spec.layers.len() {
                    "head"
                } else {
                    "link"
                };
                out.push(format!("  {role} {}: {link} -> {c}x{h}x{w}", i + 1));
            }
        }
        out
    }
}

/// Every image of `src` flattened, one row each.
fn flatten(
    src: &dyn ImageSource,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(usize),
) -> Result<Array2<f32>> {
    let (c, h, w) = src.shape();
    let x = ops::read_all(src, cancel, progress)?;
    Ok(Array2::from_shape_vec((src.len(), c * h * w), x).expect("one row per image"))
}
