//! `result.json`, `result.md` and `saved.svg`, written by hand.

use std::fmt::Write as _;

use super::{BenchArgs, SideResult};

pub struct Report<'a> {
    pub args: &'a BenchArgs,
    pub sides: &'a [SideResult],
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("null".into(), num)
}

const MIB_PER_PAGE: f64 = 4096.0 / (1u64 << 20) as f64;

impl Report<'_> {
    fn side(&self, name: &str) -> Option<&SideResult> {
        self.sides.iter().find(|s| s.side == name)
    }

    fn time_label(s: &SideResult) -> String {
        if s.time_to(1.0).is_some() {
            String::new()
        } else if s.timed_out {
            " (timed out)".into()
        } else {
            " (plateau)".into()
        }
    }

    /// Time to 100%, or to the plateau/timeout when 100% was not reached.
    fn time_full(s: &SideResult) -> f64 {
        s.time_to(1.0).unwrap_or_else(|| s.get("converge_s"))
    }

    pub fn json(&self) -> String {
        let a = self.args;
        let mut j = String::from("{\n");
        let _ = writeln!(
            j,
            "  \"params\": {{\"workload\": \"{}\", \"size_bytes\": {}, \"dup_percent\": {}, \"patterns\": {}, \"run_pages\": {}, \"volatile_percent\": {}, \"pages_to_scan\": {}, \"sleep_millisecs\": {}, \"use_zero_pages\": {}, \"raise_max_map_count\": {}, \"guests\": {}, \"no_daemon\": {}, \"advisor_target_scan_time\": {}, \"advisor_max_cpu\": {}}},",
            a.workload.as_str(),
            a.size,
            a.dup_percent,
            a.patterns,
            a.run_pages,
            a.volatile_percent,
            a.pages_to_scan,
            a.sleep_millisecs,
            a.use_zero_pages,
            a.raise_max_map_count.map_or("null".into(), |v| v.to_string()),
            a.guests,
            a.no_daemon,
            a.advisor_target_scan_time.map_or("null".into(), |v| v.to_string()),
            a.advisor_max_cpu.map_or("null".into(), |v| v.to_string())
        );
        j.push_str("  \"sides\": {\n");
        for (i, s) in self.sides.iter().enumerate() {
            let _ = writeln!(j, "    \"{}\": {{", s.side);
            let _ = writeln!(j, "      \"loadavg\": \"{}\",", s.loadavg);
            let _ = writeln!(j, "      \"achievable_pages\": {},", s.expected);
            let _ = writeln!(j, "      \"final_saved_pages\": {},", s.final_saved());
            let _ = writeln!(j, "      \"reached_100\": {},", s.time_to(1.0).is_some());
            let _ = writeln!(j, "      \"timed_out\": {},", s.timed_out);
            let _ = writeln!(j, "      \"time_to_50_s\": {},", opt(s.time_to(0.5)));
            let _ = writeln!(j, "      \"time_to_90_s\": {},", opt(s.time_to(0.9)));
            let _ = writeln!(j, "      \"time_to_100_s\": {},", opt(s.time_to(1.0)));
            for (k, v) in &s.values {
                let _ = writeln!(j, "      \"{k}\": {},", num(*v));
            }
            j.push_str("      \"samples\": [");
            for (n, (t, v)) in s.samples.iter().enumerate() {
                if n > 0 {
                    j.push_str(", ");
                }
                let _ = write!(j, "[{t}, {v}]");
            }
            j.push_str("]\n");
            j.push_str(if i + 1 < self.sides.len() { "    },\n" } else { "    }\n" });
        }
        j.push_str("  }\n}\n");
        j
    }

    pub fn markdown(&self) -> String {
        let a = self.args;
        let mut m = String::new();
        let _ = writeln!(m, "{}\n", a.settings());
        if let Some(t) = a.advisor_target_scan_time {
            let cpu = a.advisor_max_cpu.map_or(String::new(), |c| format!(", advisor_max_cpu={c}"));
            let _ = writeln!(m, "advisor_mode=scan-time, advisor_target_scan_time={t}{cpu} (pages_to_scan above is overridden: the advisor chooses it, from advisor_min_pages_to_scan on)\n");
        }
        if a.workload == super::Workload::Qemu {
            let _ = writeln!(
                m,
                "{} guests, twinpage {}\n",
                a.guests,
                if a.no_daemon { "without a daemon (each QEMU merges its own pages)" } else { "under a private twinpaged" }
            );
        }
        let loads: Vec<String> = self.sides.iter().map(|s| format!("{} side {}", s.side, s.loadavg)).collect();
        let _ = writeln!(m, "/proc/loadavg at the start of each side (the machine is shared): {}\n", loads.join("; "));
        let k = self.side("kernel");
        let t = self.side("twinpage");
        let _ = writeln!(m, "| measure | kernel KSM | twinpage | twinpage/kernel |");
        let _ = writeln!(m, "|---|---|---|---|");
        let cell = |s: Option<&SideResult>, f: &dyn Fn(&SideResult) -> f64, prec: usize| {
            s.map(f).filter(|v| v.is_finite()).map_or("-".to_string(), |v| format!("{v:.prec$}"))
        };
        let mut row = |name: &str, f: &dyn Fn(&SideResult) -> f64, prec: usize, suffix: &dyn Fn(&SideResult) -> String| {
            let kv = k.map(f).unwrap_or(f64::NAN);
            let tv = t.map(f).unwrap_or(f64::NAN);
            if !kv.is_finite() && !tv.is_finite() {
                return; // not measured for this workload
            }
            let ratio = if kv.is_finite() && tv.is_finite() && kv > 0.0 && tv >= 0.0 { format!("{:.2}x", tv / kv) } else { "-".into() };
            let ks = k.map(suffix).unwrap_or_default();
            let ts = t.map(suffix).unwrap_or_default();
            let _ = writeln!(m, "| {name} | {}{ks} | {}{ts} | {ratio} |", cell(k, f, prec), cell(t, f, prec));
        };
        let none = |_: &SideResult| String::new();
        let achievable = if a.workload == super::Workload::Qemu {
            "achievable sharing (pages; the kernel's steady state)"
        } else {
            "achievable sharing (pages)"
        };
        row(achievable, &|s| s.expected as f64, 0, &none);
        row("time to 50% (s)", &|s| s.time_to(0.5).unwrap_or(f64::NAN), 2, &none);
        row("time to 90% (s)", &|s| s.time_to(0.9).unwrap_or(f64::NAN), 2, &none);
        row("time to 100% (s)", &Self::time_full, 2, &Self::time_label);
        row("guests' buffers filled (s after launch)", &|s| s.get("guests_ready_s"), 2, &none);
        row("time to 100% after the buffers were filled (s)", &|s| Self::time_full(s) - s.get("guests_ready_s"), 2, &Self::time_label);
        row("CPU of merging threads (s)", &|s| s.get("cpu_s"), 2, &none);
        row("of which twinpaged (s)", &|s| s.get("daemon_cpu_s"), 2, &none);
        if self.sides.iter().any(|s| s.values.contains_key("idle_cpu_s")) {
            let secs = self.sides.iter().map(|s| s.get("idle_secs")).find(|v| v.is_finite()).unwrap_or(f64::NAN);
            row(&format!("CPU while idle, {secs:.0} s after convergence (s)"), &|s| s.get("idle_cpu_s"), 3, &none);
            row("full scans while idle", &|s| s.get("idle_full_scans"), 0, &none);
        }
        row("pages_shared", &|s| s.get("pages_shared"), 0, &none);
        row("pages_sharing (+ksm_zero_pages)", &|s| s.get("pages_sharing") + s.get("ksm_zero_pages"), 0, &none);
        row("saved, counters (MiB)", &|s| s.final_saved() as f64 * MIB_PER_PAGE, 1, &none);
        row("saved, PSS drop (MiB)", &|s| s.get("pss_saved_kb") / 1024.0, 1, &none);
        if self.sides.iter().any(|s| s.values.contains_key("qemu_pss_total_kb")) {
            row("PSS of all QEMUs at the end (MiB)", &|s| s.get("qemu_pss_total_kb") / 1024.0, 1, &none);
            for i in 0..a.guests {
                row(&format!("guest {} PSS at the end (MiB)", i + 1), &|s| s.get(&format!("guest{i}_pss_kb")) / 1024.0, 1, &none);
                row(&format!("guest {} ksm_merging_pages", i + 1), &|s| s.get(&format!("guest{i}_ksm_merging_pages")), 0, &none);
            }
        }
        row("saved, MemAvailable gain (MiB)", &|s| s.get("memavailable_gain_kb") / 1024.0, 1, &none);
        row("Shmem growth (MiB; twinpage's store is shmem)", &|s| s.get("shmem_gain_kb") / 1024.0, 1, &none);
        row("twinpage store allocated (MiB)", &|s| s.get("store_allocated_kb") / 1024.0, 1, &none);
        row("metadata bytes per scanned page", &|s| s.get("metadata_bytes_per_page"), 1, &|s| {
            if s.side == "kernel" {
                " (rmap_item)".into()
            } else {
                String::new()
            }
        });
        row("mappings added", &|s| s.get("mappings_added"), 0, &none);
        row("map count after", &|s| s.get("map_count_after"), 0, &none);
        row("merges held back (map budget)", &|s| s.get("merges_held_back"), 0, &none);
        // Pages with a twin are written; when not all merged, some writes hit unmerged pages.
        let partly = |s: &SideResult| {
            let f = s.final_saved() as f64 / s.expected.max(1) as f64;
            if f < 0.99 {
                format!(" (only {:.0}% merged)", f * 100.0)
            } else {
                String::new()
            }
        };
        row("first write to merged page p50 (µs)", &|s| s.get("first_write_p50_us"), 2, &partly);
        row("first write to merged page p99 (µs)", &|s| s.get("first_write_p99_us"), 2, &partly);
        // The workload's own slowdown: a worker thread's passes (or the
        // guests' verify pass) while merging against a no-merging baseline.
        if self.sides.iter().any(|s| s.values.contains_key("guest_verify_ms")) {
            row("guest verify pass, no merging (ms, median)", &|s| s.get("guest_verify_ms_alone"), 1, &none);
            row("guest verify pass, merger running (ms, median)", &|s| s.get("guest_verify_ms"), 1, &none);
            row("workload slowdown while merging (x)", &|s| s.get("guest_verify_ms") / s.get("guest_verify_ms_alone"), 2, &none);
        } else {
            row("workload passes/s, no merging", &|s| s.get("workload_passes_per_s_alone"), 1, &none);
            row("workload passes/s while merging", &|s| s.get("workload_passes_per_s_merging"), 1, &none);
            row(
                "workload slowdown while merging (x)",
                &|s| s.get("workload_passes_per_s_alone") / s.get("workload_passes_per_s_merging"),
                2,
                &none,
            );
        }
        let passes: Vec<String> = self
            .sides
            .iter()
            .filter(|s| s.values.contains_key("guest_verify_passes"))
            .map(|s| format!("{} side {} passes, {} with wrong data", s.side, s.get("guest_verify_passes"), s.get("guest_failures")))
            .collect();
        if !passes.is_empty() {
            let _ = writeln!(m, "\nguests' own verification of their buffers: {}", passes.join("; "));
        }
        m
    }

    pub fn svg(&self) -> String {
        let (w, h) = (720.0, 400.0);
        let (l, r, top, bot) = (70.0, 20.0, 40.0, 50.0);
        let tmax = self.sides.iter().filter_map(|s| s.samples.last().map(|x| x.0)).fold(0.1f64, f64::max);
        let expected = self.sides.iter().map(|s| s.expected).max().unwrap_or(0);
        let ymax = self.sides.iter().flat_map(|s| s.samples.iter().map(|x| x.1)).chain([expected]).max().unwrap_or(1).max(1) as f64
            * MIB_PER_PAGE
            * 1.05;
        let x = |t: f64| l + (w - l - r) * t / tmax;
        let y = |mib: f64| top + (h - top - bot) * (1.0 - mib / ymax);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">"
        );
        let _ = writeln!(s, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">memory saved over time: {} {} MiB, pages_to_scan={} sleep_millisecs={}</text>",
            w / 2.0,
            self.args.workload.as_str(),
            self.args.size >> 20,
            self.args.pages_to_scan,
            self.args.sleep_millisecs
        );
        // Axes and ticks.
        let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", h - bot, w - r, h - bot);
        let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{top}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>", h - bot);
        for i in 0..=5 {
            let t = tmax * i as f64 / 5.0;
            let _ = writeln!(s, "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#ddd\"/>", x(t), top, h - bot);
            let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{t:.2}</text>", x(t), h - bot + 16.0);
            let v = ymax * i as f64 / 5.0;
            let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/>", y(v), w - r);
            let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>", l - 6.0, y(v) + 4.0);
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            (l + w - r) / 2.0,
            h - 12.0,
            if self.args.workload == super::Workload::Qemu {
                "seconds since the guests were launched"
            } else {
                "seconds since madvise / register"
            }
        );
        let _ = writeln!(
            s,
            "<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">MiB saved</text>",
            (top + h - bot) / 2.0,
            (top + h - bot) / 2.0
        );
        // Achievable sharing.
        let ye = y(expected as f64 * MIB_PER_PAGE);
        let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{ye}\" x2=\"{}\" y2=\"{ye}\" stroke=\"#888\" stroke-dasharray=\"4 4\"/>", w - r);
        let what = if self.args.workload == super::Workload::Qemu { "kernel's steady state" } else { "achievable" };
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#666\">{what}</text>", w - r - 4.0, ye - 4.0);
        for (i, side) in self.sides.iter().enumerate() {
            let color = if side.side == "kernel" { "#d62728" } else { "#1f77b4" };
            let mut pts = format!("{},{}", x(0.0), y(0.0));
            for &(t, v) in &side.samples {
                let _ = write!(pts, " {:.1},{:.1}", x(t), y(v as f64 * MIB_PER_PAGE));
            }
            let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{pts}\"/>");
            // Bottom right: the curves rise from the bottom left, so it stays clear.
            let (lx, ly) = (w - r - 170.0, h - bot - 46.0 + 18.0 * i as f64);
            let _ = writeln!(s, "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>", lx + 24.0);
            let label = if side.side == "kernel" { "kernel KSM (ksmd)" } else { "twinpage" };
            let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{label}</text>", lx + 30.0, ly + 4.0);
        }
        s.push_str("</svg>\n");
        s
    }
}
