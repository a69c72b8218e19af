//! `calm_gpu._native`: the compiled half of the Python package (`pip install ./python`).
//!
//! Thin over the library: [`fit`] runs a [`calm_gpu::Trainer`] with the GIL released, and
//! [`NativeLayer`] holds a fitted or loaded model and computes its features. The
//! scikit-learn estimator, the input conversions and the PyTorch module are Python
//! (`calm_gpu/`). Every library error becomes a `ValueError` (bad input, parameters, shapes,
//! model files) or a `RuntimeError` (device, I/O) with the library's one-line message; Ctrl-C
//! during a fit or a feature pass raises `KeyboardInterrupt` after the current batch; a panic
//! becomes a `RuntimeError` instead of crossing into Python.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use calm_gpu::data::{ImageSource, Preprocess, Preprocessed};
use calm_gpu::em::{Event, InitMethod};
use calm_gpu::features::Encoding;
use calm_gpu::model::FeatureRecipe;
use calm_gpu::prior::PriorOptions;
use calm_gpu::{
    CalmError, CalmParams, CancelToken, DataInfo, Device, Layer, Model, Pooling, Trainer,
};
use ndarray::{Array1, Array4};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray4, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

/// The Python exception of a library error: its one-line message as a `ValueError` for what
/// the caller passed (data, shapes, parameters, model files, an existing output) or a
/// `RuntimeError` for what happened around it (the GPU, its memory, I/O).
fn py_err(e: CalmError) -> PyErr {
    let msg = e.to_string();
    match e {
        CalmError::Interrupted => PyKeyboardInterrupt::new_err(msg),
        CalmError::Gpu(_)
        | CalmError::GpuMemory(_)
        | CalmError::Io { .. }
        | CalmError::SlowWarmup { .. } => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// Runs `f`, turning a panic into a `RuntimeError` (a bug of calm-gpu's, never the caller's).
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown".into());
        Err(PyRuntimeError::new_err(format!(
            "internal error in calm-gpu (please report it): {what}"
        )))
    })
}

fn device(name: &str) -> PyResult<Device> {
    name.parse::<Device>()
        .map_err(|e| PyValueError::new_err(format!("backend: {e}")))
}

fn encoding(name: &str) -> PyResult<Encoding> {
    match name {
        "lse" => Ok(Encoding::Lse),
        "triangle" => Ok(Encoding::Triangle),
        other => Err(PyValueError::new_err(format!(
            "encode must be 'lse' or 'triangle', not {other:?}"
        ))),
    }
}

fn preprocess(name: &str) -> PyResult<Preprocess> {
    name.parse::<Preprocess>()
        .map_err(|e| PyValueError::new_err(format!("preprocess: {e}")))
}

/// A C-contiguous numpy array `(N, C, H, W)` of uint8 or float32 read in place: no copy of the
/// input, each batch converted to f32 as the engine reads it. The array is kept alive by the
/// reference held here; like numpy's own GIL-free loops, a fit does not guard it against
/// another thread writing to it meanwhile.
struct NumpySource<T> {
    _array: Py<PyArray4<T>>,
    /// The first element, as an address (the array does not move while referenced).
    data: usize,
    shape: [usize; 4],
}

impl<T: numpy::Element + Copy + Into<f32>> NumpySource<T> {
    fn new(array: &Bound<'_, PyArray4<T>>) -> PyResult<Self> {
        if !array.is_c_contiguous() {
            return Err(PyValueError::new_err("images must be C-contiguous"));
        }
        let dims = array.dims();
        let shape = [dims[0], dims[1], dims[2], dims[3]];
        if shape[0] == 0 {
            return Err(PyValueError::new_err("images: holds no images"));
        }
        Ok(Self {
            _array: array.clone().unbind(),
            data: array.data() as usize,
            shape,
        })
    }

