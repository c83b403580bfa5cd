//! Reading the memory being saved: this process's (a plain copy), or another process's
//! through `process_vm_readv(2)` (its userfaultfd came over a socket; root, or ptrace
//! access to it, is needed).

use std::io::IoSliceMut;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Whose memory a snapshot reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Memory {
    /// This process: the caller of the unsafe constructor promised the ranges stay mapped.
    ThisProcess,
    /// Another process, by pid.
    Process(Pid),
}

impl Memory {
    /// Copies `buf.len()` bytes at `addr` into `buf`.
    ///
    /// Callers read only pages that no one can write meanwhile: write-protected ones not
    /// yet released, or memory of a paused workload.
    pub fn read(&self, addr: usize, buf: &mut [u8]) -> Result<()> {
        match *self {
            Memory::ThisProcess => {
                // SAFETY: the snapshot's constructor (unsafe) made its caller promise that
                // the regions stay mapped and readable while it runs, and `addr..+len`
                // lies in one; the pages are write-protected or the workload paused, so
                // nothing writes them during the copy.
                unsafe {
                    std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len())
                };
                Ok(())
            }
            Memory::Process(pid) => {
                let len = buf.len();
                let mut done = 0;
                while done < len {
                    let mut local = [IoSliceMut::new(&mut buf[done..])];
                    let remote = [RemoteIoVec {
                        base: addr + done,
                        len: len - done,
                    }];
                    match process_vm_readv(pid, &mut local, &remote) {
                        Ok(0) => {
                            return Err(Error::ReadMemory {
                                addr,
                                len,
                                source: std::io::ErrorKind::UnexpectedEof.into(),
                            })
                        }
                        Ok(n) => done += n,
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            return Err(Error::ReadMemory {
                                addr,
                                len,
                                source: e.into(),
                            })
                        }
                    }
                }
                Ok(())
            }
        }
    }
}
