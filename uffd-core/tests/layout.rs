//! Our hand-written ABI against the pre-generated `linux-raw-sys` headers.

use std::mem::{offset_of, size_of};

use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as i;
use uffd_core::sys;
use uffd_core::{FaultFlags, Features, Ioctls, RegisterMode};

#[test]
fn struct_sizes_match_kernel_headers() {
    assert_eq!(size_of::<sys::uffdio_api>(), size_of::<g::uffdio_api>());
    assert_eq!(size_of::<sys::uffdio_range>(), size_of::<g::uffdio_range>());
    assert_eq!(
        size_of::<sys::uffdio_register>(),
        size_of::<g::uffdio_register>()
    );
    assert_eq!(size_of::<sys::uffdio_copy>(), size_of::<g::uffdio_copy>());
    assert_eq!(
        size_of::<sys::uffdio_zeropage>(),
        size_of::<g::uffdio_zeropage>()
    );
    assert_eq!(
        size_of::<sys::uffdio_writeprotect>(),
        size_of::<g::uffdio_writeprotect>()
    );
    assert_eq!(
        size_of::<sys::uffdio_continue>(),
        size_of::<g::uffdio_continue>()
    );
    assert_eq!(
        size_of::<sys::uffdio_poison>(),
        size_of::<g::uffdio_poison>()
    );
    assert_eq!(size_of::<sys::uffdio_move>(), size_of::<g::uffdio_move>());
    assert_eq!(size_of::<sys::uffd_msg>(), size_of::<g::uffd_msg>());
}

#[test]
fn result_fields_sit_at_kernel_offsets() {
    assert_eq!(
        offset_of!(sys::uffdio_copy, copy),
        offset_of!(g::uffdio_copy, copy)
    );
    assert_eq!(
        offset_of!(sys::uffdio_zeropage, zeropage),
        offset_of!(g::uffdio_zeropage, zeropage)
    );
    assert_eq!(
        offset_of!(sys::uffdio_continue, mapped),
        offset_of!(g::uffdio_continue, mapped)
    );
    assert_eq!(
        offset_of!(sys::uffdio_poison, updated),
        offset_of!(g::uffdio_poison, updated)
    );
    assert_eq!(
        offset_of!(sys::uffdio_move, moved),
        offset_of!(g::uffdio_move, move_)
    );
    assert_eq!(
        offset_of!(sys::uffdio_register, ioctls),
        offset_of!(g::uffdio_register, ioctls)
    );
    assert_eq!(offset_of!(sys::uffd_msg, arg), offset_of!(g::uffd_msg, arg));
}

#[test]
fn ioctl_numbers_match_kernel_headers() {
    assert_eq!(sys::UFFDIO_API, i::UFFDIO_API);
    assert_eq!(sys::UFFDIO_REGISTER, i::UFFDIO_REGISTER);
    assert_eq!(sys::UFFDIO_UNREGISTER, i::UFFDIO_UNREGISTER);
    assert_eq!(sys::UFFDIO_WAKE, i::UFFDIO_WAKE);
    assert_eq!(sys::UFFDIO_COPY, i::UFFDIO_COPY);
    assert_eq!(sys::UFFDIO_ZEROPAGE, i::UFFDIO_ZEROPAGE);
    assert_eq!(sys::UFFDIO_WRITEPROTECT, i::UFFDIO_WRITEPROTECT);
    assert_eq!(sys::UFFDIO_CONTINUE, i::UFFDIO_CONTINUE);
    // linux-raw-sys has no MOVE/POISON/IOC_NEW request numbers; check their parts.
    assert_eq!(sys::_UFFDIO_MOVE, g::_UFFDIO_MOVE);
    assert_eq!(sys::_UFFDIO_POISON, g::_UFFDIO_POISON);
    assert_eq!(sys::UFFDIO, g::UFFDIO);
    assert_eq!(sys::UFFDIO_MOVE, 0xC028_AA05, "_IOWR(0xAA, 5, 40 bytes)");
    assert_eq!(sys::UFFDIO_POISON, 0xC020_AA08, "_IOWR(0xAA, 8, 32 bytes)");
    assert_eq!(sys::USERFAULTFD_IOC_NEW, 0xAA00, "_IO(0xAA, 0)");
}

