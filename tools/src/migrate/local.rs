//! `uffdkit migrate local`: both ends as two processes over loopback, and the figures.

use uffd_core::private_fs::TempDir;

use super::*;

/// A child process started through it is killed on a termination signal.
type Spawn<'a> = &'a dyn Fn(&mut Command) -> std::io::Result<std::process::Child>;

/// Starts `uffdkit migrate dest` for `local` (through `spawn`); returns it and its
/// listening address.
fn start_dest(
    a: &LocalArgs,
    security: &SecurityArgs,
    listen: &str,
    spawn: Spawn<'_>,
) -> Result<(
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
)> {
    let s = &a.shape;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["migrate", "dest", "--json", "--listen", listen])
        .args(["--mode", &format!("{:?}", a.mode).to_lowercase()])
        // Two live bars on one terminal would tear each other: the children print lines.
        .args(["--progress", "lines"])
        .args(["--workload", &format!("{:?}", s.workload).to_lowercase()])
        .args(s.liveness.args())
        .args(security.to_args())
        .stdout(Stdio::piped());
    if s.page_size() == HUGE_PAGE_SIZE {
        cmd.args([
            "--reserve-hugepages",
            &s.size.div_ceil(HUGE_PAGE_SIZE).to_string(),
        ]);
    }
    let mut dest = spawn(&mut cmd).context("start the destination")?;
    let mut out = BufReader::new(dest.stdout.take().context("dest stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    match line.trim().strip_prefix("LISTEN ") {
        Some(addr) => Ok((dest, out, addr.to_string())),
        None => {
            let _ = dest.kill();
            let _ = dest.wait();
            bail!("the destination did not start: {line:?}")
        }
    }
}

pub(super) fn local(a: &LocalArgs) -> Result<()> {
    // mkdtemp: a fresh 0700 directory of an unguessable name, so no other user can
    // pre-create it, plant links in it, or reach the key and the socket in it.
    let tmp = TempDir::new("uffdkit-migrate-").context("create a temporary directory")?;
    let dir = tmp.path();
    // Before any thread: SIGTERM, SIGINT or SIGHUP ends both children (SIGKILL: the run
    // is abandoned) and removes the key with the directory. A child is started and its pid
    // recorded under the lock the cleanup holds to the end, so none is started unseen (a
    // pid stays ours until we wait for the child, which we do only after).
    let children = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let (ours, scratch) = (children.clone(), dir.to_path_buf());
    crate::signals::on_termination(move |_| {
        let pids = ours.lock().unwrap_or_else(|p| p.into_inner());
        for &pid in pids.iter() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&scratch);
        std::mem::forget(pids); // held until the exit that follows: no child after this
    })?;
    let spawn = |cmd: &mut Command| {
        let mut pids = children.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        pids.push(child.id());
        Ok(child)
    };
    // Waits for a child to exit, then forgets its pid and reaps it under that lock: once
    // reaped, its pid may name another process, which the cleanup must never kill.
    let reap = |child: &mut std::process::Child| -> Result<std::process::ExitStatus> {
        use nix::sys::wait::{waitid, Id, WaitPidFlag};
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)?;
        let mut pids = children.lock().unwrap_or_else(|p| p.into_inner());
        pids.retain(|&p| p != child.id());
        Ok(child.wait()?)
    };
    let (listener, opener) = match a.tls {
        Some(AutoTls::Auto) => crate::link_args::throwaway(dir)?,
        None => {
            let (mut file, name) = tmp.dir().create_temp("key.")?;
            file.write_all(&transport::key::nonce()?)?;
            let key_file = dir.join(name);
            let psk = SecurityArgs {
                key_file: Some(key_file),
                ..SecurityArgs::default()
            };
            (psk.clone(), psk)
        }
    };
    let listen = match a.via.as_str() {
        "unix" => format!("unix:{}", dir.join("sock").display()),
        _ => "127.0.0.1:0".to_string(),
    };
    let started = Instant::now();
    let (mut dest, mut dest_out, addr) = start_dest(a, &listener, &listen, &spawn)?;
    let s = &a.shape;
    let mut source = spawn(
        Command::new(std::env::current_exe()?)
            .args(["migrate", "source", "--json", "--connect", &addr])
            .args(["--progress", "lines"])
            .args(["--size", &s.size.to_string()])
            .args(["--workload", &format!("{:?}", s.workload).to_lowercase()])
            .args(["--precopy-rounds", &s.precopy_rounds.to_string()])
            .args(["--page-size", &s.page_size])
            .args(["--dirty-rate", &s.dirty_rate.to_string()])
            .args(["--source-memory", &s.source_memory])
            .args(s.liveness.args())
            .args(opener.to_args())
            .stdout(Stdio::piped())
            // Its messages (progress, the error that ended it) are the user's to read.
            .stderr(Stdio::inherit()),
    )
    .context("start the source")?;
    let mut source_json = Vec::new();
    let mut source_out = source.stdout.take().context("source stdout")?;
    std::io::Read::read_to_end(&mut source_out, &mut source_json).context("run the source")?;
    let source_status = reap(&mut source).context("run the source")?;
    if !source_status.success() {
        // Not left to wait out its give-up bound for a source that is gone.
        let _ = dest.kill();
    }
    let mut dest_json = String::new();
    std::io::Read::read_to_string(&mut dest_out, &mut dest_json)?;
    let dest_status = reap(&mut dest)?;
    let wall = started.elapsed();
    drop(tmp);
    if !source_status.success() || !dest_status.success() {
        bail!(
            "migration failed (source {source_status}, destination {dest_status}); see the \
             messages above"
        );
    }
    let src: serde_json::Value = serde_json::from_slice(&source_json).context("source report")?;
    let dst: serde_json::Value = serde_json::from_str(dest_json.trim()).context("dest report")?;
    if a.json {
        let all = json!({
            "wall_ms": wall.as_secs_f64() * 1e3,
            "stop_to_resume_ms": stop_to_resume_ms(&src, &dst),
            "source": src,
            "dest": dst,
        });
        println!("{all}");
        return Ok(());
    }
    print_local(a, &src, &dst, wall);
    Ok(())
}

