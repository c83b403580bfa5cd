//! Opening and `UFFDIO_API`, as in the kernel selftests' handshake cases.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use uffd_core::{probe, sys, Error, Features, Ioctls, OpenPath, PathPolicy, Uffd, UserMode};

#[test]
fn device_path_is_tried_first_and_reported() {
    let uffd = Uffd::builder().open().expect("open");
    assert_eq!(uffd.open_path(), OpenPath::Device);
    assert!(!uffd.user_mode_only(), "root gets kernel-mode faults");
}

#[test]
fn syscall_path_works_and_is_reported() {
    let uffd = Uffd::builder()
        .path(PathPolicy::SyscallOnly)
        .open()
        .expect("open via syscall");
    assert_eq!(uffd.open_path(), OpenPath::Syscall);
}

#[test]
fn user_mode_only_is_honoured_when_asked() {
    let uffd = Uffd::builder()
        .user_mode(UserMode::UserOnly)
        .open()
        .expect("open user-mode-only");
    assert!(uffd.user_mode_only());
}

#[test]
fn bad_api_version_fails() {
    let mut uffd = Uffd::builder().open_unnegotiated().expect("open");
    let err = uffd.api(0xAB, Features::empty()).expect_err("version 0xAB");
    assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
}

#[test]
fn unknown_feature_bit_fails() {
    let mut uffd = Uffd::builder().open_unnegotiated().expect("open");
    let unknown = Features::from_bits_retain(1 << 40);
    let err = uffd.api(sys::UFFD_API, unknown).expect_err("unknown bit");
    assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
}

#[test]
fn second_api_on_same_fd_fails() {
    let mut uffd = Uffd::builder().open_unnegotiated().expect("open");
    uffd.api(sys::UFFD_API, Features::EVENT_REMOVE)
        .expect("first API");
    let err = uffd
        .api(sys::UFFD_API, Features::EVENT_REMOVE)
        .expect_err("second API on one fd");
    assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
}

#[test]
fn api_reports_fd_ioctls() {
    let uffd = Uffd::builder().open().expect("open");
    let expected = Ioctls::API | Ioctls::REGISTER | Ioctls::UNREGISTER;
    assert_eq!(uffd.api_ioctls() & expected, expected);
}

#[test]
fn probe_reports_move_poison_and_wp_async() {
    let probe = probe().expect("probe");
    for f in [Features::MOVE, Features::POISON, Features::WP_ASYNC] {
        assert!(
            probe.features.contains(f),
            "{f:?} missing from {:?}",
            probe.features.names()
        );
    }
    assert!(probe.device.works && probe.device.kernel_faults);
    assert!(probe.syscall.works);
}

#[test]
fn probe_runs_on_a_throwaway_fd_so_a_later_handshake_still_works() {
    let before = probe().expect("probe").features;
    let uffd = Uffd::open(before - Features::SIGBUS - Features::WP_ASYNC).expect("open");
    assert_eq!(
        uffd.features(),
        before - Features::SIGBUS - Features::WP_ASYNC
    );
}

#[test]
fn missing_required_feature_is_named() {
    let future = Features::from_bits_retain(1 << 40);
    let err = Uffd::builder()
        .require(Features::MOVE | future)
        .open()
        .expect_err("bit 40 is no feature");
    match &err {
        Error::MissingFeatures { missing } => assert_eq!(*missing, future),
        other => panic!("wrong error {other:?}"),
    }
    assert!(err.to_string().contains("0x10000000000"), "{err}");
}

#[test]
fn optional_features_are_enabled_only_when_offered() {
    let future = Features::from_bits_retain(1 << 40);
    let uffd = Uffd::builder()
        .optional(Features::THREAD_ID | future)
        .open()
        .expect("open");
    assert_eq!(uffd.features(), Features::THREAD_ID);
}

#[test]
fn feature_names_are_kernel_constants_without_prefix() {
    let names = (Features::MOVE | Features::WP_ASYNC | Features::MINOR_SHMEM).names();
    assert_eq!(names, ["MINOR_SHMEM", "WP_ASYNC", "MOVE"]);
}

#[test]
fn adopted_fd_learns_negotiated_features_from_fdinfo() {
    let wanted = Features::EVENT_REMOVE | Features::THREAD_ID | Features::MOVE;
    let uffd = Uffd::open(wanted).expect("open");
    let dup: OwnedFd = uffd.as_fd().try_clone_to_owned().expect("dup");
    let adopted = Uffd::from_fd(dup).expect("adopt");
    assert_eq!(adopted.features(), wanted);
    assert_eq!(adopted.open_path(), OpenPath::Adopted);
}

#[test]
fn adopting_a_non_uffd_fails_clearly() {
    let file: OwnedFd = std::fs::File::open("/proc/self/status")
        .expect("open")
        .into();
    let err = Uffd::from_fd(file).expect_err("a file is no userfaultfd");
    assert!(err.to_string().contains("not a userfaultfd"), "{err}");
    // A userfaultfd that never went through UFFDIO_API is refused too, as documented (it
    // was adopted with no features, and every call on it then failed with EINVAL).
    let fresh = Uffd::builder().open_unnegotiated().expect("open");
    let err = Uffd::from_fd(fresh.into_fd()).expect_err("not negotiated");
    assert!(err.to_string().contains("UFFDIO_API"), "{err}");
}

#[test]
fn raw_api_on_a_fresh_uffd_lists_all_supported_features() {
    let mut fresh = Uffd::builder().open_unnegotiated().expect("open");
    let info = fresh.api(sys::UFFD_API, Features::empty()).expect("api");
    assert!(
        info.features.contains(Features::all_named()),
        "{:?}",
        info.features
    );
}

#[test]
fn an_adopted_blocking_fd_can_be_made_non_blocking_for_poll() {
    let uffd = Uffd::builder().open().expect("open blocking");
    assert!(
        matches!(
            uffd.wait_readable(Some(std::time::Duration::ZERO)),
            Err(uffd_core::Error::InvalidArgument { .. })
        ),
        "the kernel refuses poll on a blocking uffd"
    );
    let adopted = Uffd::from_fd(uffd.into_fd()).expect("adopt");
    adopted.set_non_blocking(true).expect("set O_NONBLOCK");
    assert!(!adopted
        .wait_readable(Some(std::time::Duration::ZERO))
        .expect("poll"));
    adopted.set_non_blocking(false).expect("clear O_NONBLOCK");
    assert!(adopted
        .wait_readable(Some(std::time::Duration::ZERO))
        .is_err());
}
