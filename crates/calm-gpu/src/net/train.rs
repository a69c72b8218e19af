//! Greedy layer-wise EM: layer 1 fitted as a single layer is, then its link computes layer 2's
//! input, layer 2 is fitted on it, and so on. Kill and resume: after each layer the network so
//! far is kept, and the layer under way has its own [`crate::Checkpoint`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{NetSpec, Network, NormFit};
use crate::cancel::CancelToken;
use crate::data::ImageSource;
use crate::dist::{Comm, Sharding, Solo};
use crate::em::Event;
use crate::error::{CalmError, Result};
use crate::fit::{CalmParams, Checkpoint, DataInfo, Trainer};
use crate::geometry::Geometry;
use crate::model::EpochRecord;

/// A network's parameters: the spec, and the choices every layer shares (epochs, batch, seed,
/// initialisation, revival, prior, device, and layer 1's whitening and the top layer's feature
/// recipe).
#[derive(Clone, Debug, PartialEq)]
pub struct NetParams {
    /// The layers and links.
    pub spec: NetSpec,
    /// What every layer is fitted with (its `layer` is replaced by the spec's).
    pub base: CalmParams,
}

/// What a [`NetTrainer`] reports.
pub enum NetEvent<'a> {
    /// Layer `layer` (from 1) of `layers` begins, on its input of `geometry`.
    LayerStart {
        /// The layer, from 1.
        layer: usize,
        /// The network's layers.
        layers: usize,
        /// The layer on its input.
        geometry: Geometry,
    },
    /// Images done of layer `layer`'s input (computed from the layers below) or of the
    /// standardisation after it.
    Input {
        /// The layer whose input or standardisation is being computed, from 1.
        layer: usize,
        /// Images done.
        images: usize,
        /// Images in all.
        of: usize,
    },
    /// The layer's own trainer reports.
    Fit(&'a Event<'a>),
    /// Layer `layer` is fitted.
    LayerEnd {
        /// The layer, from 1.
        layer: usize,
    },
}

/// How a network fit ended.
#[derive(Clone, Debug, PartialEq)]
pub struct NetOutcome {
    /// A cancellation stopped it (a checkpoint resumes it).
    pub interrupted: bool,
}

impl NetParams {
    /// `spec` with `base`'s choices.
    pub fn new(spec: NetSpec, base: CalmParams) -> Self {
        Self { spec, base }
    }

    /// The parameters of layer `l` (from 0): `base` with the spec's layer. Layer 1 keeps the
    /// base's whitening (unless its part says `white W`); deeper layers whiten only where their
    /// part says so. Every layer keeps the base's feature recipe (how its features are read).
    pub fn layer_params(&self, l: usize) -> CalmParams {
        let s = &self.spec.layers[l];
        let mut p = self.base.clone();
        p.layer = s.layer;
        if l > 0 {
            p.whiten = s.whiten;
            p.init_theta = None;
        } else if s.whiten.is_some() {
            p.whiten = s.whiten;
        }
        if s.variance.is_some() {
            p.variance = s.variance;
        }
        p
    }

    /// Checks the spec against images of `(c, h, w)` and every layer's parameters; errors name
    /// the spec's part or the parameter.
    pub fn check_shape(&self, c: usize, h: usize, w: usize) -> Result<Vec<super::LayerShape>> {
        self.base.check()?;
        let shapes = self.spec.shapes(c, h, w)?;
        let g = shapes[0].geometry;
        self.layer_params(0).check_shape(g.c, g.h, g.w)?;
        Ok(shapes)
    }

    /// Fits the network on `source` (preprocessed) and returns it.
    pub fn fit(&self, source: Arc<dyn ImageSource>) -> Result<Network> {
        let mut t = NetTrainer::new(self, source)?;
        if t.run(&mut |_| {})?.interrupted {
            return Err(CalmError::Interrupted);
        }
        Ok(t.into_network())
    }
}

