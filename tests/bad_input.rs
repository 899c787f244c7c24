//! Bad input changes nothing. Every writable attribute of the tree (the
//! kernel's and twinpage's own) gets out-of-range, negative, non-numeric,
//! huge, empty, whitespace-only and trailing-garbage values through all
//! three ways in (the engine API, a plain write to the file as `echo`
//! does, `twinpage set`'s library call): each is refused with the errno
//! mm/ksm.c gives for that attribute and the value reads back unchanged,
//! while what sysfs accepts (a trailing newline, kstrtobool's first-letter
//! rule) is accepted. Malformed `TWINPAGE_*` variables stop twinpage with a
//! message naming the variable: a preloaded program runs on without
//! twinpage (no tree entry, no merging), twinpaged exits before it creates
//! anything.
//!
//! Expected errors, from mm/ksm.c (Linux 6.18): the `_store` functions of
//! `run`, `pages_to_scan`, `sleep_millisecs`,
//! `stable_node_chains_prune_millisecs`, `use_zero_pages`, `smart_scan`,
//! `advisor_*` turn every parse error into `-EINVAL`; `max_page_sharing`
//! (`kstrtoint`) and `merge_across_nodes` (`kstrtoul`) return the parse
//! error itself, so a number that does not fit is `-ERANGE`; booleans go
//! through `kstrtobool`, which looks only at the first one or two bytes
//! (`"1abc"` is true, `" 1"` is `-EINVAL`); a zero-length `write(2)` never
//! reaches the store function and changes nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{engine, preload_lib, program, tempdir};
use kernel_compat::WriteError::{self, Inval, Range};
use twinpage::statsfs::{SetError, SetOutcome, StatsTree, StatsTreeOptions, Tree};

const HUGE: [&str; 3] = ["18446744073709551616", "1000000000000000000000000000000", "99999999999999999999999"];
const NEGATIVE: [&str; 3] = ["-1", "-5", "-18446744073709551616"];
const NON_NUMERIC: [&str; 4] = ["abc", "xyz", "0x10", "1e3"];
const WHITESPACE: [&str; 5] = [" ", "   ", "\t", "\n", " \n"];
const TRAILING: [&str; 6] = ["12abc", "12 ", "12\n\n", " 12", "12\t", "+ 12"];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// Every parse error is EINVAL.
    Number,
    /// The parse error goes out as is (ERANGE for a number that does not fit).
    RawNumber,
    /// kstrtobool.
    Bool,
    /// One of a few words (sysfs_streq).
    Choice,
}

fn kind(name: &str) -> Kind {
    match name {
        "max_page_sharing" | "merge_across_nodes" => Kind::RawNumber,
        "use_zero_pages" | "smart_scan" => Kind::Bool,
        "advisor_mode" | "twinpage_merge_mode" => Kind::Choice,
        _ => Kind::Number,
    }
}

/// Values out of the attribute's range (EINVAL), beyond what does not parse.
fn out_of_range(name: &str) -> Vec<&'static str> {
    match name {
        "run" => vec!["3", "4294967295"],
        "max_page_sharing" => vec!["1", "0", "-2147483648"],
        "merge_across_nodes" => vec!["2"],
        "advisor_target_scan_time" => vec!["0"],
        "use_zero_pages" | "smart_scan" => vec!["2", "9"],
        "pages_to_scan" | "sleep_millisecs" | "stable_node_chains_prune_millisecs" => vec!["4294967296"],
        "advisor_mode" => vec!["scan_time", "[none] scan-time", "None"],
        "twinpage_merge_mode" => vec!["zero_only", "[all] zero-only off", "ALL", "zero"],
        // advisor_max_cpu and the advisor's page counts take any unsigned long.
        _ => vec![],
    }
}

/// A valid value other than the default, written with echo's newline.
fn valid(name: &str) -> &'static str {
    match name {
        "run" => "0\n",
        "pages_to_scan" => "1234\n",
        "sleep_millisecs" => "33\n",
        "stable_node_chains_prune_millisecs" => "1500\n",
        "use_zero_pages" => "1\n",
        "smart_scan" => "0\n",
        "max_page_sharing" => "300\n",
        "merge_across_nodes" => "0\n",
        "advisor_mode" => "none\n",
        "advisor_max_cpu" => "50\n",
        "advisor_min_pages_to_scan" => "400\n",
        "advisor_max_pages_to_scan" => "20000\n",
        "advisor_target_scan_time" => "100\n",
        "twinpage_merge_mode" => "zero-only\n",
        other => panic!("no valid value known for {other}: add it here"),
    }
}

