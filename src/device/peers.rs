//! Data-parallel peers: several devices of one backend, one thread each, which sum tensors
//! (gradients) across all of them and agree on what to do next.
//!
//! The sums: NCCL between CUDA GPUs (cubecl's CUDA runtime, see `nccl.rs`); burn-collective's
//! in-process all-reduce for every other backend (CPU peers). Every peer must call [`Peer::sum`] for the same
//! tensors in the same order (the callers walk their module's parameters in a fixed order).
//!
//! Host-side decisions (stop, pause, a peer that failed) go through a [`Gate`]: an in-process
//! round in which every peer votes and all of them learn the outcome. A peer that ends without
//! finishing (an error, a panic) leaves the gate, and every later round reports the failure, so
//! no peer waits forever for one that is gone.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use serde::Serialize;

use super::{BackendKind, DeviceError};
use crate::models::policy::{self, KernelPolicy};

/// `--devices`: several devices of one backend, e.g. `cuda:0,cuda:1`. `cpu:0,cpu:1` runs two
/// peers on the host's cores (they share them: the closest multi-device set-up a CPU offers,
/// useful to check that a data-parallel run equals a one-device run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceSet {
    pub backend: BackendKind,
    /// Device indices (CUDA ordinals; for the CPU, peer numbers).
    pub indices: Vec<usize>,
}

impl DeviceSet {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

impl fmt::Display for DeviceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.indices.iter().map(|i| format!("{}:{i}", self.backend)).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for DeviceSet {
    type Err = DeviceError;

    fn from_str(spec: &str) -> Result<Self, DeviceError> {
        let bad = |reason: String| DeviceError::DeviceSet {
            spec: spec.to_string(),
            reason,
        };
        let mut backend = None;
        let mut indices = Vec::new();
        for (position, part) in spec.split(',').map(str::trim).enumerate() {
            if part.is_empty() {
                return Err(bad("an empty entry; write devices as cuda:0,cuda:1".into()));
            }
            let (kind, index) = match part.split_once(':') {
                Some((k, i)) => {
                    let i = i
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("`{part}`: the index after `:` must be a number")))?;
                    (k.trim(), i)
                }
                None => (part, position),
            };
            let kind = match kind.to_ascii_lowercase().as_str() {
                "cuda" => BackendKind::Cuda,
                "cpu" => BackendKind::Cpu,
                "wgpu" | "vulkan" => {
                    return Err(bad(format!(
                        "`{part}`: data-parallel runs use CUDA GPUs (NCCL) or CPU peers; run wgpu/Vulkan on one device with --device"
                    )));
                }
                other => return Err(bad(format!("`{other}` is not a backend (cuda or cpu)"))),
            };
            match backend {
                None => backend = Some(kind),
                Some(b) if b != kind => {
                    return Err(bad(format!("every device must be of one backend; found {b} and {kind}")));
                }
                Some(_) => {}
            }
            if indices.contains(&index) {
                return Err(bad(format!("`{part}` is listed twice")));
            }
            indices.push(index);
        }
        match backend {
            Some(backend) => Ok(Self { backend, indices }),
            None => Err(bad("no device given".into())),
        }
    }
}

/// How the peers' tensors are summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// NCCL between CUDA GPUs (cubecl's CUDA runtime).
    Nccl,
    /// burn-collective's all-reduce between the threads of this process.
    Collective,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Nccl => "NCCL",
            Transport::Collective => "burn-collective",
        })
    }
}

/// The backend-specific operations behind [`Peer`] (chosen where the backend type is concrete).
pub(super) struct PeerOps<B: Backend> {
    /// Called once by each peer on its own thread before its first sum.
    pub join: fn(rank: usize, world: usize, device: &B::Device) -> Result<(), String>,
    /// The sum over all peers of `tensor` (every peer calls it with its own part).
    pub sum: fn(rank: usize, tensor: FloatTensor<B>, devices: &[B::Device]) -> Result<FloatTensor<B>, String>,
    /// Called by each peer when it is done.
    pub leave: fn(rank: usize),
}

impl<B: Backend> Clone for PeerOps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for PeerOps<B> {}