/// Fits a network layer by layer.
pub struct NetTrainer {
    params: NetParams,
    source: Arc<dyn ImageSource>,
    net: Network,
    /// The checkpoint of the layer under way, to resume.
    resume: Option<Checkpoint>,
    /// The trainer of the layer under way.
    current: Option<(usize, Trainer)>,
    /// The input of the next layer `(layer, images)`, computed after the layer below it.
    stage: Option<(usize, Arc<dyn ImageSource>)>,
    cancel: CancelToken,
    data: DataInfo,
    checkpoint_dir: Option<PathBuf>,
    checkpoint_extra: BTreeMap<String, String>,
    /// A data-parallel fit: the ranks, and the images of all of them (`source` is this rank's
    /// shard).
    dist: Option<(Arc<dyn Comm>, usize)>,
}

/// The file of a network checkpoint directory holding the layers fitted so far.
pub const NETWORK_FILE: &str = "network.safetensors";

/// The layer-1 entry of a network checkpoint listing the entries the checkpoint added (the
/// CLI's command line), dropped again on resume so that a resumed fit ends in the same file.
const CHECKPOINT_KEYS: &str = "checkpoint_keys";

impl NetTrainer {
    /// A fresh fit of `params` on `source`; the spec is checked against the images first.
    pub fn new(params: &NetParams, source: Arc<dyn ImageSource>) -> Result<Self> {
        let (c, h, w) = source.shape();
        params.check_shape(c, h, w)?;
        Ok(Self {
            params: params.clone(),
            source,
            net: Network {
                spec: params.spec.clone(),
                layers: Vec::new(),
                norms: Vec::new(),
            },
            resume: None,
            current: None,
            stage: None,
            cancel: CancelToken::new(),
            data: DataInfo::default(),
            checkpoint_dir: None,
            checkpoint_extra: BTreeMap::new(),
            dist: None,
        })
    }

    /// One rank's part of a data-parallel fit ([`crate::dist`], as [`Trainer::sharded`]):
    /// `shard` holds this rank's batches of the `n` training images, and every rank of `comm`
    /// calls this, then [`NetTrainer::run`], alike; `resume`, a checkpoint directory to
    /// continue (written with any number of ranks). Every rank computes its own images' links,
    /// each standardisation is fitted on the sums of all ranks, and every rank ends with the
    /// network a single process fits, bit for bit. Only rank 0 writes. A cancellation stops
    /// every rank within the next layer's first batch: a link's images, once begun, are
    /// finished (a rank cannot stop there alone).
    pub fn sharded(
        params: &NetParams,
        shard: Arc<dyn ImageSource>,
        n: usize,
        comm: Arc<dyn Comm>,
        resume: Option<&Path>,
    ) -> Result<Self> {
        let sharding = Sharding::new(n, params.base.batch, comm.rank(), comm.size())?;
        sharding.check_shard(shard.len())?;
        let mut t = match resume {
            Some(dir) => Self::resume(params, shard, dir)?,
            None => Self::new(params, shard)?,
        };
        t.dist = Some((comm, n));
        Ok(t)
    }

    /// True where this process writes (rank 0, or a fit of one process).
    fn root(&self) -> bool {
        self.dist.as_ref().is_none_or(|(c, _)| c.rank() == 0)
    }

    /// The token the links' computations stop on: this trainer's, except on the ranks of a
    /// data-parallel fit, where one rank cannot stop alone (see [`NetTrainer::sharded`]).
    fn link_cancel(&self) -> CancelToken {
        match self.dist {
            Some(_) => CancelToken::new(),
            None => self.cancel.clone(),
        }
    }

