//! Acceptance test of throughput against a real single-node server process
//! (issue 4, item 7): 10,000 acquire/release cycles from 16 concurrent
//! tasks of the Rust client pass with no error. The rate is printed, not
//! asserted (it depends on the build profile and the machine).

mod common;

use std::time::{Duration, Instant};

use common::Node;
use oclocks_client::{Client, ClientConfig};

const TASKS: usize = 16;
const CYCLES: usize = 10_000;

/// One `Client` (one session, one pipelined TLS connection) shared by 16
/// tokio tasks; each task runs 625 cycles of acquire (exclusive connection
/// lock, wait bound 30 s) and release of its own lock name
/// (`throughput-0` .. `throughput-15`), so all 16 tasks' requests are in
/// flight on the one connection together. Every acquire and every release
/// must succeed (no release finds its grant already released), the tokens
/// each task receives must strictly increase, no lock is left held or
/// waited on, and the session is never replaced. Prints cycles per second.
#[test]
fn ten_thousand_acquire_release_cycles_from_16_tasks_without_error() {
    let node = Node::start(15_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let config = ClientConfig::from_file(&node.client_config).expect("client config");
        let client = Client::connect(config).await.expect("connect");
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let client = client.clone();
                let name = format!("throughput-{t}");
                tokio::spawn(async move {
                    let mut last = 0_u64;
                    for i in 0..CYCLES / TASKS {
                        let guard = client
                            .lock("default", name.as_str())
                            .wait(Duration::from_secs(30))
                            .acquire()
                            .await
                            .map_err(|e| format!("task {t} cycle {i}: acquire {name}: {e}"))?;
                        let token = guard.token();
                        if token <= last {
                            return Err(format!("task {t} cycle {i}: token {token} after {last}"));
                        }
                        last = token;
                        let outcome = guard
                            .release()
                            .await
                            .map_err(|e| format!("task {t} cycle {i}: release {name}: {e}"))?;
                        if outcome.already_released {
                            return Err(format!(
                                "task {t} cycle {i}: release of token {token} found it already \
                                 released"
                            ));
                        }
                    }
                    Ok::<usize, String>(CYCLES / TASKS)
                })
            })
            .collect();
        let mut done = 0;
        let mut errors = Vec::new();
        for task in tasks {
            match task.await.expect("task panicked") {
                Ok(n) => done += n,
                Err(e) => errors.push(e),
            }
        }
        let elapsed = started.elapsed();
        assert!(
            errors.is_empty(),
            "{} task(s) failed: {errors:#?}",
            errors.len()
        );
        assert_eq!(done, CYCLES);
        println!(
            "item 7: {done} acquire/release cycles from {TASKS} tasks sharing one client \
             (one lock name per task) in {elapsed:.2?}: {:.0} cycles/s",
            done as f64 / elapsed.as_secs_f64()
        );

        let page = client.list("default", None, 0).await.expect("list");
        assert!(
            page.locks.is_empty(),
            "locks left held or waited on: {:?}",
            page.locks
        );
        let session = client.session();
        assert_eq!(
            session.new_sessions, 1,
            "the session was replaced: {session:?}"
        );
        println!("item 7: connections made: {}", session.connects);
        client.close().await.expect("close");
    });
}
