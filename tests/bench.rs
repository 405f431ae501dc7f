//! The benchmark's smoke test: `gossipfs bench --quick` runs and prints the
//! table and the machine-readable last line. It checks the output's shape
//! only; no test asserts a time.

use std::process::Command;

#[test]
fn bench_quick_prints_a_table_and_a_machine_readable_last_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_gossipfs"))
        .args(["bench", "--quick"])
        .output()
        .expect("run gossipfs bench --quick");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));

    let last = stdout.lines().last().expect("bench printed something");
    let fields = last
        .strip_prefix("bench: ")
        .unwrap_or_else(|| panic!("the last line is not a bench: line: {last:?}"));
    let pairs: Vec<(&str, f64)> = fields
        .split(' ')
        .map(|pair| {
            let (key, value) =
                pair.split_once('=').unwrap_or_else(|| panic!("not key=value: {pair:?}"));
            let value =
                value.parse().unwrap_or_else(|_| panic!("{key} is not a number: {value:?}"));
            (key, value)
        })
        .collect();
    // Every scenario of the issue has its figure, its baseline and a ratio.
    for key in [
        "s1_mibps",
        "s1_mibps_base",
        "s1_mibps_ratio",
        "s1_fsync_mibps_ratio",
        "s2_mibps_ratio",
        "s3_files_per_s_ratio",
        "s3_store_p50_ms",
        "s3_store_p99_ms",
        "s4_get_p50_ms",
        "s4_get_p99_ms",
        "s4_get_big_mibps",
        "s5_chain5_store_ms_per_hop",
        "s5_chain20_delete_ms_per_hop",
        "s5_mesh5_frames",
        "s6_peak_rss_mib",
        "s7_folder_ms",
        "s7_folder_ms_ratio",
    ] {
        let value = pairs
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{key} is missing from {last:?}"))
            .1;
        assert!(value.is_finite() && value > 0.0, "{key}={value}");
    }
    // The table: a header row and one row per figure, each with min/med/max
    // for gossipfs and for its baseline.
    assert!(stdout.contains("gossipfs min/med/max"), "{stdout}");
    for scenario in ["1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 "] {
        assert!(
            stdout.lines().any(|line| line.starts_with(scenario)),
            "no row for scenario {scenario}in:\n{stdout}"
        );
    }
    // A quick run puts a smaller folder than the goal is for, and says so.
    assert!(
        stdout.lines().any(|line| line.starts_with("context: quick: the folder put")),
        "{stdout}"
    );
}
