//! Configuration from the environment (`TWINPAGE_*`), one parser for the
//! preload and `twinpaged`. Every variable with the prefix is checked; a
//! malformed one is an error naming it (the preload then disables twinpage
//! and the program runs as without it; `twinpaged` exits with status 2).

use std::path::PathBuf;

use kernel_compat::parse;

/// What the environment asked for.
#[derive(Debug, Clone)]
pub struct Config {
    /// `TWINPAGE_DIR`: the stats tree root.
    pub dir: PathBuf,
    /// `TWINPAGE_SOCKET`: the daemon's socket (default
    /// `$TWINPAGE_DIR/twinpaged.sock`); `off`: never use a daemon.
    pub socket: Option<PathBuf>,
    /// `TWINPAGE_LOG`: log filter (error, warn, info, debug, trace, off).
    pub log: String,
    /// `TWINPAGE_PASS_MERGEABLE`: also pass MADV_MERGEABLE to the kernel.
    pub pass_mergeable: bool,
    /// `TWINPAGE_MERGE_ANY`: PR_SET_MEMORY_MERGE was in force before exec.
    pub merge_any: bool,
    /// `TWINPAGE_REDIRECT_SYSFS`: reserved for the sysfs redirect mode.
    pub redirect_sysfs: bool,
    /// `TWINPAGE_DOMAIN`: sharing domain for the daemon.
    pub domain: Option<String>,
    /// `TWINPAGE_STORE_DIR`: a tmpfs directory for the store instead of a
    /// memfd (size-limited by the mount).
    pub store_dir: Option<PathBuf>,
    /// `TWINPAGE_<ATTR>`: initial tunables, in the order given.
    pub tunables: Vec<(String, String)>,
    /// The tunables those variables settle for this process: the ones
    /// given and the ones their writes changed as a side effect
    /// (`advisor_mode` sets `pages_to_scan`). A process joining a stats
    /// tree publishes these instead of adopting the tree's.
    pub explicit: Vec<String>,
}

fn flag(name: &str, v: &str) -> Result<bool, String> {
    parse::kstrtobool(v).map_err(|_| format!("{name}={v:?} is not a boolean (use 0 or 1)"))
}

/// Reads and checks every `TWINPAGE_*` variable.
pub fn from_env() -> Result<Config, String> {
    let mut vars = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Ok(k) = k.into_string() else { continue };
        match v.into_string() {
            Ok(v) => vars.push((k, v)),
            Err(v) if k.starts_with("TWINPAGE_") => return Err(format!("{k}={v:?} is not valid UTF-8")),
            Err(_) => {}
        }
    }
    from_vars(vars)
}

