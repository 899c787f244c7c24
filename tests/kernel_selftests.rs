//! The kernel's own KSM selftest, unchanged: `ksm_tests` of Linux 6.1
//! (`tools/testing/selftests/vm/ksm_tests.c`, from Debian's linux-source-6.1,
//! built by scripts/kselftest.sh as the selftests' Makefile builds it). Every
//! case its `run_vmtests.sh` runs, and its timed ones, on kernel KSM and then
//! on twinpage, alone and through twinpaged (`TWINPAGE_REDIRECT_SYSFS=1`, so
//! the program's reads and writes of `/sys/kernel/mm/ksm` reach twinpage):
//! each case must end as it ends on the kernel (0 passed, 4 skipped).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::kernel_ksm::{kernel_ksm_writable, ksm_read, ksm_write, KernelKsm};
use common::procs::{daemon_bin, start_daemon, Kids};
use common::{have_uffd, preload_lib, require, tempdir};

/// The cases, as run_vmtests.sh and the timing runs give them.
const CASES: &[&[&str]] = &[
    &["-M", "-p", "10"],
    &["-M", "-p", "10", "-a", "r"],
    &["-M", "-p", "10", "-a", "rwx"],
    &["-U"],
    &["-Z", "-p", "10", "-z", "0"],
    &["-Z", "-p", "10", "-z", "1"],
    &["-N", "-m", "1"],
    &["-N", "-m", "0"],
    &["-P", "-s", "100"],
    &["-H", "-s", "100"],
    &["-C"],
];

/// kselftest's exit codes.
const KSFT_PASS: i32 = 0;
const KSFT_SKIP: i32 = 4;

fn ksm_tests() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kselftest/ksm_tests");
    require(p.exists(), &format!("{} (scripts/kselftest.sh builds it)", p.display())).then_some(p)
}

/// A case's exit code and its last line (the verdict, or the timing).
fn outcome(o: &Output) -> (i32, String) {
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code().unwrap_or(-1), text.lines().last().unwrap_or("").trim().to_string())
}

#[test]
fn ksm_tests_cases_end_as_on_the_kernel_alone_and_through_twinpaged() {
    let (Some(bin), Some(lib), Some(daemon)) = (ksm_tests(), preload_lib(), daemon_bin()) else { return };
    if !(have_uffd() && require(kernel_ksm_writable(), "root and a writable /sys/kernel/mm/ksm (the oracle)")) {
        return;
    }
    // Puts the host's settings back at the end.
    let _k = KernelKsm::flat_out();
    let kernel: Vec<_> = CASES.iter().map(|args| outcome(&Command::new(&bin).args(*args).output().unwrap())).collect();
    // ksmd stays off while twinpage runs the cases: with `run=0` (which a
    // case saves and writes back; `run=2` would reset `full_scans`), a case
    // that reached the kernel's files would leave `full_scans` moved.
    ksm_write("run", "0");

    let mut twin = Vec::new();
    for through_daemon in [false, true] {
        let dir = tempdir(if through_daemon { "kselftest-daemon" } else { "kselftest" });
        let _kids = Kids(if through_daemon { vec![start_daemon(&daemon, &dir, &[], "warn")] } else { vec![] });
        let scans = ksm_read("full_scans");
        let side: Vec<_> = CASES
            .iter()
            .map(|args| {
                let out = Command::new(&bin)
                    .args(*args)
                    .env("LD_PRELOAD", &lib)
                    .env("TWINPAGE_REDIRECT_SYSFS", "1")
                    .env("TWINPAGE_DIR", &dir)
                    .output();
                outcome(&out.unwrap())
            })
            .collect();
        // Had a write of `run=1` reached the kernel, ksmd would have scanned.
        assert_eq!(ksm_read("full_scans"), scans, "a case reached the kernel's KSM, not twinpage's");
        twin.push(side);
        let _ = std::fs::remove_dir_all(&dir);
    }

    eprintln!("{:<22} {:<44} {:<44} through twinpaged", "ksm_tests", "kernel", "twinpage");
    for (i, args) in CASES.iter().enumerate() {
        let show = |(code, last): &(i32, String)| format!("{code} {last}");
        eprintln!("{:<22} {:<44} {:<44} {}", args.join(" "), show(&kernel[i]), show(&twin[0][i]), show(&twin[1][i]));
    }
    for (i, args) in CASES.iter().enumerate() {
        let k = kernel[i].0;
        assert!(k == KSFT_PASS || k == KSFT_SKIP, "the oracle itself: ksm_tests {} ended {k} on the kernel", args.join(" "));
        for (side, name) in twin.iter().zip(["twinpage", "twinpage through twinpaged"]) {
            assert_eq!(side[i].0, k, "ksm_tests {} under {name}: {}", args.join(" "), side[i].1);
        }
    }
}