/// What the kernel does with `input` written to `name`: the errno, or
/// `Ok(Some(shown))` (accepted, reads back as `shown`).
fn expected(name: &str, input: &str) -> Result<Option<&'static str>, WriteError> {
    let overflow = HUGE.contains(&input) || (name == "max_page_sharing" && input == "-18446744073709551616");
    match kind(name) {
        Kind::Number | Kind::Choice => Err(Inval),
        Kind::RawNumber if overflow => Err(Range),
        Kind::RawNumber => Err(Inval),
        // kstrtobool: the first byte decides (`o` + `n`/`f` is not among the inputs).
        Kind::Bool => match input.as_bytes().first() {
            Some(b'1' | b'y' | b'Y' | b't' | b'T' | b'e' | b'E') => Ok(Some("1")),
            Some(b'0' | b'n' | b'N' | b'f' | b'F' | b'd' | b'D') => Ok(Some("0")),
            _ => Err(Inval),
        },
    }
}

fn bad_inputs(name: &str) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = out_of_range(name);
    for set in [&HUGE[..], &NEGATIVE, &NON_NUMERIC, &WHITESPACE, &TRAILING] {
        v.extend_from_slice(set);
    }
    v
}

fn ksm_file(root: &Path, name: &str) -> std::path::PathBuf {
    root.join("kernel/mm/ksm").join(name)
}