    fn values(&self) -> &[T] {
        let len = self.shape.iter().product();
        // SAFETY: `data` is the first of `len` contiguous elements of the array `_array`
        // keeps alive; it is only read.
        unsafe { std::slice::from_raw_parts(self.data as *const T, len) }
    }
}

impl<T: numpy::Element + Copy + Into<f32>> ImageSource for NumpySource<T> {
    fn len(&self) -> usize {
        self.shape[0]
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.shape[1], self.shape[2], self.shape[3])
    }
    fn read_into(
        &self,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) -> Result<(), calm_gpu::data::DataError> {
        let per = self.shape[1] * self.shape[2] * self.shape[3];
        let src = &self.values()[start * per..(start + count) * per];
        for (o, &v) in out.iter_mut().zip(src) {
            *o = v.into();
        }
        Ok(())
    }
}

/// `images` (uint8 or float32, C-contiguous) as a source the library reads in place, with
/// `kind` applied to each batch as it is read. Float images are checked finite first.
fn source(images: &Bound<'_, PyAny>, kind: Preprocess) -> PyResult<Arc<dyn ImageSource>> {
    let raw: Arc<dyn ImageSource> = if let Ok(a) = images.cast::<PyArray4<f32>>() {
        let s = NumpySource::new(a)?;
        let per = s.shape[1] * s.shape[2] * s.shape[3];
        if let Some(i) = s.values().iter().position(|v| !v.is_finite()) {
            return Err(PyValueError::new_err(format!(
                "images: image {} holds a non-finite value (NaN or infinity); clean the data first",
                i / per
            )));
        }
        Arc::new(s)
    } else if let Ok(a) = images.cast::<PyArray4<u8>>() {
        Arc::new(NumpySource::new(a)?)
    } else {
        return Err(PyValueError::new_err(
            "images must be a 4-D numpy array of uint8 or float32",
        ));
    };
    Ok(match kind {
        Preprocess::None => raw,
        kind => Arc::new(Preprocessed::new(raw, kind)),
    })
}

fn init_method(name: &str) -> PyResult<InitMethod> {
    match name {
        "normal" => Ok(InitMethod::Normal),
        "patches" => Ok(InitMethod::Patches),
        "kmeans" => Ok(InitMethod::KMeans),
        other => Err(PyValueError::new_err(format!(
            "init_method must be 'normal', 'patches' or 'kmeans', not {other:?}"
        ))),
    }
}

/// What the Python side passes to [`fit`]: `None` keeps the preset's value (SPEC's, or
/// `preset="recommended"`'s).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct FitOptions {
    preset: Option<String>,
    kernels: Option<usize>,
    width: Option<usize>,
    pad: Option<usize>,
    epochs: Option<usize>,
    batch: Option<usize>,
    seed: Option<u64>,
    backend: Option<String>,
    init_method: Option<String>,
    revive: Option<bool>,
    whiten: Option<usize>,
    tol: Option<f64>,
    learn_variance: Option<bool>,
    learn_weights: Option<bool>,
    variance: Option<f64>,
    posterior: Option<String>,
    patch_norm: Option<f64>,
    pool: Option<usize>,
    encode: Option<String>,
}

