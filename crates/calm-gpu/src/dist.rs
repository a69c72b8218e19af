//! Data-parallel EM: one model fitted by many processes (MPI ranks), each holding a shard of the
//! images.
//!
//! Batch EM parallelises exactly: `theta` is fixed for the epoch, each batch adds its statistics
//! `T`, `B`, `LL`, and the update happens once per epoch. The batches are fixed by the global
//! image index, never by the number of processes `R`: batch `b` holds images
//! `[b * batch, (b + 1) * batch)` and belongs to rank `b % R` ([`Sharding`]). In round `j` every rank computes the
//! statistics of its `j`-th batch (global batch `j * R + rank`) in f64, the ranks exchange them
//! ([`Comm::all_gather`]), and every rank adds them in global batch order. On an engine whose
//! per-batch statistics are exact ([`Engine::exact_batches`], the CPU engine) that is the very sum
//! the single-process engine makes, so the model is the same bytes for every `R`. The GPU engine
//! sums its shard's batches on the device, so there the ranks exchange one sum each, added in
//! rank order: the same model within the GPU's tolerances, not the same bits.
//!
//! The training procedures that read images anywhere in the data (the whitening filter, the
//! data-patch initialisation, revival, the sum of squares of a learned prior) run on every rank
//! alike through [`Gathered`], a view of the whole data whose reads are collective: the rank that
//! holds an image broadcasts it. Every rank holds the same `theta` and seeds, so they make the
//! same reads in the same order, and end with the same result.
//!
//! The communicator is a trait: the CLI's `mpi` feature implements it over MPI, [`Solo`] is one
//! process, and [`ThreadComm`] runs ranks as threads of one process (the tests).

use std::sync::{Arc, Barrier, Mutex};

use crate::cancel::CancelToken;
use crate::data::{DataError, ImageSource, check_request};
use crate::engine::{Engine, EpochStats, Stats};
use crate::error::{CalmError, Result};
use crate::geometry::Geometry;
use crate::prior::Prior;

/// The collective operations data-parallel EM needs. Every rank must make the same calls in the
/// same order (as with MPI's collectives).
pub trait Comm: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks `R`.
    fn size(&self) -> usize;
    /// Every rank's `send` (of one length on every rank) concatenated in rank order into `recv`
    /// (`size * send.len()`).
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()>;
    /// `buf` of rank `root` copied into every rank's `buf` (of one length on every rank).
    fn broadcast(&self, root: usize, buf: &mut [f32]) -> Result<()>;
}

/// One process: rank 0 of 1.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Comm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast(&self, _: usize, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// Ranks as threads of one process, for tests and for trying the data-parallel path without MPI:
/// [`ThreadComm::group`] makes one per rank, each to be moved to its own thread.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    barrier: Barrier,
    f64s: Mutex<Vec<Vec<f64>>>,
    f32s: Mutex<Vec<f32>>,
}

impl ThreadComm {
    /// The communicators of `size` ranks, in rank order.
    pub fn group(size: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            f64s: Mutex::new(vec![Vec::new(); size]),
            f32s: Mutex::new(Vec::new()),
        });
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let s = &self.shared;
        lock(&s.f64s)[self.rank] = send.to_vec();
        s.barrier.wait();
        for (part, from) in recv.chunks_exact_mut(send.len()).zip(lock(&s.f64s).iter()) {
            part.copy_from_slice(from);
        }
        s.barrier.wait();
        Ok(())
    }
    fn broadcast(&self, root: usize, buf: &mut [f32]) -> Result<()> {
        let s = &self.shared;
        if self.rank == root {
            *lock(&s.f32s) = buf.to_vec();
        }
        s.barrier.wait();
        if self.rank != root {
            buf.copy_from_slice(&lock(&s.f32s));
        }
        s.barrier.wait();
        Ok(())
    }
}

/// Which images a rank holds: batch `b` (images `[b * batch, min((b + 1) * batch, n))`) belongs
/// to rank `b % size`. A rank's shard is its batches in order, so its local image `i` is image
/// `i % batch` of its batch `i / batch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharding {
    /// Images in the whole data.
    pub n: usize,
    /// Images per batch.
    pub batch: usize,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub size: usize,
}

impl Sharding {
    /// The sharding of `n` images in batches of `batch` over `size` ranks, seen from `rank`;
    /// an error when a rank would hold no batch.
    pub fn new(n: usize, batch: usize, rank: usize, size: usize) -> Result<Self> {
        if batch == 0 || size == 0 || rank >= size {
            return Err(CalmError::Invalid(format!(
                "rank {rank} of {size} with batches of {batch}: not a sharding"
            )));
        }
        let s = Self {
            n,
            batch,
            rank,
            size,
        };
        if s.batches() < size {
            return Err(CalmError::Invalid(format!(
                "{n} images in batches of {batch} make {} batches, fewer than the {size} processes; run at most {} (or give --batch a smaller value)",
                s.batches(),
                s.batches()
            )));
        }
        Ok(s)
    }