    /// Continues a fit kept in `dir` by [`NetTrainer::save_checkpoint`] (or after every epoch):
    /// the layers fitted there are kept, and the layer under way resumes from its checkpoint.
    pub fn resume(params: &NetParams, source: Arc<dyn ImageSource>, dir: &Path) -> Result<Self> {
        let mut t = Self::new(params, source)?;
        let file = dir.join(NETWORK_FILE);
        if file.exists() {
            let net = Network::load(&file)?;
            if net.spec != params.spec {
                return Err(CalmError::Invalid(format!(
                    "{}: the checkpoint's network `{}` is not this run's `{}`",
                    file.display(),
                    net.spec,
                    params.spec
                )));
            }
            t.net = net;
            // The checkpoint's own entries (see `save_network`) are not the fitted layer's.
            if let Some(first) = t.net.layers.first_mut()
                && let Some(keys) = first.extra.remove(CHECKPOINT_KEYS)
            {
                for k in keys.split(',') {
                    first.extra.remove(k);
                }
            }
        }
        let ck_file = dir.join(Checkpoint::FILE);
        if ck_file.exists() {
            let ck = Checkpoint::load(dir)?;
            // A checkpoint of a layer already fitted (the last one of a finished layer) is not
            // the layer under way.
            if ck.extra("net_layer") == Some(&(t.net.layers.len() + 1).to_string()) {
                t.resume = Some(ck);
            }
        }
        Ok(t)
    }

    /// Stops at the next batch once `token` (or a clone) is cancelled.
    pub fn with_cancel(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    /// Names the data in every layer's metadata.
    pub fn with_data_info(mut self, data: DataInfo) -> Self {
        self.data = data;
        self
    }

    /// Writes a checkpoint into `dir` after every epoch and every layer.
    pub fn checkpoint_every_epoch(mut self, dir: PathBuf) -> Self {
        self.checkpoint_dir = Some(dir);
        self
    }

    /// Entries every checkpoint keeps (the CLI's command line).
    pub fn checkpoint_extra(mut self, extra: BTreeMap<String, String>) -> Self {
        self.checkpoint_extra = extra;
        self
    }

    /// The epochs of the layer under way that its checkpoint holds (none for a fresh layer).
    pub fn resumed_records(&self) -> &[EpochRecord] {
        self.resume.as_ref().map_or(&[], |ck| &ck.records)
    }

    /// Layers fitted so far.
    pub fn layers_done(&self) -> usize {
        self.net.layers.len()
    }

    /// The network as fitted so far.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The fitted network, giving the trainer up.
    pub fn into_network(self) -> Network {
        self.net
    }

    /// Fits the layers left, reporting to `observer`.
    pub fn run(&mut self, observer: &mut dyn FnMut(&NetEvent)) -> Result<NetOutcome> {
        let layers = self.params.spec.layers.len();
        while self.net.layers.len() < layers {
            let l = self.net.layers.len();
            let n = self.source.len();
            // Layer l's input: computed after layer l - 1 was fitted, else from the images.
            let input = match self.stage.take() {
                Some((at, x)) if at == l => x,
                _ => {
                    let input = self.net.input_of(
                        l,
                        self.source.clone(),
                        &self.link_cancel(),
                        &mut |i, d| {
                            observer(&NetEvent::Input {
                                layer: i + 1,
                                images: d,
                                of: n,
                            })
                        },
                    );
                    match input {
                        Err(CalmError::Interrupted) => {
                            return Ok(NetOutcome { interrupted: true });
                        }
                        r => r?,
                    }
                }
            };
            let params = self.params.layer_params(l);
            let mut extra = self.checkpoint_extra.clone();
            extra.insert("net_layer".into(), (l + 1).to_string());
            let mut trainer = match (self.resume.take(), &self.dist) {
                (ck, Some((comm, n))) => {
                    Trainer::sharded(&params, input.clone(), *n, comm.clone(), ck)?
                }
                (Some(ck), None) => Trainer::resume(&params, input.clone(), ck)?,
                (None, None) => Trainer::new(&params, input.clone())?,
            }
            .with_cancel(self.cancel.clone())
            .with_data_info(self.layer_data(l))
            .checkpoint_extra(extra);
            if let Some(dir) = &self.checkpoint_dir {
                trainer = trainer.checkpoint_every_epoch(dir.clone());
            }
            observer(&NetEvent::LayerStart {
                layer: l + 1,
                layers,
                geometry: trainer.geometry(),
            });
            let outcome = trainer.run(&mut |ev: &Event| observer(&NetEvent::Fit(ev)));
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => {
                    self.current = Some((l, trainer));
                    return Err(e);
                }
            };
            if outcome.interrupted {
                self.current = Some((l, trainer));
                return Ok(NetOutcome { interrupted: true });
            }
            let model = trainer.model(outcome.stopped.clone())?;
            self.current = Some((l, trainer));
            // The next layer's input (or the head's maps), with the link's standardisation
            // fitted on it; kept for the next layer.
            self.net.layers.push(model);
            let link = self.params.spec.links.get(l);
            if l + 1 < layers || link.is_some_and(|k| k.norm) {
                let comm: &dyn Comm = match &self.dist {
                    Some((c, _)) => c.as_ref(),
                    None => &Solo,
                };
                let fit = NormFit {
                    sharding: self.sharding()?,
                    comm,
                };
                let stage =
                    self.net
                        .link_stage(l, input, Some(&fit), &self.link_cancel(), &mut |d| {
                            observer(&NetEvent::Input {
                                layer: l + 2,
                                images: d,
                                of: n,
                            })
                        });
                let (next, norm) = match stage {
                    Ok(s) => s,
                    // The layer is fitted again from its checkpoint on resume.
                    Err(e) => {
                        self.net.layers.pop();
                        return match e {
                            CalmError::Interrupted => Ok(NetOutcome { interrupted: true }),
                            e => Err(e),
                        };
                    }
                };
                self.net.norms.push(norm);
                if l + 1 < layers {
                    self.stage = Some((l + 1, next));
                }
            } else if link.is_some() {
                // A head without a standardisation: nothing to fit.
                self.net.norms.push(None);
            }
            self.current = None;
            if let Some(dir) = &self.checkpoint_dir
                && self.root()
            {
                self.save_network(dir)?;
            }
            observer(&NetEvent::LayerEnd { layer: l + 1 });
        }
        Ok(NetOutcome { interrupted: false })
    }

