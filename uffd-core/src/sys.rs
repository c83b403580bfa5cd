//! The kernel ABI of `<linux/userfaultfd.h>`: struct layouts, ioctl numbers and flag values.
//!
//! Written out here rather than generated (the `userfaultfd-sys` crate needs libclang at
//! build time and stops at Linux 6.1). Sizes are checked at compile time below, and
//! `tests/layout.rs` compares every number with the pre-generated `linux-raw-sys` headers.

#![allow(non_camel_case_types, missing_docs)]

/// `UFFD_API`: the only API version the kernel has ever accepted.
pub const UFFD_API: u64 = 0xAA;
/// The ioctl type byte of every userfaultfd ioctl.
pub const UFFDIO: u32 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: open flag restricting the fd to user-mode faults.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

pub const _UFFDIO_REGISTER: u32 = 0x00;
pub const _UFFDIO_UNREGISTER: u32 = 0x01;
pub const _UFFDIO_WAKE: u32 = 0x02;
pub const _UFFDIO_COPY: u32 = 0x03;
pub const _UFFDIO_ZEROPAGE: u32 = 0x04;
pub const _UFFDIO_MOVE: u32 = 0x05;
pub const _UFFDIO_WRITEPROTECT: u32 = 0x06;
pub const _UFFDIO_CONTINUE: u32 = 0x07;
pub const _UFFDIO_POISON: u32 = 0x08;
pub const _UFFDIO_API: u32 = 0x3F;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`; `copy` is written back: bytes copied, or a negative errno.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`; `zeropage` is written back like `uffdio_copy::copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_zeropage {
    pub range: uffdio_range,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

/// `struct uffdio_continue`; `mapped` is written back.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_continue {
    pub range: uffdio_range,
    pub mode: u64,
    pub mapped: i64,
}

/// `struct uffdio_poison`; `updated` is written back.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    pub updated: i64,
}

/// `struct uffdio_move`; `move` is written back.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_move {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub moved: i64,
}

/// `struct uffd_msg`: 32 packed bytes, an event byte, 7 reserved bytes and a 24-byte union.
///
/// The union is kept as bytes and decoded by offset in [`crate::event`], which avoids
/// unaligned references into a packed struct.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u8; 24],
}

impl uffd_msg {
    pub const ZERO: Self = Self {
        event: 0,
        reserved1: 0,
        reserved2: 0,
        reserved3: 0,
        arg: [0; 24],
    };

    /// The little-endian `u64` at byte `offset` of the union.
    pub fn arg_u64(&self, offset: usize) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.arg[offset..offset + 8]);
        u64::from_ne_bytes(bytes)
    }

    /// The `u32` at byte `offset` of the union.
    pub fn arg_u32(&self, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&self.arg[offset..offset + 4]);
        u32::from_ne_bytes(bytes)
    }
}

/// `struct pm_scan_arg` of `PAGEMAP_SCAN` (on `/proc/PID/pagemap`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct pm_scan_arg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (UFFDIO << 8) | nr
}
const IOC_READ: u32 = 2;
const IOC_WRITE: u32 = 1;
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, nr, size)
}

use core::mem::size_of;
pub const UFFDIO_API: u32 = iowr(_UFFDIO_API, size_of::<uffdio_api>());
pub const UFFDIO_REGISTER: u32 = iowr(_UFFDIO_REGISTER, size_of::<uffdio_register>());
pub const UFFDIO_UNREGISTER: u32 = ior(_UFFDIO_UNREGISTER, size_of::<uffdio_range>());
pub const UFFDIO_WAKE: u32 = ior(_UFFDIO_WAKE, size_of::<uffdio_range>());
pub const UFFDIO_COPY: u32 = iowr(_UFFDIO_COPY, size_of::<uffdio_copy>());
pub const UFFDIO_ZEROPAGE: u32 = iowr(_UFFDIO_ZEROPAGE, size_of::<uffdio_zeropage>());
pub const UFFDIO_MOVE: u32 = iowr(_UFFDIO_MOVE, size_of::<uffdio_move>());
pub const UFFDIO_WRITEPROTECT: u32 = iowr(_UFFDIO_WRITEPROTECT, size_of::<uffdio_writeprotect>());
pub const UFFDIO_CONTINUE: u32 = iowr(_UFFDIO_CONTINUE, size_of::<uffdio_continue>());
pub const UFFDIO_POISON: u32 = iowr(_UFFDIO_POISON, size_of::<uffdio_poison>());
/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u32 =
    (3 << 30) | ((size_of::<pm_scan_arg>() as u32) << 16) | ((b'f' as u32) << 8) | 16;
/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u32 = ioc(0, 0x00, 0);

const _: () = {
    assert!(size_of::<pm_scan_arg>() == 96);
    assert!(size_of::<uffdio_api>() == 24);
    assert!(size_of::<uffdio_range>() == 16);
    assert!(size_of::<uffdio_register>() == 32);
    assert!(size_of::<uffdio_copy>() == 40);
    assert!(size_of::<uffdio_zeropage>() == 32);
    assert!(size_of::<uffdio_writeprotect>() == 24);
    assert!(size_of::<uffdio_continue>() == 32);
    assert!(size_of::<uffdio_poison>() == 32);
    assert!(size_of::<uffdio_move>() == 40);
    assert!(size_of::<uffd_msg>() == 32);
};
