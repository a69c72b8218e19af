//! The network spec: CALM layers and the links between them, written as one short string.
//!
//! ```text
//! net    = part { "|" part }         layers and links alternate, a layer first;
//!                                    a link after the last layer is the feature head
//! layer  = K "x" w [ "p" p ] [ " white" W ] [ " var" F ]
//!                                    K kernels of w x w, zero padding p (default 0); white W:
//!                                    whiten this layer's input over W x W patches (layer 1
//!                                    takes the run's whitening instead); var F: the layer's
//!                                    variance sigma^2, its posterior's temperature (default:
//!                                    the run's, SPEC's 1)
//! link   = encoding [ pool ] [ "norm" ]   (space-separated, in this order)
//! encoding = "tri" [ "^" q ]         triangle max(0, mean_j d_j - d_k)^q, d_k = ||x_u - theta_k||
//!          | "post"                  the posterior gamma_k(u) = softmax_k L[k, u]
//!          | "logp"                  L itself, the unnormalised log posterior
//! pool   = ("max" | "pool" | "avg" | "lse") n [ "s" s ] [ "p" p ]
//!                                    an n x n window, stride s (default n), padding p (default
//!                                    0; padded cells are left out): the maximum, the mean or
//!                                    log sum exp over the window
//! norm   = "norm"                    each channel standardised by its mean and standard
//!                                    deviation over the training images' maps
//! ```
//!
//! For instance `128x5p2 | tri max4s2p1 norm | 512x3p1 | tri max4s2p1`: 128 kernels of 5 x 5 on
//! the images, their triangle map max-pooled 4 x 4 with stride 2 and standardised, 512 kernels
//! of 3 x 3 on that, and the features the flattened pooled triangle map of layer 2.

use std::fmt;
use std::str::FromStr;

use crate::error::ParamError;
use crate::geometry::{Geometry, LayerConfig};

/// One CALM layer of a network.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerSpec {
    /// Kernels `K`, width `w`, padding `p`.
    pub layer: LayerConfig,
    /// Patch-whitening width of this layer's input (`white W`); `None`: none, or for layer 1 the
    /// run's.
    pub whiten: Option<usize>,
    /// The layer's variance `sigma^2` (`var F`), the temperature of its posterior; `None`: the
    /// run's.
    pub variance: Option<f64>,
}

/// How a layer's map `L[k, u]` becomes one value per kernel and position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MapEncoding {
    /// `max(0, mean_j d_j(u) - d_k(u))^power`, `d_k(u) = ||x_u - theta_k||` (the prior is not
    /// used, as in the features' triangle encoding).
    Triangle {
        /// The exponent `q` (1: Coates' triangle).
        power: f32,
    },
    /// `gamma_k(u) = exp(L[k, u] - logsumexp_j L[j, u])` under the layer's prior.
    Posterior,
    /// `L[k, u]` under the layer's prior.
    LogP,
}

/// What a pooling window computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The maximum.
    Max,
    /// The mean of the window's cells inside the map.
    Avg,
    /// `log sum exp` of the window's cells.
    Lse,
}

/// A pooling window over the positions of a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    /// What the window computes.
    pub kind: PoolKind,
    /// The window is `window x window`.
    pub window: usize,
    /// Positions between windows.
    pub stride: usize,
    /// Cells of padding on every side (left out of the window).
    pub pad: usize,
}

impl PoolSpec {
    /// Windows along an axis of `n` positions; `None` when the window does not fit.
    pub fn out_len(&self, n: usize) -> Option<usize> {
        let span = n + 2 * self.pad;
        (self.window <= span && self.window > 0 && self.stride > 0)
            .then(|| (span - self.window) / self.stride + 1)
    }
}

/// What happens between two layers (or after the last one, for the features): an encoding of
/// the map, an optional pooling and an optional per-channel standardisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// The map's encoding.
    pub encoding: MapEncoding,
    /// The pooling over positions, if any.
    pub pool: Option<PoolSpec>,
    /// Standardise each channel (statistics fitted on the training images).
    pub norm: bool,
}

