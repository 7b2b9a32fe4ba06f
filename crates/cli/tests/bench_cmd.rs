//! `oclocks bench` end to end: a short run of all three workloads against a
//! real 3-node test cluster, checking the JSON rows. No timing assertions:
//! only that work was done and the safety checks held.

mod common;

use common::Node;

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

fn rows<'a>(report: &'a serde_json::Value, key: &str) -> &'a Vec<serde_json::Value> {
    report
        .get(key)
        .and_then(serde_json::Value::as_array)
        .unwrap_or_else(|| panic!("no array {key:?} in {report}"))
}

#[test]
fn bench_runs_all_workloads_and_reports_json_and_markdown() {
    let node = Node::start(15_000);
    let out = node.cli_output(&[
        "bench",
        "--duration-s",
        "1",
        "--runs",
        "1",
        "--uncontended",
        "2",
        "--contended",
        "2",
        "--failover-trials",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(report["label"], "oclocks");

    let unc = rows(&report, "uncontended");
    assert_eq!(unc.len(), 1, "{report}");
    assert_eq!(num(&unc[0], "c"), 2.0);
    assert!(num(&unc[0], "cycles") > 0.0, "no cycles: {report}");
    assert_eq!(num(&unc[0], "errors"), 0.0, "{report}");

    let con = rows(&report, "contended");
    assert_eq!(con.len(), 1, "{report}");
    assert!(num(&con[0], "handoffs") > 0.0, "no handoffs: {report}");
    assert_eq!(num(&con[0], "violations"), 0.0, "{report}");
    assert_eq!(num(&con[0], "token_regressions"), 0.0, "{report}");
    assert_eq!(num(&con[0], "max_holders"), 1.0, "{report}");

    let fail = rows(&report, "failover");
    assert_eq!(fail.len(), 1, "{report}");
    assert_eq!(num(&fail[0], "early_grants"), 0.0, "{report}");
    assert_eq!(
        num(&fail[0], "trials_ok"),
        1.0,
        "failover trial failed: {report}"
    );
    assert_eq!(num(&fail[0], "granted_ttl_s"), 2.0, "{report}");

    // The markdown report, on the same cluster: lockbench's headers and rows.
    let out = node.cli_output(&[
        "bench",
        "--workloads",
        "uncontended,contended",
        "--duration-s",
        "0.5",
        "--runs",
        "1",
        "--uncontended",
        "1",
        "--contended",
        "2",
        "--label",
        "ours",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for header in [
        "| backend | C | run | cycles/s | acquire p50 | p99 | p99.9 | cycle p50 | p99 | p99.9 | cycles | errors |",
        "| backend | C | run | handoffs/s | wait p50 | p99 | p99.9 | max | handoffs | per-client min/max | max holders | ME violations | errors |",
    ] {
        assert!(stdout.contains(header), "missing {header:?} in:\n{stdout}");
    }
    assert!(stdout.contains("\n| ours | 1 | 1 | "), "{stdout}");
    assert!(stdout.contains("\n| ours | 2 | 1 | "), "{stdout}");

    // The fill workload: static locks that stay held, 50 per session (so
    // sessions are closed and replaced on the way).
    let out = node.cli_output(&[
        "bench",
        "--workloads",
        "fill",
        "--fill-locks",
        "200",
        "--fill-clients",
        "2",
        "--fill-pipeline",
        "4",
        "--fill-per-session",
        "50",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench fill failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr: {stderr}"));
    let fill = rows(&report, "fill");
    assert_eq!(fill.len(), 1, "{report}");
    assert_eq!(num(&fill[0], "locks_taken"), 200.0, "{report}");
    assert_eq!(num(&fill[0], "errors"), 0.0, "{report}");
    assert!(num(&fill[0], "sessions") >= 4.0, "{report}");
    // The locks outlive the bench's sessions.
    let out = node.cli_output(&["locks"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listed.lines().filter(|l| l.contains("/fill/")).count(),
        200,
        "{listed}"
    );
}
