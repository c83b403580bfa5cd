//! Reading and decoding `struct uffd_msg` events, many per `read(2)`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use bitflags::bitflags;
use nix::errno::Errno;

use crate::error::{Error, Op, Result};
use crate::open::Uffd;
use crate::sys;

bitflags! {
    /// `UFFD_PAGEFAULT_FLAG_*`: what kind of fault it was.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct FaultFlags: u64 {
        /// The access was a write.
        const WRITE = sys::UFFD_PAGEFAULT_FLAG_WRITE;
        /// A write to a write-protected page (WP mode).
        const WP = sys::UFFD_PAGEFAULT_FLAG_WP;
        /// A minor fault: the page is in the page cache but not mapped (MINOR mode).
        const MINOR = sys::UFFD_PAGEFAULT_FLAG_MINOR;
        const _ = !0;
    }
}

/// A decoded userfaultfd event.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A thread faulted at `addr` (page aligned unless `EXACT_ADDRESS` was negotiated).
    Pagefault {
        /// The faulting address.
        addr: usize,
        /// Write / WP / minor.
        flags: FaultFlags,
        /// The faulting thread's id, with the `THREAD_ID` feature.
        thread: Option<u32>,
    },
    /// The process forked; `uffd` serves the child's copy of the registered ranges.
    Fork {
        /// The child's userfaultfd, now owned by the receiver.
        uffd: Uffd,
    },
    /// `mremap` moved `len` bytes of a registered range from `from` to `to`.
    Remap {
        /// Old start.
        from: usize,
        /// New start.
        to: usize,
        /// Length moved.
        len: usize,
    },
    /// `MADV_DONTNEED` / `MADV_REMOVE` dropped `[start, end)`: it now reads as missing.
    Remove {
        /// Start (inclusive).
        start: usize,
        /// End (exclusive).
        end: usize,
    },
    /// `munmap` removed `[start, end)` from the address space.
    Unmap {
        /// Start (inclusive).
        start: usize,
        /// End (exclusive).
        end: usize,
    },
    /// An event code this crate does not know (a newer kernel).
    Unknown {
        /// The raw `event` byte.
        code: u8,
    },
}

/// A caller-owned buffer of raw messages and their decoded events: one `read(2)` fills
/// it with up to `capacity` events. Allocation happens only in [`EventBuffer::new`].
pub struct EventBuffer {
    raw: Box<[sys::uffd_msg]>,
    events: Vec<Event>,
}

impl EventBuffer {
    /// A buffer for up to `capacity` events per read (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            raw: vec![sys::uffd_msg::ZERO; capacity].into_boxed_slice(),
            events: Vec::with_capacity(capacity),
        }
    }

    /// The events of the last read.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Takes the events of the last read (fork events own fds: take them to keep them).
    pub fn drain(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// How many events a read can return at most.
    pub fn capacity(&self) -> usize {
        self.raw.len()
    }
}

impl std::fmt::Debug for EventBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBuffer")
            .field("capacity", &self.raw.len())
            .field("events", &self.events)
            .finish()
    }
}

/// The outcome of a read: events, or (non-blocking fd) nothing pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// This many events are in the buffer.
    Events(usize),
    /// Non-blocking fd, nothing pending: not an error.
    WouldBlock,
}

impl Uffd {
    /// Reads as many pending events as fit in `buf` with one `read(2)` and decodes them,
    /// replacing the buffer's previous events. Blocks when the fd is blocking and nothing
    /// is pending; returns [`ReadStatus::WouldBlock`] when it is non-blocking.
    ///
    /// See `userfaultfd(2)`, "Reading from the userfaultfd structure". Since Linux 4.3.
    pub fn read_events(&self, buf: &mut EventBuffer) -> Result<ReadStatus> {
        buf.events.clear();
        let bytes = std::mem::size_of_val(&*buf.raw);
        let n = loop {
            // SAFETY: `raw` is a writable buffer of exactly `bytes` bytes of plain data.
            let n = unsafe { libc::read(self.as_raw_fd(), buf.raw.as_mut_ptr().cast(), bytes) };
            if n >= 0 {
                break n as usize;
            }
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => return Ok(ReadStatus::WouldBlock),
                errno => return Err(Error::from_errno(Op::Read, errno, 0)),
            }
        };
        let count = n / std::mem::size_of::<sys::uffd_msg>();
        for msg in &buf.raw[..count] {
            let event = self.decode(msg);
            buf.events.push(event);
        }
        Ok(ReadStatus::Events(count))
    }

    fn decode(&self, msg: &sys::uffd_msg) -> Event {
        match msg.event {
            sys::UFFD_EVENT_PAGEFAULT => {
                let thread = msg.arg_u32(16);
                Event::Pagefault {
                    flags: FaultFlags::from_bits_retain(msg.arg_u64(0)),
                    addr: msg.arg_u64(8) as usize,
                    thread: (self.features().contains(crate::Features::THREAD_ID))
                        .then_some(thread),
                }
            }
            sys::UFFD_EVENT_FORK => {
                // SAFETY: the kernel installed this fd in our table for this event and
                // hands its ownership to the reader.
                let fd = unsafe { OwnedFd::from_raw_fd(msg.arg_u32(0) as i32) };
                Event::Fork {
                    uffd: Uffd::from_fork(fd, self),
                }
            }
            sys::UFFD_EVENT_REMAP => Event::Remap {
                from: msg.arg_u64(0) as usize,
                to: msg.arg_u64(8) as usize,
                len: msg.arg_u64(16) as usize,
            },
            sys::UFFD_EVENT_REMOVE => Event::Remove {
                start: msg.arg_u64(0) as usize,
                end: msg.arg_u64(8) as usize,
            },
            sys::UFFD_EVENT_UNMAP => Event::Unmap {
                start: msg.arg_u64(0) as usize,
                end: msg.arg_u64(8) as usize,
            },
            code => Event::Unknown { code },
        }
    }

    /// Waits until an event is readable or `timeout` passes (`None`: forever). Returns
    /// whether the fd is readable. An `EINTR` counts as "not readable yet".
    ///
    /// The kernel answers `POLLERR` for a fd opened blocking (poll cannot promise a read
    /// will not block) or not yet through `UFFDIO_API`: that comes back as
    /// [`Error::InvalidArgument`]. Open with [`crate::UffdBuilder::non_blocking`].
    ///
    /// See `poll(2)`.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        // SAFETY: one valid pollfd.
        let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ret < 0 {
            return match Errno::last() {
                Errno::EINTR => Ok(false),
                errno => Err(Error::from_errno(Op::Poll, errno, 0)),
            };
        }
        if pfd.revents & libc::POLLNVAL != 0 {
            return Err(Error::Os {
                op: Op::Poll,
                errno: Errno::EBADF,
            });
        }
        if pfd.revents & libc::POLLERR != 0 {
            return Err(Error::InvalidArgument {
                op: Op::Poll,
                reason: "poll needs a non-blocking userfaultfd that has been through UFFDIO_API",
            });
        }
        Ok(ret > 0 && pfd.revents & libc::POLLIN != 0)
    }
}