/// The library's parameters for `o`: the preset's, then every option given.
fn params(o: &FitOptions) -> PyResult<CalmParams> {
    let mut p = match o.preset.as_deref() {
        None | Some("spec") => CalmParams::new(64),
        Some("recommended") => CalmParams::recommended(),
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "preset must be None, 'spec' or 'recommended', not {other:?}"
            )));
        }
    };
    if let Some(v) = o.kernels {
        p.layer.kernels = v;
    }
    if let Some(v) = o.width {
        p.layer.width = v;
    }
    if let Some(v) = o.pad {
        p.layer.pad = v;
    }
    if let Some(v) = o.epochs {
        p.epochs = v;
    }
    if let Some(v) = o.batch {
        p.batch = v;
    }
    if let Some(v) = o.seed {
        p.seed = v;
    }
    if let Some(v) = &o.backend {
        p.device = device(v)?;
    }
    if let Some(v) = &o.init_method {
        p.init_method = init_method(v)?;
    }
    if let Some(v) = o.revive {
        p.revive = v;
    }
    if let Some(v) = o.whiten {
        // 0 turns the preset's whitening off.
        p.whiten = (v > 0).then_some(v);
    }
    p.tol = o.tol.or(p.tol);
    p.variance = o.variance.or(p.variance);
    if let Some(v) = &o.posterior {
        p.posterior = calm_gpu::Posterior::parse(v).map_err(|e| {
            PyValueError::new_err(format!("posterior must be 'image' or 'patch': {e}"))
        })?;
    }
    if let Some(v) = o.patch_norm {
        // 0 turns the preset's normalisation off.
        p.patch_norm = (v != 0.0).then_some(v);
    }
    p.prior = PriorOptions {
        variance: o.learn_variance.unwrap_or(p.prior.variance),
        weights: o.learn_weights.unwrap_or(p.prior.weights),
    };
    if o.pool.is_some() || o.encode.is_some() {
        let base = p.recipe.unwrap_or(FeatureRecipe {
            grid: 1,
            encoding: Encoding::Lse,
            standardize: false,
        });
        p.recipe = Some(FeatureRecipe {
            grid: o.pool.unwrap_or(base.grid),
            encoding: match &o.encode {
                Some(e) => encoding(e)?,
                None => base.encoding,
            },
            standardize: base.standardize,
        });
    }
    p.check()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(p)
}

/// Reports to Python from inside a detached computation: runs the pending signal handlers
/// (Ctrl-C raises there) and the progress callback with `info`; the first exception cancels
/// the work and is kept to be raised once it has stopped.
struct Reporter {
    callback: Option<Py<PyAny>>,
    cancel: CancelToken,
    error: Option<PyErr>,
}

impl Reporter {
    fn report(&mut self, info: Option<&[(&str, f64)]>, kind: &str) {
        if self.error.is_some() {
            return;
        }
        let result = Python::attach(|py| -> PyResult<()> {
            py.check_signals()?;
            if let (Some(cb), Some(info)) = (&self.callback, info) {
                let d = PyDict::new(py);
                d.set_item("event", kind)?;
                for (k, v) in info {
                    d.set_item(*k, *v)?;
                }
                cb.call1(py, (d,))?;
            }
            Ok(())
        });
        if let Err(e) = result {
            self.error = Some(e);
            self.cancel.cancel();
        }
    }

    fn event(&mut self, ev: &Event) {
        match ev {
            Event::EpochStart { epoch, epochs } => self.report(
                Some(&[("epoch", *epoch as f64), ("epochs", *epochs as f64)]),
                "epoch_start",
            ),
            Event::Progress { images } => {
                self.report(Some(&[("images", *images as f64)]), "progress")
            }
            Event::EpochEnd(r) => self.report(
                Some(&[
                    ("epoch", r.epoch as f64),
                    ("loglik_per_image", r.loglik_per_image),
                    ("seconds", r.seconds),
                    ("gflops", r.gflops),
                ]),
                "epoch_end",
            ),
            Event::Revived {
                epoch,
                kernels,
                settling,
            } => self.report(
                Some(&[
                    ("epoch", *epoch as f64),
                    ("kernels", *kernels as f64),
                    ("settling", *settling as u8 as f64),
                ]),
                "revived",
            ),
            Event::PrecisionLimit { epoch } => {
                self.report(Some(&[("epoch", *epoch as f64)]), "precision_limit")
            }
        }
    }
}

/// A fitted or loaded CALM layer.
#[pyclass(module = "calm_gpu._native", name = "Layer", frozen)]
struct NativeLayer {
    layer: Layer,
    /// The adapter or engine that fitted it, for `backend_`.
    engine: String,
}

