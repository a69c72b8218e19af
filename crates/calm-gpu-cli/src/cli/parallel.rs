//! The processes of an `mpirun` (or `srun`) job: with the `mpi` feature, a binary started by an
//! MPI launcher joins its job's world and `train` fits one model over every rank
//! ([`calm_gpu::dist`]); started any other way it runs alone, as without the feature.

use std::sync::{Arc, OnceLock};

use calm_gpu::dist::Comm;

static WORLD: OnceLock<Arc<dyn Comm>> = OnceLock::new();

/// The job's communicator, when this process is one rank of an MPI job.
pub fn world() -> Option<Arc<dyn Comm>> {
    WORLD.get().cloned()
}

/// "rank 2 of 3: " on the ranks of a job of more than one process, else "".
pub fn rank_prefix() -> String {
    match world() {
        Some(w) if w.size() > 1 => format!("rank {} of {}: ", w.rank(), w.size()),
        _ => String::new(),
    }
}

/// True on the rank that prints and writes (rank 0, or a process alone).
pub fn is_root() -> bool {
    world().is_none_or(|w| w.rank() == 0)
}

/// The rank among the job's processes on this machine (for choosing a GPU), where the launcher
/// says it.
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "PMI_LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

#[cfg(feature = "mpi")]
mod imp {
    use std::sync::{Arc, Mutex};

    use calm_gpu::dist::Comm;
    use calm_gpu::{CalmError, Result};
    use mpi::traits::{Communicator, CommunicatorCollectives, Root};

    /// Finalised when taken and dropped ([`finalize`]).
    static UNIVERSE: Mutex<Option<mpi::environment::Universe>> = Mutex::new(None);

    /// MPI's world. Calls are serialised by `lock` (MPI initialised with
    /// `Threading::Serialized`); every rank makes them from its main thread in one order.
    struct Mpi {
        rank: usize,
        size: usize,
        lock: Mutex<()>,
    }

    impl Comm for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_gather(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
            if recv.len() != send.len() * self.size {
                return Err(CalmError::Invalid("all_gather: wrong buffer".into()));
            }
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            mpi::topology::SimpleCommunicator::world().all_gather_into(send, recv);
            Ok(())
        }
        fn broadcast(&self, root: usize, buf: &mut [f32]) -> Result<()> {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let world = mpi::topology::SimpleCommunicator::world();
            world.process_at_rank(root as i32).broadcast_into(buf);
            Ok(())
        }
    }

    /// Whether an MPI launcher started this process (Open MPI, MPICH/Hydra, Slurm with PMI or
    /// PMIx): only then is MPI initialised.
    fn launched() -> bool {
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    }

    pub fn init() -> std::result::Result<(), String> {
        if !launched() {
            return Ok(());
        }
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or("MPI was initialised already")?;
        let world = universe.world();
        let comm = Mpi {
            rank: world.rank() as usize,
            size: world.size() as usize,
            lock: Mutex::new(()),
        };
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(universe);
        let _ = super::WORLD.set(Arc::new(comm));
        Ok(())
    }

    pub fn finalize() {
        drop(UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    pub fn abort(code: i32) -> ! {
        mpi::topology::SimpleCommunicator::world().abort(code)
    }
}

/// Joins the MPI job this process was launched in, if any (the `mpi` feature).
pub fn init() -> Result<(), String> {
    #[cfg(feature = "mpi")]
    return imp::init();
    #[cfg(not(feature = "mpi"))]
    Ok(())
}

/// Leaves the MPI job (before the process exits; nothing without one).
pub fn finalize() {
    #[cfg(feature = "mpi")]
    imp::finalize();
}

/// Ends this process with `code`: in a job of more than one rank, ends the whole job (MPI_Abort),
/// so that no rank waits for one that failed.
/// An interruption (code 130) is agreed by every rank in the same round of the fit, so every rank
/// comes here: they wait for each other first, so that no rank's non-zero exit can make the
/// launcher end the job while rank 0 still writes its checkpoint and says how to resume.
pub fn exit(code: u8) -> ! {
    #[cfg(feature = "mpi")]
    if world().is_some_and(|w| w.size() > 1) && code != 0 && code != 130 {
        imp::abort(i32::from(code));
    }
    if code == 130
        && let Some(w) = world().filter(|w| w.size() > 1)
    {
        let mut all = vec![0.0; w.size()];
        let _ = w.all_gather(&[0.0], &mut all);
    }
    finalize();
    std::process::exit(i32::from(code))
}