    /// Batches in the whole data.
    pub fn batches(&self) -> usize {
        self.n.div_ceil(self.batch)
    }

    /// Rounds of an epoch: in round `j` rank `q` computes global batch `j * size + q`.
    pub fn rounds(&self) -> usize {
        self.batches().div_ceil(self.size)
    }

    /// Images of global batch `b`.
    pub fn batch_len(&self, b: usize) -> usize {
        self.batch.min(self.n - b * self.batch)
    }

    /// This rank's batches (global indices), in order.
    pub fn local_batches(&self) -> impl Iterator<Item = usize> + '_ {
        (self.rank..self.batches()).step_by(self.size)
    }

    /// Images this rank holds.
    pub fn local_len(&self) -> usize {
        self.local_batches().map(|b| self.batch_len(b)).sum()
    }

    /// An error unless a shard of `len` images is this rank's.
    pub fn check_shard(&self, len: usize) -> Result<()> {
        if len != self.local_len() {
            return Err(CalmError::Invalid(format!(
                "rank {} of {} holds {len} images, but its shard of {} in batches of {} has {}",
                self.rank,
                self.size,
                self.n,
                self.batch,
                self.local_len()
            )));
        }
        Ok(())
    }

    /// The rank holding global image `i`, and its index in that rank's shard.
    pub fn locate(&self, i: usize) -> (usize, usize) {
        let b = i / self.batch;
        (b % self.size, (b / self.size) * self.batch + i % self.batch)
    }

    /// The global index of this rank's local image `i`.
    pub fn global(&self, i: usize) -> usize {
        let j = i / self.batch;
        (j * self.size + self.rank) * self.batch + i % self.batch
    }

    /// This rank's `j`-th batch as `(first local image, images)`, if it has one.
    pub fn local_batch(&self, j: usize) -> Option<(usize, usize)> {
        let b = j * self.size + self.rank;
        (b < self.batches()).then(|| (j * self.batch, self.batch_len(b)))
    }
}

/// A rank's shard of a source that reads by offset (a file streamed from disk, or any source):
/// local image `i` is image [`Sharding::global`]`(i)` of `inner`, read when asked.
pub struct ShardView {
    inner: Arc<dyn ImageSource>,
    sharding: Sharding,
}

impl ShardView {
    /// The shard `sharding` gives this rank of `inner` (which holds all `sharding.n` images).
    pub fn new(inner: Arc<dyn ImageSource>, sharding: Sharding) -> Result<Self> {
        if inner.len() != sharding.n {
            return Err(CalmError::Invalid(format!(
                "a sharding of {} images over a source of {}",
                sharding.n,
                inner.len()
            )));
        }
        Ok(Self { inner, sharding })
    }
}

/// Calls `f(local index, images, offset in the request)` for each run of a request that stays in
/// one batch.
fn runs(
    batch: usize,
    start: usize,
    count: usize,
    mut f: impl FnMut(usize, usize, usize) -> std::result::Result<(), DataError>,
) -> std::result::Result<(), DataError> {
    let mut done = 0;
    while done < count {
        let i = start + done;
        let run = (batch - i % batch).min(count - done);
        f(i, run, done)?;
        done += run;
    }
    Ok(())
}