impl LinkSpec {
    /// The map shape `(K, H', W')` this link makes of a layer's positions `ho x wo`; `None` when
    /// its window does not fit.
    pub fn out_shape(&self, k: usize, ho: usize, wo: usize) -> Option<(usize, usize, usize)> {
        match &self.pool {
            None => Some((k, ho, wo)),
            Some(p) => Some((k, p.out_len(ho)?, p.out_len(wo)?)),
        }
    }
}

/// A network: `layers[i]` is followed by `links[i]`; `links` has one entry fewer than `layers`,
/// or as many when the last is the feature head.
#[derive(Clone, Debug, PartialEq)]
pub struct NetSpec {
    /// The CALM layers, input first.
    pub layers: Vec<LayerSpec>,
    /// The links after each layer.
    pub links: Vec<LinkSpec>,
}

/// One layer of a network placed on its input: its geometry and what its link makes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerShape {
    /// The layer on its input images.
    pub geometry: Geometry,
    /// The shape `(C, H, W)` its link gives (the next layer's input, or the head's map).
    pub out: Option<(usize, usize, usize)>,
}

impl NetSpec {
    /// A one-layer network of `layer`, no head.
    pub fn single(layer: LayerConfig) -> Self {
        Self {
            layers: vec![LayerSpec {
                layer,
                whiten: None,
                variance: None,
            }],
            links: Vec::new(),
        }
    }

    /// True when the last link is a feature head.
    pub fn has_head(&self) -> bool {
        self.links.len() == self.layers.len()
    }

    /// The head, if the spec has one.
    pub fn head(&self) -> Option<&LinkSpec> {
        self.has_head().then(|| self.links.last()).flatten()
    }

    /// Each layer placed on the output of the one below, from images of `(c, h, w)`; the error
    /// names the part of the spec that does not fit.
    pub fn shapes(&self, c: usize, h: usize, w: usize) -> Result<Vec<LayerShape>, ParamError> {
        let mut input = (c, h, w);
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let (c, h, w) = input;
            let g = Geometry::new(l.layer, c, h, w).map_err(|e| {
                part_error(
                    2 * i + 1,
                    &self.part_text(2 * i),
                    format!("on its {c}x{h}x{w} input: {e}"),
                )
            })?;
            if let Some(wd) = l.whiten
                && (wd > h || wd > w)
            {
                return Err(part_error(
                    2 * i + 1,
                    &self.part_text(2 * i),
                    format!("a {wd}x{wd} whitening patch does not fit its {h}x{w} input"),
                ));
            }
            let link = self.links.get(i);
            let shape = match link {
                None => None,
                Some(link) => Some(link.out_shape(g.k, g.ho, g.wo).ok_or_else(|| {
                    let p = link.pool.expect("only a pooling can fail to fit");
                    part_error(
                        2 * i + 2,
                        &self.part_text(2 * i + 1),
                        format!(
                            "a {0}x{0} window with padding {1} does not fit layer {2}'s {3}x{4} map",
                            p.window,
                            p.pad,
                            i + 1,
                            g.ho,
                            g.wo
                        ),
                    )
                })?),
            };
            out.push(LayerShape {
                geometry: g,
                out: shape,
            });
            if let Some(s) = shape {
                input = s;
            }
        }
        Ok(out)
    }

    /// The text of part `i` (from 0) as [`fmt::Display`] writes it.
    fn part_text(&self, i: usize) -> String {
        if i.is_multiple_of(2) {
            self.layers[i / 2].to_string()
        } else {
            self.links[i / 2].to_string()
        }
    }
}

fn part_error(part: usize, text: &str, reason: impl fmt::Display) -> ParamError {
    ParamError::new("net", format!("part {part} `{text}`: {reason}"))
}