#[test]
fn flag_values_match_kernel_headers() {
    let features = [
        (
            Features::PAGEFAULT_FLAG_WP,
            g::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        ),
        (Features::EVENT_FORK, g::UFFD_FEATURE_EVENT_FORK),
        (Features::EVENT_REMAP, g::UFFD_FEATURE_EVENT_REMAP),
        (Features::EVENT_REMOVE, g::UFFD_FEATURE_EVENT_REMOVE),
        (
            Features::MISSING_HUGETLBFS,
            g::UFFD_FEATURE_MISSING_HUGETLBFS,
        ),
        (Features::MISSING_SHMEM, g::UFFD_FEATURE_MISSING_SHMEM),
        (Features::EVENT_UNMAP, g::UFFD_FEATURE_EVENT_UNMAP),
        (Features::SIGBUS, g::UFFD_FEATURE_SIGBUS),
        (Features::THREAD_ID, g::UFFD_FEATURE_THREAD_ID),
        (Features::MINOR_HUGETLBFS, g::UFFD_FEATURE_MINOR_HUGETLBFS),
        (Features::MINOR_SHMEM, g::UFFD_FEATURE_MINOR_SHMEM),
        (Features::EXACT_ADDRESS, g::UFFD_FEATURE_EXACT_ADDRESS),
        (
            Features::WP_HUGETLBFS_SHMEM,
            g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        ),
        (Features::WP_UNPOPULATED, g::UFFD_FEATURE_WP_UNPOPULATED),
        (Features::POISON, g::UFFD_FEATURE_POISON),
        (Features::WP_ASYNC, g::UFFD_FEATURE_WP_ASYNC),
        (Features::MOVE, g::UFFD_FEATURE_MOVE),
    ];
    for (ours, theirs) in features {
        assert_eq!(ours.bits(), u64::from(theirs), "{ours:?}");
    }
    assert_eq!(
        Features::all_named().bits().count_ones() as usize,
        features.len()
    );

    assert_eq!(sys::UFFD_API, u64::from(g::UFFD_API));
    assert_eq!(sys::UFFD_USER_MODE_ONLY as u32, g::UFFD_USER_MODE_ONLY);
    assert_eq!(
        RegisterMode::MISSING.bits(),
        u64::from(g::UFFDIO_REGISTER_MODE_MISSING)
    );
    assert_eq!(
        RegisterMode::WP.bits(),
        u64::from(g::UFFDIO_REGISTER_MODE_WP)
    );
    assert_eq!(
        RegisterMode::MINOR.bits(),
        u64::from(g::UFFDIO_REGISTER_MODE_MINOR)
    );
    assert_eq!(
        sys::UFFDIO_COPY_MODE_DONTWAKE,
        u64::from(g::UFFDIO_COPY_MODE_DONTWAKE)
    );
    assert_eq!(sys::UFFDIO_COPY_MODE_WP, u64::from(g::UFFDIO_COPY_MODE_WP));
    assert_eq!(
        sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE,
        u64::from(g::UFFDIO_ZEROPAGE_MODE_DONTWAKE)
    );
    // The WRITEPROTECT / CONTINUE / POISON / MOVE mode bits are `(__u64)1 << n` macros
    // that bindgen does not carry into linux-raw-sys; tests/placement.rs exercises them
    // against the kernel instead.
    assert_eq!(
        FaultFlags::WRITE.bits(),
        u64::from(g::UFFD_PAGEFAULT_FLAG_WRITE)
    );
    assert_eq!(FaultFlags::WP.bits(), u64::from(g::UFFD_PAGEFAULT_FLAG_WP));
    assert_eq!(
        FaultFlags::MINOR.bits(),
        u64::from(g::UFFD_PAGEFAULT_FLAG_MINOR)
    );
    assert_eq!(
        u32::from(sys::UFFD_EVENT_PAGEFAULT),
        g::UFFD_EVENT_PAGEFAULT
    );
    assert_eq!(u32::from(sys::UFFD_EVENT_FORK), g::UFFD_EVENT_FORK);
    assert_eq!(u32::from(sys::UFFD_EVENT_REMAP), g::UFFD_EVENT_REMAP);
    assert_eq!(u32::from(sys::UFFD_EVENT_REMOVE), g::UFFD_EVENT_REMOVE);
    assert_eq!(u32::from(sys::UFFD_EVENT_UNMAP), g::UFFD_EVENT_UNMAP);
    assert_eq!(Ioctls::MOVE.bits(), 1 << g::_UFFDIO_MOVE);
    assert_eq!(Ioctls::API.bits(), 1 << g::_UFFDIO_API);
}

#[test]
fn pagemap_scan_layout_and_constants_match_kernel_headers() {
    use uffd_core::{PageCategories, PageRegion, ScanFlags};
    assert_eq!(size_of::<sys::pm_scan_arg>(), size_of::<g::pm_scan_arg>());
    assert_eq!(size_of::<PageRegion>(), size_of::<g::page_region>());
    assert_eq!(
        offset_of!(sys::pm_scan_arg, walk_end),
        offset_of!(g::pm_scan_arg, walk_end)
    );
    assert_eq!(
        offset_of!(sys::pm_scan_arg, return_mask),
        offset_of!(g::pm_scan_arg, return_mask)
    );
    assert_eq!(
        offset_of!(PageRegion, categories),
        offset_of!(g::page_region, categories)
    );
    for (ours, theirs) in [
        (PageCategories::WP_ALLOWED, g::PAGE_IS_WPALLOWED),
        (PageCategories::WRITTEN, g::PAGE_IS_WRITTEN),
        (PageCategories::FILE, g::PAGE_IS_FILE),
        (PageCategories::PRESENT, g::PAGE_IS_PRESENT),
        (PageCategories::SWAPPED, g::PAGE_IS_SWAPPED),
        (PageCategories::PFN_ZERO, g::PAGE_IS_PFNZERO),
        (PageCategories::HUGE, g::PAGE_IS_HUGE),
        (PageCategories::SOFT_DIRTY, g::PAGE_IS_SOFT_DIRTY),
        (PageCategories::GUARD, g::PAGE_IS_GUARD),
    ] {
        assert_eq!(ours.bits(), u64::from(theirs), "{ours:?}");
    }
    assert_eq!(
        ScanFlags::WP_MATCHING.bits(),
        u64::from(g::PM_SCAN_WP_MATCHING)
    );
    assert_eq!(
        ScanFlags::CHECK_WPASYNC.bits(),
        u64::from(g::PM_SCAN_CHECK_WPASYNC)
    );
    // linux-raw-sys has no PAGEMAP_SCAN request number: _IOWR('f', 16, struct pm_scan_arg).
    assert_eq!(sys::PAGEMAP_SCAN, 0xc060_6610);
}