impl ImageSource for ShardView {
    fn len(&self) -> usize {
        self.sharding.local_len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn read_into(
        &self,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) -> std::result::Result<(), DataError> {
        let (c, h, w) = self.shape();
        let per = c * h * w;
        check_request(self.len(), per, start, count, out.len())?;
        runs(self.sharding.batch, start, count, |i, run, at| {
            let dst = &mut out[at * per..(at + run) * per];
            self.inner.read_into(self.sharding.global(i), run, dst)
        })
    }
}

/// The whole data seen from every rank: `read_into` is collective (every rank must call it with
/// the same range), and the rank holding each image broadcasts it.
pub struct Gathered {
    local: Arc<dyn ImageSource>,
    sharding: Sharding,
    comm: Arc<dyn Comm>,
}

impl Gathered {
    /// The whole data over this rank's shard `local` (of `sharding.local_len()` images).
    pub fn new(local: Arc<dyn ImageSource>, sharding: Sharding, comm: Arc<dyn Comm>) -> Self {
        Self {
            local,
            sharding,
            comm,
        }
    }
}

impl ImageSource for Gathered {
    fn len(&self) -> usize {
        self.sharding.n
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.local.shape()
    }
    fn read_into(
        &self,
        start: usize,
        count: usize,
        out: &mut [f32],
    ) -> std::result::Result<(), DataError> {
        let (c, h, w) = self.shape();
        let per = c * h * w;
        check_request(self.len(), per, start, count, out.len())?;
        let fail = |e: CalmError| DataError::Invalid(e.to_string());
        runs(self.sharding.batch, start, count, |i, run, at| {
            let (owner, local) = self.sharding.locate(i);
            let dst = &mut out[at * per..(at + run) * per];
            // The owner's read first, then whether it worked, then the pixels: a rank that cannot
            // read its image fails every rank with its reason instead of leaving them waiting.
            let mut status = [1f32];
            let mut err = None;
            if owner == self.comm.rank()
                && let Err(e) = self.local.read_into(local, run, dst)
            {
                status[0] = 0.0;
                err = Some(e);
            }
            self.comm.broadcast(owner, &mut status).map_err(fail)?;
            if let Some(e) = err {
                return Err(e);
            }
            if status[0] != 1.0 {
                return Err(DataError::Invalid(format!(
                    "rank {owner} could not read images {}..{}",
                    i,
                    i + run
                )));
            }
            self.comm.broadcast(owner, dst).map_err(fail)
        })
    }
}

/// An engine over one rank's shard whose epochs run over every rank's ([`Sharding`]): the
/// statistics exchanged per round and summed in global batch order, the update applied alike on
/// every rank. Its `len` is the whole data's. A cancellation on any rank stops every rank after
/// the same round.
pub struct DistEngine {
    inner: Box<dyn Engine>,
    comm: Arc<dyn Comm>,
    sharding: Sharding,
    cancel: CancelToken,
    traffic: Arc<Mutex<Traffic>>,
}

/// What a data-parallel run's exchanges cost so far, on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Rounds exchanged (each an all-gather).
    pub rounds: usize,
    /// Bytes this rank received, its own part included.
    pub bytes: u64,
    /// Seconds spent in the all-gathers: the transfer, and the wait for the slowest rank.
    pub seconds: f64,
}

impl DistEngine {
    /// `inner` runs over this rank's shard of `sharding` (in batches of `sharding.batch`).
    pub fn new(inner: Box<dyn Engine>, comm: Arc<dyn Comm>, sharding: Sharding) -> Result<Self> {
        if inner.len() != sharding.local_len() {
            return Err(CalmError::Invalid(format!(
                "rank {} holds {} images but its shard has {}",
                sharding.rank,
                inner.len(),
                sharding.local_len()
            )));
        }
        if inner.exact_batches() && inner.batch() != sharding.batch {
            return Err(CalmError::Invalid(format!(
                "the engine's batches of {} are not the sharding's {}",
                inner.batch(),
                sharding.batch
            )));
        }
        Ok(Self {
            inner,
            comm,
            sharding,
            cancel: CancelToken::new(),
            traffic: Default::default(),
        })
    }

    /// The running count of this engine's exchanges ([`Traffic`]), readable while it runs.
    pub fn traffic(&self) -> Arc<Mutex<Traffic>> {
        self.traffic.clone()
    }

    /// `[present, cancelled, images, LL, B.., T..]`, one rank's part of a round.
    fn pack(out: &mut [f64], stats: Option<&Stats>, images: usize, cancelled: bool) {
        out.iter_mut().for_each(|v| *v = 0.0);
        out[1] = f64::from(u8::from(cancelled));
        if let Some(s) = stats {
            out[0] = 1.0;
            out[2] = images as f64;
            out[3] = s.ll;
            let k = s.b.len();
            out[4..4 + k].copy_from_slice(&s.b);
            out[4 + k..].copy_from_slice(&s.t);
        }
    }

    /// Exchanges the parts of a round and adds the present ones to `total` in rank order;
    /// returns the images they held, or `Interrupted` when any rank was cancelled.
    fn exchange(&self, send: &[f64], recv: &mut [f64], total: &mut Stats) -> Result<usize> {
        let t0 = std::time::Instant::now();
        self.comm.all_gather(send, recv)?;
        {
            let mut t = lock(&self.traffic);
            t.rounds += 1;
            t.bytes += (recv.len() * 8) as u64;
            t.seconds += t0.elapsed().as_secs_f64();
        }
        let parts: Vec<&[f64]> = recv.chunks_exact(send.len()).collect();
        if parts.iter().any(|p| p[1] != 0.0) {
            return Err(CalmError::Interrupted);
        }
        let k = total.b.len();
        let mut images = 0;
        for p in parts.iter().filter(|p| p[0] == 1.0) {
            images += p[2] as usize;
            total.ll += p[3];
            total
                .b
                .iter_mut()
                .zip(&p[4..4 + k])
                .for_each(|(a, &v)| *a += v);
            total
                .t
                .iter_mut()
                .zip(&p[4 + k..])
                .for_each(|(a, &v)| *a += v);
        }
        Ok(images)
    }
}