/// From the source's workload stopping to the destination's resuming, in ms, by the host's
/// monotonic clock (both processes run here): the downtime the workload sees, without the
/// acknowledgement's way back that `downtime_ms` includes. `None` if either is missing.
fn stop_to_resume_ms(src: &serde_json::Value, dst: &serde_json::Value) -> Option<f64> {
    let (stopped, resumed) = (
        src["stopped_at_ns"].as_u64()?,
        dst["resumed_at_ns"].as_u64()?,
    );
    (stopped > 0 && resumed >= stopped).then(|| (resumed - stopped) as f64 / 1e6)
}

fn print_local(a: &LocalArgs, src: &serde_json::Value, dst: &serde_json::Value, wall: Duration) {
    let s = &a.shape;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mib_of = |v: &serde_json::Value, k: &str| f(v, k) / f64::from(1u32 << 20);
    let link = match a.tls {
        Some(AutoTls::Auto) => "TLS 1.3 (throwaway CA)",
        None => "plaintext with a pre-shared key",
    };
    println!(
        "migrate local: {} MiB, {} pages of {} bytes, workload {:?}, via {} ({link}), destination mode {:?}",
        s.size >> 20,
        src["pages"],
        src["page_size"],
        s.workload,
        a.via,
        a.mode
    );
    let rounds = src["rounds"].as_array().map(|r| {
        r.iter()
            .map(|x| format!("{}/{}", x["pages"], x["dirty_after"]))
            .collect::<Vec<_>>()
            .join(", ")
    });
    println!(
        "  precopy rounds (pages sent / dirty after): {}; switch: {}",
        rounds.unwrap_or_default(),
        src["switch_reason"].as_str().unwrap_or("?")
    );
    println!(
        "  total {:.0} ms (wall, both processes {:.0} ms); downtime (stop → RUN acknowledged) {:.1} ms, stop → resumed at the destination {:.1} ms; postcopy {:.0} ms",
        f(src, "total_ms"),
        wall.as_secs_f64() * 1e3,
        f(src, "downtime_ms"),
        stop_to_resume_ms(src, dst).unwrap_or(f64::NAN),
        f(src, "postcopy_ms")
    );
    let sw = &src["switch"];
    let dsw = &dst["switch"];
    println!(
        "  switch (ms): before the stop: DISCARD {:.2}; downtime: stop {:.2}, last scan {:.2} (source memory {}: {:.0} MiB mapped huge), DISCARD sent {:.2}, LISTEN round trip {:.2} (destination: DISCARD applied {:.2}, pager started {:.2}), RUN round trip {:.2} (destination's embedder {:.2})",
        f(sw, "early_discard_ms"),
        f(sw, "stop_ms"),
        f(sw, "scan_ms"),
        src["source_memory"].as_str().unwrap_or("?"),
        mib_of(src, "huge_mapped_at_stop"),
        f(sw, "discard_ms"),
        f(sw, "listen_ms"),
        f(dsw, "discard_ms"),
        f(dsw, "listen_ms"),
        f(sw, "run_ms"),
        f(dsw, "run_ms")
    );
    println!(
        "  bytes: precopy {:.1} MiB, postcopy {:.1} MiB; discarded {} pages; needed at switch {}",
        mib_of(src, "precopy_bytes"),
        mib_of(src, "postcopy_bytes"),
        src["discarded"],
        src["needed_at_switch"]
    );
    println!(
        "  requested pages {} ({} requests answered with {} pages), stream pages {}; blocktime {:.1} ms; fault latency (read → placed) p50 {}, p99 {}",
        dst["requested"],
        src["requests"],
        src["urgent_pages"],
        src["stream_pages"],
        f(dst, "blocktime_ms"),
        us_or_none(&dst["fault_p50_us"]),
        us_or_none(&dst["fault_p99_us"])
    );
    let kinds = &dst["faults_by_kind"];
    println!(
        "  destination faults {}: wake-only {}, requested {}, already in flight {}, zero page or other {}",
        dst["faults"],
        kinds["wake_only"],
        kinds["requested"],
        kinds["in_flight"],
        kinds["zero_or_other"]
    );
    if let Some(b) = dst["latency_buckets_log2_us"].as_array() {
        let counts: Vec<u64> = b.iter().map(|v| v.as_u64().unwrap_or(0)).collect();
        let histogram = pager::LatencyHistogram::from_counts(&counts, Duration::ZERO);
        for line in histogram.lines() {
            println!("    {line}");
        }
    }
    println!(
        "  destination workload touched every page in {:.0} ms from RUN; reconnects {}; {} of {} pages verified: {}",
        f(dst, "workload_ms"),
        src["reconnects"],
        src["verified"],
        src["pages"],
        dst["verdict"].as_str().unwrap_or("?")
    );
}