impl fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.layer;
        write!(f, "{}x{}", l.kernels, l.width)?;
        if l.pad > 0 {
            write!(f, "p{}", l.pad)?;
        }
        if let Some(w) = self.whiten {
            write!(f, " white{w}")?;
        }
        if let Some(v) = self.variance {
            write!(f, " var{v}")?;
        }
        Ok(())
    }
}

impl fmt::Display for MapEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapEncoding::Triangle { power } if *power == 1.0 => f.write_str("tri"),
            MapEncoding::Triangle { power } => write!(f, "tri^{power}"),
            MapEncoding::Posterior => f.write_str("post"),
            MapEncoding::LogP => f.write_str("logp"),
        }
    }
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PoolKind::Max => "max",
            PoolKind::Avg => "avg",
            PoolKind::Lse => "lse",
        };
        write!(f, "{kind}{}", self.window)?;
        if self.stride != self.window {
            write!(f, "s{}", self.stride)?;
        }
        if self.pad > 0 {
            write!(f, "p{}", self.pad)?;
        }
        Ok(())
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.encoding)?;
        if let Some(p) = &self.pool {
            write!(f, " {p}")?;
        }
        if self.norm {
            f.write_str(" norm")?;
        }
        Ok(())
    }
}

impl fmt::Display for NetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.layers.iter().enumerate() {
            if i > 0 {
                f.write_str(" | ")?;
            }
            write!(f, "{l}")?;
            if let Some(link) = self.links.get(i) {
                write!(f, " | {link}")?;
            }
        }
        Ok(())
    }
}

/// `digits` then an optional `letter digits` suffix list: `128x5p2` -> (128, [("x", 5), ("p", 2)]).
fn number(s: &str) -> Option<(usize, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..end].parse().ok()?, &s[end..]))
}

fn parse_layer(words: &[&str]) -> Result<LayerSpec, String> {
    let bad = || {
        format!(
            "`{}` is not a layer (K x w, e.g. 128x5 or 512x3p1)",
            words[0]
        )
    };
    let (kernels, rest) = number(words[0]).ok_or_else(bad)?;
    let rest = rest.strip_prefix('x').ok_or_else(bad)?;
    let (width, rest) = number(rest).ok_or_else(bad)?;
    let pad = match rest {
        "" => 0,
        r => match r.strip_prefix('p').and_then(number) {
            Some((p, "")) => p,
            _ => return Err(bad()),
        },
    };
    if kernels == 0 || width == 0 {
        return Err("kernels and width must be at least 1".into());
    }
    let (mut whiten, mut variance) = (None, None);
    for w in &words[1..] {
        if let Some(v) = w.strip_prefix("var") {
            match v.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => variance = Some(v),
                _ => return Err(format!("`{w}`: a variance is a positive number, e.g. var4")),
            }
            continue;
        }
        match w.strip_prefix("white").and_then(number) {
            Some((n, "")) if n > 0 => whiten = Some(n),
            _ => {
                return Err(format!(
                    "unknown layer option `{w}` (a layer takes `white W`, W at least 1, and `var F`)"
                ));
            }
        }
    }
    Ok(LayerSpec {
        layer: LayerConfig {
            kernels,
            width,
            pad,
        },
        whiten,
        variance,
    })
}

fn parse_encoding(w: &str) -> Option<Result<MapEncoding, String>> {
    Some(Ok(match w {
        "tri" => MapEncoding::Triangle { power: 1.0 },
        "post" => MapEncoding::Posterior,
        "logp" => MapEncoding::LogP,
        _ => {
            let q = w.strip_prefix("tri^")?;
            return Some(match q.parse::<f32>() {
                Ok(power) if power.is_finite() && power > 0.0 && power <= 16.0 => {
                    Ok(MapEncoding::Triangle { power })
                }
                _ => Err(format!(
                    "`{w}`: the triangle's power must be a number above 0 and at most 16"
                )),
            });
        }
    }))
}