#[test]
fn every_writable_attribute_refuses_bad_values_and_keeps_its_value() {
    let Some(e) = engine() else { return };
    let e = Arc::new(e);
    let root = tempdir("bad-attrs");
    let h = StatsTree::spawn(e.clone(), root.clone(), StatsTreeOptions::default()).unwrap();
    let tree = Tree::at(&root);
    let names: Vec<&'static str> =
        twinpage::tunables::all_attrs().filter(|a| a.writable && e.show_attr(a.name).is_some()).map(|a| a.name).collect();
    assert!(names.contains(&"twinpage_merge_mode") && names.len() >= 13, "{names:?}");
    let pass = || assert!(h.publish_now() && h.publish_now());
    let errors = || tree.last_error().unwrap().map_or(0, |r| r.seq);
    let mut writes = 0;

    for &name in &names {
        for input in bad_inputs(name) {
            let want = expected(name, input);
            let before = e.show_attr(name).unwrap();
            let file_before = std::fs::read(ksm_file(&root, name)).unwrap();
            // Booleans accept some of these (first letter): start from the other value.
            let reset = |v: &str| e.set_attr(name, v).unwrap();
            if let Ok(Some(shown)) = want {
                reset(if shown == "1" { "0" } else { "1" });
                pass();
            }
            let before = if want.is_ok() { e.show_attr(name).unwrap() } else { before };

            // 1. The engine API.
            let got = e.set_attr(name, input);
            match want {
                Err(err) => {
                    assert_eq!(got, Err(err), "set_attr({name}, {input:?})");
                    assert_eq!(e.show_attr(name).unwrap(), before, "{name} changed by refused {input:?}");
                }
                Ok(Some(shown)) => {
                    assert_eq!(got, Ok(()), "set_attr({name}, {input:?}) (sysfs accepts it)");
                    assert_eq!(e.show_attr(name).unwrap(), shown);
                    reset(&before);
                }
                Ok(None) => unreachable!(),
            }
            pass();

            // 2. A plain write to the file, as `echo -n` or a program does.
            let seq = errors();
            std::fs::write(ksm_file(&root, name), input).unwrap();
            pass();
            let after = std::fs::read_to_string(ksm_file(&root, name)).unwrap();
            match want {
                Err(err) => {
                    assert_eq!(after.as_bytes(), &file_before[..], "{name}: file after refused {input:?}");
                    assert_eq!(e.show_attr(name).unwrap(), before, "{name} changed by refused {input:?} in the file");
                    let r = tree.last_error().unwrap().expect("a refusal is recorded");
                    assert!(
                        r.seq > seq && r.attr == name && r.error == err,
                        "{name} {input:?}: {r:?}; file {after:?}; shared {:?}",
                        std::fs::read_to_string(root.join("twinpage/tunables")).unwrap_or_default().lines().find(|l| l.starts_with(name))
                    );
                }
                Ok(Some(shown)) => {
                    assert_eq!(after, format!("{shown}\n"), "{name} {input:?}");
                    assert_eq!(errors(), seq, "{name} {input:?} refused though sysfs accepts it");
                    reset(&before);
                    pass();
                }
                Ok(None) => unreachable!(),
            }

            // 3. `twinpage set` (checks, writes, waits for the publisher).
            match (tree.set(name, input.as_bytes(), Duration::from_secs(5)), want) {
                (Err(SetError::Refused(got)), Err(err)) => assert_eq!(got, err, "twinpage set {name} {input:?}"),
                (Ok(SetOutcome::Applied { after, .. }), Ok(Some(shown))) => {
                    assert_eq!(after, shown);
                    reset(&before);
                    pass();
                }
                (other, want) => panic!("twinpage set {name} {input:?}: {other:?}, want {want:?}"),
            }
            assert_eq!(e.show_attr(name).unwrap(), before, "{name} after {input:?}");
            writes += 3;
        }

        // Empty: the store says EINVAL, but a zero-length write(2) never
        // reaches it, so the file and `twinpage set` change nothing and
        // refuse nothing.
        let before = e.show_attr(name).unwrap();
        assert_eq!(e.set_attr(name, ""), Err(Inval), "{name}: empty to the store");
        let seq = errors();
        std::fs::write(ksm_file(&root, name), "").unwrap();
        let shows = || std::fs::read_to_string(ksm_file(&root, name)).unwrap();
        let back = common::wait_until(Duration::from_secs(5), || {
            h.kick();
            shows() == format!("{before}\n")
        });
        assert!(back, "{name}: after an empty write the file shows {:?}", shows());
        assert_eq!(errors(), seq, "{name}: empty write refused");
        assert!(matches!(tree.set(name, b"", Duration::from_secs(5)), Ok(SetOutcome::Unchanged)));
        assert_eq!(e.show_attr(name).unwrap(), before);

        // What sysfs accepts is accepted: a value with echo's newline.
        let v = valid(name);
        std::fs::write(ksm_file(&root, name), v).unwrap();
        pass();
        let shown = std::fs::read_to_string(ksm_file(&root, name)).unwrap();
        let word = v.trim_end();
        assert!(shown == format!("{word}\n") || shown.contains(&format!("[{word}]")), "{name}: {v:?} shows {shown:?}");
        assert_eq!(errors(), seq, "{name}: {v:?} refused");
        let text =
            if before.contains('[') { before.split('[').nth(1).unwrap().split(']').next().unwrap().to_string() } else { before.clone() };
        e.set_attr(name, &text).unwrap();
        pass();
        writes += 5;
    }
    println!("{writes} writes to {} attributes: every refusal as the kernel's, nothing changed", names.len());
    drop(h);
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs tests/programs/twin.c preloaded with `vars`; returns its stderr and
/// whether twinpage published anything for it.
fn preloaded_twin(lib: &Path, prog: &Path, root: &Path, vars: &[(&str, &std::ffi::OsStr)]) -> (String, bool) {
    let mut cmd = Command::new(prog);
    cmd.args(["5", "64", "16", "0"])
        .env("LD_PRELOAD", lib)
        .env("TWINPAGE_DIR", root)
        .env("TWINPAGE_PAGES_TO_SCAN", "100000")
        .env("TWINPAGE_SLEEP_MILLISECS", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut c = cmd.spawn().unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("READY"), "the program must run: {line:?}");
    // Long enough for an enabled twinpage to publish and merge.
    std::thread::sleep(Duration::from_millis(300));
    let published = root.join(format!("proc/{}", c.id())).exists();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    line.clear();
    out.read_line(&mut line).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success() && line.starts_with("VERIFY OK"), "{line:?} {}", out.status);
    (String::from_utf8_lossy(&out.stderr).into_owned(), published)
}