/// Fits a layer on `images` `(N, C, H, W)` (uint8 or float32, read in place), which the
/// library preprocesses by
/// `preprocess` (`scale`: x / 255, `zca-image`, `none`) and records in the model. Returns the
/// layer; `callback(dict)`, if given, hears every epoch start and end and every batch.
#[pyfunction]
#[pyo3(signature = (images, options, preprocess, callback=None))]
fn fit(
    py: Python<'_>,
    images: &Bound<'_, PyAny>,
    options: FitOptions,
    preprocess: &str,
    callback: Option<Py<PyAny>>,
) -> PyResult<NativeLayer> {
    guarded(|| {
        let p = params(&options)?;
        let kind = self::preprocess(preprocess)?;
        let data = source(images, kind)?;
        let cancel = CancelToken::new();
        let mut reporter = Reporter {
            callback,
            cancel: cancel.clone(),
            error: None,
        };
        let info = DataInfo {
            names: vec!["numpy".into()],
            preprocess: kind.to_string(),
        };
        let result = py.detach(|| -> Result<(Layer, String), CalmError> {
            let mut t = Trainer::new(&p, data)?
                .with_cancel(cancel)
                .with_data_info(info);
            let engine = t.describe();
            let outcome = t.run(&mut |ev: &Event| reporter.event(ev))?;
            if outcome.interrupted {
                return Err(CalmError::Interrupted);
            }
            Ok((t.layer(outcome.stopped)?, engine))
        });
        if let Some(e) = reporter.error.take() {
            return Err(e);
        }
        let (layer, engine) = result.map_err(py_err)?;
        Ok(NativeLayer { layer, engine })
    })
}

#[pymethods]
impl NativeLayer {
    /// The weights `(K, C, w, w)`.
    #[getter]
    fn theta<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray4<f32>> {
        self.layer.theta().into_pyarray(py)
    }