/// f64 values one rank sends per round: the flags, the images, `LL`, `B` and `T`.
pub fn message_len(g: &Geometry) -> usize {
    4 + g.k + g.k * g.r()
}

impl Engine for DistEngine {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn len(&self) -> usize {
        self.sharding.n
    }
    fn epoch(&mut self, progress: &mut dyn FnMut(usize)) -> Result<EpochStats> {
        let stats = self.stats(0, self.sharding.n, progress)?;
        self.apply(&stats)
    }
    /// The whole data's statistics (only `0..n`): a collective call.
    fn stats(
        &mut self,
        start: usize,
        count: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Stats> {
        if (start, count) != (0, self.sharding.n) {
            return Err(CalmError::Invalid(
                "a data-parallel engine gives the statistics of the whole data only".into(),
            ));
        }
        let g = self.inner.geometry();
        let len = message_len(&g);
        let mut send = vec![0f64; len];
        let mut recv = vec![0f64; len * self.comm.size()];
        let mut total = Stats::zeros(&g);
        let mut done = 0;
        if self.inner.exact_batches() {
            for j in 0..self.sharding.rounds() {
                let cancelled = self.cancel.is_cancelled();
                let part = match self.sharding.local_batch(j) {
                    Some((first, nb)) if !cancelled => {
                        Some((self.inner.stats(first, nb, &mut |_| {})?, nb))
                    }
                    _ => None,
                };
                let (stats, nb) = part.map_or((None, 0), |(s, nb)| (Some(s), nb));
                Self::pack(&mut send, stats.as_ref(), nb, cancelled);
                done += self.exchange(&send, &mut recv, &mut total)?;
                progress(done);
            }
        } else {
            let cancelled = self.cancel.is_cancelled();
            let n = self.inner.len();
            let stats = if cancelled || n == 0 {
                None
            } else {
                Some(self.inner.stats(0, n, &mut |_| {})?)
            };
            Self::pack(&mut send, stats.as_ref(), n, cancelled);
            done += self.exchange(&send, &mut recv, &mut total)?;
            progress(done);
        }
        Ok(total)
    }
    fn apply(&mut self, stats: &Stats) -> Result<EpochStats> {
        self.inner.apply(stats)
    }
    fn batch(&self) -> usize {
        self.sharding.batch
    }
    fn theta(&mut self) -> Result<Vec<f32>> {
        self.inner.theta()
    }
    fn counts(&mut self) -> Result<Vec<f32>> {
        self.inner.counts()
    }
    fn set_theta(&mut self, theta: &[f32]) -> Result<()> {
        self.inner.set_theta(theta)
    }
    fn set_prior(&mut self, prior: &Prior) -> Result<()> {
        self.inner.set_prior(prior)
    }
    fn prior(&self) -> Prior {
        self.inner.prior()
    }
    /// Kept here, not given to the inner engine: a rank must not leave a round the others are in.
    fn set_posterior(&mut self, posterior: crate::engine::Posterior) -> Result<()> {
        self.inner.set_posterior(posterior)
    }
    fn set_cancel(&mut self, cancel: CancelToken) {
        self.cancel = cancel;
    }
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_image_has_one_owner_and_its_local_index_maps_back() {
        for (n, batch, size) in [(10, 3, 1), (10, 3, 2), (10, 3, 3), (10, 3, 4), (7, 7, 1)] {
            let shards: Vec<Sharding> = (0..size)
                .map(|r| Sharding::new(n, batch, r, size).unwrap())
                .collect();
            assert_eq!(shards.iter().map(|s| s.local_len()).sum::<usize>(), n);
            for i in 0..n {
                let (owner, local) = shards[0].locate(i);
                assert!(local < shards[owner].local_len());
                assert_eq!(
                    shards[owner].global(local),
                    i,
                    "n {n} batch {batch} size {size}"
                );
            }
        }
        let e = Sharding::new(10, 3, 0, 5).unwrap_err().to_string();
        assert!(
            e.contains("make 4 batches") && e.contains("at most 4"),
            "{e}"
        );
    }

    #[test]
    fn thread_ranks_gather_and_broadcast() {
        let out: Vec<(Vec<f64>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = ThreadComm::group(3)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut recv = vec![0.0; 6];
                        let r = c.rank() as f64;
                        c.all_gather(&[r, r * 10.0], &mut recv).unwrap();
                        let mut b = vec![c.rank() as f32; 2];
                        c.broadcast(2, &mut b).unwrap();
                        (recv, b)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (recv, b) in out {
            assert_eq!(recv, vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
            assert_eq!(b, vec![2.0, 2.0]);
        }
    }
}
