//! Finding 4: temporary directories and scratch files at names another user can guess.

use super::*;

/// Finding 4: `migrate local` used `$TMPDIR/uffdkit-migrate-<pid>` and accepted an
/// existing one: a planted `key` link made root overwrite a file of root's with the key.
#[test]
fn migrate_local_never_uses_a_directory_another_user_planted() {
    let Some(s) = Scene::new("migrate_local_never_uses_a_directory_another_user_planted") else {
        return;
    };
    let gate = s.path("gate");
    let tmp = s.path("shared");
    let proc = gated(
        &gate,
        &[("TMPDIR", &tmp)],
        &["migrate", "local", "--size", "4M", "--via", "unix"],
    );
    let planted = s.shared(&format!("uffdkit-migrate-{}", proc.pid()));
    let victim = s.victim("file");
    attacker::as_nobody(|| {
        mkdir(&planted, 0o777)?;
        symlink(&victim, &planted.join("key"))
    });
    let before = s.outside();
    open_gate(&gate);
    let f = ok(proc.finish());
    assert!(f.stdout.contains("verified"), "{}", f.text());
    assert_eq!(s.outside(), before, "root changed a file outside its own");
    let left: Vec<_> = std::fs::read_dir(&planted).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "root used the planted directory: {left:?}");
}

/// Finding 4: `restore`'s eager baseline downloaded into
/// `$TMPDIR/uffdkit-download-<pid>/image`, through a link planted there.
#[test]
fn the_download_baseline_never_writes_through_a_planted_link() {
    let Some(s) = Scene::new("the_download_baseline_never_writes_through_a_planted_link") else {
        return;
    };
    s.push();
    let gate = s.path("gate");
    let (tmp, url, raw) = (s.path("shared"), s.url(), s.path("raw"));
    let proc = gated(
        &gate,
        &[("TMPDIR", &tmp)],
        &[
            "restore",
            "--image",
            &url,
            "--reference",
            raw.to_str().unwrap(),
            "--strategy",
            "eager",
            "--touch",
            "0.5",
            "--no-cache",
        ],
    );
    let planted = s.shared(&format!("uffdkit-download-{}", proc.pid()));
    let victim = s.victim("file");
    attacker::as_nobody(|| {
        mkdir(&planted, 0o777)?;
        symlink(&victim, &planted.join("image"))
    });
    let before = s.outside();
    open_gate(&gate);
    ok(proc.finish());
    assert_eq!(s.outside(), before, "root changed a file outside its own");
}

/// Finding 4: `snapshot chain` wrote `<work-dir>/uffdkit-snapshot-<pid>-base.raw` with
/// `File::create`, through a link planted at that name in a shared directory.
#[test]
fn snapshot_chain_never_writes_through_a_planted_scratch_name() {
    let Some(s) = Scene::new("snapshot_chain_never_writes_through_a_planted_scratch_name") else {
        return;
    };
    let gate = s.path("gate");
    let (work, url) = (s.path("shared"), s.url());
    let proc = gated(
        &gate,
        &[],
        &[
            "snapshot",
            "chain",
            "--size",
            "4M",
            "--layers",
            "1",
            "--interval",
            "0.1",
            "--chunk-kib",
            "64",
            "--url",
            &url,
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    let pid = proc.pid();
    let victim = s.victim("file");
    attacker::as_nobody(|| {
        for what in ["base", "full"] {
            symlink(
                &victim,
                &work.join(format!("uffdkit-snapshot-{pid}-{what}.raw")),
            )?;
        }
        Ok(())
    });
    let before: Vec<_> = s
        .outside()
        .into_iter()
        .filter(|(p, _)| !p.starts_with(s.path("store")))
        .collect();
    open_gate(&gate);
    ok(proc.finish());
    let after: Vec<_> = s
        .outside()
        .into_iter()
        .filter(|(p, _)| !p.starts_with(s.path("store")))
        .collect();
    assert_eq!(after, before, "root changed a file outside its own");
}