fn parse_pool(w: &str) -> Option<Result<PoolSpec, String>> {
    let (kind, rest) = [
        ("max", PoolKind::Max),
        ("pool", PoolKind::Max),
        ("avg", PoolKind::Avg),
        ("lse", PoolKind::Lse),
    ]
    .into_iter()
    .find_map(|(name, kind)| {
        w.strip_prefix(name)
            .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            .map(|r| (kind, r))
    })?;
    let bad = || format!("`{w}` is not a pooling (e.g. max4s2p1: window 4, stride 2, padding 1)");
    let Some((window, mut rest)) = number(rest) else {
        return Some(Err(bad()));
    };
    let (mut stride, mut pad) = (window, 0);
    if let Some(r) = rest.strip_prefix('s') {
        let Some((s, r)) = number(r) else {
            return Some(Err(bad()));
        };
        (stride, rest) = (s, r);
    }
    if let Some(r) = rest.strip_prefix('p') {
        let Some((p, r)) = number(r) else {
            return Some(Err(bad()));
        };
        (pad, rest) = (p, r);
    }
    if !rest.is_empty() {
        return Some(Err(bad()));
    }
    if window == 0 || stride == 0 {
        return Some(Err(format!(
            "`{w}`: the window and the stride must be at least 1"
        )));
    }
    if pad >= window {
        return Some(Err(format!(
            "`{w}`: the padding must be less than the window (a window of padding alone is empty)"
        )));
    }
    Some(Ok(PoolSpec {
        kind,
        window,
        stride,
        pad,
    }))
}

fn parse_link(words: &[&str]) -> Result<LinkSpec, String> {
    let encoding = match parse_encoding(words[0]) {
        Some(e) => e?,
        None => {
            return Err(format!(
                "a link starts with an encoding (tri, tri^q, post, logp), not `{}`",
                words[0]
            ));
        }
    };
    let (mut pool, mut norm) = (None, false);
    for w in &words[1..] {
        if norm {
            return Err(format!("`{w}` after `norm`: norm comes last"));
        }
        if *w == "norm" {
            norm = true;
        } else if let Some(p) = parse_pool(w) {
            if pool.is_some() {
                return Err(format!("`{w}`: a link has at most one pooling"));
            }
            pool = Some(p?);
        } else if parse_encoding(w).is_some() {
            return Err(format!("`{w}`: a link has one encoding, first"));
        } else {
            return Err(format!(
                "unknown operation `{w}` (a link is an encoding, then a pooling such as max4s2, then norm)"
            ));
        }
    }
    Ok(LinkSpec {
        encoding,
        pool,
        norm,
    })
}

impl FromStr for NetSpec {
    type Err = ParamError;
    /// Parses the grammar of the module's documentation; the error names the part (from 1).
    fn from_str(s: &str) -> Result<Self, ParamError> {
        let mut spec = NetSpec {
            layers: Vec::new(),
            links: Vec::new(),
        };
        for (i, part) in s.split('|').enumerate() {
            let text = part.trim();
            let words: Vec<&str> = text.split_whitespace().collect();
            if words.is_empty() {
                return Err(part_error(i + 1, text, "is empty"));
            }
            let starts_layer = words[0].starts_with(|c: char| c.is_ascii_digit());
            let want_layer = spec.layers.len() == spec.links.len();
            let r = match (starts_layer, want_layer) {
                (true, true) => parse_layer(&words).map(|l| spec.layers.push(l)),
                (false, false) => parse_link(&words).map(|l| spec.links.push(l)),
                (true, false) => Err(
                    "two layers in a row: an encoding (such as `tri`) must come between them"
                        .into(),
                ),
                (false, true) if i == 0 => Err(format!(
                    "a network starts with a layer (K x w, e.g. 128x5), not `{}`",
                    words[0]
                )),
                (false, true) => Err("two links in a row: a link follows a layer".into()),
            };
            r.map_err(|e| part_error(i + 1, text, e))?;
        }
        Ok(spec)
    }
}