/// The peers of one data-parallel job, as [`super::dispatch_peers`] hands them to the job.
pub struct Peers<B: Backend> {
    pub backend: BackendKind,
    pub set: DeviceSet,
    pub(super) devices: Vec<B::Device>,
    pub(super) ops: PeerOps<B>,
    pub(super) policy: KernelPolicy,
}

impl<B: Backend> Peers<B> {
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// One handle per peer, rank 0 first; each goes to its own thread.
    pub fn split(self) -> Vec<Peer<B>> {
        let world = self.devices.len();
        let labels: Vec<String> = self.set.indices.iter().map(|i| format!("{}:{i}", self.backend)).collect();
        (0..world)
            .map(|rank| Peer {
                rank,
                world,
                label: labels[rank].clone(),
                device: self.devices[rank].clone(),
                devices: self.devices.clone(),
                ops: self.ops,
                policy: self.policy,
                joined: AtomicBool::new(false),
            })
            .collect()
    }
}

/// One peer: its rank among `world`, its device, and the sum over all peers.
pub struct Peer<B: Backend> {
    pub rank: usize,
    pub world: usize,
    /// `cuda:1`, `cpu:0`: how messages name this peer.
    pub label: String,
    pub device: B::Device,
    devices: Vec<B::Device>,
    ops: PeerOps<B>,
    policy: KernelPolicy,
    joined: AtomicBool,
}

impl<B: Backend> Peer<B> {
    /// Run `f` under the job's kernel policy (a per-thread setting: each peer thread enters it).
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        policy::scoped(self.policy, f)
    }

    /// Join the group (on the peer's own thread, before the first [`Peer::sum`]).
    pub fn join(&self) -> Result<(), DeviceError> {
        (self.ops.join)(self.rank, self.world, &self.device).map_err(|reason| DeviceError::Collective {
            peer: self.label.clone(),
            reason,
        })?;
        self.joined.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The element-wise sum of `tensor` over all peers (each passes its own).
    pub fn sum(&self, tensor: FloatTensor<B>) -> Result<FloatTensor<B>, DeviceError> {
        (self.ops.sum)(self.rank, tensor, &self.devices).map_err(|reason| DeviceError::Collective {
            peer: self.label.clone(),
            reason,
        })
    }
}

impl<B: Backend> Drop for Peer<B> {
    fn drop(&mut self) {
        if self.joined.load(Ordering::SeqCst) {
            (self.ops.leave)(self.rank);
        }
    }
}

/// What a peer says at a [`Gate`] round; the round's outcome is the strongest vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vote {
    Continue,
    Stop,
    Failed,
}

/// The outcome of a [`Gate`] round.
#[derive(Clone, Debug, PartialEq)]
pub struct Agreed {
    pub vote: Vote,
    /// The element-wise sum of the values the peers passed, in rank order.
    pub sums: Vec<f64>,
    /// Who failed first and why, when `vote` is `Failed`.
    pub failure: Option<String>,
}

struct GateState {
    generation: u64,
    posted: Vec<Option<(Vote, Vec<f64>)>>,
    /// Peers that ended without finishing.
    gone: Vec<bool>,
    failure: Option<String>,
    last: Option<Agreed>,
}