    /// The batches of the fit over its ranks (one rank: all of them here).
    fn sharding(&self) -> Result<Sharding> {
        let batch = self.params.base.batch;
        match &self.dist {
            Some((c, n)) => Sharding::new(*n, batch, c.rank(), c.size()),
            None => Sharding::new(self.source.len(), batch, 0, 1),
        }
    }

    fn layer_data(&self, l: usize) -> DataInfo {
        if l == 0 {
            return self.data.clone();
        }
        DataInfo {
            names: self
                .data
                .names
                .iter()
                .map(|n| format!("layer {l} of {n}"))
                .collect(),
            preprocess: "none".into(),
        }
    }

    fn save_network(&self, dir: &Path) -> Result<()> {
        let mut net = self.net.clone();
        if let Some(first) = net.layers.first_mut() {
            first.extra.extend(self.checkpoint_extra.clone());
            let keys: Vec<&str> = self.checkpoint_extra.keys().map(String::as_str).collect();
            first.extra.insert(CHECKPOINT_KEYS.into(), keys.join(","));
        }
        net.save(&dir.join(NETWORK_FILE), true)
    }

    /// Writes a checkpoint of the state now into `dir`: the layers fitted so far, and the layer
    /// under way (after a cancellation, say). On the ranks of a data-parallel fit but rank 0 it
    /// writes nothing.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<()> {
        if !self.root() {
            return Ok(());
        }
        if !self.net.layers.is_empty() {
            self.save_network(dir)?;
        }
        if let Some((_, t)) = &mut self.current {
            t.save_checkpoint(dir)?;
        }
        Ok(())
    }
}