fn malformed_env() -> Vec<(&'static str, std::ffi::OsString)> {
    use std::os::unix::ffi::OsStringExt;
    let s = |v: &str| std::ffi::OsString::from(v);
    vec![
        ("TWINPAGE_DIR", s("relative/dir")),
        ("TWINPAGE_DIR", s("")),
        ("TWINPAGE_SOCKET", s("twinpaged.sock")),
        ("TWINPAGE_DOMAIN", s("uid:0")),
        ("TWINPAGE_DOMAIN", s("")),
        ("TWINPAGE_DOMAIN", s(&"a".repeat(65))),
        ("TWINPAGE_LOG", s("loud")),
        ("TWINPAGE_PASS_MERGEABLE", s("2")),
        ("TWINPAGE_MERGE_ANY", s("maybe")),
        ("TWINPAGE_REDIRECT_SYSFS", s("")),
        ("TWINPAGE_RUN", s("3")),
        ("TWINPAGE_RUN", s("")),
        ("TWINPAGE_PAGES_TO_SCAN", s("lots")),
        ("TWINPAGE_PAGES_TO_SCAN", s("-1")),
        ("TWINPAGE_SLEEP_MILLISECS", s("18446744073709551616")),
        ("TWINPAGE_MAX_PAGE_SHARING", s("1")),
        ("TWINPAGE_USE_ZERO_PAGES", s(" 1")),
        ("TWINPAGE_ADVISOR_MODE", s("auto")),
        ("TWINPAGE_TWINPAGE_MERGE_MODE", s("zero")),
        ("TWINPAGE_PAGES_SHARED", s("1")),
        ("TWINPAGE_TYPO", s("1")),
        ("TWINPAGE_PAGES_TO_SCAN", std::ffi::OsString::from_vec(vec![0xff, 0x31])),
    ]
}

#[test]
fn a_malformed_variable_disables_the_preload_and_the_program_runs_on() {
    let (Some(lib), Some(prog)) = (preload_lib(), program("twin")) else { return };
    if !common::have_uffd() {
        return;
    }
    let root = tempdir("bad-env");
    // The control: well-formed, twinpage publishes the process.
    let (err, published) = preloaded_twin(&lib, &prog, &root, &[]);
    assert!(published, "control run not published: {err}");
    for (var, value) in malformed_env() {
        let (err, published) = preloaded_twin(&lib, &prog, &root, &[(var, &value)]);
        let line = format!("twinpage: invalid environment: {var}");
        assert!(err.contains(&line), "{var}={value:?}: stderr {err:?}");
        assert!(err.contains("twinpage is disabled and the program runs without it"), "{err:?}");
        assert_eq!(err.lines().count(), 1, "one message: {err:?}");
        assert!(!published, "{var}={value:?}: twinpage ran anyway");
    }
    println!("{} malformed variables: each named in one line, twinpage off, the program verified its memory", malformed_env().len());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_malformed_variable_stops_twinpaged_before_it_creates_anything() {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/twinpaged");
    if !common::require(bin.exists(), "target/release/twinpaged") {
        return;
    }
    let root = tempdir("bad-env-daemon");
    let dir = root.join("tree");
    for (var, value) in malformed_env() {
        let mut cmd = Command::new(&bin);
        cmd.env_clear().env("PATH", "/usr/bin:/bin");
        if var != "TWINPAGE_DIR" {
            cmd.arg("--dir").arg(&dir);
        }
        let out = cmd.env(var, &value).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value:?}: {err}");
        assert!(err.starts_with(&format!("twinpaged: invalid environment: {var}")), "{var}={value:?}: {err:?}");
        assert!(!dir.exists(), "{var}={value:?}: twinpaged created {}", dir.display());
    }
    let d = dir.to_str().unwrap();
    for args in [
        &["--dir", "relative"][..],
        &["--dir", d, "--socket", "rel.sock"],
        &["--dir", d, "--socket-mode", "999"],
        &["--dir", d, "--socket-mode", "rw"],
        &["--dir", d, "--bogus"],
    ] {
        let out = Command::new(&bin).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
        assert!(!dir.exists(), "{args:?}: twinpaged created {}", dir.display());
    }
    let _ = std::fs::remove_dir_all(&root);
}
