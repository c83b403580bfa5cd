//! What this kernel and this process can do with userfaultfd.

use nix::errno::Errno;

use crate::error::Result;
use crate::features::{Features, Ioctls};
use crate::mapping::{Mapping, MemoryKind};
use crate::open::{PathPolicy, Uffd, UserMode};
use crate::register::RegisterMode;
use crate::sys;

/// Whether one open path works, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathProbe {
    /// The fd could be opened this way.
    pub works: bool,
    /// It handles kernel-mode faults (not `UFFD_USER_MODE_ONLY`).
    pub kernel_faults: bool,
    /// The errno when it did not open.
    pub error: Option<Errno>,
}

/// The ioctls one registration mode gives on one kind of memory, or the kernel's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeProbe {
    /// The registration mode tried.
    pub mode: RegisterMode,
    /// The range's ioctls, or why registration failed.
    pub result: std::result::Result<Ioctls, Errno>,
}

/// Registration results for one kind of memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindProbe {
    /// The memory kind.
    pub kind: MemoryKind,
    /// Why the kind could not be tried (e.g. no hugetlb pages could be mapped).
    pub unavailable: Option<String>,
    /// One entry per mode combination.
    pub modes: Vec<ModeProbe>,
}

/// The result of [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Every feature the kernel supports.
    pub features: Features,
    /// The ioctls `UFFDIO_API` offers on an fd.
    pub api_ioctls: Ioctls,
    /// `/dev/userfaultfd`.
    pub device: PathProbe,
    /// `userfaultfd(2)`.
    pub syscall: PathProbe,
    /// Per memory kind: the ioctls of each registration mode.
    pub kinds: Vec<KindProbe>,
}

/// Every combination of registration modes, in a stable order.
pub const MODE_COMBINATIONS: [RegisterMode; 7] = [
    RegisterMode::MISSING,
    RegisterMode::WP,
    RegisterMode::MINOR,
    RegisterMode::MISSING.union(RegisterMode::WP),
    RegisterMode::MISSING.union(RegisterMode::MINOR),
    RegisterMode::WP.union(RegisterMode::MINOR),
    RegisterMode::MISSING
        .union(RegisterMode::WP)
        .union(RegisterMode::MINOR),
];

fn probe_path(policy: PathPolicy) -> PathProbe {
    let kernel = Uffd::builder()
        .path(policy)
        .user_mode(UserMode::KernelFaults)
        .open_unnegotiated();
    match kernel {
        Ok(_) => PathProbe {
            works: true,
            kernel_faults: true,
            error: None,
        },
        Err(first) => {
            let user = Uffd::builder()
                .path(policy)
                .user_mode(UserMode::UserOnly)
                .open_unnegotiated();
            PathProbe {
                works: user.is_ok(),
                kernel_faults: false,
                error: first.errno(),
            }
        }
    }
}

/// Features that change how faults are delivered rather than what can be registered;
/// left out when probing registrations.
const DELIVERY_FEATURES: Features = Features::SIGBUS.union(Features::WP_ASYNC);

fn probe_kind(kind: MemoryKind, features: Features) -> KindProbe {
    let mapping = match Mapping::new(kind, kind.page_size()) {
        Ok(m) => m,
        Err(e) => {
            return KindProbe {
                kind,
                unavailable: Some(format!("cannot map {} memory: {e}", kind.name())),
                modes: Vec::new(),
            }
        }
    };
    let modes = MODE_COMBINATIONS
        .iter()
        .map(|&mode| {
            // A fresh fd per mode: a failed registration must not colour the next one.
            let result = Uffd::builder()
                .optional(features - DELIVERY_FEATURES)
                .open()
                .and_then(|uffd| uffd.register(mapping.addr(), mapping.len(), mode))
                .map_err(|e| e.errno().unwrap_or(Errno::EINVAL));
            ModeProbe { mode, result }
        })
        .collect();
    KindProbe {
        kind,
        unavailable: None,
        modes,
    }
}

/// Probes the kernel: supported features (on a throwaway fd, since `UFFDIO_API` works once
/// per fd), which open paths work, and the ioctls each registration mode yields on
/// anonymous, shmem and hugetlb memory. Hugetlb is probed with `MAP_NORESERVE`, so it
/// needs no free huge pages.
pub fn probe() -> Result<Probe> {
    let device = probe_path(PathPolicy::DeviceOnly);
    let syscall = probe_path(PathPolicy::SyscallOnly);
    let fd = Uffd::builder().open_unnegotiated()?;
    let info = fd.api_ioctl(sys::UFFD_API, Features::empty())?;
    let kinds = [MemoryKind::Anon, MemoryKind::Shmem, MemoryKind::Hugetlb]
        .into_iter()
        .map(|kind| probe_kind(kind, info.features))
        .collect();
    Ok(Probe {
        features: info.features,
        api_ioctls: info.ioctls,
        device,
        syscall,
        kinds,
    })
}

impl Probe {
    /// The ioctls `mode` gives on `kind`, if registration succeeded.
    pub fn ioctls(&self, kind: MemoryKind, mode: RegisterMode) -> Option<Ioctls> {
        self.kinds
            .iter()
            .find(|k| k.kind == kind)?
            .modes
            .iter()
            .find(|m| m.mode == mode)?
            .result
            .ok()
    }
}