    /// `B'` of the last update, `(K,)`.
    #[getter]
    fn counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.layer.counts().into_pyarray(py)
    }

    /// `LL / N` of every epoch, in order.
    #[getter]
    fn loglik<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        let m = self.layer.model();
        let n = m.meta.images.max(1) as f64;
        Array1::from_iter(m.meta.history.iter().map(|h| h.loglik / n)).into_pyarray(py)
    }

    /// The adapter or engine that fitted the layer ("" for a loaded one).
    #[getter]
    fn engine(&self) -> &str {
        &self.engine
    }

    /// The model's description: its layer, training image shape, whitening, recipe, prior.
    fn meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.layer.model();
        let d = PyDict::new(py);
        d.set_item("kernels", m.meta.layer.kernels)?;
        d.set_item("width", m.meta.layer.width)?;
        d.set_item("pad", m.meta.layer.pad)?;
        d.set_item(
            "image_shape",
            (m.meta.channels, m.meta.height, m.meta.width),
        )?;
        d.set_item("images", m.meta.images)?;
        d.set_item("seed", m.meta.seed)?;
        d.set_item("preprocess", &m.meta.preprocess)?;
        d.set_item("whiten", m.whiten.as_ref().map(|w| w.width))?;
        d.set_item("patch_norm", m.patch_norm())?;
        if let Some(r) = m.meta.features {
            d.set_item("pool", r.grid)?;
            d.set_item("encode", r.encoding.to_string())?;
            d.set_item("standardize", r.standardize)?;
        }
        d.set_item("stopped", m.meta.stopped.as_deref())?;
        let prior = m.prior_or_uniform();
        d.set_item("variance", prior.variance())?;
        d.set_item("calm_gpu_version", &m.meta.calm_gpu_version)?;
        Ok(d)
    }

    /// What `L` is computed with: the effective weights `(K, C, w, w)` and bias `(K,)` of the
    /// model's prior (`theta` and `-0.5 ||theta_k||^2` for SPEC's), and the whitening filter
    /// `(C, C, W, W)` or None.
    #[allow(clippy::type_complexity)]
    fn conv_parts<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(
        Bound<'py, PyArray4<f32>>,
        Bound<'py, PyArray1<f32>>,
        Option<Bound<'py, PyArray4<f32>>>,
    )> {
        let m = self.layer.model();
        let g = m.geometry().map_err(py_err)?;
        let (w, b) = m.prior_or_uniform().effective(&g, &m.theta);
        let shape = self.layer.theta().raw_dim();
        let w =
            Array4::from_shape_vec(shape, w).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let whiten = match &m.whiten {
            Some(f) => Some(
                Array4::from_shape_vec(
                    (f.channels, f.channels, f.width, f.width),
                    f.filter.clone(),
                )
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?
                .into_pyarray(py),
            ),
            None => None,
        };
        Ok((w.into_pyarray(py), Array1::from(b).into_pyarray(py), whiten))
    }

    /// Features of `images` `(N, C, H, W)` (uint8 or float32, read in place, in batches) after
    /// `preprocess` (as [`fit`]'s): by the
    /// model's recipe, or on a `pool x pool` grid with encoding `encode` when given.
    #[pyo3(signature = (images, backend, preprocess, pool=None, encode=None, callback=None))]
    #[allow(clippy::too_many_arguments)]
    fn features<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        backend: &str,
        preprocess: &str,
        pool: Option<usize>,
        encode: Option<&str>,
        callback: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guarded(|| {
            let recipe = self
                .layer
                .model()
                .meta
                .features
                .map(|r| r.pooling())
                .unwrap_or(Pooling {
                    grid: 1,
                    encoding: Encoding::Lse,
                });
            let pooling = Pooling {
                grid: pool.unwrap_or(recipe.grid),
                encoding: match encode {
                    Some(e) => encoding(e)?,
                    None => recipe.encoding,
                },
            };
            if pooling.grid == 0 {
                return Err(PyValueError::new_err("pool must be at least 1"));
            }
            let dev = device(backend)?;
            let data = source(images, self::preprocess(preprocess)?)?;
            let total = data.len() as f64;
            let cancel = CancelToken::new();
            let mut reporter = Reporter {
                callback,
                cancel: cancel.clone(),
                error: None,
            };
            let model = self.layer.model();
            let result = py.detach(|| {
                model.features(
                    dev,
                    &Default::default(),
                    data,
                    pooling,
                    &cancel,
                    &mut |done| {
                        reporter.report(
                            Some(&[("images", done as f64), ("total", total)]),
                            "progress",
                        )
                    },
                )
            });
            if let Some(e) = reporter.error.take() {
                return Err(e);
            }
            Ok(result.map_err(py_err)?.into_pyarray(py))
        })
    }

    /// The model file's bytes (safetensors, as `calm-gpu train` writes).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.layer.model().to_bytes().map_err(py_err)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// A model from its file's bytes; `name` says where they came from in errors.
    #[staticmethod]
    fn from_bytes(data: &[u8], name: &str) -> PyResult<Self> {
        guarded(|| {
            let model = Model::from_bytes(name.as_ref(), data).map_err(py_err)?;
            Ok(Self {
                layer: Layer::from_model(model, Device::Auto),
                engine: String::new(),
            })
        })
    }

    /// A model file written by `calm-gpu train` (or by [`NativeLayer::save`]).
    #[staticmethod]
    fn load(path: std::path::PathBuf) -> PyResult<Self> {
        guarded(|| {
            let model = Model::load(&path).map_err(py_err)?;
            Ok(Self {
                layer: Layer::from_model(model, Device::Auto),
                engine: String::new(),
            })
        })
    }

    /// Writes the model file (replacing `path` only when `force`; written atomically).
    fn save(&self, path: std::path::PathBuf, force: bool) -> PyResult<()> {
        guarded(|| self.layer.model().save(&path, force).map_err(py_err))
    }
}

/// The names `backend` takes.
#[pyfunction]
fn backends() -> Vec<String> {
    Device::ALL.iter().map(|d| d.name().to_string()).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fit, m)?)?;
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    m.add_class::<NativeLayer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