impl serde::Serialize for NetSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NetSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes_back() {
        for s in [
            "128x8",
            "128x5p2 | tri max4s2p1 norm | 512x3p1 | tri max4s2p1",
            "64x3 white3 | post avg2 | 32x2 | logp lse3s1",
            "16x3 | tri^0.5 norm | 8x1",
            "64x5p2 white7 var0.25 | tri max4s2p1 norm | 256x3p1 var4 | tri avg4s3",
        ] {
            let spec: NetSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        let spec: NetSpec = "128x5p2 | tri pool4s2 | 512x3p1 | tri pool4s2"
            .parse()
            .unwrap();
        assert_eq!(spec.layers.len(), 2);
        assert!(spec.has_head());
        assert_eq!(spec.links[0].pool.unwrap().kind, PoolKind::Max);
        assert_eq!(spec.links[0].pool.unwrap().stride, 2);
    }

    /// Each bad spec is refused with the part it names.
    #[test]
    fn bad_specs_name_their_part() {
        for (s, part, says) in [
            ("", "part 1", "empty"),
            ("tri | 64x3", "part 1", "starts with a layer"),
            ("64x3 | 32x3", "part 2", "two layers in a row"),
            ("64x3 | tri | post", "part 3", "two links in a row"),
            ("64x3 | tri foo", "part 2", "unknown operation `foo`"),
            ("64x3 | max2 tri", "part 2", "starts with an encoding"),
            ("64x3 | tri norm max2", "part 2", "norm comes last"),
            ("64x3 | tri max2 avg2", "part 2", "at most one pooling"),
            ("64x3 | tri max0", "part 2", "at least 1"),
            ("64x3 | tri max2p2", "part 2", "less than the window"),
            ("64x3 | tri^-1", "part 2", "power"),
            ("0x3", "part 1", "at least 1"),
            ("64y3", "part 1", "not a layer"),
            ("64x3 hue", "part 1", "unknown layer option"),
            ("64x3 | tri | 8x3 var0", "part 3", "positive number"),
            ("64x3 var-1", "part 1", "positive number"),
            ("64x3 varx", "part 1", "positive number"),
            ("64x3 ||", "part 2", "empty"),
        ] {
            let e = s.parse::<NetSpec>().unwrap_err();
            let text = e.to_string();
            assert!(
                e.field == "net" && text.contains(part) && text.contains(says),
                "{s}: {text}"
            );
        }
    }

    #[test]
    fn shapes_follow_the_links_and_refuse_what_does_not_fit() {
        let spec: NetSpec = "8x5p2 | tri max4s2p1 norm | 16x3p1 | tri avg2"
            .parse()
            .unwrap();
        let s = spec.shapes(1, 28, 28).unwrap();
        assert_eq!((s[0].geometry.ho, s[0].geometry.wo), (28, 28));
        assert_eq!(s[0].out, Some((8, 14, 14)));
        assert_eq!(s[1].geometry.c, 8);
        assert_eq!(s[1].out, Some((16, 7, 7)));
        let e = "8x5 | tri max30 | 4x1".parse::<NetSpec>().unwrap();
        let text = e.shapes(1, 28, 28).unwrap_err().to_string();
        assert!(
            text.contains("part 2 `tri max30`") && text.contains("24x24"),
            "{text}"
        );
        let e = "8x5 | tri max4 | 4x7".parse::<NetSpec>().unwrap();
        let text = e.shapes(1, 28, 28).unwrap_err().to_string();
        assert!(
            text.contains("part 3 `4x7`") && text.contains("8x6x6"),
            "{text}"
        );
        let e = "8x5 | tri max4 | 4x3 white7".parse::<NetSpec>().unwrap();
        let text = e.shapes(1, 28, 28).unwrap_err().to_string();
        assert!(
            text.contains("part 3") && text.contains("whitening"),
            "{text}"
        );
    }
}