/// Rounds in which every peer of a process votes and learns the outcome (see the module docs).
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    pub fn new(world: usize) -> Self {
        Self {
            state: Mutex::new(GateState {
                generation: 0,
                posted: vec![None; world],
                gone: vec![false; world],
                failure: None,
                last: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Vote with `values` (summed over the peers) and wait for the others. Once a peer has
    /// left, every round ends at once with `Failed`.
    pub fn agree(&self, rank: usize, vote: Vote, values: &[f64]) -> Agreed {
        let mut st = self.lock();
        if st.failure.is_some() {
            return failed(&st);
        }
        let generation = st.generation;
        st.posted[rank] = Some((vote, values.to_vec()));
        if complete(&mut st) {
            self.changed.notify_all();
        }
        while st.generation == generation && st.failure.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.generation == generation {
            return failed(&st);
        }
        st.last.clone().unwrap_or_else(|| failed(&st))
    }

    /// The peer `rank` ends without finishing (`why` is its error): wake everyone.
    pub fn leave(&self, rank: usize, why: String) {
        let mut st = self.lock();
        st.gone[rank] = true;
        if st.failure.is_none() {
            st.failure = Some(why);
        }
        self.changed.notify_all();
    }
}

fn failed(st: &GateState) -> Agreed {
    Agreed {
        vote: Vote::Failed,
        sums: Vec::new(),
        failure: st.failure.clone(),
    }
}

/// Close the round if every peer has voted; true when it did.
fn complete(st: &mut GateState) -> bool {
    if st.posted.iter().zip(&st.gone).any(|(p, gone)| p.is_none() && !gone) {
        return false;
    }
    let mut vote = Vote::Continue;
    let mut sums: Vec<f64> = Vec::new();
    for (v, values) in st.posted.iter().flatten() {
        vote = vote.max(*v);
        if sums.len() < values.len() {
            sums.resize(values.len(), 0.0);
        }
        for (s, x) in sums.iter_mut().zip(values) {
            *s += x;
        }
    }
    st.last = Some(Agreed {
        vote,
        sums,
        failure: None,
    });
    st.posted.iter_mut().for_each(|p| *p = None);
    st.generation += 1;
    true
}

/// burn-collective's in-process all-reduce (any backend; threads of this process).
pub(super) fn collective_ops<B: Backend>() -> PeerOps<B> {
    use burn::collective::{CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register};
    PeerOps {
        join: |rank, world, device| {
            register::<B>(PeerId::from(rank), device.clone(), CollectiveConfig::default().with_num_devices(world))
                .map_err(|e| format!("{e:?}"))
        },
        sum: |rank, tensor, _| all_reduce::<B>(PeerId::from(rank), tensor, ReduceOperation::Sum).map_err(|e| format!("{e:?}")),
        leave: |rank| {
            let _ = finish_collective::<B>(PeerId::from(rank));
        },
    }
}

/// The one data-parallel job a process runs at a time: burn-collective keeps one group per
/// backend type in the process.
pub(super) static ONE_GROUP: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_sets_parse_and_refuse_mixed_or_repeated_devices() {
        let set: DeviceSet = "cuda:0, cuda:1".parse().expect("two GPUs");
        assert_eq!((set.backend, set.indices.clone()), (BackendKind::Cuda, vec![0, 1]));
        assert_eq!(set.to_string(), "cuda:0,cuda:1");
        let set: DeviceSet = "cpu,cpu".parse().expect("two CPU peers");
        assert_eq!(set.indices, vec![0, 1]);
        for bad in ["", "cuda:0,cpu:1", "cuda:0,cuda:0", "tpu:0", "cuda:x", "wgpu:0,wgpu:1", "cuda:0,"] {
            let e = bad.parse::<DeviceSet>().expect_err(bad);
            assert!(e.is_bad_input() && e.to_string().contains("--devices"), "{bad}: {e}");
        }
    }

    #[test]
    fn gate_sums_votes_and_releases_everyone_when_a_peer_leaves() {
        let gate = Gate::new(3);
        std::thread::scope(|s| {
            let a = s.spawn(|| gate.agree(1, Vote::Continue, &[1.0, 2.0]));
            let b = s.spawn(|| gate.agree(2, Vote::Stop, &[10.0, 20.0]));
            let me = gate.agree(0, Vote::Continue, &[100.0, 200.0]);
            assert_eq!(me.vote, Vote::Stop);
            assert_eq!(me.sums, vec![111.0, 222.0]);
            assert_eq!(a.join().expect("peer 1"), me);
            assert_eq!(b.join().expect("peer 2"), me);
        });
        // next round: peer 2 leaves while 0 and 1 wait
        std::thread::scope(|s| {
            let a = s.spawn(|| gate.agree(1, Vote::Continue, &[]));
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                gate.leave(2, "cuda:2 ran out of memory".into());
            });
            let me = gate.agree(0, Vote::Continue, &[]);
            assert_eq!(me.vote, Vote::Failed);
            assert_eq!(me.failure.as_deref(), Some("cuda:2 ran out of memory"));
            assert_eq!(a.join().expect("peer 1").vote, Vote::Failed);
        });
        assert_eq!(gate.agree(0, Vote::Continue, &[]).vote, Vote::Failed, "later rounds fail at once");
    }
}