/// [`from_env`] over given pairs.
pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, String> {
    let mut dir = PathBuf::from("/run/twinpage");
    let mut socket = None;
    let mut socket_off = false;
    let mut c = Config {
        dir: PathBuf::new(),
        socket: None,
        log: "warn".into(),
        pass_mergeable: false,
        merge_any: false,
        redirect_sysfs: false,
        domain: None,
        store_dir: None,
        tunables: Vec::new(),
        explicit: Vec::new(),
    };
    // The values are applied, in order, to the model the engine starts from:
    // each is judged as the kernel would judge that write after the ones
    // before it (pages_to_scan is refused once advisor_mode is scan-time).
    let mut model = crate::tunables::default_model();
    let mut vars: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| k.starts_with("TWINPAGE_")).collect();
    vars.sort();
    for (k, v) in vars {
        let name = &k["TWINPAGE_".len()..];
        match name {
            "SOCKET" if v == "off" => socket_off = true,
            "DIR" | "SOCKET" => {
                if !v.starts_with('/') {
                    return Err(format!("{k}={v:?} must be an absolute path"));
                }
                if name == "DIR" {
                    dir = PathBuf::from(&v);
                } else {
                    socket = Some(PathBuf::from(&v));
                }
            }
            "LOG" => {
                let lv = v.to_ascii_lowercase();
                if !["off", "error", "warn", "info", "debug", "trace"].contains(&lv.as_str()) {
                    return Err(format!("{k}={v:?}: use off, error, warn, info, debug or trace"));
                }
                c.log = lv;
            }
            "PASS_MERGEABLE" => c.pass_mergeable = flag(&k, &v)?,
            "MERGE_ANY" => c.merge_any = flag(&k, &v)?,
            "REDIRECT_SYSFS" => c.redirect_sysfs = flag(&k, &v)?,
            // Read by the engine itself (`merge::pin::pin_guard_enabled`);
            // checked here so a bad value is named like any other.
            "STORE_DIR" => {
                if !v.starts_with('/') || !std::path::Path::new(&v).is_dir() {
                    return Err(format!("{k}={v:?} must be the absolute path of a directory (on tmpfs)"));
                }
                c.store_dir = Some(PathBuf::from(v));
            }
            "PIN_GUARD" => {
                if crate::merge::pin::PinGuard::parse(&v).is_none() {
                    return Err(format!("{k}={v:?}: use 1 (check what can be checked), strict (merge only that) or 0"));
                }
            }
            "DOMAIN" => {
                if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    return Err(format!("{k}={v:?}: 1-64 characters of [A-Za-z0-9._-]"));
                }
                c.domain = Some(v);
            }
            _ => {
                let attr = name.to_ascii_lowercase();
                match crate::tunables::find_attr(&attr) {
                    Some(a) if a.writable => {
                        if v.is_empty() {
                            return Err(format!("{k} is empty (unset it for the default {:?})", a.default));
                        }
                        crate::tunables::write_into_model(&mut model, &attr, v.as_bytes())
                            .map_err(|e| format!("{k}={v:?} is refused as sysfs refuses it ({})", e.name()))?;
                        c.tunables.push((attr, v));
                    }
                    Some(_) => return Err(format!("{k}: {attr} is read-only")),
                    None => return Err(format!("{k}: unknown twinpage variable")),
                }
            }
        }
    }
    let untouched = crate::tunables::default_model();
    c.explicit = crate::tunables::all_attrs()
        .filter(|a| a.writable)
        .map(|a| a.name)
        .filter(|n| c.tunables.iter().any(|(t, _)| t == n) || model.show(n) != untouched.show(n))
        .map(String::from)
        .collect();
    c.socket = (!socket_off).then(|| socket.unwrap_or_else(|| dir.join("twinpaged.sock")));
    c.dir = dir;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(p: &[(&str, &str)]) -> Result<Config, String> {
        from_vars(p.iter().map(|(a, b)| (a.to_string(), b.to_string())))
    }

    #[test]
    fn good_and_bad() {
        let c = vars(&[("TWINPAGE_PAGES_TO_SCAN", "1000"), ("TWINPAGE_DIR", "/tmp/x"), ("PATH", "/bin")]).unwrap();
        assert_eq!(c.tunables, vec![("pages_to_scan".to_string(), "1000".to_string())]);
        assert_eq!(c.socket, Some(PathBuf::from("/tmp/x/twinpaged.sock")));
        assert_eq!(vars(&[("TWINPAGE_SOCKET", "off")]).unwrap().socket, None);
        assert!(vars(&[("TWINPAGE_SOCKET", "sock")]).unwrap_err().contains("TWINPAGE_SOCKET"));
        assert!(vars(&[("TWINPAGE_DOMAIN", "uid:0")]).unwrap_err().contains("TWINPAGE_DOMAIN"));
        assert!(vars(&[("TWINPAGE_STORE_DIR", "shm")]).unwrap_err().contains("TWINPAGE_STORE_DIR"));
        assert!(vars(&[("TWINPAGE_STORE_DIR", "/nonexistent/dir")]).unwrap_err().contains("TWINPAGE_STORE_DIR"));
        assert_eq!(vars(&[("TWINPAGE_STORE_DIR", "/dev/shm")]).unwrap().store_dir.as_deref(), Some(std::path::Path::new("/dev/shm")));
        assert!(vars(&[("TWINPAGE_PAGES_TO_SCAN", "lots")]).unwrap_err().contains("TWINPAGE_PAGES_TO_SCAN"));
        assert!(vars(&[("TWINPAGE_RUN", "3")]).unwrap_err().contains("EINVAL"));
        assert!(vars(&[("TWINPAGE_DIR", "relative")]).is_err());
        assert!(vars(&[("TWINPAGE_PAGES_SHARED", "1")]).unwrap_err().contains("read-only"));
        assert!(vars(&[("TWINPAGE_TYPO", "1")]).unwrap_err().contains("unknown"));
        assert!(vars(&[("TWINPAGE_LOG", "loud")]).is_err());
        let c = vars(&[("TWINPAGE_TWINPAGE_MERGE_MODE", "zero-only")]).unwrap();
        assert_eq!(c.tunables, vec![("twinpage_merge_mode".to_string(), "zero-only".to_string())]);
        assert!(vars(&[("TWINPAGE_TWINPAGE_MERGE_MODE", "zero")]).unwrap_err().contains("TWINPAGE_TWINPAGE_MERGE_MODE"));
        assert!(vars(&[("TWINPAGE_RUN", "")]).unwrap_err().contains("TWINPAGE_RUN is empty"));
        // Judged in order, as the kernel judges writes: with the advisor on,
        // pages_to_scan is the advisor's.
        let advised = vars(&[("TWINPAGE_ADVISOR_MODE", "scan-time"), ("TWINPAGE_PAGES_TO_SCAN", "1000")]);
        assert!(advised.unwrap_err().contains("TWINPAGE_PAGES_TO_SCAN=\"1000\" is refused as sysfs refuses it (EINVAL)"));
        let c = vars(&[("TWINPAGE_ADVISOR_MIN_PAGES_TO_SCAN", "20000"), ("TWINPAGE_ADVISOR_MODE", "scan-time")]).unwrap();
        assert_eq!(c.tunables.len(), 2);
        // The advisor's switch set pages_to_scan: this process's too.
        assert_eq!(c.explicit, ["advisor_min_pages_to_scan", "advisor_mode", "pages_to_scan"]);
        assert_eq!(vars(&[("TWINPAGE_SLEEP_MILLISECS", "20")]).unwrap().explicit, ["sleep_millisecs"]);
    }
}
