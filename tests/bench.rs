//! The benchmark's smoke test: `gossipfs bench --quick` runs and prints the
//! table and the machine-readable last line. It checks the output's shape
//! only; no test asserts a time.

mod common;

use std::process::Command;

/// Every row of the README's table, by its key on the `bench:` line.
const ROWS: [&str; 24] = [
    "s1_mibps",
    "s1_vs_sha1_mibps",
    "s1_fsync_mibps",
    "s2_mibps",
    "s3_files_per_s",
    "s3_store_p50_ms",
    "s3_store_p99_ms",
    "s4_get_p50_ms",
    "s4_get_p99_ms",
    "s4_get_big_mibps",
    "s4_get_copies_1",
    "s4_get_copies_3",
    "s4_get_copies_5",
    "s5_chain5_store_ms_per_hop",
    "s5_chain5_delete_ms_per_hop",
    "s5_chain10_store_ms_per_hop",
    "s5_chain10_delete_ms_per_hop",
    "s5_chain20_store_ms_per_hop",
    "s5_chain20_delete_ms_per_hop",
    "s5_mesh5_frames",
    "s5_mesh5_copies",
    "s6_peak_rss_mib",
    "s7_folder_ms",
    "s7_folder_limit_ms",
];

#[test]
fn bench_quick_prints_a_table_and_a_machine_readable_last_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_gossipfs"))
        .args(["bench", "--quick"])
        // Its scratch directory where the other tests keep theirs: the
        // figures are not checked, only that every one is there.
        .env("TMPDIR", common::scratch_base())
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
    let value = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{key} is missing from {last:?}"))
            .1
    };
    // Every row has its figure, its baseline and a ratio; and every
    // discovered mesh, its count of links.
    let mut keys = vec!["s5_dmesh5_links".to_string()];
    for row in ROWS
        .iter()
        .map(|row| row.to_string())
        .chain([5, 10, 20].into_iter().map(|n| format!("s5_dmesh{n}_copies")))
    {
        keys.extend([format!("{row}_base"), format!("{row}_ratio"), row]);
    }
    for key in keys {
        let value = value(&key);
        assert!(value.is_finite() && value > 0.0, "{key}={value}");
    }
    // A get moves at least the one copy it returns.
    for holders in [1, 3, 5] {
        assert!(value(&format!("s4_get_copies_{holders}")) >= 1.0, "{last}");
    }

    // The table: a header row, then one row per figure, each with min/med/max
    // for gossipfs and for its baseline, and a ratio.
    assert!(stdout.contains("gossipfs min/med/max"), "{stdout}");
    let rows: Vec<&str> =
        stdout.lines().filter(|line| line.starts_with(|c: char| c.is_ascii_digit())).collect();
    assert_eq!(rows.len(), ROWS.len() + 3, "{stdout}");
    for row in &rows {
        let parts: Vec<&str> = row.split(" | ").collect();
        assert_eq!(parts.len(), 3, "not figure | baseline | ratio: {row:?}");
        let numbers = |part: &str, from_end: usize| {
            let words: Vec<&str> = part.split_whitespace().collect();
            words[words.len().saturating_sub(from_end)..]
                .iter()
                .all(|word| word.parse::<f64>().is_ok())
        };
        assert!(numbers(parts[0], 3) && numbers(parts[1], 3), "not min/med/max: {row:?}");
    }
    for scenario in ["1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 "] {
        assert!(
            rows.iter().any(|line| line.starts_with(scenario)),
            "no row for scenario {scenario}in:\n{stdout}"
        );
    }
    // A quick run puts a smaller folder than the goal is for, and says so.
    assert!(
        stdout.lines().any(|line| line.starts_with("context: quick: the folder put")),
        "{stdout}"
    );
}
